"""The spool benchmark's harness runs (``python -m bench.bench_spool``, small): it cannot
rot. No timing is asserted here; figures live in docs/benchmarks.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.ptys import SOCAT

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.bench]


@pytest.mark.timeout(300)
def test_bench_spool_replays_and_checks_the_bytes() -> None:
    assert SOCAT is not None, "socat is required (.ci/system-deps installs it)"
    out = subprocess.run([sys.executable, "-m", "bench.bench_spool", "--messages", "300",
                          "--repeats", "1"], cwd=ROOT, capture_output=True, text=True,
                         timeout=240, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["messages"] == 300 and len(result["runs"]) == 1
    # The run compared the replayed bytes with those sent (it fails otherwise), and
    # the broker reported the replay it made.
    assert set(result["runs"][0]) == {"spool", "replay", "broker"}
    assert result["replay"]["median"] > 0
