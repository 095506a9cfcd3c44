"""The JSON Schema (draft 2020-12) of the wire format, generated from the model.

Everything that can drift is taken from :mod:`messagerie.model`: the patterns, the
``type`` of each class in ``MESSAGE_TYPES``, which types may go to ``tous``, the
:class:`~messagerie.model.Niveau` and :class:`~messagerie.model.Statut` values. Only
the payload field names are written here, next to the class that checks them.

The schema describes one decoded frame; it cannot express what the codec also refuses
(repeated keys, frames over 64 KiB, invalid UTF-8). Patterns are ECMA-262 regular
expressions: ``$`` is the end of the string (Python's ``re.search`` also lets ``$``
match before a final newline; the model uses ``fullmatch``).

Regenerate the checked-in copy with::

    python -m messagerie.schema > docs/schema/messagerie.schema.json
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, Final

from .model import (
    HORODATAGE_PATTERN,
    ID_PATTERN,
    MESSAGE_TYPES,
    NAME_PATTERN,
    TOKEN_PATTERN,
    TOUS,
    Commande,
    Journal,
    Message,
    Niveau,
    Notification,
    Reponse,
    Statut,
)

DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"

_STRING: Final[dict[str, Any]] = {"type": "string"}
_OPTIONAL_OBJECT: Final[dict[str, Any]] = {
    "type": ["object", "null"],
    "description": "An object; absent or null reads as an empty object.",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/$defs/{name}"}


def _object(required: Sequence[str], properties: dict[str, Any], description: str,
            **more: Any) -> dict[str, Any]:
    # additionalProperties is spelled out: decoding keeps unknown keys, so must the schema.
    return {"type": "object", "description": description, "required": list(required),
            "properties": properties, "additionalProperties": True, **more}


def _notification_payload() -> dict[str, Any]:
    return _object(("categorie", "evenement"), {
        "categorie": _ref("token"), "evenement": _ref("token"), "data": _OPTIONAL_OBJECT,
    }, "Something happened: a category, an event and its data.")


def _commande_payload() -> dict[str, Any]:
    return _object(("id", "commande"), {
        "id": _ref("id"), "commande": _ref("token"), "arguments": _OPTIONAL_OBJECT,
    }, "Do something and answer with a reponse carrying the same id.")


def _reponse_payload() -> dict[str, Any]:
    erreur = _object(("code", "message"), {"code": _STRING, "message": _STRING},
                     "Why the command failed: a code (see class Code) and a text.")
    return _object(("id", "commande", "statut"), {
        "id": _ref("id"),
        "commande": _ref("token"),
        "statut": {"enum": [s.value for s in Statut]},
        "resultat": {"description": f"Any JSON value, when statut is {Statut.OK.value!r}."},
        "erreur": {"description": f"Required when statut is {Statut.ERREUR.value!r}; "
                                  "not checked otherwise."},
    }, "The answer to the command with the same id.",
        # Like Reponse.check_payload: erreur is only checked on an error answer.
        **{"if": {"properties": {"statut": {"const": Statut.ERREUR.value}}},
           "then": {"required": ["erreur"], "properties": {"erreur": erreur}}})


def _journal_payload() -> dict[str, Any]:
    return _object(("niveau", "texte", "horodatage", "composant"), {
        "niveau": {"enum": [n.value for n in Niveau]},
        "texte": _STRING,
        "horodatage": {"type": "string", "pattern": HORODATAGE_PATTERN,
                       "description": "RFC 3339 date and time with an offset or Z."},
        "composant": _ref("token"),
        "data": _OPTIONAL_OBJECT,
    }, "A log event, usually sent to dom0.")


_PAYLOADS: Final[dict[type[Message], Callable[[], dict[str, Any]]]] = {
    Notification: _notification_payload,
    Commande: _commande_payload,
    Reponse: _reponse_payload,
    Journal: _journal_payload,
}


def json_schema() -> dict[str, Any]:
    """The JSON Schema of one message on the wire (a ``oneOf`` over the message types)."""
    missing = [t for t, cls in MESSAGE_TYPES.items() if cls not in _PAYLOADS]
    if missing:  # a new message class without a schema: fail loudly, never drift
        raise RuntimeError(f"no payload schema for message type(s) {missing}")
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
    for kind, cls in MESSAGE_TYPES.items():
        defs[f"{kind}_payload"] = _PAYLOADS[cls]()
        defs[kind] = _object(("type", "source", "destination", "payload"), {
            "type": {"const": kind},
            "source": _ref("name"),
            "destination": _ref("destination" if cls.broadcastable else "name"),
            "payload": _ref(f"{kind}_payload"),
        }, f"A {kind} message.")
        one_of.append(_ref(kind))
    return {
        "$schema": DIALECT,
        "title": "messagerie message",
        "description": ("One message of the messagerie protocol: one compact JSON object "
                        "per line. Generated from messagerie.model; see docs/protocol.md."),
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
