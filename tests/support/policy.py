"""Routing policies written for a test: rules as keyword arguments, rendered to the
policy's TOML (docs/broker.md), in order (first match wins)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Rule:
    """One ``[[regle]]``; ``nom`` is a name, a list of names, or None for any name."""

    source: str
    destination: str
    type: str = "*"
    nom: str | list[str] | None = None
    action: str = "allow"

    def toml(self) -> str:
        keys: dict[str, str | list[str]] = {
            "source": self.source, "destination": self.destination, "type": self.type}
        if self.nom is not None:
            keys["nom"] = self.nom
        keys["action"] = self.action
        # a JSON string or list of strings is a TOML one too
        return "[[regle]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())


def policy_text(*rules: Rule, groupes: dict[str, list[str]] | None = None) -> str:
    groups = "".join(f"{name} = {json.dumps(members)}\n"
                     for name, members in (groupes or {}).items())
    return ("[groupes]\n" + groups + "\n" if groups else "") + \
        "\n".join(r.toml() for r in rules)


def write_policy(path: Path, *rules: Rule,
                 groupes: dict[str, list[str]] | None = None) -> Path:
    """The policy file at ``path`` with these rules (and groups); its path."""
    path.write_text(policy_text(*rules, groupes=groupes))
    return path
