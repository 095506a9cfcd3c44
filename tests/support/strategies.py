"""Hypothesis strategies shared by the property tests (codec, frame decoder, envelope,
schema): valid messages as their wire objects, JSON values, and lines that are not
messages."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from messagerie import encode, from_dict
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
    "commande": ("id", "commande", "arguments", "delai"),
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
