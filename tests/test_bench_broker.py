"""The broker benchmark's harness runs (``python -m bench.bench_broker --quick``), with a
baseline tree as a change to the hot path is measured: it cannot rot. No timing is
asserted here; figures live in docs/benchmarks.md."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.support.ptys import SOCAT

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.bench]


@pytest.mark.timeout(420)  # the run's own deadline decides, generous on a loaded machine
def test_bench_broker_quick_against_a_baseline_tree() -> None:
    assert SOCAT is not None, "socat is required (.ci/system-deps installs it)"
    # Its temporary files in a directory of the test's own, short enough for the
    # brokers' unix socket paths (108 bytes), to see that none is left behind.
    with tempfile.TemporaryDirectory(prefix="mb-", dir="/tmp") as tmp:
        _run_and_check(Path(tmp))


def _run_and_check(tmp_path: Path) -> None:
    # The baseline is this very tree (run from its sources, there is no .venv in a
    # fresh clone's CI): the harness, not the comparison, is under test.
    out = subprocess.run([sys.executable, "-m", "bench.bench_broker", "--quick",
                          "--baseline", str(ROOT)], cwd=ROOT, capture_output=True,
                         text=True, timeout=360, check=False,
                         env={**os.environ, "TMPDIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "## Broker over socat ptys" in text and "--baseline TREE" in text
    rows = {r.split("|")[1].strip(): r for r in text.splitlines() if r.startswith("| ")}
    bursts = [k for k in rows if k.startswith("burst, ") and "rate limit" not in k]
    assert len(bursts) == 6, bursts  # raw, two Python relays, broker, baseline, complete
    for label in bursts[1:]:
        # Two alternating runs, each against its own run's raw relay.
        match = re.search(r"\*\*([\d.]+)x raw\*\* \(runs: ([\d.]+), ([\d.]+)\)", rows[label])
        assert match and float(match.group(1)) > 0, rows[label]
    assert re.search(r"this broker / it: [\d.]+x \(runs: [\d.]+, [\d.]+\), its CPU per "
                     r"message [\d.]+x \(runs: [\d.]+, [\d.]+\)", text), text
    assert re.search(r"CPU [\d.]+ us per message", rows["burst, broker (info level)"])
    assert "idle, 20 domains connected" in rows
    assert not list(tmp_path.glob("messagerie-bench-*")), "temporary directory left behind"


def test_a_baseline_from_before_a_limit_is_configured_without_it(tmp_path: Path) -> None:
    from bench.bench_broker import LIMITS, known_limits, unlimited

    # This tree knows every limit the bench lifts.
    assert known_limits(ROOT) == list(LIMITS)
    # A tree from before the CPU budget: its configuration module reads three of them.
    (tmp_path / "src" / "broker").mkdir(parents=True)
    (tmp_path / "src" / "broker" / "config.py").write_text(
        'RATE = ("debit", "rafale")\nSTALL = "delai_blocage"\n')
    keys = known_limits(tmp_path)
    assert keys == ["debit", "rafale", "delai_blocage"]
    assert unlimited(keys) == ("[limites]\ndebit = 1000000000\nrafale = 1000000000\n"
                               "delai_blocage = 60\n")
