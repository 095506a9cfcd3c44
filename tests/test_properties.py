"""Hypothesis properties of the codec and the frame decoder (strategies in
tests/support/strategies.py, shared with the envelope and schema tests)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from messagerie import FrameDecoder, FrameError, Message, Reason, decode, encode, from_dict
from tests.support.strategies import garbage, messages, wire_objects

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(wire_objects())
def test_round_trip(obj: dict[str, Any]) -> None:
    msg = from_dict(obj)
    line = encode(msg)
    assert line.endswith(b"\n") and b"\n" not in line[:-1]
    back = decode(line)
    assert back == msg
    assert type(back) is type(msg)
    assert back.to_dict() == obj
    assert back.raw == line[:-1]
    assert encode(back) == line


@SETTINGS
@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=8),
       st.integers(1, 200))
def test_frame_decoder_never_raises(data: bytes, cuts: list[int], max_frame: int) -> None:
    d = FrameDecoder(max_frame=max_frame)
    points = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    for a, b in itertools.pairwise(points):
        for item in d.feed(data[a:b]):
            assert isinstance(item, Message | FrameError)
        assert d.buffered <= max_frame + 1


def normalise(out: list[Message | FrameError], max_frame: int) -> list[Any]:
    # A too_large frame is reported as soon as the limit is passed: its size, detail and
    # excerpt length depend on how much had arrived. Everything else must be identical.
    n = min(64, max_frame + 1)
    return [(o.reason, o.field, o.excerpt[:n]) if isinstance(o, FrameError)
            and o.reason is Reason.TOO_LARGE else (o, o.raw) if isinstance(o, Message) else o
            for o in out]


@pytest.mark.slow
@SETTINGS
@given(st.lists(messages.map(lambda m: (True, m)) | garbage.map(lambda g: (False, g)),
                max_size=12),
       st.lists(st.integers(0, 10_000), max_size=20), st.sampled_from([b"\n", b"\r\n"]))
def test_valid_frames_survive_garbage(items: list[tuple[bool, Any]], cuts: list[int],
                                      ending: bytes) -> None:
    stream = b"".join(encode(x)[:-1] + ending if ok else x + b"\n" for ok, x in items)
    d = FrameDecoder(max_frame=4096)
    out: list[Message | FrameError] = []
    points = sorted({0, len(stream), *(c for c in cuts if c <= len(stream))})
    for a, b in itertools.pairwise(points):
        out += d.feed(stream[a:b])
    assert len(out) == len(items)
    for (ok, x), o in zip(items, out, strict=True):
        if ok:
            assert isinstance(o, Message) and o == x
        else:
            assert isinstance(o, FrameError)
    assert d.buffered == 0


@pytest.mark.slow
@SETTINGS
@given(st.lists(messages.map(encode) | garbage.map(lambda g: g + b"\n")
                | st.binary(max_size=300), max_size=10),
       st.lists(st.integers(0, 10_000), max_size=30), st.integers(50, 2000))
def test_fragmentation_invariance(chunks: list[bytes], cuts: list[int], max_frame: int) -> None:
    stream = b"".join(chunks)
    whole = FrameDecoder(max_frame=max_frame)
    expected = whole.feed(stream)
    pieces = FrameDecoder(max_frame=max_frame)
    out: list[Message | FrameError] = []
    points = sorted({0, len(stream), *(c for c in cuts if c <= len(stream))})
    for a, b in itertools.pairwise(points):
        out += pieces.feed(stream[a:b])
    assert normalise(out, max_frame) == normalise(expected, max_frame)
    assert pieces.buffered == whole.buffered
    # Byte by byte too: the worst fragmentation.
    single = FrameDecoder(max_frame=max_frame)
    out = []
    for i in range(len(stream)):
        out += single.feed(stream[i:i + 1])
    assert normalise(out, max_frame) == normalise(expected, max_frame)
