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
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar, Final, Generic, TypeVar, overload

from . import wire
from .errors import MessageInvalide, Reason
from .wire import (
    DOM0,
    ENVELOPE_FIELDS,
    ERREUR_FIELDS,
    HORODATAGE_PATTERN,
    ID_PATTERN,
    NAME_MAX,
    NAME_PATTERN,
    TOKEN_PATTERN,
    TOUS,
    Niveau,
    Statut,
    check_unambiguous,
    valid_name_or_tous,
)
from .wire import type_name as _type_name

__all__ = [
    "DOM0", "ENVELOPE_FIELDS", "ERREUR_FIELDS", "HORODATAGE_PATTERN", "ID_PATTERN",
    "MESSAGE_TYPES", "NAME_MAX", "NAME_PATTERN", "TOKEN_PATTERN", "TOUS", "Commande",
    "Journal", "Message", "MessageInvalide", "Niveau", "Notification", "Reason", "Reponse",
    "Statut", "check_name", "check_unambiguous", "is_valid_name", "new_id",
    "valid_name_or_tous",
]


def check_name(value: object, field: str = "name", *, broadcast: bool = False) -> str:
    """Return ``value`` if it is a valid domain name (or ``tous`` when ``broadcast``).

    Raises :class:`MessageInvalide` naming ``field`` otherwise.
    """
    if type(value) is not str:
        raise MessageInvalide(Reason.WRONG_TYPE, f"expected a string, got {_type_name(value)}",
                              field)
    if not valid_name_or_tous(value):
        raise wire.bad_pattern(NAME_PATTERN, value, field)
    if value == TOUS and not broadcast:
        raise MessageInvalide(Reason.BAD_NAME, f"{TOUS!r} is only valid as a destination", field)
    return value


def is_valid_name(value: str) -> bool:
    """True when ``value`` can name a domain (``tous`` cannot)."""
    return value != TOUS and valid_name_or_tous(value)


T = TypeVar("T")


class _Field(Generic[T]):
    """A payload field read as an attribute (``msg.categorie``); with ``empty``, an absent
    or ``null`` object reads as ``{}``."""

    def __init__(self, key: str, *, empty: bool = False) -> None:
        self.key = key
        self.empty = empty

    @overload
    def __get__(self, obj: None, owner: type) -> _Field[T]: ...

    @overload
    def __get__(self, obj: Message, owner: type) -> T: ...

    def __get__(self, obj: Message | None, owner: type) -> T | _Field[T]:
        if obj is None:
            return self
        if self.empty:
            value: T = obj.payload.get(self.key) or {}  # type: ignore[assignment]
            return value
        found: T = obj.payload[self.key]
        return found


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
    #: May this type be sent to ``tous``? (From the wire definition.)
    broadcastable: ClassVar[bool] = True
    #: The payload keys the protocol defines for this type. (From the wire definition.)
    payload_fields: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        kind = wire.KINDS[cls.type]
        cls.broadcastable = kind.broadcastable
        cls.payload_fields = kind.payload_fields

    source: str
    destination: str
    payload: dict[str, Any]
    extra: dict[str, Any]
    raw: bytes | None

    def __init__(self, source: str, destination: str, payload: Mapping[str, Any],
                 *, extra: Mapping[str, Any] | None = None) -> None:
        if not self.type:
            raise TypeError("Message is abstract: use Notification, Commande, Reponse or Journal")
        if not isinstance(payload, Mapping):
            raise MessageInvalide(Reason.WRONG_TYPE,
                                  f"expected an object, got {_type_name(payload)}", "payload")
        self.payload = dict(payload)
        wire.check_object({"type": self.type, "source": source, "destination": destination,
                           "payload": self.payload})
        self.source = source
        self.destination = destination
        self.extra = dict(extra) if extra else {}
        for key in self.extra:
            if wire.folds_to(key, ENVELOPE_FIELDS) is not None:
                raise ValueError(f"extra envelope key {key!r} shadows a protocol field")
        self.raw = None

    @classmethod
    def check_payload(cls, payload: dict[str, Any]) -> None:
        """Validate ``payload`` for this message type; raise :class:`MessageInvalide`."""
        wire.check_payload(wire.KINDS[cls.type], payload)

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

    def __init__(self, source: str, destination: str, categorie: str, evenement: str,
                 data: Mapping[str, Any] | None = None) -> None:
        super().__init__(source, destination, {
            "categorie": categorie, "evenement": evenement,
            "data": dict(data) if data is not None else {}})

    categorie: _Field[str] = _Field("categorie")
    evenement: _Field[str] = _Field("evenement")
    data: _Field[dict[str, Any]] = _Field("data", empty=True)

    @property
    def name(self) -> str:
        return self.categorie


class Commande(Message):
    """Do something and answer: ``id`` (correlation), ``commande`` (name), ``arguments``,
    and optionally ``delai``, the seconds its sender waits for the answer.

    ``id`` is generated when not given; many commands may be in flight, each
    ``reponse`` carries its command's ``id``. A command is never broadcast. ``delai``
    (0 < delai <= :data:`~messagerie.wire.DELAI_MAX`) counts from the broker's receipt
    of the command: past it the broker answers ``delai_depasse`` and tells the
    destination that the command is abandoned. :meth:`Client.command` sets it from its
    ``timeout``.
    """

    __slots__ = ()
    type = "commande"

    def __init__(self, source: str, destination: str, commande: str,
                 arguments: Mapping[str, Any] | None = None, *, id: str | None = None,
                 delai: float | None = None) -> None:
        payload: dict[str, Any] = {
            "id": id if id is not None else new_id(), "commande": commande,
            "arguments": dict(arguments) if arguments is not None else {}}
        if delai is not None:
            # A float, as the wire's Struct decodes it: 5 would re-encode as 5.0, and a
            # frame that does not re-encode to itself takes the relay's slower path.
            payload["delai"] = float(delai) if type(delai) in (int, float) else delai
        super().__init__(source, destination, payload)

    id: _Field[str] = _Field("id")
    commande: _Field[str] = _Field("commande")
    arguments: _Field[dict[str, Any]] = _Field("arguments", empty=True)

    @property
    def delai(self) -> float | None:
        """The deadline the command carries, in seconds from its receipt by the broker
        (``None``: none; the broker's ``limites.duree_commande`` applies)."""
        value = self.payload.get("delai")
        return None if value is None else float(value)

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

    def __init__(self, source: str, destination: str, id: str, commande: str,
                 statut: str = Statut.OK, *, resultat: Any = None,
                 erreur: Mapping[str, Any] | None = None) -> None:
        payload: dict[str, Any] = {"id": id, "commande": commande, "statut": str(statut)}
        if statut == Statut.OK:
            payload["resultat"] = resultat
        else:
            payload["erreur"] = dict(erreur) if erreur is not None else {}
        super().__init__(source, destination, payload)

    id: _Field[str] = _Field("id")
    commande: _Field[str] = _Field("commande")

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


class Journal(Message):
    """A log event (the spec's "Evénement de journal"): ``niveau``, ``texte``,
    ``horodatage`` (RFC 3339), ``composant`` (the emitting program) and ``data``.

    Usually sent to ``dom0``, where the broker writes it to the journal.
    """

    __slots__ = ()
    type = "journal"

    def __init__(self, source: str, destination: str, niveau: str, texte: str,
                 composant: str, *, horodatage: str | None = None,
                 data: Mapping[str, Any] | None = None) -> None:
        if horodatage is None:
            horodatage = datetime.now(UTC).isoformat(timespec="milliseconds").replace(
                "+00:00", "Z")
        super().__init__(source, destination, {
            "niveau": str(niveau), "texte": texte, "horodatage": horodatage,
            "composant": composant, "data": dict(data) if data is not None else {}})

    @property
    def niveau(self) -> Niveau:
        return Niveau(self.payload["niveau"])

    texte: _Field[str] = _Field("texte")
    horodatage: _Field[str] = _Field("horodatage")
    composant: _Field[str] = _Field("composant")
    data: _Field[dict[str, Any]] = _Field("data", empty=True)

    @property
    def name(self) -> str:
        return self.composant


MESSAGE_TYPES: Final[dict[str, type[Message]]] = {
    cls.type: cls for cls in (Notification, Commande, Reponse, Journal)}
"""The wire ``type`` value of each message class."""
