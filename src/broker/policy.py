"""The routing policy: who may send what to whom. Pure: no asyncio, no I/O but
:func:`load_policy` reading its file.

Modelled on Qubes' qrexec policy: an ordered list of rules, the **first rule that
matches decides**, and when none matches the message is **denied**. A policy file is
TOML::

    [groupes]
    metier = ["vm-ui", "vm-diag"]        # named groups of domains, used as "@metier"

    [[regle]]
    source = "vm-sys-usb"                # domain | "@groupe" | "*" | "dom0"
    destination = "tous"                 # domain | "@groupe" | "*" | "dom0" | "tous"
    type = "notification"                # notification | commande | journal | "*"
    nom = ["usb_device", "disque"]       # optional: string or list, fnmatch globs allowed
    action = "allow"                     # allow | deny

Matching, field by field:

``source``, ``destination``
    A domain name matches that domain only; ``@groupe`` matches the members of the
    group; ``*`` matches **any DomU but never dom0**: dom0 is matched only where it is
    named (``"dom0"``, or as a member of a group), as in qrexec.

``destination = "tous"`` and broadcasts
    The broker filters a broadcast per recipient: it calls
    ``decide(source, recipient, type, name, broadcast=True)`` once for each domain the
    broadcast would reach. A rule whose destination is ``tous`` matches **every
    recipient of a broadcast** (dom0 included, since ``tous`` names it), and no
    unicast message. Every other destination pattern matches the recipient's name,
    whether the message is a broadcast or not, so ``destination = "vm-ui"`` lets a
    broadcast reach vm-ui and ``destination = "*"`` lets it reach every DomU.
    ``decide(source, "tous", ...)`` without ``broadcast`` asks "may this source
    broadcast at all?": only ``tous`` rules match it.

``type``
    One of ``notification``, ``commande``, ``journal`` or ``*``.

``nom``
    What the message is called (:attr:`messagerie.model.Message.name`): the
    ``categorie`` of a notification, the command name of a commande, the
    ``composant`` of a journal event. A string or a list of strings, each an exact
    name or an :mod:`fnmatch` glob (``lister_*``), compared case-sensitively. Absent
    or ``"*"``: any name.

``reponse`` messages are not governed by rules (a rule with ``type = "reponse"`` is an
error). A reponse answers a command, and the router only delivers a reponse that
answers a command it forwarded, back to that command's sender: so **a reponse passes
if and only if the command it answers was allowed** (:attr:`Policy.allows_reponses`).
That keeps the promise "every command is answered" across a policy reload that happens
while the command is in flight. For a caller that asks anyway, :meth:`Policy.decide`
answers a reponse with the decision for the command it mirrors (the reponse's
destination sending that command to its source), never with a blanket allow.

A policy is compiled once (sets and regexes) and :meth:`Policy.decide` memoises its
answers in a bounded dict: it runs for every message, mouse moves included.
"""

from __future__ import annotations

import argparse
import fnmatch
import re
import sys
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final

from messagerie.model import DOM0, NAME_PATTERN, TOUS

if TYPE_CHECKING:
    from messagerie.model import Message

__all__ = [
    "ANY",
    "RULE_TYPES",
    "Action",
    "Decision",
    "Matcher",
    "NameMatcher",
    "Policy",
    "PolicyError",
    "Rule",
    "explain_main",
    "load_policy",
    "parse_policy",
]

ANY: Final = "*"
"""Wildcard: any DomU (never dom0) for domains, anything for ``type`` and ``nom``."""

RULE_TYPES: Final = frozenset({"notification", "commande", "journal"})
"""Message types a rule may name (besides ``*``). ``reponse`` follows its command."""

_NAME_RE: Final = re.compile(NAME_PATTERN)
# A nom pattern: the characters of model.TOKEN_PATTERN plus the fnmatch metacharacters.
_NOM_RE: Final = re.compile(r"^[A-Za-z0-9_.:/*?\[\]!-]{1,64}$")
_GLOB_CHARS: Final = frozenset("*?[")
_NOT_DOMU: Final = frozenset({DOM0, TOUS})
_TOKEN_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}$")

CACHE_SIZE: Final = 4096
"""Decisions memoised per policy. Keys are validated names, so a hostile domain that
varies them only makes the cache start over, it cannot grow it."""


class PolicyError(ValueError):
    """An invalid policy file. ``path``, ``line`` (1-based, when known) and ``key`` (the
    TOML key at fault, e.g. ``regle[3].action``) are also attributes."""

    def __init__(self, detail: str, *, path: str | None = None, line: int | None = None,
                 key: str | None = None) -> None:
        self.detail = detail
        self.path = path
        self.line = line
        self.key = key
        where = path or "<policy>"
        if line is not None:
            where += f":{line}"
        super().__init__(f"{where}: {key}: {detail}" if key else f"{where}: {detail}")


class Action(StrEnum):
    ALLOW = "allow"
    DENY = "deny"


@dataclass(frozen=True, slots=True)
class Matcher:
    """A domain pattern, compiled: ``text`` as written, ``names`` the domains it names
    (one domain, or a group's members), ``any_domu`` for ``*``, ``broadcast`` for
    ``tous``."""

    text: str
    names: frozenset[str] = frozenset()
    any_domu: bool = False
    broadcast: bool = False

    def matches(self, name: str, broadcast: bool = False) -> bool:
        """Does this pattern match domain ``name`` (a recipient when ``broadcast``)?"""
        if self.broadcast:
            return broadcast or name == TOUS
        if name in self.names:
            return True
        return self.any_domu and name not in _NOT_DOMU

    @classmethod
    def parse(cls, text: str, groups: Mapping[str, frozenset[str]], *,
              allow_tous: bool) -> Matcher:
        """Compile ``text``; raise :class:`ValueError` with a readable message."""
        if text == ANY:
            return cls(text, any_domu=True)
        if text == TOUS:
            if not allow_tous:
                raise ValueError(f"{TOUS!r} is only valid as a destination")
            return cls(text, broadcast=True)
        if text.startswith("@"):
            group = text[1:]
            if group not in groups:
                known = ", ".join(sorted(groups)) or "none defined"
                raise ValueError(f"unknown group {text!r} (groups: {known})")
            return cls(text, names=groups[group])
        if not _NAME_RE.fullmatch(text):
            raise ValueError(f"{text!r} is not a domain name, '@groupe', '*' or 'dom0'")
        return cls(text, names=frozenset({text}))


@dataclass(frozen=True, slots=True)
class NameMatcher:
    """A ``nom`` pattern list, compiled: exact names in a set, globs in one regex.
    ``patterns`` empty means any name (``nom`` absent or ``"*"``)."""

    patterns: tuple[str, ...] = ()
    exact: frozenset[str] = frozenset()
    glob: re.Pattern[str] | None = None

    @property
    def any(self) -> bool:
        return not self.patterns

    def matches(self, name: str | None) -> bool:
        if not self.patterns:
            return True
        if name is None:
            return False
        if name in self.exact:
            return True
        return self.glob is not None and self.glob.match(name) is not None

    @classmethod
    def parse(cls, patterns: Sequence[str]) -> NameMatcher:
        if ANY in patterns:
            return cls()
        exact: set[str] = set()
        globs: list[str] = []
        for pattern in patterns:
            if not _NOM_RE.fullmatch(pattern):
                raise ValueError(f"{pattern[:80]!r} is not a name or a glob of "
                                 "A-Z a-z 0-9 _ . : / - and * ? [ ] !")
            if _GLOB_CHARS.isdisjoint(pattern):
                if not _TOKEN_RE.fullmatch(pattern):
                    raise ValueError(f"{pattern!r} can never match a name "
                                     "(names start with a letter or a digit)")
                exact.add(pattern)
            else:
                globs.append(pattern)
        glob = None
        if globs:
            # fnmatch.translate ends each pattern with \Z; match() anchors the start.
            glob = re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs))
        return cls(tuple(patterns), frozenset(exact), glob)

    def __str__(self) -> str:
        return ",".join(self.patterns) if self.patterns else ANY


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``[[regle]]``: ``index`` is its 1-based rank in the file, ``line`` the line of
    its header (``None`` when unknown, e.g. an inline table), ``origin`` the file."""

    index: int
    line: int | None
    source: Matcher
    destination: Matcher
    type: str
    names: NameMatcher
    action: Action
    origin: str = "<policy>"

    def matches(self, source: str, destination: str, type: str, name: str | None,
                broadcast: bool = False) -> bool:
        return ((self.type in (ANY, type))
                and self.source.matches(source)
                and self.destination.matches(destination, broadcast)
                and self.names.matches(name))

    def describe(self) -> str:
        """``rule 3 (line 14): deny vm-sys-usb -> @metier commande *``"""
        where = f" (line {self.line})" if self.line is not None else ""
        return (f"rule {self.index}{where}: {self.action} {self.source.text} -> "
                f"{self.destination.text} {self.type} {self.names}")

    def __str__(self) -> str:
        return self.describe()


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to "may this message go there?". ``rule`` is the rule that decided,
    ``None`` for the default deny (or, for a reponse, when its command had none)."""

    allowed: bool
    rule: Rule | None
    reason: str

    def describe(self) -> str:
        """``allow: rule 3 (line 14): allow vm-ui -> vm-sys-usb commande lister_*``"""
        return f"{'allow' if self.allowed else 'deny'}: {self.reason}"

    def __str__(self) -> str:
        return self.describe()

    def __bool__(self) -> bool:
        return self.allowed


_DEFAULT_DENY: Final = Decision(False, None, "default deny (no rule matched)")


class Policy:
    """An ordered list of rules: first match wins, default deny.

    Build one with :func:`load_policy` (a file), :func:`parse_policy` (a string) or
    :meth:`allow_all`. Immutable once built; a reload builds a new one, so a router
    swaps policies atomically by rebinding a reference.
    """

    allows_reponses: ClassVar[bool] = True
    """Answers to allowed commands always pass: the router delivers a reponse that
    answers a command it forwarded, back to its sender, without consulting the rules
    again (so a reload cannot strand a caller). Unsolicited reponses are the router's
    to drop. See the module documentation."""

    __slots__ = ("_by_type", "_cache", "groups", "origin", "rules")

    def __init__(self, rules: Iterable[Rule], groups: Mapping[str, frozenset[str]] | None = None,
                 *, origin: str = "<policy>") -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        self.groups: Mapping[str, frozenset[str]] = dict(groups or {})
        self.origin = origin
        # Rules that can apply to each type, in order: skips e.g. every commande rule
        # when deciding on a notification.
        self._by_type: dict[str, tuple[Rule, ...]] = {
            t: tuple(r for r in self.rules if r.type in (t, ANY)) for t in RULE_TYPES}
        self._cache: dict[tuple[str, str, str, str | None, bool], Decision] = {}

    @classmethod
    def allow_all(cls) -> Policy:
        """A policy that allows everything, dom0 included: the broker's default when no
        policy file is configured. Permissive, for development: a deployment whose
        DomUs parse untrusted data must configure a real policy."""
        return parse_policy(_ALLOW_ALL_TEXT, origin="<allow-all>")

    def __len__(self) -> int:
        return len(self.rules)

    def __repr__(self) -> str:
        return f"Policy({self.origin!r}, {len(self.rules)} rules)"

    def decide(self, source: str, destination: str, type: str, name: str | None = None,
               *, broadcast: bool = False) -> Decision:
        """Decide on a message from ``source`` to ``destination`` (for a broadcast: to
        one recipient, with ``broadcast=True``) of ``type``, called ``name``."""
        key = (source, destination, type, name, broadcast)
        try:
            return self._cache[key]
        except KeyError:
            pass
        decision = self.evaluate(source, destination, type, name, broadcast=broadcast)
        if len(self._cache) >= CACHE_SIZE:
            self._cache.clear()
        self._cache[key] = decision
        return decision

    def decide_message(self, message: Message, recipient: str | None = None) -> Decision:
        """:meth:`decide` for a message; for a broadcast give each ``recipient``."""
        if recipient is None:
            return self.decide(message.source, message.destination, message.type,
                               message.name)
        return self.decide(message.source, recipient, message.type, message.name,
                           broadcast=message.destination == TOUS)

    def evaluate(self, source: str, destination: str, type: str, name: str | None = None,
                 *, broadcast: bool = False) -> Decision:
        """:meth:`decide` without the cache (for tests and the explain tool)."""
        if type == "reponse":
            # Mirror: the reponse from B to A for command c passes if A may command c of B.
            mirrored = self.evaluate(destination, source, "commande", name)
            return Decision(mirrored.allowed, mirrored.rule,
                            f"reponse follows its commande: {mirrored.reason}")
        rules = self._by_type.get(type, self.rules)
        for rule in rules:
            if rule.matches(source, destination, type, name, broadcast):
                return Decision(rule.action is Action.ALLOW, rule, rule.describe())
        return _DEFAULT_DENY

    def cache_clear(self) -> None:
        self._cache.clear()


# ---------------------------------------------------------------------------
# Parsing

_ALLOW_ALL_TEXT: Final = """\
# Built-in permissive policy (no policy file configured): for development only.
[[regle]]
source = "*"
destination = "*"
type = "*"
action = "allow"
[[regle]]
source = "*"
destination = "dom0"
type = "*"
action = "allow"
[[regle]]
source = "dom0"
destination = "*"
type = "*"
action = "allow"
[[regle]]
source = "dom0"
destination = "dom0"
type = "*"
action = "allow"
[[regle]]
source = "*"
destination = "tous"
type = "*"
action = "allow"
[[regle]]
source = "dom0"
destination = "tous"
type = "*"
action = "allow"
"""

_TOP_KEYS: Final = ("groupes", "regle")
_RULE_KEYS: Final = ("source", "destination", "type", "nom", "action")
_REQUIRED_KEYS: Final = ("source", "destination", "type", "action")

_HEADER_RE: Final = re.compile(r"^\s*(\[\[?)\s*([^\]#]*?)\s*(\]\]?)\s*(?:#.*)?$")
_KEY_RE: Final = re.compile(r"""^\s*("[^"]*"|'[^']*'|[A-Za-z0-9_-]+)\s*[=.]""")
_TOML_LINE_RE: Final = re.compile(r"\(at line (\d+), column \d+\)")


class _Locator:
    """Line numbers for TOML tables and keys, which :mod:`tomllib` does not give.

    A line scanner, good enough for error messages: it knows table headers
    (``[groupes]``, the N-th ``[[regle]]``) and ``key =`` lines under them. Lines inside
    multi-line strings could fool it; then a message points at the wrong line, the
    decision itself never depends on it.
    """

    def __init__(self, text: str) -> None:
        self.tables: dict[str, list[int]] = {}
        self.keys: dict[tuple[str, int], dict[str, int]] = {}
        current: tuple[str, int] = ("", 0)
        self.keys[current] = {}
        for lineno, line in enumerate(text.splitlines(), start=1):
            header = _HEADER_RE.match(line)
            if header and len(header.group(1)) == len(header.group(3)):
                name = header.group(2).strip().strip("\"'")
                lines = self.tables.setdefault(name, [])
                lines.append(lineno)
                current = (name, len(lines) - 1)
                self.keys[current] = {}
                continue
            key = _KEY_RE.match(line)
            if key:
                self.keys[current].setdefault(key.group(1).strip("\"'"), lineno)

    def table(self, name: str, index: int = 0) -> int | None:
        lines = self.tables.get(name, [])
        return lines[index] if index < len(lines) else None

    def key(self, table: str, index: int, key: str) -> int | None:
        line = self.keys.get((table, index), {}).get(key)
        return line if line is not None else self.table(table, index)


def load_policy(path: str | Path) -> Policy:
    """Read and compile the policy file at ``path``; raise :class:`PolicyError`."""
    origin = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"cannot read the policy: {exc}", path=origin) from exc
    return parse_policy(text, origin=origin)


def parse_policy(text: str, *, origin: str = "<policy>") -> Policy:
    """Compile the policy ``text`` (TOML); raise :class:`PolicyError`. ``origin`` names
    the file in messages and rules."""

    def fail(detail: str, key: str | None = None, line: int | None = None) -> PolicyError:
        return PolicyError(detail, path=origin, line=line, key=key)

    if not text.strip():
        raise fail("the policy is empty (it would deny everything; write a deny rule "
                   "if that is what you mean)")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = _TOML_LINE_RE.search(str(exc))
        raise fail(f"TOML syntax error: {exc}",
                   line=int(found.group(1)) if found else None) from exc
    where = _Locator(text)

    for key in data:
        if key not in _TOP_KEYS:
            raise fail(f"unknown key (expected {', '.join(_TOP_KEYS)})", key,
                       where.key("", 0, key) or where.table(key))

    groups = _parse_groups(data.get("groupes", {}), where, fail)

    raw_rules = data.get("regle")
    if raw_rules is None:
        raise fail("no [[regle]]: the policy would deny everything (write a deny rule "
                   "if that is what you mean)")
    if not isinstance(raw_rules, list) or not all(isinstance(r, dict) for r in raw_rules):
        raise fail("must be an array of tables: write each rule under [[regle]]", "regle",
                   where.key("", 0, "regle"))
    rules = [_parse_rule(i, raw, groups, where=where, fail=fail, origin=origin)
             for i, raw in enumerate(raw_rules)]
    return Policy(rules, groups, origin=origin)


def _parse_groups(raw: Any, where: _Locator, fail: Any) -> dict[str, frozenset[str]]:
    if not isinstance(raw, dict):
        raise fail("must be a table of group = [domains]", "groupes",
                   where.key("", 0, "groupes") or where.table("groupes"))
    groups: dict[str, frozenset[str]] = {}
    for name, members in raw.items():
        key = f"groupes.{name}"
        line = where.key("groupes", 0, name)
        if not _NAME_RE.fullmatch(name) or name == TOUS:
            raise fail(f"{name!r} is not a valid group name (same rules as a domain name)",
                       key, line)
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise fail("must be a list of domain names", key, line)
        for member in members:
            if member == TOUS or not _NAME_RE.fullmatch(member):
                raise fail(f"{member[:80]!r} is not a domain name (groups list domains; "
                           "'*', '@groupe' and 'tous' are not allowed here)", key, line)
        groups[name] = frozenset(members)
    return groups


def _parse_rule(i: int, raw: dict[str, Any], groups: Mapping[str, frozenset[str]], *,
                where: _Locator, fail: Any, origin: str) -> Rule:
    index = i + 1
    header = where.table("regle", i)

    def key_fail(key: str, detail: str) -> PolicyError:
        error: PolicyError = fail(detail, f"regle[{index}].{key}", where.key("regle", i, key))
        return error

    for key in raw:
        if key not in _RULE_KEYS:
            raise key_fail(key, f"unknown key (expected {', '.join(_RULE_KEYS)})")
    for key in _REQUIRED_KEYS:
        if key not in raw:
            error: PolicyError = fail("required key is missing", f"regle[{index}].{key}",
                                      header)
            raise error
    for key in ("source", "destination", "type", "action"):
        if not isinstance(raw[key], str):
            raise key_fail(key, "must be a string")

    try:
        source = Matcher.parse(raw["source"], groups, allow_tous=False)
    except ValueError as exc:
        raise key_fail("source", str(exc)) from None
    try:
        destination = Matcher.parse(raw["destination"], groups, allow_tous=True)
    except ValueError as exc:
        raise key_fail("destination", str(exc)) from None

    type_ = raw["type"]
    if type_ == "reponse":
        raise key_fail("type", "reponses are not governed by rules: a reponse passes "
                               "iff the commande it answers was allowed")
    if type_ != ANY and type_ not in RULE_TYPES:
        raise key_fail("type", f"{type_[:80]!r} is not one of "
                               f"{', '.join(sorted(RULE_TYPES))} or '*'")

    nom = raw.get("nom", ANY)
    if isinstance(nom, str):
        nom = [nom]
    if not isinstance(nom, list) or not all(isinstance(n, str) for n in nom):
        raise key_fail("nom", "must be a string or a list of strings")
    if not nom:
        raise key_fail("nom", "an empty list matches nothing; omit nom (or write '*') "
                              "to match any name")
    try:
        names = NameMatcher.parse(nom)
    except ValueError as exc:
        raise key_fail("nom", str(exc)) from None

    try:
        action = Action(raw["action"])
    except ValueError:
        raise key_fail("action", f"{raw['action'][:80]!r} is not 'allow' or 'deny'") from None

    return Rule(index, header, source, destination, type_, names, action, origin)


# ---------------------------------------------------------------------------
# "Would this be allowed, and by which rule?"

def explain_main(argv: Sequence[str] | None = None) -> int:
    """``messagerie-policy POLICY_FILE --source S --destination D --type T [--nom N]
    [--broadcast]``: print the decision and the deciding rule. Exit status 0 when
    allowed, 1 when denied, 2 when the policy file is invalid (or the arguments are)."""
    parser = argparse.ArgumentParser(
        prog="messagerie-policy",
        description="Would this message be allowed by the routing policy, and by which rule?")
    parser.add_argument("policy", metavar="POLICY_FILE", help="the policy file (TOML)")
    parser.add_argument("--source", "-s", required=True, help="sending domain")
    parser.add_argument("--destination", "-d", required=True,
                        help="destination domain (the recipient, with --broadcast), or tous")
    parser.add_argument("--type", "-t", required=True,
                        choices=sorted((*RULE_TYPES, "reponse")), help="message type")
    parser.add_argument("--nom", "-n", default=None,
                        help="category (notification), command name (commande, reponse) "
                             "or composant (journal)")
    parser.add_argument("--broadcast", "-b", action="store_true",
                        help="the message is a broadcast (to tous); --destination is one "
                             "of its recipients")
    args = parser.parse_args(argv)
    try:
        policy = load_policy(args.policy)
    except PolicyError as exc:
        print(f"messagerie-policy: invalid policy: {exc}", file=sys.stderr)
        return 2
    decision = policy.evaluate(args.source, args.destination, args.type, args.nom,
                               broadcast=args.broadcast)
    what = f"{args.type} {args.nom or '(no name)'}"
    route = f"{args.source} -> {args.destination}"
    if args.broadcast:
        route += " (recipient of a broadcast)"
    print(f"{route}: {what}")
    print(decision.describe())
    return 0 if decision.allowed else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(explain_main())
