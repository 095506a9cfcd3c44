"""The README's first command: the broker's embedded demo runs and exits cleanly."""

from __future__ import annotations

import subprocess

import pytest

from tests.support.broker_process import BROKER
from tests.support.corpus import SPEC_EXAMPLE_TEXT

pytestmark = pytest.mark.integration


def test_demo_shows_the_flows_and_exits_zero() -> None:
    run = subprocess.run([str(BROKER), "--demo"], capture_output=True,
                         text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    demo = [line for line in run.stdout.splitlines() if line.startswith("demo |")]
    text = "\n".join(demo)
    # vm-sys-usb announces the spec's example to tous; both business domains get it.
    spec = SPEC_EXAMPLE_TEXT
    assert f"vm-ui      <- {spec}" in text and f"vm-diag    <- {spec}" in text
    # vm-ui asks vm-sys-usb for its disks and gets the answer.
    assert '"statut":"ok","resultat":["sda1"]' in text
    # What the broker refuses is answered, and said.
    assert "error refuse: refused by the routing policy" in text
    assert "error destination_inconnue" in text
    assert "spoofed_source" in run.stdout
    assert demo[-1].endswith("stopped, exit status 0")
