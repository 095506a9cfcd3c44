"""Shared by the atheris harnesses: a fake routing view and the policies to fuzz with.

Not a test module; imported by ``fuzz_route.py`` (and usable from a REPL to replay a
crash: ``python fuzz/fuzz_route.py crash-<hash>``).
"""

from __future__ import annotations

from pathlib import Path

from broker.policy import Policy, load_policy, parse_policy
from broker.router import StaticView

ROOT = Path(__file__).resolve().parent.parent
DOMAINS = ("vm-a", "vm-b", "vm-c", "vm-sys-usb", "vm-ui", "vm-diag")
NAMES = (*DOMAINS, "dom0")

POLICIES: tuple[Policy, ...] = (
    Policy.allow_all(),
    parse_policy('[[regle]]\nsource = "*"\ndestination = "*"\ntype = "*"\naction = "deny"\n',
                 origin="<deny-all>"),
    load_policy(ROOT / "config" / "policy.toml"),
)


View = StaticView
