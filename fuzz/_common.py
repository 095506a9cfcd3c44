"""Shared by the atheris harnesses: a fake routing view and the policies to fuzz with.

Not a test module; imported by ``fuzz_route.py`` (and usable from a REPL to replay a
crash: ``python fuzz/fuzz_route.py crash-<hash>``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from broker.policy import Policy, load_policy, parse_policy
from broker.router import PolicyLike

ROOT = Path(__file__).resolve().parent.parent
DOMAINS = ("vm-a", "vm-b", "vm-c", "vm-sys-usb", "vm-ui", "vm-diag")
NAMES = (*DOMAINS, "dom0")

POLICIES: tuple[Policy, ...] = (
    Policy.allow_all(),
    parse_policy('[[regle]]\nsource = "*"\ndestination = "*"\ntype = "*"\naction = "deny"\n',
                 origin="<deny-all>"),
    load_policy(ROOT / "config" / "policy.toml"),
)


@dataclass
class View:
    policy: PolicyLike
    known: frozenset[str]
    up: frozenset[str]
    pending: set[tuple[str, str, str]] = field(default_factory=set)

    def is_known(self, name: str) -> bool:
        return name in self.known

    def is_connected(self, name: str) -> bool:
        return name in self.up

    def connected(self) -> Iterator[str]:
        return iter(sorted(self.up))

    def expects_reponse(self, commander: str, id: str, replier: str) -> bool:
        return (commander, id, replier) in self.pending
