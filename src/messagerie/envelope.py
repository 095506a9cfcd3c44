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

The frame is decoded into the wire's own Structs (:mod:`messagerie.wire`, without their
patterns, which are checked against a memo) with the contents left as raw bytes. When it
re-encodes to itself (compact, keys in the order :func:`messagerie.encode` writes them)
that is the whole check; :func:`decode_runs` does the same for all the frames of a read
in one call, and when they all share their bytes up to their data (one domain's stream
of one event), checks the first frame so and the others' data alone. A canonical
notification whose bytes up to its payload's last key (its ``data``, or a key the
protocol does not define) are those of one accepted before is checked on that last
value alone (a bounded memo of those prefixes). Anything else
(other key orders, spaces, escapes, unknown keys, a refusal to explain) takes the exact
path, which validates the frame as an object the way :func:`messagerie.decode` does (a
compact one with an unknown key, such as the spec's example, judged from the memos as
``decode`` judges it), reading only the envelope's levels for repeated keys; when a full
decode fails there, the contents are kept raw (a number Python cannot hold is the
receiver's call), so both paths accept and refuse the same frames. The depth limit is
checked before any verdict; a canonical frame whose raw contents are too short to nest
past it is not counted.
"""

from __future__ import annotations

import json
from operator import eq
from typing import Any, Final

import msgspec
from msgspec import UNSET, Raw, Struct

from . import wire
from .codec import (
    _DATA_OBJECT,
    _PREFIXES,  # noqa: F401  (the relay's memo too: tests look at it here)
    _SHALLOW,
    _SKELETON,
    MAX_DEPTH,
    _decode_object,
    _json_decode,
    _remember_frame,
    _remember_prefix,
    _skeleton,
    _strip,
    check_depth,
    decode,
    known_canonical,
    known_prefix,
    utf8_error,
)
from .errors import MessageInvalide, Reason
from .model import Message
from .wire import DOM0, ERREUR_FIELDS, TOUS, Kind, accepts, check_object

_OPEN_BRACE: Final = ord("{")
_OBJECT_STARTS: Final = frozenset({b"{", b" ", b"\t", b"\r", b"\n"})
"""The first bytes a frame that is a JSON object may have (JSON's whitespace, then ``{``)."""


class _Envelope(Struct, gc=False, eq=False):
    type: str
    source: str
    destination: str


class Envelope(_Envelope, kw_only=True, gc=False, eq=False):
    """A frame whose envelope was validated: what routing, policy and logs need.

    ``name`` is what the policy calls the message (category, command or component),
    ``id`` the correlation id of a ``commande`` or ``reponse`` (else ``None``), ``raw``
    the frame's exact bytes (without the newline), to forward unchanged. A Struct: one
    is built per frame on the relay's hot path, in C (compared and hashed by identity,
    as any object).
    """

    name: str | None
    id: str | None
    raw: bytes

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


# -- the fast path: the canonical frame straight into the wire's Structs ----------------
# Contents are Raw: syntax-checked, not built. A frame in encode()'s form re-encodes to
# itself, which proves that no key was repeated (a repeat would have collapsed) and none
# was unknown (it would have been skipped).

_TWINS: Final = wire.twins(Raw)
_fast_decode = msgspec.json.Decoder(wire.union(_TWINS)).decode
_fast_decode_list = msgspec.json.Decoder(list[wire.union(_TWINS)]).decode  # type: ignore[misc]
_decode_raws = msgspec.json.Decoder(list[Raw]).decode
_fast_encode = msgspec.json.Encoder().encode
_JOURNAL: Final = wire.KINDS["journal"]
# decode_envelope() reads a canonical notification's data from the frame's last bytes:
# payload is the frame's last field, data the payload's.
assert msgspec.structs.fields(wire.Notification)[-1].name == "payload"
assert msgspec.structs.fields(wire.NotificationPayload)[-1].name == "data"


def _envelope(s: Any, kind: Kind, raw: bytes) -> Envelope | None:
    """The envelope of the loose-decoded canonical frame ``s``, if valid."""
    key = accepts(s, kind)
    if key is None:
        return None
    return _build(kind, key, s, raw)


def _build(kind: Kind, key: tuple[str, ...], s: Any, raw: bytes) -> Envelope:
    return Envelope(kind.tag, key[0], key[1], name=key[2],
                    id=s.payload.id if kind.has_id else None, raw=raw)


def _utf8(data: bytes) -> bool:
    """Valid UTF-8? (Raw contents are not decoded, so it is checked here.)"""
    return data.isascii() or utf8_error(data) is None


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
    run = _known_run(lines)
    if run is not None:
        return [run]
    # The parser first (msgspec raises RecursionError, far beyond MAX_DEPTH, rather than
    # fail); the depth limit is checked below, before any verdict.
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
    longest = max(map(len, lines))
    if longest > _UNCOUNTED and _too_deep(b"\n".join(lines)):
        return None
    out: list[Envelope | Run] = []
    start = 0  # first line of the current run
    key: tuple[str, ...] | None = None
    for i, s in enumerate(decoded):
        kind = _TWINS[type(s)]
        valid = accepts(s, kind) if kind is not _JOURNAL else None  # journals: one by one
        if valid is None:
            return None
        if kind is _NOTIFICATION and s.destination not in (TOUS, DOM0):
            here = valid[:3]  # source, destination, categorie
            if here == key:
                continue  # the run goes on
            if key is not None:
                _close_run(out, lines, decoded, start, i)
            key = here
            start = i
            continue
        if key is not None:
            _close_run(out, lines, decoded, start, i)
            key = None
        out.append(_build(kind, valid, s, lines[i]))
        start = i + 1
    if key is not None:
        _close_run(out, lines, decoded, start, len(lines))
    return out


_NOTIFICATION: Final = wire.KINDS["notification"]


# The depth limit over a run of canonical frames (each decoded into a twin: its own
# object and payload, and below them only its contents, raw). A valid JSON value nested
# d levels deep takes at least 2d bytes, so a frame whose contents take at most _SHALLOW
# bytes nests within MAX_DEPTH: true of every frame no longer than the shortest canonical
# frame of any type plus _SHALLOW, and of a notification whose data, after a prefix
# shared by the run, is that short. Otherwise a frame deeper than the limit has more
# than MAX_DEPTH opening brackets: with the run's other bytes deleted (two C calls for
# the whole run), more than MAX_DEPTH of them in a row, no newline between.
_UNCOUNTED: Final = min(map(_skeleton, wire.KINDS.values())) + _SHALLOW
_OPENERS: Final = bytes.maketrans(b"[", b"{")
_NOT_OPENER: Final = bytes(b for b in range(256) if b not in b"{[\n")
_DEEPER: Final = b"{" * (MAX_DEPTH + 1)
_DEEPER_DATA: Final = b"{" * (MAX_DEPTH - 1)
"""Openers in a row that may put a notification's data past MAX_DEPTH, below the two
levels of its envelope."""


def _too_deep(run: bytes) -> bool:
    """May a frame of ``run`` (frames joined by newlines) nest past MAX_DEPTH?"""
    return _DEEPER in run.translate(_OPENERS, _NOT_OPENER)


def _known_run(lines: list[bytes]) -> Run | None:
    """The common case, a read of one domain's stream of one event: every frame is the
    first one's bytes up to its data, an object, then the two braces that close its
    payload and itself. Then the first frame is checked as :func:`decode_runs` checks
    any (canonical, valid), and of the others only their data, all in one parse.

    Each frame then has the first one's envelope: the bytes before its data are the
    same, and what follows (``}}``) leaves no room for another key; its data is valid
    JSON (syntax, UTF-8, depth) and an object, which is all :func:`decode_envelope`
    asks of it. ``None`` when any of that does not hold: the caller decides then."""
    first = lines[0]
    n = len(lines)
    cut = first.find(b',"data":{')
    # In a canonical notification the first ``,"data":{`` is the payload's: names and
    # tokens cannot contain a quote.
    if cut < 0 or n < 2 or first[-2:] != b"}}":
        return None
    head = first[:cut + 8]  # up to ``"data":``
    data = b"\n".join(lines) + b"\n"
    # Every line after the first starts with the head and an object, every line ends
    # with ``}}``: the lines hold no newline, so each occurrence is a line boundary
    # (one C call for the read).
    if data.count(b"}}\n" + head + b"{") != n - 1 or data[-3:] != b"}}\n":
        return None
    start = len(head)
    contents = [line[start:-2] for line in lines]
    joined = b",".join(contents)
    try:
        raws = _decode_raws(b"[" + joined + b"]")
    except (msgspec.DecodeError, RecursionError):
        return None
    # Each data is one value, exactly its own bytes: as many values as lines, each as
    # long as its line's data. The values lie in order between the brackets, one byte
    # at least between two; their lengths add up to all but the n - 1 commas and the
    # brackets, so none has a byte more around it and each is where its line's data
    # is. Without it a data ``{"a":"`` and the next line's ``{"b":"`` could make one
    # value, and a third line's ``{"c":1},{"d":2}`` two.
    if len(raws) != n or list(map(len, raws)) != list(map(len, contents)):
        return None
    if not _utf8(joined):
        return None
    # The depth of each frame: its envelope's two levels, then its data's, bounded as
    # _too_deep bounds a run's but on the data alone (half the bytes of a mouse move).
    if max(map(len, contents)) > _SHALLOW and _DEEPER_DATA in b"\n".join(contents).translate(
            _OPENERS, _NOT_OPENER):
        return None
    try:
        s = _fast_decode(first)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    kind = _TWINS[type(s)]
    if kind is not _NOTIFICATION or _fast_encode(s) != first:
        return None
    envelope = _envelope(s, kind, first)
    if envelope is None or envelope.destination in (TOUS, DOM0):
        return None
    return Run(envelope, n, data)


def _close_run(out: list[Envelope | Run], lines: list[bytes], decoded: list[Any],
               start: int, end: int) -> None:
    s = decoded[start]
    envelope = _build(_NOTIFICATION, (s.source, s.destination, s.payload.categorie), s,
                      lines[start])
    if end - start == 1:
        out.append(envelope)
    else:
        out.append(Run(envelope, end - start, b"\n".join(lines[start:end]) + b"\n"))


# -- the exact path -----------------------------------------------------------------------
# For frames the fast path does not take (other key orders, spaces, escapes, unknown
# keys, a refusal to explain). Same verdicts: the envelope's values are decoded, the
# contents replaced by stand-ins of their JSON kind, and the object is validated as
# messagerie.decode() validates one; so a number or a key inside the contents is judged
# the same way whichever path a frame takes.

_decode_map = msgspec.json.Decoder(dict[str, Raw]).decode
_KIND_OF_FIRST_BYTE: Final[dict[int, Any]] = {
    ord("{"): {}, ord("["): [], ord('"'): "", ord("t"): True, ord("f"): False,
    ord("n"): None}
_TOP_FIELDS: Final = frozenset(("type", "source", "destination"))


def _placeholder(raw: Raw) -> Any:
    """A value of the same JSON kind as ``raw`` (contents are checked for kind only)."""
    return _KIND_OF_FIRST_BYTE.get(memoryview(raw)[0], 0)


def _value(raw: Raw) -> Any:
    try:
        return _json_decode(raw)
    except msgspec.DecodeError as exc:  # a number out of range where a value is read
        raise MessageInvalide(Reason.INVALID_JSON, f"invalid JSON: {exc}") from None


def _map(raw: Raw | None) -> dict[str, Raw] | None:
    return _decode_map(raw) if raw is not None and memoryview(raw)[0] == _OPEN_BRACE else None


def _level(raw: dict[str, Raw], read: frozenset[str]) -> dict[str, Any]:
    return {k: _value(v) if k in read else _placeholder(v) for k, v in raw.items()}


def _exact(line: bytes, s: Any) -> Envelope:
    """The exact path; ``s`` is the frame decoded into a twin, if it could be. The depth
    is checked before any verdict, as in :func:`messagerie.decode`."""
    try:
        obj = _json_decode(line)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        check_depth(line)
        # Perhaps valid JSON with a number Python cannot hold, which may be in the
        # contents (the receiver's call): decide with the contents kept raw.
        return _exact_raw(line)
    if type(obj) is dict and _fast_encode(obj) == line:  # canonical, an unknown key kept
        kind = known_canonical(obj, line)
        if kind is not None:
            if kind is _NOTIFICATION:
                _remember_frame(line, obj)
            p = obj["payload"]
            return Envelope(kind.tag, obj["source"], obj["destination"],
                            name=p[kind.name_field], id=p["id"] if kind.has_id else None,
                            raw=line)
    check_depth(line)
    if type(obj) is not dict:
        _decode_object(line, checked=True)  # raises: not an object, as decode() says it
    if _fast_encode(obj) != line:  # re-encodes to itself: nothing repeated anywhere
        _envelope_duplicates(line)  # not compact, or a key collapsed: find out exactly
    return _checked(obj, line, s)


def _checked(obj: dict[str, Any], line: bytes, s: Any = None) -> Envelope:
    kind = check_object(obj, s)
    p = obj["payload"]
    return Envelope(kind.tag, obj["source"], obj["destination"], name=p[kind.name_field],
                    id=p["id"] if kind.has_id else None, raw=line)


def _exact_raw(line: bytes) -> Envelope:
    try:
        top = _decode_map(line)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        # Not a JSON object: explained as decode() explains it (same reason, same
        # place: which of two faults comes first depends on the parser's path).
        _decode_object(line, checked=True)
        raise MessageInvalide(Reason.INVALID_JSON, f"invalid JSON: {exc}") from None
    error = utf8_error(line)  # UTF-8 throughout: raw contents are not decoded
    if error is not None:
        raise error
    obj = _level(top, _TOP_FIELDS)
    levels: list[tuple[dict[str, Raw], bytes]] = [(top, line)]
    raw_payload = top.get("payload")
    payload_map = _map(raw_payload)
    if payload_map is not None:
        levels.append((payload_map, bytes(raw_payload)))  # type: ignore[arg-type]
        kind = wire.KINDS.get(obj["type"]) if type(obj.get("type")) is str else None
        payload = obj["payload"] = _level(payload_map, kind.read if kind else frozenset())
        if kind is not None and kind.with_erreur:
            raw_erreur = payload_map.get("erreur")
            erreur_map = _map(raw_erreur)
            if erreur_map is not None:
                levels.append((erreur_map, bytes(raw_erreur)))  # type: ignore[arg-type]
                payload["erreur"] = _level(erreur_map, ERREUR_FIELDS)
    if any(_fast_encode(m) != raw for m, raw in levels):
        _envelope_duplicates(line)  # not compact, or a key collapsed: find out exactly
    return _checked(obj, line)


def _envelope_duplicates(line: bytes) -> None:
    """Refuse a key repeated at the envelope's levels (top, payload, erreur).

    Every object is parsed as a tuple of its (key, value) pairs: ``tuple`` is a builtin,
    so a frame of many objects costs no Python call per object (a Python hook did: 15 000
    ``{}`` took two thirds of the envelope check's time). Only the envelope's levels are
    then looked at; the last of repeated keys is the value, as in a dict.
    """
    try:  # numbers as text: the syntax was checked, their range is not the question
        top = json.loads(line, object_pairs_hook=tuple, parse_int=str, parse_float=str)
    except ValueError as exc:  # msgspec and json disagree: refuse rather than guess
        raise MessageInvalide(Reason.INVALID_JSON, f"invalid JSON: {exc}") from None
    payload = _pair_value(top, "payload")
    erreur = (_pair_value(payload, "erreur") if _pair_value(top, "type") == "reponse"
              else None)  # a reponse's erreur is envelope; elsewhere it is contents
    for where, value in (("", top), ("payload.", payload), ("payload.erreur.", erreur)):
        if type(value) is not tuple:
            continue
        seen: set[str] = set()
        for key, _ in value:
            if key in seen:
                raise MessageInvalide(Reason.DUPLICATE_KEY, f"duplicate key {key[:40]!r}",
                                      f"{where}{key[:40]}")
            seen.add(key)


def _pair_value(obj: Any, key: str) -> Any:
    """The value of ``key`` in an object parsed as pairs (the last one), else None."""
    if type(obj) is not tuple:
        return None
    found = None
    for k, v in obj:
        if k == key:
            found = v
    return found


def decode_envelope(line: bytes | bytearray | memoryview | str) -> Envelope:
    """Validate one frame's envelope (see the module's documentation) and return it.

    A final ``\\n`` or ``\\r\\n`` is allowed. Raises :class:`MessageInvalide` naming
    the field and the reason, as :func:`messagerie.decode` does.
    """
    if type(line) is bytes and line[-2:] == b"}}":
        # A bare notification (as FrameDecoder gives them) whose bytes up to its payload's
        # last value are a known one's (see codec._PREFIXES) has its envelope: only that
        # value is checked (one JSON value, an object or null if it is the data, valid
        # UTF-8, its depth bounded).
        known = known_prefix(line)
        if known is not None:
            tail = line[len(known[7]):-2]
            try:
                _decode_raw(tail)  # one JSON value, and nothing after it but spaces
                valid = (not known[6] or tail[:1] in _OBJECT_OR_NULL) and (
                    tail.isascii() or utf8_error(tail) is None)
            except (msgspec.DecodeError, RecursionError):
                valid = False
            if valid:
                if len(tail) > _SHALLOW:  # else too short to nest past the limit
                    check_depth(line)
                return Envelope(_NOTIFICATION_TAG, known[0], known[1], name=known[2],
                                id=None, raw=line)
    if type(line) is not bytes or line[-1:] == b"\n":
        line = _strip(line)
    if line[:1] not in _OBJECT_STARTS:
        # Not an object, whatever follows: refused as decode() refuses it (the depth,
        # then the parser's verdict), in one parse; the exact path would take four.
        # The cheap refusal of a flood of junk lines (``x``): each costs its channel's
        # turn as much as a mouse move, not five times as much.
        _decode_object(line)
    # The parser first (msgspec raises RecursionError, far beyond MAX_DEPTH, rather than
    # fail), the depth before any verdict: a frame refused for its depth is refused so
    # whatever else is wrong with it.
    try:
        s = _fast_decode(line)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return _exact(line, None)  # explained there
    if _fast_encode(s) == line and (line.isascii() or utf8_error(line) is None):
        cut = line.find(_DATA_OBJECT)
        kind = _TWINS[type(s)]
        key = kind.key(s)
        # accepts(), inlined for the common notification: known names, and data an object.
        # Canonical, the frame ends with its payload, the payload with its data when it has
        # some (else with the string evenement): "}" as the frame's third byte from the end
        # closes data, an object. Its depth is bounded as decode() bounds it
        # (codec.known_canonical).
        size = kind.known.get(key) if kind is _NOTIFICATION else None
        if size is not None and line[-3] == _CLOSE_BRACE:
            if len(line) - _SKELETON[kind] - size > _SHALLOW:
                check_depth(line)
            if cut > 0:
                _remember_prefix(line[:cut], key)
            return Envelope(kind.tag, key[0], key[1], name=key[2], id=None, raw=line)
        if _shallow(s.payload, kind):
            envelope = _envelope(s, kind, line)
            if envelope is not None:
                if cut > 0 and kind is _NOTIFICATION:
                    _remember_prefix(line[:cut], key)
                return envelope
    return _exact(line, s)  # not canonical, or to explain


# Canonical notifications by their bytes up to their payload's last key (codec.py's
# memo, which decode() fills and reads too; see codec._PREFIXES): a frame made of a known
# prefix, the same last key, one JSON value and "}}" has the envelope of the frame the
# prefix was taken from. Only that value is its own: one JSON value (a raw decode: its
# syntax), an object or null if it is the data, valid UTF-8, its depth bounded from its
# length or counted. A canonical notification accepted here with its data an object
# leaves its prefix in the memo.
_NOTIFICATION_TAG: Final = _NOTIFICATION.tag
_decode_raw = msgspec.json.Decoder(Raw).decode
_OBJECT_OR_NULL: Final = (b"{", b"n")


# A canonical frame decoded into a twin is its own object and payload (two levels) with
# its contents raw below them; a valid JSON value nested d levels deep takes at least 2d
# bytes, so contents of at most _SHALLOW bytes each keep the frame within MAX_DEPTH
# levels, no count needed.
_CLOSE_BRACE: Final = ord("}")


def _shallow(payload: Any, kind: Kind) -> bool:
    """Are the raw contents of this payload short enough to need no depth count?"""
    for name in kind.contents:
        value = getattr(payload, name)
        if value is not UNSET and len(value) > _SHALLOW:
            return False
    return True


def decode_complete(line: bytes | bytearray | memoryview | str) -> Envelope:
    """The envelope of a frame validated completely by :func:`messagerie.decode`
    (repeated keys refused inside the contents too): the broker's
    ``validation = "complete"``."""
    message = decode(line)
    assert message.raw is not None
    return Envelope.of(message)
