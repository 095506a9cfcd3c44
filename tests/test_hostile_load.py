"""Hostile load against the broker as users start it.

Scale: 1 000 domains on ptys under the shipped unit's limits (``LimitNOFILE``, the
memory budget derived from ``MemoryMax``), half of them not reading while one
broadcasts 4 KiB frames at full speed: every domain connects (no ``EMFILE``), the
broker stays up and its RSS stays under ``MemoryMax``. The readers get what their
share of the queue budget holds (a Python thread reads all 500 of them here, slower
than 500 domains would): under memory pressure a slow reader's queue is cut at its
share like a mute one's.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import select
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.memory import default_budget
from tests.support.broker_process import BrokerProcess, write_config
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
UNIT = (ROOT / "systemd" / "messagerie-broker.service").read_text()


def unit_value(key: str) -> str:
    match = re.search(rf"^{key}=(\S+)$", UNIT, re.MULTILINE)
    assert match, key
    return match.group(1)


def memory_max() -> int:
    text = unit_value("MemoryMax")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def peak_rss(pid: int, box: list[int]) -> int:
    box[0] = max(box[0], rss(pid))
    return box[0]


@contextlib.contextmanager
def nofile(limit: int) -> Iterator[None]:
    """Spawn with this RLIMIT_NOFILE (as systemd's LimitNOFILE= sets it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


BROADCASTS = 150


class Ptys:
    """Many ptys held by their master side (the DomU ends, in this process)."""

    def __init__(self, names: list[str]) -> None:
        self.master: dict[str, int] = {}
        self.path: dict[str, str] = {}
        for name in names:
            master, slave = os.openpty()
            self.path[name] = os.ttyname(slave)
            os.close(slave)  # the broker opens it by name
            os.set_blocking(master, False)
            self.master[name] = master

    def close(self) -> None:
        for fd in self.master.values():
            os.close(fd)


class Reader(threading.Thread):
    """Reads the DomU ends of ``names`` and counts the broadcasts each got."""

    def __init__(self, ptys: Ptys, names: list[str], marker: bytes) -> None:
        super().__init__(daemon=True)
        self.fds = {ptys.master[n]: n for n in names}
        self.marker = marker
        self.counts = dict.fromkeys(names, 0)
        self.stop = threading.Event()
        self.last = time.monotonic()
        self.tails: dict[int, bytes] = {}

    def quiet(self, seconds: float) -> bool:
        """Nothing arrived for ``seconds``."""
        return time.monotonic() - self.last > seconds

    def run(self) -> None:
        poller = select.epoll()
        for fd in self.fds:
            poller.register(fd, select.EPOLLIN)
        while not self.stop.is_set():
            for fd, _ in poller.poll(0.2):
                with contextlib.suppress(OSError):
                    data = self.tails.get(fd, b"") + os.read(fd, 1 << 16)
                    self.counts[self.fds[fd]] += data.count(self.marker)
                    self.tails[fd] = data[-(len(self.marker) - 1):]  # a marker cut in two
                    self.last = time.monotonic()


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_thousand_domains_half_not_reading_stay_under_memory_max(tmp_path: Path) -> None:
    n = 1000
    names = [f"vm-{i:04d}" for i in range(n)]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 256:  # this process holds the thousand DomU ends
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4 * n), hard))
    ptys = Ptys(names)
    budget = default_budget(memory_max())  # what the broker derives under its unit
    config = write_config(tmp_path / "broker.toml", dict(ptys.path.items()),
                          extra=f"[limites]\nmemoire_files = {budget}\n"
                                "debit = 10000000\nrafale = 10000000\n"
                                # Memory is the point, not the budgets: a 4 KiB broadcast
                                # to 999 domains is one long turn (999 writes), charged as
                                # such; at the default part_cpu the 150 were not all read
                                # within 120 s.
                                "part_cpu = 1000000\nrafale_cpu = 1000000\n")
    readers = names[1:n // 2]  # names[n // 2:] never read their channel
    reader = Reader(ptys, readers, b'"bcast"')
    reader.start()
    try:
        with nofile(int(unit_value("LimitNOFILE"))):
            broker = BrokerProcess(config)
        try:
            broker.wait_ready(timeout=120)
            broker.wait_event("domain.connected", count=n, timeout=120)
            box = [rss(broker.proc.pid)]
            assert not broker.find("domain.unavailable")  # no EMFILE, nothing refused
            # vm-0000 broadcasts 150 frames of 4 KiB: 600 KB for each domain that does
            # not read, 300 MB for the mute half together, over the whole MemoryMax.
            pad = "p" * 4000
            frames = b"".join(
                b'{"type":"notification","source":"vm-0000","destination":"tous",'
                b'"payload":{"categorie":"bcast","evenement":"e","data":{"i":%d,"p":"%s"}}}\n'
                % (i, pad.encode()) for i in range(BROADCASTS))
            fd = ptys.master["vm-0000"]
            view = memoryview(frames)
            peak = 0
            deadline = time.monotonic() + 120
            while view and time.monotonic() < deadline:
                with contextlib.suppress(BlockingIOError):
                    view = view[os.write(fd, view[:16384]):]
                peak = max(peak, rss(broker.proc.pid))
                select.select([], [fd], [], 0.05)
            assert not view, "the broker did not read the broadcaster"

            # The broker goes on with what it read; the readers get what their share
            # of the budget holds (a Python thread reads 500 ptys here: slower than
            # 500 domains would). Measured until the traffic settles.
            settled = wait_until(lambda: broker.find("domain.stalled") and (
                peak_rss(broker.proc.pid, box) or True) and reader.quiet(3.0), 120,
                lambda: "the fan-out to settle")
            assert settled
            peak = max(peak, box[0])
            assert peak < memory_max(), f"RSS {peak >> 20} MiB over MemoryMax"
            got = sorted(reader.counts.values())
            print(f"\n1000 domains, half not reading: broker peak RSS {peak / 2**20:.0f} MiB"
                  f" (MemoryMax {memory_max() >> 20} MiB, queue budget {budget >> 20} MiB);"
                  f" readers got {got[0]}-{got[-1]} of {BROADCASTS} broadcasts")
            assert got[0] > 0  # every reader was served (its share of the budget)
            assert broker.proc.poll() is None and not broker.find("broker.failed")
            assert broker.proc.poll() is None
        finally:
            broker.stop(timeout=60)
    finally:
        reader.stop.set()
        reader.join(5)
        ptys.close()


# -- honest latency under each attack class ------------------------------------------
# Each attack class is compared with the quiet phases just before and after it in the
# same run (bench_flood.baseline), on the median of the p99s of five windows of 400
# honest messages (bench_flood.WINDOWS), the run's processes at nice -5 when allowed:
# on this 2-core machine shared with other jobs the quiet p99 moves from 1 to 200 ms
# within a minute, and one stall of the machine moves a phase's p99 by itself.
# Measured here that way (load average 1-5, 13 runs, first measurements): p99 within
# 3x in 60 of 65 attacked phases (heavy frames and starvation 13 of 13, junk and
# broadcasts 12, the shared destination 10); the others 3.1-7.5x, and 13x and 22x for
# the shared destination (then in arrival order until full, see LOOSE); measured again
# (the runs that did) within 0.7-2.2x. Without the priority (four runs), the junk
# flood's was 11x and 14x in two.
# So a class over a bound is measured again, in a run of its own, up to twice: a cost
# the broker adds is there every time, a stall of the machine seldom twice. Before the
# CPU budget, CPU-heavy frames took honest p50 to 14-40x: a broker that lets one
# domain's input block its loop breaks the p50 bound.
P50_RATIO = 5.0
P50_RATIO_FANOUT = 25.0
"""Broadcasts to every domain reach vm-diag too, whose own (Python) receiver then reads
them: honest p50 0.9-2.8x measured, 13x once under the heaviest load (earlier runs)."""
P99_RATIO = 3.0
P99_RATIO_LOOSE = 10.0
LOOSE: tuple[str, ...] = ()
"""The classes held to P99_RATIO_LOOSE, none now (docs/security.md). The shared
destination (a flood to vm-diag itself) was, while a destination's queue was in
arrival order until full (13x and 22x in two runs of 13); with the fair write order
0.26-2.7x in 12 runs of 12, median 1.0. The junk flood was too (4.7-6.2x in a
fresh-clone CI run on a quiet machine, every time: its turns lasted 1.4-2.3 ms, 128
refusals of 10 us); with the cheap refusal and no turn floor, 0.53-3.7x (median 1.0)
in 23 runs, 22 within 3x."""
P50_CEILING_US = 25_000
"""An absolute bound on honest p50 in every phase, quiet or attacked. The ratios alone
cannot see a broker that is slow all the time: one that delays every message (a write
flushed by a timer instead of at the end of its read, a turn that waits for a tick)
by tens of ms keeps every ratio near 1x. p50, not p99: a stall of this shared machine
moves p99 (quiet p99 1-200 ms here) but not the median of 2 000 messages. Generous:
over 100x the quiet p50 measured here (0.1-0.2 ms), 5x the worst attacked p50 ever
measured (3-5 ms, CPU-heavy frames before the CPU budget)."""
REPEATS = 2
"""Runs of their own for the classes over a bound (each with its quiet neighbours)."""


def over_bounds(r: dict[str, Any], kinds: Iterable[str]) -> list[str]:
    """The attack classes of ``r`` whose honest p50 or p99 is past its bound, or whose
    phase or quiet neighbours have their p50 past P50_CEILING_US."""
    from bench.bench_flood import baseline

    return [k for k in kinds
            if r[k]["p50_us"] > (P50_RATIO_FANOUT if k == "fanout" else P50_RATIO)
            * baseline(r, k, "p50_us")
            or r[k]["p99_window_median_us"]
            > (P99_RATIO_LOOSE if k in LOOSE else P99_RATIO)
            * baseline(r, k, "p99_window_median_us")
            or max(r[k]["p50_us"], baseline(r, k, "p50_us")) > P50_CEILING_US]


def test_a_broker_slow_in_every_phase_is_past_a_bound() -> None:
    # Every ratio at 1x but honest p50 at 40 ms throughout: only the ceiling sees it.
    def phase(p50: float) -> dict[str, float]:
        return {"p50_us": p50, "p99_window_median_us": 2 * p50}

    def run(p50: float) -> dict[str, Any]:
        return {"junk": phase(p50), "quiet_before": {"junk": phase(p50)},
                "quiet_after": {"junk": phase(p50)}}

    assert over_bounds(run(150), ["junk"]) == []
    assert over_bounds(run(40_000), ["junk"]) == ["junk"]
    slow_neighbour = run(150)
    slow_neighbour["quiet_after"]["junk"] = phase(40_000)  # then its ratios pass too
    assert over_bounds(slow_neighbour, ["junk"]) == ["junk"]


def report(r: dict[str, Any], kinds: Iterable[str]) -> str:
    from bench.bench_flood import baseline

    keys = ("p50_us", "p99_us", "p99_window_median_us")

    def figures(x: dict[str, float]) -> str:
        return "".join(f"{x[k]:>9.0f}" for k in keys)

    lines = [f"nice {r['nice']}; p99w: the median of five windows' p99; quiet: the larger "
             "neighbour's",
             f"{'phase':<12}{'p50':>9}{'p99':>9}{'p99w':>9}  {'quiet':>9}{'':>18}"
             f"   x p50   x p99  x p99w", f"{'quiet':<12}{figures(r['quiet'])}"]
    for phase in kinds:
        if phase == "starved":  # its quiet neighbours carry vm-cmd's commands too
            lines.append(f"{'quiet+cmds':<12}{figures(r['quiet_before'][phase])}")
        x = r[phase]
        ratios = "".join(f"{x[k] / baseline(r, phase, k):>8.2f}" for k in keys)
        lines.append(f"{phase:<12}{figures(x)}  {figures({k: baseline(r, phase, k) for k in keys})}"
                     f"{ratios}")
        lines.append(f"{'quiet':<12}{figures(r['quiet_after'][phase])}")
    for phase in ("quiet_commands", "starved_commands", "quiet_after_commands"):
        if phase in r:
            x = r[phase]
            lines.append(f"{phase:<16} p50 {x['p50_us']:.0f} us p99 {x['p99_us']:.0f} us "
                         f"answered {x['answered']} stuck {x['stuck']}")
    return "\n".join(lines)


@pytest.mark.load
@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_honest_traffic_under_each_attack_class(tmp_path: Path) -> None:
    """The broker as users start it, domains on socat ptys; in one run, a quiet phase,
    then each attack class while vm-ui sends 2 000 counted notifications to vm-diag at
    1 000 msg/s (bench.bench_flood.hostile_run), each followed by a quiet phase: a junk
    flood, broadcasts to every domain, a flood to vm-diag itself, CPU-heavy frames, and
    command starvation (vm-mute never answers 200 of vm-cmd's commands while its
    ``ping`` commands to vm-srv and dom0 go on). Every honest message and command is
    accounted for; honest p99 stays within 3x of the quiet phases around each attack
    (the re-measurement absorbs a stall of the machine)."""
    from bench.bench_flood import ATTACKS, hostile_run

    # 2 000 honest messages a phase (2 s): a CPU-heavy frame (2-6 ms to check, 1.4-12 a
    # second at the default part_cpu) delays the few that arrive during its turn.
    r = hostile_run(tmp_path / "run", 2_000, 20_000, 4)
    print("\nhonest latency per attack class\n" + report(r, ATTACKS))
    assert r["honest_lost"] == 0
    for phase in ("quiet_commands", "starved_commands", "quiet_after_commands"):
        assert r[phase]["answered"] == {"ok": 200} and r[phase]["unanswered"] == 0
    # vm-mute holds its share of vm-cmd's slots (64), the rest answered limite at once.
    assert r["starved_commands"]["stuck"] == {"limite": 200 - 64}
    over = over_bounds(r, ATTACKS)
    for attempt in range(REPEATS):
        if not over:
            break
        again = hostile_run(tmp_path / f"again-{attempt}", 2_000, 20_000, 4, kinds=over)
        print(f"\nover a bound: {', '.join(over)}; measured again\n" + report(again, over))
        assert again["honest_lost"] == 0
        over = over_bounds(again, over)
    assert not over, f"honest latency past its bound under {over} in {REPEATS + 1} runs"
