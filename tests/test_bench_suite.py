"""The benchmark suite (``python -m bench.suite``) in its smallest configuration, so that the
harness cannot rot: every system and scenario runs, nothing is written to docs/.
No timing is asserted: this machine's figures are not the test's business."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = ["raw relay (socat)", "broker, ptys", "broker, unix sockets", "amqtt", "mosquitto"]
SCENARIOS = ["burst,", "field:", "latency at 100 msg/s", "latency at 1,000 msg/s",
             "latency at 10,000 msg/s", "fan-out to 2", "fan-out to 3", "idle,",
             "under flood"]


@pytest.mark.timeout(300)  # the run's own deadline (240 s) decides, not the default 120 s
def test_smoke_run_covers_every_system_and_scenario(tmp_path: Path) -> None:
    before = _docs_state()
    out = tmp_path / "bench.md"
    proc = subprocess.run([sys.executable, "-m", "bench.suite", "--smoke",
                           "--write", "--out", str(out)],
                          capture_output=True, text=True, timeout=240, cwd=ROOT,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    header = next(line for line in text.splitlines() if line.startswith("| scenario | raw"))
    assert [c.strip() for c in header.strip("|").split("|")][1:] == SYSTEMS
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    for scenario in SCENARIOS:
        matching = [r for r in rows if scenario in r]
        assert len(matching) == 2, (scenario, matching)  # results and ratios
        cells = [c.strip() for c in matching[0].strip("|").split("|")][1:]
        assert len(cells) == len(SYSTEMS) and all(cells), matching[0]
    assert "failed" not in text, text
    assert "paho-mqtt publisher" in text
    assert "Targets:" in text and "burst >= 5x amqtt" in text
    # Written where asked (table between markers, plot beside it), and nowhere else.
    written = out.read_text()
    assert "<!-- suite:start -->" in written and "<!-- suite:end -->" in written
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    assert _docs_state() == before


def _docs_state() -> tuple[str, int]:
    """The suite's section of docs/benchmarks.md and the plot's mtime (other sections
    of docs/ may change under us: other benchmarks and people write them)."""
    md, png = ROOT / "docs" / "benchmarks.md", ROOT / "docs" / "benchmarks.png"
    text = md.read_text() if md.exists() else ""
    section = text.partition("<!-- suite:start -->")[2].partition("<!-- suite:end -->")[0]
    return section, png.stat().st_mtime_ns if png.exists() else 0
