"""Envelope-only decoding, sans-IO: what a relay needs to route a frame, and no more.

:func:`decode_envelope` checks a frame the way a relay must and returns an
:class:`Envelope` (type, source, destination, name, id and the frame's bytes):

* the whole frame is one JSON object in valid UTF-8 (syntax checked throughout,
  ``data`` included: a receiver never gets bytes it cannot parse);
* the envelope is valid exactly as :func:`messagerie.decode` checks it: ``type``,
  ``source`` and ``destination`` (names, ``tous`` rules), ``payload`` an object with the
  fields its type requires (``categorie``/``evenement``; ``id``/``commande``;
  ``id``/``commande``/``statut``/``erreur``; the journal's fields), and no key repeated
  at the top level, in ``payload`` or in a ``reponse``'s ``erreur``;
* the contents (``data``, ``arguments``, ``resultat``, the values of keys the protocol
  does not define) are not interpreted: they must be valid JSON of the right kind (an
  object where the spec says so), but what only a full decode finds inside them (a
  repeated key, a number beyond a double or Python's integer digits limit) is left to
  the receiver, whose :func:`messagerie.decode` refuses it. The relay decides nothing
  on them, so it cannot be misled by them.

The common frame, compact JSON with the keys in the order :func:`messagerie.encode`
writes them, is decoded into C structures with the contents left as raw bytes and
checked by re-encoding: 1.4 us for a mouse move against 2.0 for :func:`messagerie.decode`,
0.8 to 1.0 us when :func:`decode_runs` checks a read's frames together. Anything else
(other key orders, spaces, escapes, unknown keys) takes an exact slow path that keeps
the contents raw too: both paths accept and refuse the same frames.
"""

from __future__ import annotations

import json
from itertools import repeat
from operator import eq, methodcaller
from typing import Any, ClassVar, Final

import msgspec
from msgspec import UNSET, Raw, Struct, UnsetType

from .codec import (
    MAX_DEPTH,
    _decode_object,
    _from_object,
    _json_decode,
    _parse_error,
    _strip,
    check_depth,
    decode,
    utf8_error,
)
from .model import (
    DOM0,
    ERREUR_FIELDS,
    MESSAGE_TYPES,
    TOUS,
    Message,
    MessageInvalide,
    Reason,
    _valid_token,
    valid_name_or_tous,
)

_OPEN_BRACE: Final = ord("{")
_NULL: Final = Raw(b"null")


class Envelope:
    """A frame whose envelope was validated: what routing, policy and logs need.

    ``name`` is what the policy calls the message (category, command or component),
    ``id`` the correlation id of a ``commande`` or ``reponse`` (else ``None``), ``raw``
    the frame's exact bytes (without the newline), to forward unchanged.
    """

    __slots__ = ("destination", "id", "name", "raw", "source", "type")

    def __init__(self, type: str, source: str, destination: str, *, name: str | None,
                 id: str | None, raw: bytes) -> None:
        self.type = type
        self.source = source
        self.destination = destination
        self.name = name
        self.id = id
        self.raw = raw

    @classmethod
    def of(cls, message: Message, raw: bytes | None = None) -> Envelope:
        """The envelope of a message (``raw`` defaults to the bytes it was decoded from)."""
        data = raw if raw is not None else message.raw
        if data is None:
            raise ValueError("a message built locally has no bytes: pass raw=encode(...)")
        return cls(message.type, message.source, message.destination, name=message.name,
                   id=message.id, raw=data)

    def __repr__(self) -> str:
        return (f"Envelope(type={self.type!r}, source={self.source!r}, "
                f"destination={self.destination!r}, name={self.name!r}, id={self.id!r})")


# -- the fast path: the canonical frame as C structures ----------------------------------
# Field order is messagerie.encode()'s: a frame in that form re-encodes to itself, which
# proves that no key was repeated (a repeat would have collapsed) and none was unknown
# (it would have been skipped). Contents are Raw: syntax-checked, not built.

class _NotificationPayload(Struct):
    categorie: str
    evenement: str
    data: Raw | UnsetType = UNSET


class _CommandePayload(Struct):
    id: str
    commande: str
    arguments: Raw | UnsetType = UNSET


class _Erreur(Struct):
    code: str
    message: str


class _ReponsePayload(Struct):
    id: str
    commande: str
    statut: str
    resultat: Raw | UnsetType = UNSET
    erreur: _Erreur | UnsetType = UNSET


class _Notification(Struct, tag_field="type", tag="notification"):
    kind: ClassVar[str] = "notification"
    source: str
    destination: str
    payload: _NotificationPayload


class _Commande(Struct, tag_field="type", tag="commande"):
    kind: ClassVar[str] = "commande"
    source: str
    destination: str
    payload: _CommandePayload


class _Reponse(Struct, tag_field="type", tag="reponse"):
    kind: ClassVar[str] = "reponse"
    source: str
    destination: str
    payload: _ReponsePayload


_fast_decode = msgspec.json.Decoder(_Notification | _Commande | _Reponse).decode
_fast_encode = msgspec.json.Encoder().encode


def _is_object(raw: Raw | UnsetType) -> bool:
    """An optional object: absent, ``null`` or ``{...}`` (``Raw`` keeps the exact
    bytes of the value, which in a canonical frame start with its first character)."""
    return raw is UNSET or memoryview(raw)[0] == _OPEN_BRACE or raw == _NULL


def _fast(line: bytes) -> Envelope | None:
    """The envelope of a canonical, valid frame; ``None`` means "take the exact path"
    (which explains refusals: this one only accepts)."""
    if not line.startswith(b'{"type":"'):
        return None  # not canonical (the tag comes first): spare junk a failed parse
    try:
        s = _fast_decode(line)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    if _fast_encode(s) != line:
        return None
    if not _utf8(line):
        return None
    return _checked(s, line)


def _utf8(data: bytes) -> bool:
    """Valid UTF-8? (Raw contents are not decoded, so it is checked here.)"""
    return data.isascii() or utf8_error(data) is None


def _checked(s: _Notification | _Commande | _Reponse, line: bytes) -> Envelope | None:
    """The envelope of a decoded canonical frame if its values are valid."""
    source = s.source
    destination = s.destination
    names = valid_name_or_tous.seen
    if source not in names or destination not in names or source == TOUS:
        return None
    tokens = _valid_token.seen
    p = s.payload
    if type(p) is _NotificationPayload:
        if p.categorie in tokens and p.evenement in tokens and _is_object(p.data):
            return Envelope("notification", source, destination, name=p.categorie, id=None,
                            raw=line)
        return None
    if destination == TOUS:
        return None  # a commande or reponse is never broadcast: explained by the exact path
    if type(p) is _CommandePayload:
        if p.commande in tokens and _valid_id(p.id) and _is_object(p.arguments):
            return Envelope("commande", source, destination, name=p.commande, id=p.id,
                            raw=line)
        return None
    assert type(p) is _ReponsePayload
    if not (p.commande in tokens and _valid_id(p.id)):
        return None
    ok = p.erreur is UNSET and p.statut == "ok"
    # An error carries no resultat (such a frame is explained by the exact path).
    failed = p.erreur is not UNSET and p.statut == "erreur" and p.resultat is UNSET
    if ok or failed:
        return Envelope("reponse", source, destination, name=p.commande, id=p.id, raw=line)
    return None


_fast_decode_list = msgspec.json.Decoder(list[_Notification | _Commande | _Reponse]).decode


class Run:
    """``count`` consecutive notifications with the same source, destination and
    category, each validated as :func:`decode_envelope` does: ``envelope`` is the
    first one's, ``data`` their bytes, newlines included, to forward unchanged."""

    __slots__ = ("count", "data", "envelope")

    def __init__(self, envelope: Envelope, count: int, data: bytes) -> None:
        self.envelope = envelope
        self.count = count
        self.data = data

    def __repr__(self) -> str:
        return f"Run({self.envelope!r}, count={self.count})"


def decode_runs(lines: list[bytes]) -> list[Envelope | Run] | None:
    """Validate many frames at once (bare, as :class:`~messagerie.FrameDecoder` gives
    them): consecutive unicast notifications to one domain with the same source and
    category come as one :class:`Run`, anything else as an :class:`Envelope`.

    ``None`` when any frame is not canonical, not valid, or needs more than the fast
    path: decode each frame with :func:`decode_envelope` then. A stream of mouse moves
    is checked here in one C call per read, not one per message."""
    if not lines:
        return []
    # No line opens more brackets than the depth limit (sound: a line's depth is at most
    # its count of ``{`` plus ``[``), so no parser reaches its own limit here.
    if max(map(bytes.count, lines, repeat(b"{"))) + max(map(bytes.count, lines, repeat(b"["))) \
            > MAX_DEPTH:
        return None
    framed = b"[" + b",".join(lines) + b"]"
    try:
        decoded = _fast_decode_list(framed)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    # Each line must be exactly one element, re-encoded to itself. A count and a
    # comparison of the whole are not enough: a frame cut over two lines (``[{}`` then
    # ``{}]``) plus two frames on one line (``{..},{..}``) decode to as many elements
    # as lines, and every envelope after the cut would be checked against another
    # line's bytes (a denied commande forwarded on an allowed notification's decision).
    if len(decoded) != len(lines) or not all(map(eq, map(_fast_encode, decoded), lines)):
        return None  # not aligned, not canonical, or an empty line made ",,"
    if not _utf8(framed):
        return None
    same = _same_envelope(lines, decoded)
    if same is not None:
        return [same]
    names = valid_name_or_tous.seen
    tokens = _valid_token.seen
    out: list[Envelope | Run] = []
    start = 0  # first line of the current run
    key: tuple[str, str, str] | None = None
    for i, s in enumerate(decoded):
        p = s.payload
        if type(p) is _NotificationPayload:
            source, destination, categorie = s.source, s.destination, p.categorie
            if not (p.evenement in tokens and _is_object(p.data)):
                return None
            if key is not None and key[0] == source and key[1] == destination \
                    and key[2] == categorie:
                continue  # the run goes on
            if (source not in names or destination not in names or categorie not in tokens
                    or source == TOUS):
                return None
            if key is not None:
                _close_run(out, lines, decoded, start, i)
            if destination in (TOUS, DOM0):
                key = None
                out.append(Envelope("notification", source, destination, name=categorie,
                                    id=None, raw=lines[i]))
                start = i + 1
            else:
                key = (source, destination, categorie)
                start = i
            continue
        if key is not None:
            _close_run(out, lines, decoded, start, i)
            key = None
        envelope = _checked(s, lines[i])
        if envelope is None:
            return None
        out.append(envelope)
        start = i + 1
    if key is not None:
        _close_run(out, lines, decoded, start, len(lines))
    return out


def _same_envelope(lines: list[bytes],
                   decoded: list[_Notification | _Commande | _Reponse]) -> Run | None:
    """The common case at the cost of one check per frame in C: every frame starts with
    the same bytes up to its ``"data":{``, so all have the first one's envelope
    (type, source, destination, categorie, evenement; contents an object)."""
    first = lines[0]
    cut = first.find(b',"data":{')
    # In a canonical notification the first ``,"data":{`` is the payload's: names and
    # tokens cannot contain a quote.
    if cut < 0 or len(lines) < 2 or type(decoded[0]) is not _Notification:
        return None
    prefix = first[:cut + 9]
    if sum(map(methodcaller("startswith", prefix), lines)) != len(lines):
        return None
    envelope = _checked(decoded[0], first)
    if envelope is None or envelope.destination in (TOUS, DOM0):
        return None
    return Run(envelope, len(lines), b"\n".join(lines) + b"\n")


def _close_run(out: list[Envelope | Run], lines: list[bytes],
               decoded: list[_Notification | _Commande | _Reponse], start: int, end: int) -> None:
    s = decoded[start]
    envelope = Envelope("notification", s.source, s.destination,
                        name=s.payload.categorie,  # type: ignore[union-attr]
                        id=None, raw=lines[start])
    if end - start == 1:
        out.append(envelope)
    else:
        out.append(Run(envelope, end - start, b"\n".join(lines[start:end]) + b"\n"))


def _valid_id(value: str) -> bool:
    # The id check of messagerie.model, inlined: 1-64 printable ASCII, no space.
    return 0 < len(value) <= 64 and value.isascii() and value.isprintable() and " " not in value


# -- the exact path -----------------------------------------------------------------------
# For frames the fast path does not take (other key orders, spaces, escapes, unknown
# keys, a cold memo). Same verdicts: contents stay raw here too, so a number or a key
# inside them is judged the same way whichever path a frame takes.

_decode_map = msgspec.json.Decoder(dict[str, Raw]).decode
CONTENTS: Final = frozenset(("data", "arguments", "resultat", "erreur"))
"""Payload fields left raw by the envelope check (a reponse's ``erreur`` is then read
for its ``code`` and ``message``)."""
_ENVELOPE_FIELDS: Final = {kind: cls.payload_fields - CONTENTS
                           for kind, cls in MESSAGE_TYPES.items()}
_KIND_OF_FIRST_BYTE: Final[dict[int, Any]] = {
    ord("{"): {}, ord("["): [], ord('"'): "", ord("t"): True, ord("f"): False,
    ord("n"): None}


def _placeholder(raw: Raw) -> Any:
    """A value of the same JSON kind as ``raw`` (contents are checked for kind only)."""
    return _KIND_OF_FIRST_BYTE.get(memoryview(raw)[0], 0)


def _value(raw: Raw) -> Any:
    try:
        return _json_decode(raw)
    except msgspec.DecodeError as exc:  # a number out of range where a value is read
        raise MessageInvalide(Reason.INVALID_JSON, f"invalid JSON: {exc}") from None


def _map(raw: Raw) -> dict[str, Raw] | None:
    return _decode_map(raw) if memoryview(raw)[0] == _OPEN_BRACE else None


def _slow(line: bytes) -> Envelope:
    try:
        obj = _json_decode(line)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        if isinstance(exc, msgspec.DecodeError) and "out of range" in str(exc):
            # Valid JSON with a number Python cannot hold: it may be in the contents,
            # which are the receiver's: decide with the contents kept raw.
            return _slow_raw(line)
        raise _parse_error(exc, line) from None  # junk: one parse, as decode() does
    if type(obj) is not dict:
        _decode_object(line)  # raises: not an object, named as decode() names it
    message = _from_object(obj, line, duplicates=_compact_or_no_repeat)
    return Envelope.of(message, line)


def _compact_or_no_repeat(line: bytes, obj: dict[str, Any]) -> None:
    if _fast_encode(obj) != line:  # re-encodes to itself: nothing repeated anywhere
        _envelope_duplicates(line)


def _slow_raw(line: bytes) -> Envelope:
    try:
        top = _decode_map(line)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        # Not a JSON object: explained as decode() explains it (same reason, same
        # place: which of two faults comes first depends on the parser's path).
        _decode_object(line)
        raise MessageInvalide(Reason.INVALID_JSON, f"invalid JSON: {exc}") from None
    error = utf8_error(line)  # UTF-8 throughout: raw contents are not decoded
    if error is not None:
        raise error
    obj: dict[str, Any] = {k: _value(v) if k in ("type", "source", "destination")
                           else _placeholder(v) for k, v in top.items()}
    levels: list[tuple[str, dict[str, Raw], bytes]] = [("", top, line)]
    raw_payload = top.get("payload")
    payload_map = _map(raw_payload) if raw_payload is not None else None
    if payload_map is not None:
        assert raw_payload is not None
        levels.append(("payload.", payload_map, bytes(raw_payload)))
        kind = obj.get("type")
        fields = _ENVELOPE_FIELDS.get(kind, frozenset()) if type(kind) is str else frozenset()
        payload = {k: _value(v) if k in fields else _placeholder(v)
                   for k, v in payload_map.items()}
        raw_erreur = payload_map.get("erreur") if obj.get("type") == "reponse" else None
        erreur_map = _map(raw_erreur) if raw_erreur is not None else None
        if erreur_map is not None:
            assert raw_erreur is not None
            levels.append(("payload.erreur.", erreur_map, bytes(raw_erreur)))
            payload["erreur"] = {k: _value(v) if k in ERREUR_FIELDS else _placeholder(v)
                                 for k, v in erreur_map.items()}
        obj["payload"] = payload

    def duplicates(line: bytes, obj: dict[str, Any]) -> None:
        if any(_fast_encode(m) != raw for _, m, raw in levels):
            _envelope_duplicates(line)  # not compact, or a key collapsed: find out exactly

    message = _from_object(obj, line, duplicates=duplicates)
    return Envelope.of(message, line)


def _envelope_duplicates(line: bytes) -> None:
    """Refuse a key repeated at the envelope's levels (top, payload, erreur)."""
    repeated: dict[int, tuple[dict[str, Any], str]] = {}

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for key, value in items:
            if key in d and id(d) not in repeated:
                repeated[id(d)] = (d, key)  # keeps d alive: its id stays its own
            d[key] = value
        return d

    try:  # numbers as text: the syntax was checked, their range is not the question
        top = json.loads(line, object_pairs_hook=pairs, parse_int=str, parse_float=str)
    except ValueError as exc:  # msgspec and json disagree: refuse rather than guess
        raise MessageInvalide(Reason.INVALID_JSON, f"invalid JSON: {exc}") from None
    payload = top.get("payload")
    erreur = (payload.get("erreur") if type(payload) is dict and top.get("type") == "reponse"
              else None)  # a reponse's erreur is envelope; elsewhere it is contents
    for where, value in (("", top), ("payload.", payload), ("payload.erreur.", erreur)):
        found = repeated.get(id(value))
        if found is not None and found[0] is value:
            raise MessageInvalide(Reason.DUPLICATE_KEY, f"duplicate key {found[1][:40]!r}",
                                  f"{where}{found[1][:40]}")


def decode_envelope(line: bytes | bytearray | memoryview | str) -> Envelope:
    """Validate one frame's envelope (see the module's documentation) and return it.

    A final ``\\n`` or ``\\r\\n`` is allowed. Raises :class:`MessageInvalide` naming
    the field and the reason, as :func:`messagerie.decode` does.
    """
    if type(line) is not bytes or line[-1:] == b"\n":  # FrameDecoder gives bare bytes
        line = _strip(line)
    check_depth(line)  # before any parser meets its own limit
    envelope = _fast(line)
    if envelope is not None:
        return envelope
    return _slow(line)


def decode_complete(line: bytes | bytearray | memoryview | str) -> Envelope:
    """The envelope of a frame validated completely by :func:`messagerie.decode`
    (repeated keys refused inside the contents too): the broker's
    ``validation = "complete"``."""
    message = decode(line)
    assert message.raw is not None
    return Envelope.of(message)
