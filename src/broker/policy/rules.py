"""The policy's model: rules, their matchers, the policy that applies them.

Pure (no I/O): what a rule means is described in :mod:`broker.policy`; reading a file
into these classes is :mod:`broker.policy.parser`'s job.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, ClassVar, Final

from messagerie.model import DOM0, NAME_PATTERN, TOUS

if TYPE_CHECKING:
    from messagerie.model import Message

ANY: Final = "*"
"""Wildcard: any DomU (never dom0) for domains, anything for ``type`` and ``nom``."""

RULE_TYPES: Final = frozenset({"notification", "commande", "journal"})
"""Message types a rule may name (besides ``*``). ``reponse`` follows its command."""

DOMAIN_NAME_RE: Final = re.compile(NAME_PATTERN)
# A nom pattern: the characters of model.TOKEN_PATTERN plus the fnmatch metacharacters.
_NOM_RE: Final = re.compile(r"^[A-Za-z0-9_.:/*?\[\]!-]{1,64}$")
_GLOB_CHARS: Final = frozenset("*?[")
_NOT_DOMU: Final = frozenset({DOM0, TOUS})
_TOKEN_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}$")

CACHE_SIZE: Final = 4096
"""Decisions memoised per policy. Keys are validated names, so a hostile domain that
varies them only makes the cache start over, it cannot grow it."""


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
        if not DOMAIN_NAME_RE.fullmatch(text):
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
class Verdict:
    """The policy's answer to "may this message go there?". ``rule`` is the rule that
    decided, ``None`` for the default deny (or, for a reponse, when its command had
    none). (The router's answer, to whom and how, is ``broker.router.Decision``.)"""

    allowed: bool
    rule: Rule | None
    reason: str

    def describe(self) -> str:
        """``allow: rule 3 (line 14): allow vm-ui -> vm-sys-usb commande liste_*``"""
        return f"{'allow' if self.allowed else 'deny'}: {self.reason}"

    def __str__(self) -> str:
        return self.describe()

    def __bool__(self) -> bool:
        return self.allowed


_DEFAULT_DENY: Final = Verdict(False, None, "default deny (no rule matched)")


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
        self._cache: dict[tuple[str, str, str, str | None, bool], Verdict] = {}

    @classmethod
    def allow_all(cls) -> Policy:
        """A policy that allows everything, dom0 included: the broker's default when no
        policy file is configured. Permissive, for development: a deployment whose
        DomUs parse untrusted data must configure a real policy."""
        domu, dom0 = Matcher(ANY, any_domu=True), Matcher(DOM0, names=frozenset({DOM0}))
        everyone = Matcher(TOUS, broadcast=True)
        pairs = ((domu, domu), (domu, dom0), (dom0, domu), (dom0, dom0), (domu, everyone),
                 (dom0, everyone))
        origin = "<allow-all>"
        return cls((Rule(i, None, source, destination, ANY, NameMatcher(), Action.ALLOW,
                         origin) for i, (source, destination) in enumerate(pairs, start=1)),
                   origin=origin)

    def __len__(self) -> int:
        return len(self.rules)

    def domains(self) -> frozenset[str]:
        """Every domain the policy names (in a rule or a group), ``dom0`` included:
        the recipients whose fate a broadcast's explanation lists one by one."""
        names: set[str] = {DOM0}
        for rule in self.rules:
            names |= rule.source.names | rule.destination.names
        for members in self.groups.values():
            names |= members
        return frozenset(names)

    def __repr__(self) -> str:
        return f"Policy({self.origin!r}, {len(self.rules)} rules)"

    def decide(self, source: str, destination: str, type: str, name: str | None = None,
               *, broadcast: bool = False) -> Verdict:
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

    def decide_message(self, message: Message, recipient: str | None = None) -> Verdict:
        """:meth:`decide` for a message; for a broadcast give each ``recipient``."""
        if recipient is None:
            return self.decide(message.source, message.destination, message.type,
                               message.name)
        return self.decide(message.source, recipient, message.type, message.name,
                           broadcast=message.destination == TOUS)

    def evaluate(self, source: str, destination: str, type: str, name: str | None = None,
                 *, broadcast: bool = False) -> Verdict:
        """:meth:`decide` without the cache (for tests and the explain tool)."""
        if type == "reponse":
            # Mirror: the reponse from B to A for command c passes if A may command c of B.
            mirrored = self.evaluate(destination, source, "commande", name)
            return Verdict(mirrored.allowed, mirrored.rule,
                            f"reponse follows its commande: {mirrored.reason}")
        rules = self._by_type.get(type, self.rules)
        for rule in rules:
            if rule.matches(source, destination, type, name, broadcast):
                return Verdict(rule.action is Action.ALLOW, rule, rule.describe())
        return _DEFAULT_DENY

    def cache_clear(self) -> None:
        self._cache.clear()


