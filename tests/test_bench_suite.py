"""The benchmark suite (``python -m bench.suite``) in its smallest configuration, so that the
harness cannot rot: every system and scenario runs, in alternating rounds, nothing is
written to docs/; and a run stopped midway leaves no process nor directory behind.
No timing is asserted: this machine's figures are not the test's business."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.bench]

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = ["raw relay, ptys (socat)", "broker, ptys", "raw relay, unix sockets (socat)",
           "broker, unix sockets", "amqtt", "mosquitto"]
SCENARIOS = ["burst,", "field:", "latency at 100 msg/s", "latency at 1,000 msg/s",
             "latency at 10,000 msg/s", "fan-out to 2", "fan-out to 3", "idle,",
             "under flood"]


def _suite(tmp: Path, *args: str, **kw: Any) -> subprocess.Popen[str]:
    """The suite in a session of its own (its children in its process group), its
    temporary directories under ``tmp``."""
    return subprocess.Popen([sys.executable, "-m", "bench.suite", *args], cwd=ROOT,
                            env={**os.environ, "TMPDIR": str(tmp)}, text=True,
                            start_new_session=True, **kw)


def _stop_group(proc: subprocess.Popen[str]) -> None:
    """Whatever happened, nothing of the run survives the test."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


def _group(pgid: int) -> list[str]:
    ps = subprocess.run(["ps", "-o", "pid=,args=", "-g", str(pgid)], capture_output=True,
                        text=True, check=False)
    return ps.stdout.splitlines()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.timeout(480)  # the run's own deadline (420 s) decides, not the default 120 s
def test_smoke_run_covers_every_system_and_scenario(tmp_path: Path) -> None:
    before = _docs_state()
    out = tmp_path / "bench.md"
    proc = _suite(tmp_path, "--smoke", "--rounds", "2", "--deadline", "420", "--write",
                  "--out", str(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        text, err = proc.communicate(timeout=450)
    finally:
        _stop_group(proc)
    assert proc.returncode == 0, err[-3000:]
    header = next(line for line in text.splitlines() if line.startswith("| scenario | raw"))
    assert [c.strip() for c in header.strip("|").split("|")][1:] == SYSTEMS
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    for scenario in SCENARIOS:
        matching = [r for r in rows if scenario in r]
        assert len(matching) == 2, (scenario, matching)  # results and ratios
        cells = [c.strip() for c in matching[0].strip("|").split("|")][1:]
        assert len(cells) == len(SYSTEMS) and all(cells), matching[0]
    # Each broker against the raw relay over its own transport.
    ratio_header = next(line for line in text.splitlines() if "pty / raw pty" in line)
    assert "unix / raw unix" in ratio_header
    burst = next(r for r in rows if r.startswith("| burst,"))
    assert "n/a" not in burst, burst
    # Two rounds, every system in each, alternating: round 2 starts with the second system.
    firsts = [ln.split()[2] for ln in err.splitlines() if ln.startswith("round ")
              and ln.split()[3] == "burst"]
    assert firsts == ["raw", "pty", "raw-unix", "unix", "amqtt", "mosquitto",
                      "pty", "raw-unix", "unix", "amqtt", "mosquitto", "raw"], firsts
    assert "failed" not in text, text
    assert "paho-mqtt publisher" in text
    assert "Targets:" in text and "burst >= 5x amqtt" in text
    # Written where asked (table between markers, plot beside it), and nowhere else.
    written = out.read_text()
    assert "<!-- suite:start -->" in written and "<!-- suite:end -->" in written
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    assert _docs_state() == before
    assert not list(tmp_path.glob("messagerie-suite-*")), "temporary directory left behind"
    assert not _group_alive(proc.pid), "a process of the run outlived it"


@pytest.mark.timeout(180)
def test_a_run_stopped_midway_leaves_nothing_behind(tmp_path: Path) -> None:
    # SIGTERM (what a timeout sends first) while sessions are up: the run unwinds,
    # stopping its socat ptys, brokers and peers and removing its directory.
    log = tmp_path / "stderr"
    with log.open("w") as err:
        proc = _suite(tmp_path, "--smoke", "--systems", "pty,raw", "--rounds", "3",
                      stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_until(lambda: "round 1 pty" in log.read_text() or proc.poll() is not None, 120,
                   "the first result")
        assert proc.poll() is None, log.read_text()[-2000:]
        assert list(tmp_path.glob("messagerie-suite-*"))
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(60)
        assert proc.returncode == 128 + signal.SIGTERM, log.read_text()[-2000:]
        assert "benchmark stopped: SIGTERM received" in log.read_text()
        assert not list(tmp_path.glob("messagerie-suite-*")), "temporary directory left"
        # Processes of the run (socat, brokers, peers) are gone, soon if not at once.
        wait_until(lambda: not _group_alive(proc.pid), 15,
                   lambda: f"the run's processes gone (left: {_group(proc.pid)})")
    finally:
        _stop_group(proc)


def _docs_state() -> tuple[str, int]:
    """The suite's section of docs/benchmarks.md and the plot's mtime (other sections
    of docs/ may change under us: other benchmarks and people write them)."""
    md, png = ROOT / "docs" / "benchmarks.md", ROOT / "docs" / "benchmarks.png"
    text = md.read_text() if md.exists() else ""
    section = text.partition("<!-- suite:start -->")[2].partition("<!-- suite:end -->")[0]
    return section, png.stat().st_mtime_ns if png.exists() else 0
