"""The wire format, defined once: typed msgspec Structs tagged on ``type``.

Everything else derives from the Structs below (``Notification``, ``Commande``,
``Reponse``, ``Journal``: the frames as they travel):

* the model's validation (:mod:`messagerie.model`, :func:`messagerie.decode`);
* the relay's envelope check (:mod:`messagerie.envelope`), which decodes the same Structs
  with the contents (``data``, ``arguments``, ``resultat``, ``erreur``) kept as
  ``msgspec.Raw``: syntax-checked, never built;
* the JSON Schema (:mod:`messagerie.schema`, from ``msgspec.json.schema``);
* the refusal explanations: :func:`explain` maps msgspec's ``ValidationError`` (its
  path, ``$.payload.categorie``) to a :class:`~messagerie.errors.Reason` and a field.

What msgspec cannot say is here too, once, next to the types: ``tous`` is only a
destination and only for the types that may be broadcast, a ``reponse`` with ``statut``
``erreur`` carries an ``erreur`` object, patterns match the whole string (msgspec uses
``re.search``, whose ``$`` also matches before a final newline), and a key that equals a
field ignoring case is refused. Repeated keys are the codec's (msgspec keeps the last).

Decoding uses twins of these Structs derived by :func:`derive`: without the patterns
(checked afterwards against a bounded memo, a set lookup instead of a regex for names
and tokens that repeat endlessly), and with the contents either raw (the relay) or
decoded (the model). A notification or commande decoded to a dict is judged from those
memos alone once its source, destination and tokens have passed together
(:func:`accepts_object`). Only a refusal goes back to the Structs as written, to explain
it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from enum import Enum, StrEnum
from operator import attrgetter, itemgetter
from types import UnionType
from typing import Annotated, Any, ClassVar, Final, Union, get_args, get_origin

import msgspec
from msgspec import UNSET, Meta, Raw, Struct, UnsetType

from .errors import MessageInvalide, Reason

DOM0: Final = "dom0"
"""The name of the control domain: the broker and the services it hosts."""
TOUS: Final = "tous"
"""Broadcast destination: every connected domain and dom0, never the sender."""

NAME_MAX: Final = 64
"""Longest domain name accepted (Xen itself allows 64 bytes in xenstore paths we use)."""
NAME_PATTERN: Final = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
"""Domain names: 1 to 64 ASCII letters, digits, ``-``, ``_`` or ``.``, not starting with
punctuation. ``tous`` is reserved for broadcast and never names a domain."""
TOKEN_PATTERN: Final = "^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}$"
"""Categories, events and command names: open vocabularies, but bounded and free of
spaces and control characters so that policies can match them and logs stay clean."""
ID_PATTERN: Final = r"^[\x21-\x7e]{1,64}$"
"""Correlation ids: 1 to 64 printable ASCII characters without spaces."""
# [0-9], not \d: Python's \d also matches non-ASCII digits ("٢٠٢٤"), ECMA-262's does not.
HORODATAGE_PATTERN: Final = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?"
    r"(Z|[+-][0-9]{2}:[0-9]{2})$")
"""RFC 3339 date and time with an offset or ``Z``."""
DELAI_MAX: Final = 86400.0
"""Longest deadline a ``commande`` may carry, in seconds (a day). The broker also bounds
every command by its own ``limites.duree_commande``, whichever is first."""


class Statut(StrEnum):
    OK = "ok"
    ERREUR = "erreur"


class Niveau(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"


Name = Annotated[str, Meta(pattern=NAME_PATTERN,
                           description="A domain name, or 'tous' as a destination.")]
Token = Annotated[str, Meta(pattern=TOKEN_PATTERN,
                            description="A category, event, command or component name.")]
Id = Annotated[str, Meta(pattern=ID_PATTERN,
                         description="A correlation id: 1-64 printable ASCII, no spaces.")]
Horodatage = Annotated[str, Meta(pattern=HORODATAGE_PATTERN,
                                 description="RFC 3339 date and time with an offset or Z.")]
Delai = Annotated[float, Meta(gt=0, le=DELAI_MAX, description=(
    "Seconds the commander waits for the answer, counted from the command's receipt by "
    "the broker (the clocks of DomUs and dom0 are not assumed to agree)."))]
Contents = Raw
"""Any JSON value that the relay passes on without reading it."""
ObjectContents = dict[str, Raw] | None
"""Contents that must be an object (``null`` or absent read as an empty object)."""


class Erreur(Struct):
    """Why the command failed: a code (see class Code) and a text."""

    code: str
    message: str


class NotificationPayload(Struct):
    """Something happened: a category, an event and its data."""

    categorie: Token
    evenement: Token
    data: ObjectContents | UnsetType = UNSET


class CommandePayload(Struct):
    """Do something and answer with a reponse carrying the same id."""

    # delai: the commander's deadline, relative to the broker's receipt of the command.
    # Past min(delai, limites.duree_commande) the broker answers delai_depasse in the
    # destination's place and tells the destination the command is abandoned.

    id: Id
    commande: Token
    arguments: ObjectContents | UnsetType = UNSET
    delai: Delai | UnsetType = UNSET


class ReponsePayload(Struct):
    """The answer to the command with the same id."""

    # resultat (any value) when statut is ok; an Erreur object, required, when it is
    # erreur (and not read otherwise): see accepts() and explain_payload().

    id: Id
    commande: Token
    statut: Statut
    resultat: Contents | UnsetType = UNSET
    erreur: Contents | UnsetType = UNSET


class JournalPayload(Struct):
    """A log event, usually sent to dom0."""

    niveau: Niveau
    texte: str
    horodatage: Horodatage
    composant: Token
    data: ObjectContents | UnsetType = UNSET


class _Frame(Struct, tag_field="type"):
    """What every message has: its type (the tag), its source and its destination."""

    source: Name
    destination: Name


class Notification(_Frame, tag="notification"):
    """A notification message."""

    broadcastable: ClassVar[bool] = True
    name_field: ClassVar[str] = "categorie"
    payload: NotificationPayload


class Commande(_Frame, tag="commande"):
    """A commande message."""

    broadcastable: ClassVar[bool] = False
    name_field: ClassVar[str] = "commande"
    payload: CommandePayload


class Reponse(_Frame, tag="reponse"):
    """A reponse message."""

    broadcastable: ClassVar[bool] = False
    name_field: ClassVar[str] = "commande"
    payload: ReponsePayload


class Journal(_Frame, tag="journal"):
    """A journal message."""

    broadcastable: ClassVar[bool] = True
    name_field: ClassVar[str] = "composant"
    payload: JournalPayload


FRAMES: Final[tuple[type[Struct], ...]] = (Notification, Commande, Reponse, Journal)
"""The frame Structs, in the order the protocol lists them."""
Frame = Notification | Commande | Reponse | Journal
"""One frame: ``msgspec.json.Decoder(Frame)`` is the whole protocol's validator."""


def tag_of(cls: type[Struct]) -> str:
    tag = cls.__struct_config__.tag
    assert isinstance(tag, str)
    return tag


def field_names(cls: type[Struct]) -> frozenset[str]:
    return frozenset(f.encode_name for f in msgspec.structs.fields(cls))


ENVELOPE_FIELDS: Final = field_names(Notification) | {"type"}
ERREUR_FIELDS: Final = field_names(Erreur)


# -- twins ------------------------------------------------------------------------

_TWINS: dict[tuple[Any, Any, bool], Any] = {}


def derive(tp: Any, contents: Any, *, patterns: bool = False) -> Any:
    """``tp`` with ``Raw`` replaced by ``contents`` (object contents by
    ``dict[Any, contents]``) and, unless ``patterns``, the string patterns dropped
    (numeric bounds are kept; a Struct gives a Struct of the same name, tag and field
    order)."""
    key = (tp, contents, patterns)
    found = _TWINS.get(key)
    if found is None:
        found = _TWINS[key] = _derive(tp, contents, patterns)
    return found


def _derive(tp: Any, contents: Any, patterns: bool) -> Any:
    origin = get_origin(tp)
    if origin is Annotated:
        # Only patterns are dropped (checked against memos): numeric bounds cost nothing
        # to msgspec and have no memo, so the twins keep them.
        return tp if patterns or _pattern_of(tp) is None else get_args(tp)[0]
    if tp is Raw:
        return contents
    if isinstance(tp, type) and issubclass(tp, Struct):
        config = tp.__struct_config__
        fields = [(f.encode_name, derive(f.type, contents, patterns=patterns))
                  if f.required else
                  (f.encode_name, derive(f.type, contents, patterns=patterns), f.default)
                  for f in msgspec.structs.fields(tp)]
        return msgspec.defstruct(tp.__name__, fields, tag=config.tag,
                                 tag_field=config.tag_field, module=__name__)
    if origin is dict:
        value = derive(get_args(tp)[1], contents, patterns=patterns)
        return dict[str, value] if contents is Raw else dict[Any, value]  # type: ignore[valid-type]
    if origin is Union or origin is UnionType:
        args = get_args(tp)
        if not patterns and any(get_origin(a) is dict for a in args):
            # Object contents: taken as they come (Raw, or any value) and their kind
            # checked by accepts(), not rebuilt as a dict for every frame.
            args = (Raw, *(a for a in args if get_origin(a) is not dict and a is not type(None)))
        return Union[tuple(derive(a, contents, patterns=patterns) for a in args)]  # noqa: UP007
    return tp


def _has_raw(tp: Any) -> bool:
    return tp is Raw or any(_has_raw(a) for a in get_args(tp))


def union(cls: Iterable[type[Struct]]) -> Any:
    return Union[tuple(cls)]  # noqa: UP007  (built from a tuple)


# -- patterns, memoised ------------------------------------------------------------------

class Validated:
    """A pattern checked on the whole string, with a bounded memo of strings known to
    match: names and vocabularies repeat endlessly on a channel, and a set lookup is ten
    times cheaper than a regex. Bounded so that hostile input cannot grow it."""

    __slots__ = ("_fullmatch", "pattern", "seen")

    def __init__(self, pattern: str) -> None:
        assert pattern.startswith("^") and pattern.endswith("$")
        self.pattern = pattern
        self._fullmatch = re.compile(pattern[1:-1]).fullmatch
        #: Strings known valid (at most 4096).
        self.seen: set[str] = set()

    def __call__(self, value: object) -> bool:
        # Type first: a decoded list or object is unhashable and would raise in ``in``.
        if type(value) is not str:
            return False
        if value in self.seen:
            return True
        if self._fullmatch(value) is None:
            return False
        if len(self.seen) >= 4096:
            self.seen.clear()
        self.seen.add(value)
        return True


_PATTERNS: Final = {p: Validated(p) for p in (NAME_PATTERN, TOKEN_PATTERN, ID_PATTERN,
                                              HORODATAGE_PATTERN)}
valid_name_or_tous: Final = _PATTERNS[NAME_PATTERN]
"""True for a syntactically valid name, ``tous`` included (memoised)."""


def clear_memos() -> None:
    """Forget every string known valid (tests use it to start cold)."""
    for memo in _PATTERNS.values():
        memo.seen.clear()
    for kind in KINDS.values():
        kind.known.clear()
        kind.prefixes.clear()
        kind.recent[0] = NO_PREFIX
        kind.unambiguous = set(kind.payload_fields)


def _pattern_of(tp: Any) -> str | None:
    if get_origin(tp) is Annotated:
        for meta in get_args(tp)[1:]:
            if isinstance(meta, Meta) and meta.pattern is not None:
                return meta.pattern
    return None


def _constrained(cls: type[Struct]) -> list[tuple[str, Validated]]:
    """The string fields of ``cls`` that carry a pattern, with the memo of each."""
    return [(f.encode_name, _PATTERNS[p]) for f in msgspec.structs.fields(cls)
            if (p := _pattern_of(f.type)) is not None]


def _in_bounds(meta: Meta) -> Callable[[Any], bool]:
    """Is a decoded value a JSON number (not a boolean) within ``meta``'s bounds?"""
    gt, ge, lt, le = meta.gt, meta.ge, meta.lt, meta.le

    def check(value: Any) -> bool:
        # NaN compares false to everything: refused whatever the bounds.
        return (type(value) in (int, float) and (gt is None or value > gt)
                and (ge is None or value >= ge) and (lt is None or value < lt)
                and (le is None or value <= le))
    return check


def _bounded(cls: type[Struct]) -> list[tuple[str, Callable[[Any], bool]]]:
    """The number fields of ``cls`` that carry bounds, with a check of each."""
    out = []
    for f in msgspec.structs.fields(cls):
        for tp in (f.type, *get_args(f.type)):
            if get_origin(tp) is Annotated:
                metas = [m for m in get_args(tp)[1:] if isinstance(m, Meta)
                         and (m.gt, m.ge, m.lt, m.le) != (None, None, None, None)]
                if metas:
                    out.append((f.encode_name, _in_bounds(metas[0])))
    return out


def _one(name: str) -> Callable[[Any], tuple[str, ...]]:
    get = itemgetter(name)
    return lambda obj: (get(obj),)


NO_PREFIX: Final[tuple[Any, ...]] = (None,) * 7 + (b"\xff",)
"""A :attr:`Kind.recent` entry that no frame starts with (a frame starts with ``{``)."""


class Kind:
    """What the rules beyond msgspec need to know of one message type, derived from its
    Struct: its tag, whether it may go to ``tous``, its fields and patterns."""

    def __init__(self, cls: type[Struct]) -> None:
        fields = {f.encode_name: f.type for f in msgspec.structs.fields(cls)}
        self.cls = cls
        self.tag = tag_of(cls)
        self.broadcastable: bool = cls.broadcastable  # type: ignore[attr-defined]
        self.name_field: str = cls.name_field  # type: ignore[attr-defined]
        self.payload_cls: type[Struct] = fields["payload"]
        self.payload_fields = field_names(self.payload_cls)
        self.envelope_checks = _constrained(cls)
        self.payload_checks = _constrained(self.payload_cls)
        self.with_erreur = "erreur" in self.payload_fields
        self.has_id = "id" in self.payload_fields
        #: The payload fields that are contents: left raw by the relay.
        self.contents = frozenset(f.encode_name for f in msgspec.structs.fields(self.payload_cls)
                                  if _has_raw(f.type))
        #: The payload fields the relay reads.
        self.read = self.payload_fields - self.contents
        #: The payload fields that may be absent.
        self.optional = tuple(f.encode_name for f in msgspec.structs.fields(self.payload_cls)
                              if not f.required)
        #: The payload field that must be an object (or null), if any.
        self.object_field = next((f.encode_name for f in msgspec.structs.fields(self.payload_cls)
                                  if any(get_origin(a) is dict for a in get_args(f.type))),
                                 None)
        repeating = [f"payload.{name}" for name, memo in self.payload_checks
                     if memo.pattern in (NAME_PATTERN, TOKEN_PATTERN)]
        self.unique = [(attrgetter(name), memo) for name, memo in self.payload_checks
                       if memo.pattern not in (NAME_PATTERN, TOKEN_PATTERN)]
        #: The values of the memoised fields (source, destination, tokens) in one tuple.
        self.key: Callable[[Any], tuple[str, ...]] = attrgetter(
            *(n for n, _ in self.envelope_checks), *repeating)
        self.key_memos = [memo for _, memo in self.envelope_checks] + [
            memo for _, memo in self.payload_checks
            if memo.pattern in (NAME_PATTERN, TOKEN_PATTERN)]
        #: Tuples of memoised values known valid for this type (at most 4096), each with
        #: its length in characters (all of it, summed).
        self.known: dict[tuple[str, ...], int] = {}
        #: Nothing to check beyond the memoised values (no id, timestamp or erreur).
        self.simple = not self.unique and not self.with_erreur
        # The same key read from a decoded object (a dict and its payload dict).
        tokens = [name for name, memo in self.payload_checks
                  if memo.pattern in (NAME_PATTERN, TOKEN_PATTERN)]
        self.top_key: Callable[[Any], tuple[str, ...]] = itemgetter(
            *(n for n, _ in self.envelope_checks))
        self.payload_key: Callable[[Any], tuple[str, ...]] = (
            itemgetter(*tokens) if len(tokens) > 1 else _one(tokens[0]))
        self.unique_items = [(name, memo) for name, memo in self.payload_checks
                             if memo.pattern not in (NAME_PATTERN, TOKEN_PATTERN)]
        #: Canonical frames of this type by their bytes up to their contents, with the
        #: memoised values of a frame accepted with them (used by the relay's envelope
        #: check for notifications; at most 4096).
        self.prefixes: dict[bytes, tuple[Any, ...]] = {}
        #: The entry of ``prefixes`` last found, tried first (one entry: a stream of
        #: frames from one source to one destination hits it every time).
        self.recent: list[tuple[Any, ...]] = [NO_PREFIX]
        #: The payload's fields and other keys known to be none of them even to parsers
        #: that ignore case (:func:`check_unambiguous` passed them): a subset test
        #: instead of folding each unknown key of every frame again.
        self.unambiguous: set[str] = set(self.payload_fields)
        #: The number fields with bounds (a commande's delai): checked by msgspec in
        #: the twins, by accepts_object() in a decoded object.
        self.bounded = _bounded(self.payload_cls)
        #: Every payload field is a memoised value, a pattern-checked string, a bounded
        #: number or the object field: a decoded object is judged by accepts_object()
        #: alone.
        self.plain = not self.with_erreur and self.payload_fields == {
            *tokens, *(n for n, _ in self.unique_items), *(n for n, _ in self.bounded),
            self.object_field}


    def remember_unambiguous(self, keys: Iterable[str]) -> None:
        """Add keys that :func:`check_unambiguous` passed (short ones; at most 4096)."""
        if len(self.unambiguous) >= 4096:
            self.unambiguous = set(self.payload_fields)
        self.unambiguous.update(k for k in keys if len(k) <= NAME_MAX)


KINDS: Final = {tag_of(cls): Kind(cls) for cls in FRAMES}
"""Each message type's :class:`Kind`, by its wire ``type``."""
_PLAIN: Final = {tag: kind for tag, kind in KINDS.items() if kind.plain}
_KIND_OF: dict[type, Kind] = {}


def kind_of_twin(twin: type[Struct]) -> Kind:
    """The :class:`Kind` of a twin Struct made by :func:`derive`."""
    kind = _KIND_OF.get(twin)
    if kind is None:
        kind = _KIND_OF[twin] = KINDS[tag_of(twin)]
    return kind


def twins(contents: Any) -> dict[type, Kind]:
    """Loose twins of the frames (no patterns) with these contents, and their kinds."""
    out = {}
    for kind in KINDS.values():
        twin = derive(kind.cls, contents)
        _KIND_OF[twin] = kind
        out[twin] = kind
    return out


def accepts(s: Any, kind: Kind) -> tuple[str, ...] | None:
    """Does the loose-decoded frame ``s`` follow the rules msgspec did not check? Its
    memoised values (source, destination, then its tokens: ``key[2]`` is its name) if so;
    ``None`` means "explain it with :func:`explain`" (which may still accept: an
    ``erreur`` to read closely)."""
    key: tuple[str, ...] = kind.key(s)
    if kind.object_field is not None:
        value = getattr(s.payload, kind.object_field)
        if type(value) is not dict and not is_object(value):
            return None
    if key in kind.known:  # this source, destination and tokens passed every check
        if kind.simple:
            return key
    else:
        for value, memo in zip(key, kind.key_memos, strict=True):
            if value not in memo.seen and not memo(value):
                return None
        if key[0] == TOUS or (key[1] == TOUS and not kind.broadcastable):
            return None
        if len(kind.known) >= 4096:
            kind.known.clear()
        kind.known[key] = sum(map(len, key))
    if kind.unique:
        p = s.payload
        for get, memo in kind.unique:
            if memo._fullmatch(get(p)) is None:
                return None
    if kind.with_erreur:
        erreur = s.payload.erreur
        if erreur is not UNSET:
            return key if _plain_erreur(erreur) else None
        return key if s.payload.statut != Statut.ERREUR else None
    return key


def accepts_object(obj: dict[str, Any]) -> tuple[Kind, int] | None:
    """The :class:`Kind` of the decoded wire object ``obj`` (contents decoded, no key
    repeated), and the length of its memoised values (source, destination, tokens)
    summed, if it is valid as judged from the memos alone: those values together passed
    :func:`accepts` before, and its other fields are checked here. ``None`` means
    "validate it with :func:`check_object`", never a refusal; the payload's keys are
    the caller's to check with :func:`check_payload_keys` (after the depth limit)."""
    try:
        kind = _PLAIN.get(obj["type"])
        if kind is None:
            return None
        p = obj["payload"]
        # A payload that is not an object raises TypeError in payload_key (str keys).
        size = kind.known.get(kind.top_key(obj) + kind.payload_key(p))
        if size is None or len(obj) != 4:  # the four fields and nothing else
            return None
    except (KeyError, TypeError):  # another type, a field missing, an unhashable value
        return None
    value = p.get(kind.object_field)
    if value is not None and type(value) is not dict:
        return None
    for name, memo in kind.unique_items:
        value = p.get(name)
        if type(value) is not str or memo._fullmatch(value) is None:
            return None
    for name, in_bounds in kind.bounded:
        value = p.get(name, UNSET)
        if value is not UNSET and not in_bounds(value):
            return None
    return kind, size


def check_payload_keys(kind: Kind, payload: dict[str, Any]) -> None:
    """Refuse a payload key that case-insensitive parsers take for a field, as
    :func:`check_keys` does (keys that passed before are remembered)."""
    if not payload.keys() <= kind.unambiguous:
        check_unambiguous(payload, kind.payload_fields, "payload.")
        kind.remember_unambiguous(payload)


_OBJECT_OR_NULL: Final = frozenset(b"{n")


def is_object(value: Any) -> bool:
    """Is the value of an object field absent, ``null`` or an object? Decoded, or raw
    (``Raw`` keeps the exact bytes of the value, which start with its first character:
    ``{``, or ``n`` for ``null``)."""
    if value is UNSET or value is None or type(value) is dict:
        return True
    return type(value) is Raw and memoryview(value)[0] in _OBJECT_OR_NULL


_decode_erreur = msgspec.json.Decoder(Erreur).decode
_encode = msgspec.json.Encoder().encode


def _plain_erreur(erreur: Any) -> bool:
    """An ``erreur`` that is exactly ``{"code": str, "message": str}``: decoded, or raw and
    canonical (so no key in it is repeated or unknown). Anything else is explained."""
    if type(erreur) is dict:
        return (erreur.keys() == ERREUR_FIELDS and type(erreur["code"]) is str
                and type(erreur["message"]) is str)
    if type(erreur) is not Raw:
        return False
    try:
        return bool(_encode(_decode_erreur(erreur)) == bytes(erreur))
    except (msgspec.DecodeError, UnicodeDecodeError):
        return False


# -- explanations -----------------------------------------------------------------

_LABELS: Final = {"str": "a string", "int": "an integer", "float": "a number",
                  "bool": "a boolean", "array": "an array", "object": "an object",
                  "object | null": "an object", "null": "null"}


def type_name(value: object) -> str:
    """How a refusal names the JSON kind of ``value``."""
    if value is None:
        return "null"
    return {
        str: "a string", int: "an integer", float: "a number", bool: "a boolean",
        list: "an array", dict: "an object",
    }.get(type(value), type(value).__name__)


def _shown(value: str, limit: int = 40) -> str:
    return repr(value[:limit])


def _pattern_detail(pattern: str, value: str) -> str:
    if pattern == NAME_PATTERN:
        shown = value if len(value) <= 80 else value[:77] + "..."
        return (f"{shown!r} is not a domain name (1-{NAME_MAX} of A-Z a-z 0-9 - _ ., "
                "starting with a letter or digit)")
    if pattern == ID_PATTERN:
        return "must be 1-64 printable ASCII characters without spaces"
    if pattern == HORODATAGE_PATTERN:
        return f"{_shown(value)} is not an RFC 3339 timestamp"
    return f"{value[:80]!r} must match {pattern}"


def bad_pattern(pattern: str, value: str, field: str) -> MessageInvalide:
    """The refusal of a string that does not match its field's pattern."""
    reason = Reason.BAD_NAME if pattern == NAME_PATTERN else Reason.BAD_VALUE
    return MessageInvalide(reason, _pattern_detail(pattern, value), field)


def _lookup(obj: Any, path: list[str]) -> Any:
    for key in path:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj


def _enum_of(path: list[str]) -> type[Enum] | None:
    return {"statut": Statut, "niveau": Niveau}.get(path[-1]) if path else None


_BOUND_ERROR: Final = re.compile(r"Expected `(?:float|int)` ([<>]=?) (\S+)$")


def from_validation_error(exc: msgspec.ValidationError, obj: Any,
                          prefix: str = "") -> MessageInvalide:
    """The refusal that msgspec's ``exc`` (raised for ``obj``) stands for, naming the
    field by its path below ``prefix``."""
    text, _, where = str(exc).partition(" - at `")
    path = where[2:-1].split(".") if where.startswith("$.") else []
    if prefix:
        path = [*prefix.split("."), *path]
    if text.startswith("Object missing required field `"):
        missing = ".".join([*path, text[len("Object missing required field `"):-1]])
        return MessageInvalide(Reason.MISSING_FIELD, "required field is missing", missing)
    field = ".".join(path) or None
    value = _lookup(obj, path[len(prefix.split(".")) if prefix else 0:])
    if text.startswith("Invalid"):  # an unknown tag or enum value
        if path == ["type"]:
            return MessageInvalide(
                Reason.UNKNOWN_TYPE,
                f"{_shown(str(value))} is not one of {', '.join(KINDS)}", field)
        enum = _enum_of(path)
        values = ", ".join(sorted(str(m.value) for m in enum)) if enum else "the values allowed"
        return MessageInvalide(Reason.BAD_VALUE, f"{_shown(str(value))} is not one of {values}",
                               field)
    if text.startswith("Expected `str` matching regex"):
        pattern = text.split("'", 2)[1]
        return bad_pattern(pattern, str(value), field or "")
    bound = _BOUND_ERROR.match(text)
    if bound is not None:  # a number out of its range (a commande's delai)
        op, limit = bound.groups()
        shown = repr(value) if type(value) in (int, float) else type_name(value)
        return MessageInvalide(Reason.BAD_VALUE,
                               f"must be a number {op} {float(limit):g}, got {shown}", field)
    if text.startswith("Expected `"):
        expected = text[len("Expected `"):].split("`", 1)[0]
        return MessageInvalide(
            Reason.WRONG_TYPE,
            f"expected {_LABELS.get(expected, expected)}, got {type_name(value)}", field)
    return MessageInvalide(Reason.BAD_VALUE, text, field)  # pragma: no cover  (msgspec changed)


# msgspec.convert() analyses a union on every call but caches what it learns of a Struct
# class: objects are converted to the class their "type" names.
_STRICT_FRAMES: Final = {tag: derive(k.cls, Any, patterns=True) for tag, k in KINDS.items()}
_STRICT_PAYLOADS: Final = {tag: derive(k.payload_cls, Any, patterns=True)
                           for tag, k in KINDS.items()}


def explain(obj: dict[str, Any]) -> MessageInvalide | None:
    """Why the wire object ``obj`` (contents decoded, or stand-ins of their JSON kind)
    is not a valid message, or ``None`` if it is one. The Structs as written decide
    first, in the order of the object's keys; then the rules msgspec cannot express."""
    tag = obj.get("type", UNSET)
    if type(tag) is not str or tag not in KINDS:
        if tag is UNSET:
            return MessageInvalide(Reason.MISSING_FIELD, "required field is missing", "type")
        if type(tag) is not str:
            return MessageInvalide(Reason.WRONG_TYPE,
                                   f"expected a string, got {type_name(tag)}", "type")
        return MessageInvalide(Reason.UNKNOWN_TYPE,
                               f"{_shown(tag)} is not one of {', '.join(KINDS)}", "type")
    try:
        s = msgspec.convert(obj, _STRICT_FRAMES[tag])
    except msgspec.ValidationError as exc:
        return from_validation_error(exc, obj)
    kind = KINDS[tag]
    for name, memo in kind.envelope_checks:
        value = getattr(s, name)
        if not memo(value):
            return bad_pattern(memo.pattern, value, name)
        if name == "source" and value == TOUS:
            return MessageInvalide(Reason.BAD_NAME, f"{TOUS!r} is only valid as a destination",
                                   name)
    if s.destination == TOUS and not kind.broadcastable:
        return MessageInvalide(Reason.BAD_NAME, f"a {kind.tag} cannot be sent to {TOUS!r}",
                               "destination")
    return explain_payload(kind, obj["payload"])


def explain_payload(kind: Kind, payload: dict[str, Any]) -> MessageInvalide | None:
    """Why ``payload`` is not a valid payload of this kind, or ``None``."""
    try:
        p = msgspec.convert(payload, _STRICT_PAYLOADS[kind.tag])
    except msgspec.ValidationError as exc:
        return from_validation_error(exc, payload, "payload")
    for name, memo in kind.payload_checks:
        value = getattr(p, name)
        if not memo(value):
            return bad_pattern(memo.pattern, value, f"payload.{name}")
    if kind.with_erreur and p.statut == Statut.ERREUR:
        erreur = payload.get("erreur", UNSET)
        if erreur is UNSET:
            return MessageInvalide(Reason.MISSING_FIELD, "required field is missing",
                                   "payload.erreur")
        if type(erreur) is not dict:
            return MessageInvalide(Reason.WRONG_TYPE,
                                   f"expected an object, got {type_name(erreur)}",
                                   "payload.erreur")
        try:
            msgspec.convert(erreur, Erreur)
        except msgspec.ValidationError as exc:
            return from_validation_error(exc, erreur, "payload.erreur")
    return None


def folds_to(key: str, fields: frozenset[str]) -> str | None:
    """The field of ``fields`` (lower-case ASCII names) that ``key`` is, or equals to some
    parser that matches keys ignoring case; ``None`` if none. Parsers fold differently:
    Go's encoding/json by simple case folding (``"\u017fource"`` is source, the Kelvin
    sign is k), .NET's OrdinalIgnoreCase and Java's equalsIgnoreCase through upper case
    (a dotless ``"\u0131d"`` is ID), and Java then lower case by the simple mapping
    (``"\u0130d"``, a dotted capital I, is id; so is it to Jackson lower-casing names
    in a Turkish locale). Python's full mappings give ``"i\u0307"`` for that capital
    I, hence the replacement before folding."""
    for folded in (key.casefold(), key.replace("\u0130", "i").upper().lower()):
        if folded in fields:
            return folded
    return None


def check_unambiguous(keys: Iterable[str], fields: frozenset[str], where: str) -> None:
    """Refuse a key that is not one of ``fields`` but equals one of them to parsers that
    match keys ignoring case (Go's encoding/json, Java's equalsIgnoreCase, some Jackson
    and System.Text.Json settings): ``"Source"``, ``"\u017fource"`` or
    ``"destinat\u0131on"`` next to ``"source"`` or ``"destination"`` would be a second
    one to them, read after the one the broker checked."""
    for key in keys:
        if key not in fields and (field := folds_to(key, fields)) is not None:
            raise MessageInvalide(
                Reason.DUPLICATE_KEY,
                f"{key[:40]!r} is {field!r} to parsers that ignore case",
                f"{where}{key[:40]}")


def check_keys(kind: Kind, obj: Mapping[str, Any], payload: Mapping[str, Any]) -> None:
    """Refuse keys, at the envelope's levels, that case-insensitive parsers would take for
    a field (the payload first, then its ``erreur``, then the top level)."""
    if not payload.keys() <= kind.payload_fields:
        check_unambiguous(payload, kind.payload_fields, "payload.")
    if kind.with_erreur:
        erreur = payload.get("erreur")
        if type(erreur) is dict and not erreur.keys() <= ERREUR_FIELDS:
            check_unambiguous(erreur, ERREUR_FIELDS, "payload.erreur.")
    if len(obj) > 4:
        check_unambiguous(obj, ENVELOPE_FIELDS, "")


# -- validating a wire object -------------------------------------------------------

MODEL_TWINS: Final = twins(Any)
"""The frames as :func:`messagerie.decode` reads them: contents decoded, no patterns."""
_MODEL_FRAMES: Final = {kind.tag: twin for twin, kind in MODEL_TWINS.items()}


def check_object(obj: dict[str, Any], s: Any = None) -> Kind:
    """Validate a wire object whose contents are decoded (or stand-ins of their JSON
    kind) and return its :class:`Kind`; raise :class:`MessageInvalide` otherwise.
    ``s`` is the object already decoded into a twin, if it was. Repeated keys are the
    caller's: a dict has none left."""
    if s is None:
        tag = obj.get("type")
        twin = _MODEL_FRAMES.get(tag) if type(tag) is str else None
        try:
            s = msgspec.convert(obj, twin) if twin is not None else None
        except msgspec.ValidationError:
            s = None
    kind = kind_of_twin(type(s)) if s is not None else None
    if kind is None or accepts(s, kind) is None:
        error = explain(obj)
        if error is not None:
            raise error
        kind = KINDS[obj["type"]]
    check_keys(kind, obj, obj["payload"])
    return kind


def check_payload(kind: Kind, payload: dict[str, Any]) -> None:
    """Validate the payload of a message of this kind alone."""
    error = explain_payload(kind, payload)
    if error is not None:
        raise error
    check_keys(kind, {}, payload)
