"""The mapping between messagerie messages and MQTT topics, with no I/O.

Outgoing (messagerie -> MQTT): a message becomes a PUBLISH on
``<prefix>/<host>/<source>/<type>/<name>`` (``name``: the notification's ``categorie``,
the command's or reply's ``commande``, the journal's ``composant``), its payload the
frame's exact JSON bytes (no newline).

Incoming (MQTT -> messagerie): a PUBLISH whose payload is a messagerie message, on
``<prefix>/<host>/<identity>/<type>/<name>``: the topic must agree with the payload
(source = the bridge's identity, type, name), so that what a topic filter lets in is
what the payload says. Or the field's request form: ``<topic>/request`` with the
command's ``arguments`` as payload, configured per topic (destination and command
name), answered on ``<topic>/response/<identity>``.

:func:`inbound` decides what to do with an incoming PUBLISH: :class:`Inject` (write this
message to the broker) or :class:`Refuse` (say why; a command is answered with the
error). It never raises on its input.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from messagerie.codec import decode, encode
from messagerie.model import (
    Commande,
    Message,
    MessageInvalide,
    Reponse,
    Statut,
    check_name,
    new_id,
)
from messagerie.vocabulary import Code

REQUEST = "request"
RESPONSE = "response"


def topic_for(prefix: str, host: str, msg: Message) -> str:
    """The topic a message is published on."""
    return f"{prefix}/{host}/{msg.source}/{msg.type}/{msg.name}"


def valid_filter(text: str) -> str | None:
    """Why ``text`` is not an MQTT topic filter (``None``: it is one)."""
    if not text:
        return "empty"
    levels = text.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "'#' must be a whole level, the last one"
        if "+" in level and level != "+":
            return "'+' must be a whole level"
    return None


def matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches ``topic_filter`` (MQTT's ``+`` and ``#`` wildcards)."""
    want = topic_filter.split("/")
    have = topic.split("/")
    for i, level in enumerate(want):
        if level == "#":
            return True
        if i >= len(have) or (level != "+" and level != have[i]):
            return False
    return len(want) == len(have)


def matches_any(filters: tuple[str, ...], topic: str) -> bool:
    return any(matches(f, topic) for f in filters)


@dataclass(frozen=True, slots=True)
class ReplyTo:
    """Where the answer to a command from MQTT goes: a topic, and the MQTT 5
    correlation data to send back with it (``None``: none was given)."""

    topic: str
    correlation: bytes | None = None


@dataclass(frozen=True, slots=True)
class Request:
    """A field-form request topic: ``<topic>/request`` -> ``commande`` to ``destination``."""

    topic: str
    destination: str
    commande: str


@dataclass(frozen=True, slots=True)
class Inject:
    """Write ``message`` to the broker; answer a command to ``reply_to``."""

    message: Message
    frame: bytes
    reply_to: ReplyTo | None


@dataclass(frozen=True, slots=True)
class Refuse:
    """Do not inject. ``answer`` is the error reply to publish (a command that could be
    read enough to be answered), else ``None``."""

    reason: str
    detail: str
    answer: tuple[ReplyTo, bytes] | None = None


def error_reply(identity: str, reply_to: ReplyTo, commande: str, id: str, *, code: str,
                message: str) -> tuple[ReplyTo, bytes]:
    """The bridge's own error answer, shaped as the broker's (a ``reponse`` from the
    bridge's identity, ``statut: erreur``)."""
    rep = Reponse(identity, identity, id, commande, Statut.ERREUR,
                  erreur={"code": code, "message": message})
    return reply_to, encode(rep).rstrip(b"\n")


def inbound(topic: str, payload: bytes, *, prefix: str, host: str, identity: str,
            requests: tuple[Request, ...], response_topic: str | None,
            correlation: bytes | None, in_flight: frozenset[str] = frozenset()) -> Inject | Refuse:
    """What to do with a PUBLISH from MQTT (already matched by an ``entree`` filter or
    a request topic). ``response_topic``/``correlation``: its MQTT 5 properties."""
    for req in requests:
        if topic == f"{req.topic}/{REQUEST}":
            return _field_request(req, payload, identity, response_topic, correlation)
    try:
        msg = decode(payload)
    except MessageInvalide as exc:
        return Refuse("invalid", str(exc))
    reply_to = None
    if isinstance(msg, Commande):
        # Without a response topic the answer goes where the out mapping puts replies.
        reply_to = ReplyTo(response_topic or f"{prefix}/{host}/{msg.destination}/reponse/"
                           f"{msg.commande}", correlation)
    expected = f"{prefix}/{host}/{identity}/{msg.type}/{msg.name}"
    problem = None
    if msg.source != identity:
        problem = ("source", f"source {msg.source!r}: what comes from MQTT is {identity!r}")
    elif topic != expected:
        problem = ("topic", f"topic {topic!r} does not match the message (expected {expected!r})")
    elif isinstance(msg, Commande) and msg.id in in_flight:
        problem = ("duplicate_id", f"a command with id {msg.id!r} is already in flight")
    if problem is not None:
        answer = None
        if isinstance(msg, Commande) and reply_to is not None:
            answer = error_reply(identity, reply_to, msg.commande, msg.id,
                                 code=Code.REFUSE, message=problem[1])
        return Refuse(problem[0], problem[1], answer)
    return Inject(msg, msg.raw.rstrip(b"\r\n") if msg.raw is not None else payload, reply_to)


def _field_request(req: Request, payload: bytes, identity: str, response_topic: str | None,
                   correlation: bytes | None) -> Inject | Refuse:
    reply_to = ReplyTo(response_topic or f"{req.topic}/{RESPONSE}/{identity}", correlation)
    id = new_id()
    detail = f"{req.topic}/{REQUEST}: the payload must be a JSON object (the arguments)"
    try:
        arguments = msgspec.json.decode(payload) if payload.strip() else {}
    except msgspec.DecodeError as exc:
        arguments, detail = None, f"{detail}: {exc}"
    if isinstance(arguments, dict):
        try:
            cmd = Commande(identity, req.destination, req.commande, arguments, id=id)
        except MessageInvalide as exc:
            detail = f"{req.topic}/{REQUEST}: {exc}"
        else:
            return Inject(cmd, encode(cmd).rstrip(b"\n"), reply_to)
    return Refuse("invalid", detail, error_reply(identity, reply_to, req.commande, id,
                                                 code=Code.MESSAGE_INVALIDE, message=detail))


def check_identity(name: str) -> str:
    """The bridge's identity: a plain domain name, never ``dom0`` or ``tous``."""
    if name in ("dom0", "tous"):
        raise ValueError(f"{name!r} is reserved; the bridge is a source of its own")
    return check_name(name, "identite")
