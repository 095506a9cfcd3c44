"""Encoding and decoding, sans-IO.

``encode(message)`` gives one compact UTF-8 JSON object and a final ``\\n``.
``decode(line)`` gives a :class:`~messagerie.model.Message` or raises
:class:`~messagerie.model.MessageInvalide`. :class:`FrameDecoder` turns a byte stream
cut anywhere into messages and per-frame :class:`FrameError` values; it never raises on
its input, resynchronises at the next newline and never buffers more than one frame.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Final, Generic, TypeVar, overload

import msgspec

from .errors import MessageInvalide, Reason
from .model import MESSAGE_TYPES, Message
from .wire import (
    ENVELOPE_FIELDS,
    KINDS,
    MODEL_TWINS,
    Kind,
    accepts,
    accepts_object,
    check_object,
    check_payload_keys,
    union,
)
from .wire import type_name as _type_name

MAX_FRAME: Final = 64 * 1024
"""Default cap on one frame, newline excluded."""

MAX_DEPTH: Final = 64
"""Deepest nesting of objects and arrays in a frame, the frame's own object and its
``payload`` counted (so contents may nest 62 levels). The protocol's own limit, below
every common JSON parser's, so that what one end accepts the other can parse, whatever
Python or parser version either runs (their own limits range from about 100 to 10 000)."""

_json_decode = msgspec.json.Decoder().decode
_json_encode = msgspec.json.Encoder().encode


def encode(message: Message) -> bytes:
    """One compact UTF-8 JSON object followed by ``\\n``.

    Raises :class:`MessageInvalide` for a message nested deeper than :data:`MAX_DEPTH`,
    which no receiver would accept."""
    try:
        frame = _json_encode(message.to_dict())
    except RecursionError:  # deeper than the encoder goes: far beyond MAX_DEPTH
        raise MessageInvalide(Reason.INVALID_JSON, _TOO_DEEP) from None
    check_depth(frame)
    return frame + b"\n"


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise MessageInvalide(Reason.DUPLICATE_KEY, f"duplicate key {key[:40]!r}")
        seen[key] = value
    return seen


def _check_duplicates(line: bytes, obj: dict[str, Any]) -> None:
    # Receivers may parse with another JSON library: with a repeated key, one keeps the
    # first value and another the last, so the broker could check one source and the
    # receiver believe another. Refuse repeated keys anywhere. Exact and cheap for the
    # common case: a compact frame that re-encodes to itself has no repeated key (a
    # repeat would have collapsed). Anything else takes the slow, exact path.
    if _json_encode(obj) != line:
        try:
            json.loads(line, object_pairs_hook=_reject_duplicates)
        except MessageInvalide:
            raise
        except ValueError as exc:  # msgspec and json disagree: refuse rather than guess
            raise MessageInvalide(Reason.INVALID_JSON, f"invalid JSON: {exc}") from None


def _strip(line: bytes | bytearray | memoryview | str) -> bytes:
    """The frame as bytes, without its final ``\\n`` or ``\\r\\n``."""
    if type(line) is not bytes:
        try:
            line = line.encode() if isinstance(line, str) else bytes(line)
        except UnicodeEncodeError as exc:  # a str with a lone surrogate
            raise MessageInvalide(Reason.INVALID_UTF8,
                                  f"unencodable character at {exc.start}") from None
    if line[-1:] == b"\n":
        line = line[:-2] if line[-2:] == b"\r\n" else line[:-1]
    return line


def _decode_object(line: bytes, *, checked: bool = False) -> dict[str, Any]:
    """Parse one frame (UTF-8 and JSON syntax throughout) into a dict (``checked``: its
    depth was checked already)."""
    if not checked:
        check_depth(line)
    try:
        obj = _json_decode(line)
    except (UnicodeDecodeError, msgspec.DecodeError, RecursionError) as exc:
        raise _parse_error(exc, line) from None
    if type(obj) is not dict:
        raise MessageInvalide(Reason.NOT_AN_OBJECT,
                              f"a message is a JSON object, got {_type_name(obj)}")
    return obj


def utf8_error(data: bytes) -> MessageInvalide | None:
    """The refusal of bytes that are not valid UTF-8, else ``None``.

    Decided here, not from a parser's exception class (parsers and their releases
    disagree on how they report it), so every release gives the same reason."""
    if data.isascii():
        return None
    try:
        data.decode()
    except UnicodeDecodeError as exc:
        return MessageInvalide(Reason.INVALID_UTF8, f"invalid UTF-8 at byte {exc.start}")
    return None


def _parse_error(exc: BaseException, line: bytes) -> MessageInvalide:
    """What a parser's refusal of ``line`` means for the protocol: invalid UTF-8
    anywhere in the frame comes first, then JSON syntax (a ``msgspec.ValidationError``,
    a ``DecodeError``, is an integer beyond what Python holds)."""
    return utf8_error(line) or MessageInvalide(Reason.INVALID_JSON, f"invalid JSON: {exc}")


# Nesting is counted on the brackets outside strings: strings are cut out, the other
# bytes deleted, braces folded into brackets, and the running depth is the running sum
# of +1 per ``[`` and -1 per ``]`` (all in C, a few nanoseconds per bracket).
#
# A string that is never closed runs to the end of the frame (as a parser reads it): the
# match then cannot fail, so no quote inside it starts a second scan (linear time, where
# requiring the closing quote made a 64 KiB frame of ``\"`` cost ~20 s).
_STRING: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_FOLD: Final = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKET: Final = bytes(b for b in range(256) if b not in b"[]{}")
_STEP: Final = tuple(1 if b == ord("[") else -1 for b in range(256))
_TOO_DEEP: Final = (f"invalid JSON: nested too deeply (more than {MAX_DEPTH} levels of "
                    "objects and arrays)")


def nesting_depth(line: bytes) -> int:
    """How deep the objects and arrays of a frame nest (its own object is level 1).

    Counted on the brackets outside strings, whether or not the JSON is valid, so the
    answer does not depend on any parser."""
    return _depth(_brackets(line))


def _brackets(line: bytes) -> bytes:
    return _STRING.sub(b"", line).translate(_FOLD, _NOT_BRACKET)


def _depth(brackets: bytes) -> int:
    """The highest running sum of +1 per ``[`` and -1 per ``]`` (0 for none).

    Exact for any input, in C for the common frame: each pass deletes the innermost
    pairs, ``[]``. In a balanced string those are the pairs with nothing inside, so a
    pass lowers every pair's nesting by exactly one level, and deleting pairs keeps a
    string balanced or unbalanced. Passes go on while they shrink the string by an
    eighth or more (so they cost at most eight reads of it); what is left is counted
    step by step, and if it is balanced the depth is the passes plus its own. A flat
    frame (15 000 ``{}``) is one pass, where a step in Python per bracket took ~70 ns
    per byte; an unbalanced string is counted as it came."""
    rest = brackets
    passes = 0
    while rest:
        inner = rest.replace(b"[]", b"")
        deleted = len(rest) - len(inner)
        if not deleted:
            break
        passes += 1
        slow = deleted * 8 < len(rest)
        rest = inner
        if slow:
            break
    if passes == 0:
        return _steps(brackets)
    if not rest:
        return passes
    sums = list(accumulate(map(_STEP.__getitem__, rest)))
    if sums[-1] == 0 and min(sums) >= 0:  # balanced
        return passes + max(sums)
    return _steps(brackets)


def _steps(brackets: bytes) -> int:
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


# A cheaper bound for a canonical frame judged valid: its own object and payload are two
# levels and hold, besides the skeleton (keys, punctuation, the type) and the memoised
# strings (ASCII without escapes: their length in bytes), only the values below them;
# a valid JSON value nested d levels deep takes at least 2d bytes. So a frame whose
# other bytes are at most _SHALLOW nests at most MAX_DEPTH levels, no count needed.
_SHALLOW: Final = 2 * (MAX_DEPTH - 2)


def _skeleton(kind: Kind) -> int:
    """Bytes of the shortest canonical frame of ``kind``: its required fields, all
    strings (a plain kind's), empty."""
    payload = {f.encode_name: "" for f in msgspec.structs.fields(kind.payload_cls) if f.required}
    return len(_json_encode({"type": kind.tag, "source": "", "destination": "",
                             "payload": payload}))


_SKELETON: Final = {kind: _skeleton(kind) for kind in KINDS.values() if kind.plain}


def check_depth(line: bytes) -> None:
    """Refuse a frame nested deeper than :data:`MAX_DEPTH` (``invalid_json``; invalid
    UTF-8, if any, is named first). Free for the common frame: a frame with no more
    opening brackets than the limit cannot exceed it."""
    if line.count(b"{") + line.count(b"[") <= MAX_DEPTH:
        return
    if nesting_depth(line) > MAX_DEPTH:
        raise utf8_error(line) or MessageInvalide(Reason.INVALID_JSON, _TOO_DEEP)


def decode(line: bytes | bytearray | memoryview | str) -> Message:
    """Decode and validate one message. A final ``\\n`` or ``\\r\\n`` is allowed.

    Raises :class:`MessageInvalide` naming the field and the reason.
    """
    if type(line) is bytes and line[-2:] == b"}}":
        # A bare notification (as FrameDecoder gives them) whose bytes up to its payload's
        # last value are a known one's (see _PREFIXES): only that value is parsed, and
        # proved canonical by its re-encode (so nothing in it is repeated); the rest of
        # the frame is the known frame's bytes. The common frame: the Message is built
        # here, not by _message().
        known = known_prefix(line)
        if known is not None:
            tail = line[len(known[7]):-2]
            try:
                value = _json_decode(tail)
                canonical = _json_encode(value) == tail
            except (UnicodeDecodeError, msgspec.DecodeError, RecursionError,
                    UnicodeEncodeError):
                canonical = False
            if canonical and (type(value) is dict or not known[6] or value is None):
                if len(tail) > _SHALLOW:  # else too short to nest past the limit
                    check_depth(line)
                payload = known[3].copy()
                payload[known[4]] = value
                msg = _new(_NOTIFICATION_CLASS)
                msg.source = known[0]
                msg.destination = known[1]
                msg.payload = payload
                msg.extra = {}
                msg.raw = line
                return msg
    if type(line) is not bytes or line[-1:] == b"\n":
        line = _strip(line)
    if not line.startswith(_PLAIN_PREFIXES):
        return _decode_typed(line)
    # A notification or commande (judged from the memos alone once decoded to a dict, see
    # wire.accepts_object): the parser first (msgspec raises RecursionError, far beyond
    # MAX_DEPTH, rather than fail), the depth before any verdict: a frame refused for its
    # depth is refused so whatever else is wrong with it.
    try:
        obj = _json_decode(line)
    except (UnicodeDecodeError, msgspec.DecodeError, RecursionError):
        obj = None
    # A frame that re-encodes to itself repeats no key anywhere (a repeat would have
    # collapsed); the common one is then judged from the memos of what passed before.
    canonical = type(obj) is dict and _json_encode(obj) == line
    if canonical:
        kind = known_canonical(obj, line)
        if kind is not None:  # _message(), inlined for the common frame
            if kind is _NOTIFICATION:
                _remember_frame(line, obj)
            cls = _CLASSES[kind]
            msg = _new(cls)
            msg.source = obj["source"]
            msg.destination = obj["destination"]
            msg.payload = obj["payload"]
            msg.extra = {}
            msg.raw = line
            return msg
    check_depth(line)
    if type(obj) is not dict:
        obj = _decode_object(line, checked=True)  # raises, explaining why
    return _from_object(obj, line, canonical=canonical)


def _decode_typed(line: bytes) -> Message:
    """The other frames (reponse, journal, anything not canonical): straight into the
    wire's Structs, the contents decoded. A frame that re-encodes to itself repeated no
    key and had none unknown."""
    check_depth(line)
    try:
        s = _decode_twin(line)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        s = None
    if s is not None and _json_encode(s) == line:
        kind = MODEL_TWINS[type(s)]
        if accepts(s, kind) is not None:
            return _message(kind, s.source, s.destination, _payload(kind, s.payload), line)
    # Anything else (unknown keys, another order, spaces, a refusal to explain) as an
    # object, which keeps every key; the Struct already decoded spares a conversion.
    return _from_object(_decode_object(line, checked=True), line, s)


_PLAIN_PREFIXES: Final = tuple(b'{"type":"%s",' % tag.encode() for tag, kind in KINDS.items()
                               if kind.plain)
_decode_twin = msgspec.json.Decoder(union(MODEL_TWINS)).decode
_asdict = msgspec.structs.asdict
_UNSET = msgspec.UNSET


def _payload(kind: Kind, p: Any) -> dict[str, Any]:
    payload = _asdict(p)
    for field in kind.optional:
        if payload[field] is _UNSET:  # an optional field that was absent stays absent
            del payload[field]
    return payload


def known_canonical(obj: dict[str, Any], line: bytes) -> Kind | None:
    """The :class:`Kind` of ``obj``, decoded from ``line``, which it re-encodes to
    (so no key in it is repeated), if it is valid as judged from the memos
    (:func:`~messagerie.wire.accepts_object`), its depth checked; else ``None``."""
    accepted = accepts_object(obj)
    if accepted is None:
        return None
    kind, size = accepted
    if len(line) - _SKELETON[kind] - size > _SHALLOW:
        check_depth(line)
    check_payload_keys(kind, obj["payload"])  # after the depth: no verdict comes before it
    return kind


def from_dict(obj: dict[str, Any]) -> Message:
    """Validate a JSON object already parsed (e.g. by a caller's own JSON library)."""
    return _from_object(obj, None)


def _from_object(obj: dict[str, Any], line: bytes | None, s: Any = None, *,
                 canonical: bool = False) -> Message:
    if line is not None and not canonical:
        _check_duplicates(line, obj)
    kind = check_object(obj, s)
    extra = {k: v for k, v in obj.items() if k not in ENVELOPE_FIELDS} if len(obj) > 4 else {}
    return _message(kind, obj["source"], obj["destination"], obj["payload"], line, extra=extra)


_CLASSES: Final = {kind: MESSAGE_TYPES[kind.tag] for kind in KINDS.values()}

# Canonical notifications by their bytes up to their payload's last key (the prefix),
# with what the rest of such a frame must be: decode() and envelope.decode_envelope()
# keep them, at most 4096 (on the notification's Kind, so that wire.clear_memos()
# forgets them with the other memos). A frame made of a prefix, the same last key, one
# JSON value and the "}}" closing the payload and the frame has the envelope of the frame
# the prefix was taken from: its type, source, destination and payload keys (every one
# but the last passed the case rule, none repeated, with string values only, so that a
# decode can share them), and the last key's value is the only part of it that is its
# own. Its depth, syntax, UTF-8 and (for a decode) its repeated keys are then checked on
# that value alone, and its depth bounded from its length as for any frame.
#
# Where a frame's last key starts is looked for (a memo lookup only misses when the guess
# is wrong): its data's key, first, else the last ``,"`` in the frame, which is right
# when the last value holds none (a string, a number, true, false or null). In a
# canonical notification, the first ``,"data":{`` is the payload's data (names, tokens
# and string values hold no unescaped quote), so a mouse move's data hits whatever it
# holds.
#
# An entry: (source, destination, categorie, the payload before its last key as a dict
# never handed out, the last key, its bytes with the comma and colon around it, whether
# the value must be an object or null, the prefix and those bytes). The entry found last
# is tried first, with one comparison (_RECENT), before the prefix is looked for.
_NOTIFICATION: Final = KINDS["notification"]
_NOTIFICATION_CLASS: Final = MESSAGE_TYPES["notification"]
_NOTIFICATION_START: Final = b'{"type":"notification",'
_PREFIXES: Final = _NOTIFICATION.prefixes
_RECENT: Final = _NOTIFICATION.recent
_DATA_OBJECT: Final = b',"data":{'
_DATA_KEY: Final = b',"data":'
_NEXT_KEY: Final = b',"'
_TOP_ORDER: Final = ["type", "source", "destination", "payload"]
_new = object.__new__


def known_prefix(line: bytes) -> tuple[Any, ...] | None:
    """The entry of _PREFIXES that ``line`` (a bare notification ending with "}}")
    starts with, its last key included, else None: the one found last first (_RECENT,
    one comparison), else looked for, and then it is the one tried first."""
    recent = _RECENT[0]
    if line.startswith(recent[7]):
        return recent
    if not line.startswith(_NOTIFICATION_START):
        return None
    # Data (an object) last ends the frame with "}}}", else the last key is after the
    # last ``,"``.
    cut = line.find(_DATA_OBJECT) if line[-3:] == b"}}}" else line.rfind(_NEXT_KEY)
    found = _PREFIXES.get(line[:cut])
    if found is None or not line.startswith(found[5], cut):
        return None
    _RECENT[0] = found
    return found


def _remember_frame(line: bytes, obj: dict[str, Any]) -> None:
    """Remember the prefix of ``line``, a canonical notification accepted as ``obj``,
    if it has one: its payload last, the payload's last key its data or a key the
    protocol does not define (contents: any value), its other values strings."""
    p = obj["payload"]
    if list(obj) != _TOP_ORDER or not p:
        return
    *first, last = p
    if last in _NOTIFICATION.read:  # a field the protocol reads: not any value will do
        return
    template = {k: p[k] for k in first}
    if any(type(v) is not str for v in template.values()):
        return
    sep = _DATA_KEY if last == "data" else b"," + _json_encode(last) + b":"
    cut = len(line) - 2 - len(_json_encode(p[last])) - len(sep)
    if line[cut:cut + len(sep)] == sep:  # always: the frame is its own encoding
        _remember(line[:cut], (obj["source"], obj["destination"], p["categorie"],
                               template, last, sep, last == "data", line[:cut + len(sep)]))


def _remember_prefix(prefix: bytes, key: tuple[str, ...]) -> None:
    """Remember ``prefix``, the bytes up to the data (an object) of a canonical
    notification laid out as encode() writes it, accepted with these memoised values
    (source, destination, categorie, evenement)."""
    _remember(prefix, (key[0], key[1], key[2], {"categorie": key[2], "evenement": key[3]},
                       "data", _DATA_KEY, True, prefix + _DATA_KEY))


_PREFIX_MAX: Final = 512
"""Longest prefix remembered, its last key included: what a notification's own fields
take at most (names and tokens are bounded), so that the memo stays a few MiB whatever
the frames (an entry holds the prefix, the key and both together: a last key of 60 KB
let 4096 entries hold 740 MB)."""


def _remember(prefix: bytes, entry: tuple[Any, ...]) -> None:
    if len(entry[7]) > _PREFIX_MAX:  # the prefix and its last key, all an entry holds
        return
    if len(_PREFIXES) >= 4096:
        _PREFIXES.clear()
    _PREFIXES[prefix] = entry


def _message(kind: Kind, source: str, destination: str, payload: dict[str, Any],
             line: bytes | None, *, extra: dict[str, Any] | None = None) -> Message:
    cls = MESSAGE_TYPES[kind.tag]
    msg = cls.__new__(cls)
    msg.source = source
    msg.destination = destination
    msg.payload = payload
    msg.extra = extra or {}
    msg.raw = line
    return msg


@dataclass(frozen=True, slots=True)
class FrameError:
    """A frame the decoder refused: why, and enough of it to log."""

    reason: Reason
    detail: str
    size: int
    """Length of the frame in bytes (at least this much for ``too_large``)."""
    field: str | None = None
    excerpt: bytes = b""
    """The first bytes of the frame, for logs (at most 64)."""

    def __str__(self) -> str:
        where = f"{self.field}: " if self.field else ""
        return f"{self.reason}: {where}{self.detail}"


T = TypeVar("T")


class FrameDecoder(Generic[T]):
    """Split a byte stream into newline-terminated frames and decode each one.

    Feed it bytes as they come, in any fragmentation; it returns, in order, a
    :class:`Message` for each valid frame and a :class:`FrameError` for each bad one.
    It never raises on its input. A frame longer than ``max_frame`` bytes is refused
    as soon as the limit is passed and the rest of it is discarded without being
    buffered, up to the next newline. ``\\r\\n`` is accepted; empty lines are skipped.

    ``decode`` replaces :func:`decode` for each frame: a relay passes
    :func:`messagerie.envelope.decode_envelope` to get
    :class:`~messagerie.envelope.Envelope` values instead of messages. It must raise
    :class:`MessageInvalide` to refuse a frame, and refuse the same bytes alike every
    time: a frame equal to the last one refused in the same feed gets that refusal
    again without a call (a flood of one junk line costs one decode a read). ``batch`` (e.g.
    :func:`messagerie.envelope.decode_runs`) may validate the frames of one feed
    together, faster; it falls back on ``decode`` when it cannot.
    """

    __slots__ = ("_discarding", "_parts", "_size", "batch", "decode", "max_frame")

    @overload
    def __init__(self: FrameDecoder[Message], max_frame: int = MAX_FRAME) -> None: ...

    @overload
    def __init__(self, max_frame: int = MAX_FRAME, *, decode: Callable[[bytes], T],
                 batch: Callable[[list[bytes]], list[T] | None] | None = None) -> None: ...

    def __init__(self, max_frame: int = MAX_FRAME, *,
                 decode: Callable[[bytes], Any] = decode,
                 batch: Callable[[list[bytes]], list[Any] | None] | None = None) -> None:
        if max_frame < 1:
            raise ValueError("max_frame must be positive")
        self.max_frame = max_frame
        self.decode = decode
        """The function applied to each complete frame (may be replaced between feeds)."""
        self.batch = batch
        """Optional: called first with all the complete frames of one feed; it returns
        their items (not necessarily one per frame), or ``None`` to have each frame
        decoded by ``decode`` instead (which explains what is wrong)."""
        # An incomplete frame, as the chunks it came in: appending is O(1) and a newline
        # is looked for in new bytes only, so a frame sent a byte at a time costs
        # O(its size), not O(size²).
        self._parts: list[bytes] = []
        self._size = 0
        self._discarding = False

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame (never more than ``max_frame`` + 1)."""
        return self._size

    def feed(self, data: bytes) -> list[T | FrameError]:
        out: list[T | FrameError] = []
        if self._discarding:
            end = data.find(b"\n")
            if end < 0:
                return out
            self._discarding = False
            data = data[end + 1:]
        limit = self.max_frame
        if self._parts:
            if b"\n" not in data:
                self._parts.append(data)
                self._size += len(data)
                if self._size > limit + 1:
                    out.append(FrameError(Reason.TOO_LARGE,
                                          f"frame exceeds {limit} bytes without a newline",
                                          self._size, excerpt=b"".join(self._parts)[:64]))
                    self._discarding = True
                    self._parts = []
                    self._size = 0
                return out
            self._parts.append(data)
            data = b"".join(self._parts)
            self._parts = []
            self._size = 0
        lines = data.split(b"\n")
        rest = lines.pop()
        decode = self.decode
        batch = self.batch
        if batch is not None and lines and max(map(len, lines)) <= limit:
            try:
                items = batch(lines)
            except Exception:  # a bug there must not break the stream: frame by frame
                items = None
            if items is not None:
                out.extend(items)
                lines = []
        # The last frame refused and its refusal: the same bytes again (a flood of one
        # junk line) are refused alike without a decode, ``decode``'s verdict being a
        # function of the bytes. Within one feed: ``decode`` may change between feeds.
        refused: tuple[bytes, FrameError] | None = None
        for frame in lines:
            # \r\n: drop the \r so that ``raw`` is canonical and the fast path applies.
            line = frame[:-1] if frame[-1:] == b"\r" else frame
            if not line:
                continue
            if refused is not None and line == refused[0]:
                out.append(refused[1])
                continue
            if len(line) > limit:
                out.append(FrameError(Reason.TOO_LARGE,
                                      f"frame of {len(line)} bytes exceeds {limit}",
                                      len(line), excerpt=line[:64]))
                continue
            try:
                out.append(decode(line))
                continue
            except MessageInvalide as exc:
                error = FrameError(exc.reason, exc.detail, len(line), exc.field, line[:64])
            except Exception as exc:  # never let one frame break the stream
                error = FrameError(Reason.INVALID_JSON, f"undecodable frame: {exc!r}",
                                   len(line), excerpt=line[:64])
            refused = (line, error)
            out.append(error)
        if len(rest) > limit + 1:
            out.append(FrameError(Reason.TOO_LARGE,
                                  f"frame exceeds {limit} bytes without a newline",
                                  len(rest), excerpt=rest[:64]))
            self._discarding = True
        elif rest:
            self._parts.append(rest)
            self._size = len(rest)
        return out
