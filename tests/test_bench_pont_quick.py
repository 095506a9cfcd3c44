"""The bridge benchmark's harness runs (``python -m bench.bench_pont --quick``): it cannot
rot. No timing is asserted here; figures live in docs/benchmarks.md."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.bench]


@pytest.mark.timeout(420)
def test_bench_pont_quick_prints_its_tables() -> None:
    out = subprocess.run([sys.executable, "-m", "bench.bench_pont", "--quick"], cwd=ROOT,
                         capture_output=True, text=True, timeout=360, check=False)
    assert out.returncode == 0, out.stderr[-2000:] + out.stdout[-2000:]
    text = out.stdout
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and "---" not in ln]
    labels = [r.split("|")[1].strip() for r in rows]
    assert labels == ["path", "DomU -> broker -> messagerie-pont -> mosquitto -> mosquitto_sub",
                      "mosquitto_pub -> mosquitto -> mosquitto_sub", "path",
                      "through the bridge", "mosquitto_pub", "added by the bridge path"], rows
    assert re.search(r"ratio bridge / baseline: \d+\.\d\d", text), text
    # Every message of every scenario arrived (the harness raises otherwise).
    assert "burst of 2000" in text and "(500 messages)" in text
