"""atheris target: the sans-IO frame decoder on arbitrary bytes, cut anywhere.

    .venv/bin/python fuzz/fuzz_frame_decoder.py fuzz/corpus/frame_decoder -max_total_time=600

Checks, for every input:

* ``FrameDecoder.feed`` never raises, whatever the bytes and the cuts;
* it never buffers more than ``max_frame`` + 1 bytes (a 10 MB line costs nothing);
* the result does not depend on how the stream was cut (whole vs. chunks);
* every decoded message re-encodes to a frame that decodes to an equal message, and
  its ``raw`` bytes are one of the input's lines (forwarded unchanged by the broker).

See docs/fuzzing.md.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from messagerie import FrameDecoder, FrameError, Message, decode, encode


def normalise(items: list[Message | FrameError]) -> list[object]:
    # A too_large frame is refused as soon as the limit is passed: its size and detail
    # depend on how much had arrived. Everything else must be identical.
    return [("msg", m.raw) if isinstance(m, Message) else ("err", m.reason, m.field)
            for m in items]


MAX_FRAMES = (16, 64, 256, 4096, 65536)
HEADER = 5


def test_one_input(data: bytes) -> None:
    # Header: byte 0 picks max_frame, bytes 1-4 are cut points (x 16); then the stream.
    # (Not atheris.FuzzedDataProvider: it takes integers from the end of the input,
    # which would cut the seeds' frames; a fixed header keeps seeds readable.)
    if len(data) < HEADER:
        return
    max_frame = MAX_FRAMES[data[0] % len(MAX_FRAMES)]
    cuts = sorted({b * 16 for b in data[1:HEADER]})
    stream = data[HEADER:]

    whole = FrameDecoder(max_frame)
    expected = whole.feed(stream)
    assert whole.buffered <= max_frame + 1

    chunked = FrameDecoder(max_frame)
    got: list[Message | FrameError] = []
    start = 0
    for cut in [c for c in cuts if c < len(stream)] + [len(stream)]:
        got += chunked.feed(stream[start:cut])
        assert chunked.buffered <= max_frame + 1
        start = cut
    assert normalise(got) == normalise(expected), (normalise(got), normalise(expected))
    assert chunked.buffered == whole.buffered

    lines = {ln[:-1] if ln.endswith(b"\r") else ln for ln in stream.split(b"\n")}
    for item in expected:
        if isinstance(item, Message):
            assert item.raw in lines
            again = decode(encode(item))
            assert again.to_dict() == item.to_dict()


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
