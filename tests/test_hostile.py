"""A hostile corpus: each bad frame gives one clear per-frame error, nothing escapes, and
the channel keeps working (the valid frame after it decodes)."""

from __future__ import annotations

import time
from typing import Final

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from messagerie import (
    MAX_DEPTH,
    FrameDecoder,
    FrameError,
    Message,
    MessageInvalide,
    Notification,
    Reason,
    decode,
    encode,
)
from messagerie.codec import _depth, _steps, nesting_depth
from messagerie.envelope import decode_envelope
from tests.support.corpus import CORPUS, OK, notif


@pytest.mark.parametrize(("line", "reason", "field"), [c[1:] for c in CORPUS],
                         ids=[c[0] for c in CORPUS])
def test_decode_gives_a_clear_error(line: bytes, reason: Reason, field: str | None) -> None:
    with pytest.raises(MessageInvalide) as exc:
        decode(line)
    assert (exc.value.reason, exc.value.field) == (reason, field)
    assert exc.value.detail
    assert len(str(exc.value)) < 400  # never echoes a huge frame back into the logs


@pytest.mark.parametrize(("line", "reason", "field"), [c[1:] for c in CORPUS],
                         ids=[c[0] for c in CORPUS])
@pytest.mark.parametrize("ending", [b"\n", b"\r\n"])
def test_channel_survives(line: bytes, reason: Reason, field: str | None,
                          ending: bytes) -> None:
    d = FrameDecoder(max_frame=1 << 20)
    out = d.feed(OK + line + ending + OK)
    assert len(out) == 3, out
    assert isinstance(out[0], Message) and isinstance(out[2], Message)
    err = out[1]
    assert isinstance(err, FrameError)
    assert (err.reason, err.field) == (reason, field)
    assert len(err.excerpt) <= 64
    assert d.buffered == 0


def test_whole_corpus_on_one_channel_fed_in_odd_chunks() -> None:
    stream = b"".join(OK + c[1] + b"\n" for c in CORPUS) + OK
    d = FrameDecoder(max_frame=1 << 20)
    out: list[Message | FrameError] = []
    for i in range(0, len(stream), 4093):
        out += d.feed(stream[i:i + 4093])
    assert [o.reason for o in out if isinstance(o, FrameError)] == [c[2] for c in CORPUS]
    assert sum(isinstance(o, Message) for o in out) == len(CORPUS) + 1


@pytest.mark.parametrize("data", [
    b'{"v":"a\\u0000b"}', b'{"v":' + b"1" * 100 + b"}", b'{"v":-0}', b'{"v":1E+2}',
    b'{"v":"\\ud83d\\ude00"}', b'{"": ""}', b'{"__proto__":1,"constructor":2}',
    b'{"v":' + b"[" * 61 + b"]" * 61 + b"}",  # MAX_DEPTH: frame, payload, data, 61 arrays
    b'{"v":"' + b"[" * 1000 + b'{"}',  # brackets in a string do not nest
])
def test_odd_but_valid_json_is_accepted(data: bytes) -> None:
    msg = decode(notif(data))
    assert isinstance(msg, Notification)
    assert FrameDecoder().feed(notif(data) + b"\n" + OK) == [msg, decode(OK)]


def test_nesting_limit_is_the_protocols_own() -> None:
    # Parsers give up at depths that vary with the Python version (about 1000 on 3.11,
    # 10 000 on 3.13) and the caller's stack: the protocol's own limit decides first,
    # exactly at MAX_DEPTH, whatever the depth, the kind of bracket or the decoder.
    for depth in [*range(1, 200), 999, 1000, 1500, 10_001, 30_000]:
        for open_, close in ((b"[", b"]"), (b'{"a":', b"}")):
            line = notif(b'{"v": ' + open_ * depth + b"1" * (open_ == b'{"a":')
                         + close * depth + b"}")
            ok = 3 + depth <= MAX_DEPTH
            for check in (decode, decode_envelope):
                try:
                    check(line)
                    assert ok, (depth, check)
                except MessageInvalide as exc:
                    assert not ok, (depth, check, exc)
                    assert exc.reason is Reason.INVALID_JSON
                    assert "nested too deeply" in exc.detail


def test_nesting_limit_is_exact_for_compact_frames_of_known_names() -> None:
    # Compact frames from names already seen take the fast paths, which skip the count
    # when a frame is too short to nest past the limit (in the contents, in an unknown
    # payload key): exact there too, at every depth, for each kind with contents.
    frames = [
        (3, b'{"type":"notification","source":"a","destination":"b","payload":'
            b'{"categorie":"c","evenement":"e","data":{"v":%s}}}'),
        (2, b'{"type":"notification","source":"a","destination":"b","payload":'
            b'{"categorie":"c","evenement":"e","x":%s}}'),
        (3, b'{"type":"commande","source":"a","destination":"b","payload":'
            b'{"id":"1","commande":"c","arguments":{"v":%s}}}'),
        (2, b'{"type":"reponse","source":"a","destination":"b","payload":'
            b'{"id":"1","commande":"c","statut":"ok","resultat":%s}}'),
    ]
    for above, frame in frames:
        for check in (decode, decode_envelope):
            check(frame % b"1")  # the names are known from now on
            for depth in range(1, 70):
                for contents in (b"[" * depth + b"]" * depth,
                                 b'{"a":' * depth + b"1" + b"}" * depth):
                    try:
                        check(frame % contents)
                        assert above + depth <= MAX_DEPTH, (frame, depth, check)
                    except MessageInvalide as exc:
                        assert above + depth > MAX_DEPTH, (frame, depth, check, exc)
                        assert "nested too deeply" in exc.detail


def _nested(depth: int, width: int) -> bytes:
    return b"[" * depth + b"[]" * width + b"]" * depth


@settings(max_examples=400, deadline=None)
@given(st.one_of(
    st.binary(max_size=200).map(lambda b: bytes(b"[]"[x & 1] for x in b)),  # anything
    st.recursive(st.just(b""), lambda inner: st.lists(inner, max_size=6).map(
        lambda parts: b"".join(b"[" + p + b"]" for p in parts)), max_leaves=80),  # balanced
    st.tuples(st.integers(0, 90), st.integers(0, 300)).map(lambda t: _nested(*t)),
    st.lists(st.tuples(st.integers(0, 70), st.integers(0, 40)), max_size=8).map(
        lambda groups: b"".join(_nested(d, w) for d, w in groups)),
))
def test_the_depth_by_deleting_pairs_is_the_step_by_step_count(brackets: bytes) -> None:
    # The fast count (innermost pairs deleted in C) must agree with the running sum on
    # every string: balanced or not, flat, deep, mixed; the limit depends on it.
    assert _depth(brackets) == _steps(brackets)
    for damaged in (brackets[1:], brackets[:-1], b"]" + brackets, brackets + b"["):
        assert _depth(damaged) == _steps(damaged)


def test_a_flat_frame_of_many_brackets_is_accepted_and_a_deep_one_in_it_refused() -> None:
    flat = b",".join([b"{}"] * 15_000)
    assert decode_envelope(notif(b'{"x":[' + flat + b"]}")).type == "notification"
    inner = MAX_DEPTH - 3  # the frame, its payload and data: three levels already
    ok = b"[" * (inner - 1) + b"]" * (inner - 1)
    for check in (decode, decode_envelope):
        check(notif(b'{"x":[' + flat + b"," + ok + b"]}"))
        with pytest.raises(MessageInvalide) as exc:
            check(notif(b'{"x":[' + flat + b",[" + ok + b"]]}"))
        assert "nested too deeply" in exc.value.detail


def test_depth_is_counted_outside_strings_and_invalid_utf8_comes_first() -> None:
    assert nesting_depth(rb'{"a":"[[[[{{{{\\"}') == 1  # the string ends at its quote
    assert nesting_depth(rb'{"a":"\"[[","b":[[]]}') == 3  # an escaped quote does not
    assert nesting_depth(b"[" * 70) == 70  # counted whether or not the JSON is valid
    assert nesting_depth(b"[]]]][[") == 1
    deep_bad = notif(b'{"v":' + b"[" * 100 + b'"\xff"' + b"]" * 100 + b"}")
    for check in (decode, decode_envelope):
        with pytest.raises(MessageInvalide) as exc:
            check(deep_bad)
        assert exc.value.reason is Reason.INVALID_UTF8


@pytest.mark.parametrize("frame", [
    b"[" * 65 + b'"' + b'\\"' * 32_700,  # escaped quotes in a string never closed
    b"[" * 65 + b'"\\' * 32_700,
    b"[" * 65 + b'"' + b"\\" * 65_000,
    b'["' * 32_700,
    b"[" * 65_000,
    b"[]" * 32_700,
], ids=["escaped quotes", "quote backslash", "backslashes", "open strings", "open", "wide"])
def test_depth_check_is_linear_on_hostile_frames(frame: bytes) -> None:
    # A liveness bound, not a benchmark: one 64 KiB frame must not hold the broker's loop
    # anywhere near its 10 s watchdog. Matching strings that must be closed made these
    # quadratic (about 20 s each); linear, they take milliseconds.
    for check in (decode, decode_envelope):
        start = time.process_time()
        with pytest.raises(MessageInvalide):
            check(frame)
        assert time.process_time() - start < 1.0, check


def test_encode_refuses_what_no_receiver_accepts() -> None:
    data: dict[str, object] = {}
    inner = data
    for _ in range(MAX_DEPTH):
        inner["a"] = {}
        inner = inner["a"]  # type: ignore[assignment]
    with pytest.raises(MessageInvalide, match="nested too deeply"):
        encode(Notification("vm-a", "tous", "c", "e", data))


TEN_MB: Final = 10 * 1024 * 1024


@pytest.mark.parametrize("body", [b"x" * TEN_MB, notif(b'{"v":"' + b"y" * TEN_MB + b'"}')],
                         ids=["garbage", "json"])
def test_ten_megabytes_in_one_piece(body: bytes) -> None:
    d = FrameDecoder()
    out = d.feed(body)
    assert len(out) == 1 and isinstance(out[0], FrameError)
    assert out[0].reason is Reason.TOO_LARGE and out[0].size > 65536
    assert d.buffered == 0
    assert d.feed(b"more garbage") == []
    assert d.feed(b"\n" + OK) == [decode(OK)]

    d = FrameDecoder()
    out = d.feed(body + b"\n" + OK)
    assert [getattr(o, "reason", "ok") for o in out] == [Reason.TOO_LARGE, "ok"]


@pytest.mark.parametrize("chunk", [4096, 65537, 1 << 20])
def test_ten_megabytes_in_chunks(chunk: int) -> None:
    d = FrameDecoder()
    out: list[Message | FrameError] = []
    body = b"z" * TEN_MB
    for i in range(0, TEN_MB, chunk):
        out += d.feed(body[i:i + chunk])
        assert d.buffered <= d.max_frame + 1
    out += d.feed(b"\r\n" + OK)
    assert [getattr(o, "reason", "ok") for o in out] == [Reason.TOO_LARGE, "ok"]
    assert out[1] == decode(OK)
    assert d.buffered == 0
