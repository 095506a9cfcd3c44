"""The flood benchmark's harness runs (``python -m bench.bench_flood --quick``): it cannot rot.
No timing is asserted here; figures live in docs/benchmarks.md."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.ptys import SOCAT

ROOT = Path(__file__).resolve().parent.parent

# `load`: the same hostile run as tests/test_hostile_load.py (about 30 s): CI runs it once.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.load, pytest.mark.bench]


@pytest.mark.timeout(420)  # the run's own deadline decides, generous on a loaded machine
def test_bench_flood_quick_prints_its_table() -> None:
    assert SOCAT is not None, "socat is required (.ci/system-deps installs it)"
    # As documented: a module, from the repository root (no sys.path patching).
    out = subprocess.run([sys.executable, "-m", "bench.bench_flood", "--quick"], cwd=ROOT,
                         capture_output=True, text=True, timeout=360, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "## Honest latency under a flood" in text
    assert "Honest messages lost: 0." in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == [
        "quiet", "flood, default limits", "flood, no rate limit", "quiet, attack run",
        "junk flood", "quiet", "broadcast flood", "quiet", "shared destination", "quiet",
        "CPU-heavy frames", "quiet", "quiet", "command starvation", "quiet"], rows
    # The throttled flood was throttled, the unlimited one was not.
    throttled = [re.search(r"([\d,]+) throttled", r) for r in rows[2:4]]
    assert all(throttled), rows
    counts = [int(m.group(1).replace(",", "")) for m in throttled if m]
    assert counts[0] > 0 and counts[1] == 0, rows
    assert "200 of 200 answered ok" in text
