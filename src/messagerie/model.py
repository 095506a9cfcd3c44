"""The protocol model: the message types of the messagerie protocol.

Pure data and validation; no I/O. Wire field names are French, as in the spec
(``protocole-messagerie.md``); Python names are English except where they mirror a
wire field (``msg.categorie`` is the payload's ``categorie``).

A message keeps everything it was given: unknown payload keys (the spec's own
example carries ``chemin``) and unknown envelope keys survive a decode/encode round
trip, and a decoded message keeps the exact bytes it came from in ``raw`` so that a
relay can forward them unchanged.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar, Final

from .errors import MessagerieError

DOM0: Final = "dom0"
"""The name of the control domain: the broker and the services it hosts."""
TOUS: Final = "tous"
"""Broadcast destination: every connected domain and dom0, never the sender."""

NAME_MAX: Final = 64
"""Longest domain name accepted (Xen itself allows 64 bytes in xenstore paths we use)."""
NAME_PATTERN: Final = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
"""Domain names: 1 to 64 ASCII letters, digits, ``-``, ``_`` or ``.``, not starting with
punctuation. ``tous`` is reserved for broadcast and never names a domain."""
_NAME_RE: Final = re.compile(NAME_PATTERN[1:-1])

TOKEN_PATTERN: Final = "^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}$"
"""Categories, events and command names: open vocabularies, but bounded and free of
spaces and control characters so that policies can match them and logs stay clean."""
_TOKEN_RE: Final = re.compile(TOKEN_PATTERN[1:-1])

ID_PATTERN: Final = r"^[\x21-\x7e]{1,64}$"
"""Correlation ids: 1 to 64 printable ASCII characters without spaces."""
_ID_RE: Final = re.compile(ID_PATTERN[1:-1])


class Reason(StrEnum):
    """Why a frame or a message was refused. Stable strings, used in logs and tests."""

    INVALID_UTF8 = "invalid_utf8"
    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    UNKNOWN_TYPE = "unknown_type"
    BAD_NAME = "bad_name"
    BAD_VALUE = "bad_value"
    DUPLICATE_KEY = "duplicate_key"
    TOO_LARGE = "too_large"


class MessageInvalide(MessagerieError, ValueError):
    """A message (or a frame) that does not follow the protocol.

    A :class:`~messagerie.errors.MessagerieError` like every error of the library, and
    a ``ValueError`` (what it is to the caller of :func:`~messagerie.decode`).

    ``reason`` is a :class:`Reason`, ``field`` the JSON path of the offending field
    (``source``, ``payload.categorie``) when there is one, ``detail`` the explanation.
    """

    def __init__(self, reason: Reason, detail: str, field: str | None = None) -> None:
        self.reason = reason
        self.field = field
        self.detail = detail
        super().__init__(f"{field}: {detail}" if field else detail)


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return {
        str: "a string", int: "an integer", float: "a number", bool: "a boolean",
        list: "an array", dict: "an object",
    }.get(type(value), type(value).__name__)


def check_name(value: object, field: str = "name", *, broadcast: bool = False) -> str:
    """Return ``value`` if it is a valid domain name (or ``tous`` when ``broadcast``).

    Raises :class:`MessageInvalide` naming ``field`` otherwise.
    """
    if type(value) is not str:
        raise MessageInvalide(Reason.WRONG_TYPE, f"expected a string, got {_type_name(value)}",
                              field)
    if not valid_name_or_tous(value):
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise MessageInvalide(
            Reason.BAD_NAME,
            f"{shown!r} is not a domain name (1-{NAME_MAX} of A-Z a-z 0-9 - _ ., "
            "starting with a letter or digit)", field)
    if value == TOUS and not broadcast:
        raise MessageInvalide(Reason.BAD_NAME, f"{TOUS!r} is only valid as a destination", field)
    return value


def is_valid_name(value: str) -> bool:
    """True when ``value`` can name a domain (``tous`` cannot)."""
    return value != TOUS and valid_name_or_tous(value)


def _require(payload: Mapping[str, Any], key: str, kind: type, label: str) -> Any:
    value = payload.get(key, _MISSING)
    if value is _MISSING:
        raise MessageInvalide(Reason.MISSING_FIELD, "required field is missing", f"payload.{key}")
    if type(value) is not kind:
        raise MessageInvalide(Reason.WRONG_TYPE, f"expected {label}, got {_type_name(value)}",
                              f"payload.{key}")
    return value


class _Validated:
    """A bounded memo of strings already checked against a pattern.

    Names and command names repeat endlessly on a channel; checking a set is ten
    times cheaper than a regex. Bounded so that hostile input cannot grow it.
    """

    __slots__ = ("_pattern", "seen")

    def __init__(self, pattern: re.Pattern[str]) -> None:
        self._pattern = pattern
        #: Strings known valid. Hot paths test ``x in v.seen`` before calling ``v(x)``.
        self.seen: set[str] = set()

    def __call__(self, value: object) -> bool:
        # Type first: a decoded list or object is unhashable and would raise in ``in``.
        if type(value) is not str:
            return False
        if value in self.seen:
            return True
        if self._pattern.fullmatch(value) is None:
            return False
        if len(self.seen) >= 4096:
            self.seen.clear()
        self.seen.add(value)
        return True


valid_name_or_tous = _Validated(_NAME_RE)
"""True for a syntactically valid name, ``tous`` included (memoised)."""
_valid_token = _Validated(_TOKEN_RE)


def _require_token(payload: Mapping[str, Any], key: str) -> str:
    value = payload.get(key, _MISSING)
    if _valid_token(value):
        return str(value)
    value = _require(payload, key, str, "a string")
    raise MessageInvalide(Reason.BAD_VALUE, f"{value[:80]!r} must match {TOKEN_PATTERN}",
                          f"payload.{key}")


def _require_id(payload: Mapping[str, Any]) -> str:
    value: str = _require(payload, "id", str, "a string")
    if _ID_RE.fullmatch(value) is None:
        raise MessageInvalide(Reason.BAD_VALUE,
                              "must be 1-64 printable ASCII characters without spaces",
                              "payload.id")
    return value


def _optional_object(payload: Mapping[str, Any], key: str) -> None:
    value = payload.get(key)
    if value is not None and type(value) is not dict:
        raise MessageInvalide(Reason.WRONG_TYPE, f"expected an object, got {_type_name(value)}",
                              f"payload.{key}")


def check_unambiguous(keys: Iterable[str], fields: frozenset[str], where: str) -> None:
    """Refuse a key that is not one of ``fields`` but equals one of them to parsers that
    match keys ignoring case (Go's encoding/json, some Jackson and System.Text.Json
    settings): ``"Source"`` or ``"ſource"`` next to ``"source"`` would be a second
    source to them, read after the one the broker checked."""
    for key in keys:
        if key not in fields and key.casefold() in fields:
            raise MessageInvalide(
                Reason.DUPLICATE_KEY,
                f"{key[:40]!r} is {key.casefold()!r} to parsers that ignore case",
                f"{where}{key[:40]}")


ENVELOPE_FIELDS: Final = frozenset(("type", "source", "destination", "payload"))
ERREUR_FIELDS: Final = frozenset(("code", "message"))


class _Missing:
    pass


_MISSING: Final = _Missing()


def new_id() -> str:
    """A fresh correlation id: 16 hex characters from the OS's random source."""
    return os.urandom(8).hex()


class Message:
    """A protocol message: the envelope (``type``, ``source``, ``destination``) and a payload.

    Use a subclass: :class:`Notification`, :class:`Commande`, :class:`Reponse`,
    :class:`Journal`. ``payload`` is the payload object as a dict (unknown keys kept),
    ``extra`` the envelope keys the protocol does not define (kept, normally empty),
    ``raw`` the exact frame a decoded message came from (``None`` when built locally).
    """

    __slots__ = ("destination", "extra", "payload", "raw", "source")

    type: ClassVar[str] = ""
    #: May this type be sent to ``tous``?
    broadcastable: ClassVar[bool] = True
    #: The payload keys the protocol defines for this type.
    payload_fields: ClassVar[frozenset[str]] = frozenset()

    source: str
    destination: str
    payload: dict[str, Any]
    extra: dict[str, Any]
    raw: bytes | None

    def __init__(self, source: str, destination: str, payload: Mapping[str, Any],
                 *, extra: Mapping[str, Any] | None = None) -> None:
        if not self.type:
            raise TypeError("Message is abstract: use Notification, Commande, Reponse or Journal")
        self.source = check_name(source, "source")
        if destination == TOUS and not self.broadcastable:
            raise MessageInvalide(Reason.BAD_NAME, f"a {self.type} cannot be sent to {TOUS!r}",
                                  "destination")
        self.destination = check_name(destination, "destination", broadcast=True)
        if not isinstance(payload, Mapping):
            raise MessageInvalide(Reason.WRONG_TYPE,
                                  f"expected an object, got {_type_name(payload)}", "payload")
        self.payload = dict(payload)
        self.check_payload(self.payload)
        self.check_keys(self.payload)
        self.extra = dict(extra) if extra else {}
        for key in self.extra:
            if key.casefold() in ENVELOPE_FIELDS:
                raise ValueError(f"extra envelope key {key!r} shadows a protocol field")
        self.raw = None

    @classmethod
    def check_payload(cls, payload: dict[str, Any]) -> None:
        """Validate ``payload`` for this message type; raise :class:`MessageInvalide`."""

    @classmethod
    def check_keys(cls, payload: dict[str, Any]) -> None:
        """Refuse payload keys that case-insensitive parsers would take for a field."""
        if not payload.keys() <= cls.payload_fields:
            check_unambiguous(payload, cls.payload_fields, "payload.")

    def to_dict(self) -> dict[str, Any]:
        """The message as the JSON object sent on the wire."""
        d: dict[str, Any] = {"type": self.type, "source": self.source,
                             "destination": self.destination, "payload": self.payload}
        if self.extra:
            d.update(self.extra)
        return d

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]  # mutable payload

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(source={self.source!r}, "
                f"destination={self.destination!r}, payload={self.payload!r})")

    @property
    def name(self) -> str | None:
        """What the policy and the logs call this message: category or command name."""
        return None

    @property
    def id(self) -> str | None:
        """The correlation id of a ``commande`` or ``reponse`` (``None`` otherwise)."""
        return None


class Notification(Message):
    """Something happened: ``categorie``, ``evenement`` and ``data`` (an object).

    ``data`` may be absent on the wire (the spec's own example has none); it then reads
    as an empty object. Other payload keys are kept as they are.
    """

    __slots__ = ()
    type = "notification"
    payload_fields = frozenset(("categorie", "evenement", "data"))

    def __init__(self, source: str, destination: str, categorie: str, evenement: str,
                 data: Mapping[str, Any] | None = None) -> None:
        super().__init__(source, destination, {
            "categorie": categorie, "evenement": evenement,
            "data": dict(data) if data is not None else {}})

    @classmethod
    def check_payload(cls, payload: dict[str, Any]) -> None:
        # Inlined: this runs for every mouse move.
        data = payload.get("data")
        seen = _valid_token.seen
        try:
            if (payload.get("categorie") in seen and payload.get("evenement") in seen
                    and (data is None or type(data) is dict)):
                return
        except TypeError:  # a list or an object is unhashable: explained below
            pass
        _require_token(payload, "categorie")
        _require_token(payload, "evenement")
        _optional_object(payload, "data")

    @property
    def categorie(self) -> str:
        value: str = self.payload["categorie"]
        return value

    @property
    def evenement(self) -> str:
        value: str = self.payload["evenement"]
        return value

    @property
    def data(self) -> dict[str, Any]:
        value: dict[str, Any] = self.payload.get("data") or {}
        return value

    @property
    def name(self) -> str:
        return self.categorie


class Statut(StrEnum):
    OK = "ok"
    ERREUR = "erreur"


class Commande(Message):
    """Do something and answer: ``id`` (correlation), ``commande`` (name), ``arguments``.

    ``id`` is generated when not given; many commands may be in flight, each
    ``reponse`` carries its command's ``id``. A command is never broadcast.
    """

    __slots__ = ()
    type = "commande"
    payload_fields = frozenset(("id", "commande", "arguments"))
    broadcastable = False

    def __init__(self, source: str, destination: str, commande: str,
                 arguments: Mapping[str, Any] | None = None, *, id: str | None = None) -> None:
        super().__init__(source, destination, {
            "id": id if id is not None else new_id(), "commande": commande,
            "arguments": dict(arguments) if arguments is not None else {}})

    @classmethod
    def check_payload(cls, payload: dict[str, Any]) -> None:
        _require_id(payload)
        _require_token(payload, "commande")
        _optional_object(payload, "arguments")

    @property
    def id(self) -> str:
        value: str = self.payload["id"]
        return value

    @property
    def commande(self) -> str:
        value: str = self.payload["commande"]
        return value

    @property
    def arguments(self) -> dict[str, Any]:
        value: dict[str, Any] = self.payload.get("arguments") or {}
        return value

    @property
    def name(self) -> str:
        return self.commande

    def reply(self, resultat: Any = None, *, source: str | None = None) -> Reponse:
        """The success ``reponse`` to this command, from its destination to its source."""
        return Reponse(source or self.destination, self.source, self.id, self.commande,
                       Statut.OK, resultat=resultat)

    def fail(self, code: str, message: str, *, source: str | None = None) -> Reponse:
        """The error ``reponse`` to this command (``code`` from :class:`Code` or your own)."""
        return Reponse(source or self.destination, self.source, self.id, self.commande,
                       Statut.ERREUR, erreur={"code": code, "message": message})


class Reponse(Message):
    """The answer to a command: its ``id`` and ``commande``, a ``statut`` (``ok`` or
    ``erreur``), then ``resultat`` (any JSON value) or ``erreur`` (``code``, ``message``)."""

    __slots__ = ()
    type = "reponse"
    payload_fields = frozenset(("id", "commande", "statut", "resultat", "erreur"))
    broadcastable = False

    def __init__(self, source: str, destination: str, id: str, commande: str,
                 statut: str = Statut.OK, *, resultat: Any = None,
                 erreur: Mapping[str, Any] | None = None) -> None:
        payload: dict[str, Any] = {"id": id, "commande": commande, "statut": str(statut)}
        if statut == Statut.OK:
            payload["resultat"] = resultat
        else:
            payload["erreur"] = dict(erreur) if erreur is not None else {}
        super().__init__(source, destination, payload)

    @classmethod
    def check_payload(cls, payload: dict[str, Any]) -> None:
        _require_id(payload)
        _require_token(payload, "commande")
        statut = _require(payload, "statut", str, "a string")
        if statut == "ok":
            return
        if statut != "erreur":
            raise MessageInvalide(Reason.BAD_VALUE, f"{statut[:40]!r} is not 'ok' or 'erreur'",
                                  "payload.statut")
        erreur = _require(payload, "erreur", dict, "an object")
        for key in ("code", "message"):
            value = erreur.get(key, _MISSING)
            if value is _MISSING:
                raise MessageInvalide(Reason.MISSING_FIELD, "required field is missing",
                                      f"payload.erreur.{key}")
            if type(value) is not str:
                raise MessageInvalide(Reason.WRONG_TYPE,
                                      f"expected a string, got {_type_name(value)}",
                                      f"payload.erreur.{key}")

    @classmethod
    def check_keys(cls, payload: dict[str, Any]) -> None:
        super().check_keys(payload)
        erreur = payload.get("erreur")
        if type(erreur) is dict and not erreur.keys() <= ERREUR_FIELDS:
            check_unambiguous(erreur, ERREUR_FIELDS, "payload.erreur.")

    @property
    def id(self) -> str:
        value: str = self.payload["id"]
        return value

    @property
    def commande(self) -> str:
        value: str = self.payload["commande"]
        return value

    @property
    def statut(self) -> Statut:
        return Statut(self.payload["statut"])

    @property
    def ok(self) -> bool:
        return bool(self.payload["statut"] == "ok")

    @property
    def resultat(self) -> Any:
        return self.payload.get("resultat")

    @property
    def erreur(self) -> dict[str, str] | None:
        value: dict[str, str] | None = self.payload.get("erreur")
        return value

    @property
    def name(self) -> str:
        return self.commande


class Niveau(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"


_NIVEAUX: Final = frozenset(n.value for n in Niveau)
# [0-9], not \d: Python's \d also matches non-ASCII digits ("٢٠٢٤"), ECMA-262's does not.
HORODATAGE_PATTERN: Final = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?"
    r"(Z|[+-][0-9]{2}:[0-9]{2})$")
_HORODATAGE_RE: Final = re.compile(HORODATAGE_PATTERN[1:-1])


class Journal(Message):
    """A log event (the spec's "Evénement de journal"): ``niveau``, ``texte``,
    ``horodatage`` (RFC 3339), ``composant`` (the emitting program) and ``data``.

    Usually sent to ``dom0``, where the broker writes it to the journal.
    """

    __slots__ = ()
    type = "journal"
    payload_fields = frozenset(("niveau", "texte", "horodatage", "composant", "data"))

    def __init__(self, source: str, destination: str, niveau: str, texte: str,
                 composant: str, *, horodatage: str | None = None,
                 data: Mapping[str, Any] | None = None) -> None:
        if horodatage is None:
            horodatage = datetime.now(UTC).isoformat(timespec="milliseconds").replace(
                "+00:00", "Z")
        super().__init__(source, destination, {
            "niveau": str(niveau), "texte": texte, "horodatage": horodatage,
            "composant": composant, "data": dict(data) if data is not None else {}})

    @classmethod
    def check_payload(cls, payload: dict[str, Any]) -> None:
        niveau = _require(payload, "niveau", str, "a string")
        if niveau not in _NIVEAUX:
            raise MessageInvalide(Reason.BAD_VALUE,
                                  f"{niveau[:40]!r} is not one of {', '.join(sorted(_NIVEAUX))}",
                                  "payload.niveau")
        _require(payload, "texte", str, "a string")
        horodatage = _require(payload, "horodatage", str, "a string")
        if _HORODATAGE_RE.fullmatch(horodatage) is None:
            raise MessageInvalide(Reason.BAD_VALUE,
                                  f"{horodatage[:40]!r} is not an RFC 3339 timestamp",
                                  "payload.horodatage")
        _require_token(payload, "composant")
        _optional_object(payload, "data")

    @property
    def niveau(self) -> Niveau:
        return Niveau(self.payload["niveau"])

    @property
    def texte(self) -> str:
        value: str = self.payload["texte"]
        return value

    @property
    def horodatage(self) -> str:
        value: str = self.payload["horodatage"]
        return value

    @property
    def composant(self) -> str:
        value: str = self.payload["composant"]
        return value

    @property
    def data(self) -> dict[str, Any]:
        value: dict[str, Any] = self.payload.get("data") or {}
        return value

    @property
    def name(self) -> str:
        return self.composant


MESSAGE_TYPES: Final[dict[str, type[Message]]] = {
    cls.type: cls for cls in (Notification, Commande, Reponse, Journal)}
"""The wire ``type`` value of each message class."""
