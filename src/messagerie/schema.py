"""The JSON Schema (draft 2020-12) of the wire format, derived from the wire's Structs.

``msgspec.json.schema(messagerie.wire.Frame)`` gives the types, the required fields,
the patterns, the enums and the descriptions; this module adds what msgspec cannot
express and names the parts: ``tous`` is not a source nor a destination of the types
that are never broadcast, unknown keys are allowed (decoding keeps them), ``null``
contents read as an empty object, and a ``reponse`` whose ``statut`` is ``erreur``
carries an ``erreur`` object (not checked otherwise).

The schema describes one decoded frame; it cannot express what the codec also refuses
(repeated keys, keys equal to a field ignoring case, frames over 64 KiB, invalid UTF-8).
Patterns are ECMA-262 regular expressions: ``$`` is the end of the string (Python's
``re.search`` also lets ``$`` match before a final newline; the model matches whole
strings).

Regenerate the checked-in copy with::

    python -m messagerie.schema > docs/schema/messagerie.schema.json
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from enum import Enum
from typing import Any, Final

import msgspec

from . import wire
from .wire import ID_PATTERN, NAME_PATTERN, TOKEN_PATTERN, TOUS, Statut

DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"
_NAMED: Final = {NAME_PATTERN: "name", TOKEN_PATTERN: "token", ID_PATTERN: "id"}
_ENUMS: Final[dict[str, type[Enum]]] = {"Statut": wire.Statut, "Niveau": wire.Niveau}
_OPTIONAL_OBJECT: Final[dict[str, Any]] = {
    "type": ["object", "null"],
    "description": "An object; absent or null reads as an empty object.",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/$defs/{name}"}


def _property(prop: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """A property of msgspec's schema, with patterns and enums named, contents plain."""
    pattern = prop.get("pattern")
    if pattern in _NAMED:
        return _ref(_NAMED[pattern])
    ref = prop.get("$ref", "").rpartition("/")[2]
    if ref in _ENUMS:  # in the order the protocol lists them, not sorted
        return {"enum": [m.value for m in _ENUMS[ref]]}
    if prop.get("anyOf") == [{"type": "object", "additionalProperties": {}}, {"type": "null"}]:
        return dict(_OPTIONAL_OBJECT)
    return prop


def _object(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    # additionalProperties is spelled out: decoding keeps unknown keys, so must the schema.
    return {"type": "object", "description": schema.get("description", ""),
            "required": schema.get("required", []),
            "properties": {k: _property(v, defs) for k, v in schema["properties"].items()},
            "additionalProperties": True}


def json_schema() -> dict[str, Any]:
    """The JSON Schema of one message on the wire (a ``oneOf`` over the message types)."""
    generated = msgspec.json.schema(wire.Frame)
    source_defs = generated["$defs"]
    defs: dict[str, Any] = {
        "name": {"type": "string", "pattern": NAME_PATTERN, "not": {"const": TOUS},
                 "description": f"A domain name (dom0 included; {TOUS!r} is not a name)."},
        "destination": {"type": "string", "pattern": NAME_PATTERN,
                        "description": f"A domain name or {TOUS!r} (broadcast)."},
        "token": {"type": "string", "pattern": TOKEN_PATTERN,
                  "description": "A category, event, command or component name."},
        "id": {"type": "string", "pattern": ID_PATTERN,
               "description": "A correlation id: 1-64 printable ASCII, no spaces."},
    }
    one_of = []
    for tag, kind in wire.KINDS.items():
        frame = _object(source_defs[kind.cls.__name__], defs)
        frame["properties"].update(
            type={"const": tag}, payload=_ref(f"{tag}_payload"),
            destination=_ref("destination" if kind.broadcastable else "name"))
        payload = _object(source_defs[kind.payload_cls.__name__], defs)
        if kind.with_erreur:
            # erreur is raw contents to the relay: its shape comes from its own Struct.
            erreur = _object(msgspec.json.schema(wire.Erreur)["$defs"][wire.Erreur.__name__],
                             defs)
            props = payload["properties"]
            props["resultat"] = {"description": f"Any JSON value, when statut is "
                                                f"{Statut.OK.value!r}."}
            props["erreur"] = {"description": f"Required when statut is "
                                              f"{Statut.ERREUR.value!r}; not checked otherwise."}
            payload["if"] = {"properties": {"statut": {"const": Statut.ERREUR.value}}}
            payload["then"] = {"required": ["erreur"], "properties": {"erreur": erreur}}
        defs[f"{tag}_payload"] = payload
        defs[tag] = frame
        one_of.append(_ref(tag))
    return {
        "$schema": DIALECT,
        "title": "messagerie message",
        "description": ("One message of the messagerie protocol: one compact JSON object "
                        "per line. Generated from messagerie.wire; see docs/protocol.md."),
        "oneOf": one_of,
        "$defs": defs,
    }


def render() -> str:
    """The schema as checked in: indented, keys sorted, final newline."""
    return json.dumps(json_schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m messagerie.schema [PATH]``: write the schema to PATH or stdout."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) > 1 or (args and args[0].startswith("-")):
        print("usage: python -m messagerie.schema [PATH]", file=sys.stderr)
        return 2
    text = render()
    if args:
        with open(args[0], "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
