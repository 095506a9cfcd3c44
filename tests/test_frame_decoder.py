"""FrameDecoder: framing, limits, resynchronisation, \\r\\n and empty lines."""

from __future__ import annotations

import json
import time

import pytest

from messagerie import (
    MAX_FRAME,
    FrameDecoder,
    FrameError,
    Message,
    Notification,
    Reason,
    codec,
    encode,
)

MSG = Notification("vm-sys-usb", "vm-ui", "entree", "souris",
                   {"entree": "souris", "position": {"x": 1, "y": 2}})
LINE = encode(MSG)  # with its \n
FRAME = LINE[:-1]


def messages(out: list[Message | FrameError]) -> list[Message]:
    assert all(isinstance(o, Message) for o in out), out
    return [o for o in out if isinstance(o, Message)]


def padded(size: int) -> bytes:
    """A valid frame of exactly ``size`` bytes (padding in an unknown payload key)."""
    base = len(encode(Notification("vm-a", "vm-b", "c", "e", {"p": ""}))) - 1
    msg = Notification("vm-a", "vm-b", "c", "e", {"p": "x" * (size - base)})
    line = encode(msg)[:-1]
    assert len(line) == size
    return line


def test_default_limit() -> None:
    assert MAX_FRAME == 65536
    assert FrameDecoder().max_frame == MAX_FRAME


@pytest.mark.parametrize("bad", [0, -1])
def test_limit_must_be_positive(bad: int) -> None:
    with pytest.raises(ValueError):
        FrameDecoder(bad)


def test_one_frame_in_one_feed() -> None:
    d = FrameDecoder()
    out = messages(d.feed(LINE))
    assert out == [MSG] and out[0].raw == FRAME
    assert d.buffered == 0


def test_several_frames_in_one_feed() -> None:
    assert messages(FrameDecoder().feed(LINE * 3)) == [MSG] * 3


def test_byte_by_byte() -> None:
    d = FrameDecoder()
    out: list[Message | FrameError] = []
    for i in range(len(LINE)):
        out += d.feed(LINE[i:i + 1])
        assert d.buffered == (i + 1) % len(LINE)
    assert messages(out) == [MSG]


def test_incomplete_frame_waits() -> None:
    d = FrameDecoder()
    assert d.feed(FRAME) == []
    assert d.buffered == len(FRAME)
    assert messages(d.feed(b"\n")) == [MSG]
    assert d.buffered == 0


def test_crlf_and_empty_lines() -> None:
    d = FrameDecoder()
    out = messages(d.feed(b"\n\r\n\n" + FRAME + b"\r\n\r\n" + FRAME + b"\r"))
    assert out == [MSG]
    assert out[0].raw == FRAME  # the \r is not part of the frame
    assert messages(d.feed(b"\n")) == [MSG]
    assert d.feed(b"\n" * 1000 + b"\r\n" * 1000) == []


def test_bad_frame_then_good_frame() -> None:
    out = FrameDecoder().feed(b'{"type":\n' + LINE + b"not json\n" + LINE)
    assert [type(o).__name__ for o in out] == [
        "FrameError", "Notification", "FrameError", "Notification"]
    first, third = out[0], out[2]
    assert isinstance(first, FrameError) and isinstance(third, FrameError)
    assert first.reason is third.reason is Reason.INVALID_JSON
    assert first.size == len(b'{"type":') and first.excerpt == b'{"type":'


def test_frame_error_names_the_field() -> None:
    bad = FRAME.replace(b'"souris"', b'"sou ris"', 1)
    out = FrameDecoder().feed(bad + b"\n")
    assert len(out) == 1 and isinstance(out[0], FrameError)
    err = out[0]
    assert (err.reason, err.field) == (Reason.BAD_VALUE, "payload.evenement")
    assert str(err).startswith("bad_value: payload.evenement: ")
    assert err.size == len(bad)


def test_excerpt_is_bounded() -> None:
    out = FrameDecoder().feed(b"x" * 1000 + b"\n")
    assert isinstance(out[0], FrameError) and out[0].excerpt == b"x" * 64


def test_frame_at_the_limit_is_accepted() -> None:
    line = padded(300)
    d = FrameDecoder(max_frame=300)
    assert len(messages(d.feed(line + b"\n"))) == 1
    assert len(messages(d.feed(line + b"\r\n"))) == 1  # the \r does not count
    for b in line + b"\r":  # fed byte by byte: buffered reaches max_frame + 1, no more
        assert d.feed(bytes([b])) == []
        assert d.buffered <= 301
    assert len(messages(d.feed(b"\n"))) == 1


@pytest.mark.parametrize("chunk", [1, 7, 301, 302, 10_000])
def test_frame_over_the_limit_is_refused_once(chunk: int) -> None:
    big = padded(301)
    stream = big + b"\n" + padded(300) + b"\n" + padded(5000) + b"\r\n" + LINE
    d = FrameDecoder(max_frame=300)
    out: list[Message | FrameError] = []
    for i in range(0, len(stream), chunk):
        out += d.feed(stream[i:i + chunk])
        assert d.buffered <= 301
    kinds = [o.reason if isinstance(o, FrameError) else "ok" for o in out]
    assert kinds == [Reason.TOO_LARGE, "ok", Reason.TOO_LARGE, "ok"]
    assert out[-1] == MSG
    err = out[0]
    assert isinstance(err, FrameError) and err.excerpt == big[:64] and err.size >= 301
    assert "300" in err.detail


def test_discarding_spans_many_feeds() -> None:
    d = FrameDecoder(max_frame=200)
    out = d.feed(b"{" * 202)
    assert [o.reason for o in out if isinstance(o, FrameError)] == [Reason.TOO_LARGE]
    for _ in range(100):
        assert d.feed(b"a" * 1000) == []
        assert d.buffered == 0
    assert messages(d.feed(b"tail\n" + LINE)) == [MSG]


def test_decoder_state_is_per_instance() -> None:
    a, b = FrameDecoder(), FrameDecoder()
    a.feed(FRAME[:10])
    assert b.feed(LINE) == [MSG]
    assert messages(a.feed(FRAME[10:] + b"\n")) == [MSG]


def test_unexpected_exception_in_a_frame_becomes_an_error() -> None:
    def boom(line: bytes) -> Message:
        raise RuntimeError("bug")

    out = FrameDecoder(decode=boom).feed(LINE + LINE)
    assert [o.reason for o in out if isinstance(o, FrameError)] == [Reason.INVALID_JSON] * 2


def test_a_failing_batch_falls_back_on_each_frame() -> None:
    calls: list[list[bytes]] = []

    def batch(lines: list[bytes]) -> list[Message] | None:
        calls.append(lines)
        if len(calls) == 1:
            return None  # "cannot": each frame is decoded instead
        raise RuntimeError("bug")  # a bug in the batch must not break the stream either

    d = FrameDecoder(decode=codec.decode, batch=batch)
    assert messages(d.feed(LINE + LINE)) == [MSG, MSG]
    assert messages(d.feed(LINE)) == [MSG]
    assert calls == [[FRAME, FRAME], [FRAME]]


def test_batch_never_sees_an_oversize_frame() -> None:
    seen: list[list[bytes]] = []

    def batch(lines: list[bytes]) -> list[Message] | None:
        seen.append(lines)
        return None

    d = FrameDecoder(len(FRAME), decode=codec.decode, batch=batch)
    out = d.feed(LINE + b"x" * (len(FRAME) + 1) + b"\n" + LINE)
    assert [type(o) for o in out] == [type(MSG), FrameError, type(MSG)]
    assert seen == []


def test_output_is_json_compatible_message() -> None:
    msg = messages(FrameDecoder().feed(LINE))[0]
    assert json.loads(msg.raw or b"") == msg.to_dict()


def test_a_frame_trickled_in_small_pieces_costs_its_size_not_its_square() -> None:
    # A hostile domain may send a large frame 4 KiB at a time: each read must not copy
    # or rescan what is already buffered. A complexity guard, not a benchmark: the
    # linear decoder takes about a millisecond here, a quadratic one (joining the
    # buffer on every read) several seconds; the bound leaves 1000x of headroom.
    decoder = FrameDecoder(max_frame=16 * 1024 * 1024)
    chunk = b"x" * 4096
    started = time.process_time()
    for _ in range(2048):
        assert decoder.feed(chunk) == []
    elapsed = time.process_time() - started
    assert decoder.buffered == 2048 * 4096
    (error,) = decoder.feed(b'"}\n')
    assert isinstance(error, FrameError) and error.reason is Reason.INVALID_JSON
    assert elapsed < 1.0, f"8 MiB in 4 KiB reads took {elapsed:.2f} s of CPU"


def test_a_line_refused_again_is_not_decoded_again() -> None:
    # A flood of one junk line costs one decode per read, not one per line: the same
    # bytes get the same refusal (decode's verdict is a function of the bytes): the
    # last line refused is remembered, valid frames are decoded each time.
    calls: list[bytes] = []

    def decode(line: bytes) -> bytes:
        calls.append(line)
        if line.startswith(b"x"):
            raise codec.MessageInvalide(Reason.INVALID_JSON, f"not {line!r}")
        return line

    d = FrameDecoder[bytes](MAX_FRAME, decode=decode)
    out = d.feed(b"x\n" * 100 + b"ok\nok\n" + b"x\n" * 3 + b"xy\nx\r\n")
    assert calls == [b"x", b"ok", b"ok", b"xy", b"x"]
    errors = [o for o in out if isinstance(o, FrameError)]
    assert len(out) == 107 and len(errors) == 105
    alone = d.feed(b"x\n")[0]  # what each of them is, decoded on its own
    assert {e for e in errors if e.excerpt == b"x"} == {alone}
    assert out[100:102] == [b"ok", b"ok"] and out[105].excerpt == b"xy"
