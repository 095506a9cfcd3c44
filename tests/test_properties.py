"""Hypothesis properties of the codec and the frame decoder.

The strategies here (``wire_objects``, ``messages``) are also used by test_schema.py.
"""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from messagerie import FrameDecoder, FrameError, Message, Reason, decode, encode, from_dict
from messagerie.model import (
    HORODATAGE_PATTERN,
    ID_PATTERN,
    MESSAGE_TYPES,
    NAME_PATTERN,
    TOKEN_PATTERN,
    TOUS,
    Niveau,
    Statut,
)

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

names = st.from_regex(NAME_PATTERN, fullmatch=True).filter(lambda n: n != TOUS)
tokens = st.from_regex(TOKEN_PATTERN, fullmatch=True)
ids = st.from_regex(ID_PATTERN, fullmatch=True)
stamps = st.from_regex(HORODATAGE_PATTERN, fullmatch=True)

json_scalars = (st.none() | st.booleans() | st.integers(-(2**80), 2**80)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
json_objects = st.dictionaries(st.text(max_size=10), json_values, max_size=4)

REQUIRED: dict[str, tuple[str, ...]] = {
    "notification": ("categorie", "evenement", "data"),
    "commande": ("id", "commande", "arguments"),
    "reponse": ("id", "commande", "statut", "resultat", "erreur"),
    "journal": ("niveau", "texte", "horodatage", "composant", "data"),
}


@st.composite
def payloads(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    extra = draw(json_objects)
    # Unknown keys are kept; one equal to a field ignoring case is refused (test_codec).
    payload = {k: v for k, v in extra.items() if k.casefold() not in REQUIRED[kind]}
    if kind == "notification":
        payload.update(categorie=draw(tokens), evenement=draw(tokens))
        if draw(st.booleans()):
            payload["data"] = draw(json_objects)
    elif kind == "commande":
        payload.update(id=draw(ids), commande=draw(tokens), arguments=draw(json_objects))
    elif kind == "reponse":
        payload.update(id=draw(ids), commande=draw(tokens))
        if draw(st.booleans()):
            payload.update(statut=Statut.OK.value, resultat=draw(json_values))
        else:
            payload.update(statut=Statut.ERREUR.value, erreur={
                "code": draw(st.text(max_size=20)), "message": draw(st.text(max_size=40)),
                **{k: v for k, v in draw(json_objects).items()
                   if k.casefold() not in ("code", "message")}})
    else:
        payload.update(niveau=draw(st.sampled_from(list(Niveau))).value,
                       texte=draw(st.text(max_size=60)), horodatage=draw(stamps),
                       composant=draw(tokens), data=draw(json_objects))
    return payload


@st.composite
def wire_objects(draw: st.DrawFn) -> dict[str, Any]:
    """A valid message as the JSON object on the wire, with arbitrary unknown keys."""
    kind = draw(st.sampled_from(list(MESSAGE_TYPES)))
    broadcast = MESSAGE_TYPES[kind].broadcastable and draw(st.booleans())
    obj = {k: v for k, v in draw(json_objects).items()
           if k.casefold() not in ("type", "source", "destination", "payload")}
    obj.update(type=kind, source=draw(names),
               destination=TOUS if broadcast else draw(names),
               payload=draw(payloads(kind)))
    return obj


messages = wire_objects().map(from_dict)

# A line that is not a message: random bytes, or a valid frame cut short (an unclosed
# object is never valid JSON). Never a newline, never empty (empty lines are skipped).
garbage = (st.binary(min_size=1, max_size=80) | messages.flatmap(
    lambda m: st.integers(1, len(encode(m)) - 2).map(lambda n: encode(m)[:n]))
).map(lambda b: b.replace(b"\n", b"?")).filter(lambda b: b not in (b"", b"\r"))


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
