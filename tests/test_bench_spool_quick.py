"""The spool replay benchmark's harness runs (``python -m bench.bench_spool`` with a
small count): it cannot rot. No timing is asserted here (the benchmark itself checks
that every message arrived, in order, byte for byte); figures live in
docs/benchmarks.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.ptys import SOCAT

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_bench_spool_runs_and_reports() -> None:
    assert SOCAT is not None, "socat is required (.ci/system-deps installs it)"
    out = subprocess.run([sys.executable, "-m", "bench.bench_spool", "--messages", "300",
                          "--repeats", "1"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["messages"] == 300 and len(result["runs"]) == 1
    assert result["replay"]["median"] > 0
