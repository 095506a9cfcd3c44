"""The policy file: TOML into :mod:`broker.policy.rules`, with line-numbered errors.

:func:`parse_policy` (a string) and :func:`load_policy` (a file) raise
:class:`PolicyError` naming the file, the line and the key at fault
(``policy.toml:14: regle[3].action: 'permit' is not 'allow' or 'deny'``).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from messagerie.model import TOUS

from .rules import ANY, DOMAIN_NAME_RE, RULE_TYPES, Action, Matcher, NameMatcher, Policy, Rule


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
        if not DOMAIN_NAME_RE.fullmatch(name) or name == TOUS:
            raise fail(f"{name!r} is not a valid group name (same rules as a domain name)",
                       key, line)
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise fail("must be a list of domain names", key, line)
        for member in members:
            if member == TOUS or not DOMAIN_NAME_RE.fullmatch(member):
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


