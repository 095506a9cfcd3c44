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
from collections.abc import Iterator
from pathlib import Path

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
                                # Memory is the point, not the rate budget: 150
                                # broadcasts to 999 domains are 150 000 deliveries. A
                                # 4 KiB broadcast to 999 domains is one long turn (999
                                # writes), over the default CPU share: nobody else
                                # sends, so the CPU budget does not bind.
                                "debit = 10000000\nrafale = 10000000\n")
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
# Measured here (2 cores shared with other jobs, load average 4-7): quiet p50 0.2-2 ms
# and p99 2-77 ms from one run to the next (the machine, not the broker: the quiet
# phases before and after the attacks of one run differ as much); over seven runs the
# attacked p50 was within 0.1-3.3x of the larger quiet one and p99 within 0.1-8x, but
# for the broadcast flood under the heaviest load (p50 13x): its 8 recipients' socat
# relays and drains (userspace processes that pv-channels do not need) take the
# machine's CPU from the honest flow's own relays. Before the CPU budget, CPU-heavy
# frames took honest p50 to 14-40x. The bounds sit over that spread: a broker that
# lets one domain's input block its loop (no CPU budget, no cut of a read into turns)
# breaks the p50 one.
P50_RATIO = 5.0
P50_RATIO_FANOUT = 25.0
P99_RATIO = 15.0


@pytest.mark.load
@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_honest_traffic_under_each_attack_class(tmp_path: Path) -> None:
    """The broker as users start it, domains on socat ptys; in one run, a quiet phase,
    then each attack class while vm-ui sends 2 000 counted notifications to vm-diag at
    1 000 msg/s (bench.bench_flood.hostile_run): a junk flood, broadcasts to every
    domain, a flood to vm-diag itself, CPU-heavy frames, and command starvation
    (vm-mute never answers 200 of vm-cmd's commands while its ``ping`` commands to
    vm-srv and dom0 go on). Every honest message and command is accounted for."""
    from bench.bench_flood import ATTACKS, baseline, hostile_run

    # 2 000 honest messages a phase (2 s): one CPU-heavy frame (about 12 ms, one every
    # 3 s at the default part_cpu) then delays under 1 % of them, as in a longer run.
    r = hostile_run(tmp_path, 2_000, 20_000, 4)
    # Each attack against the quiet phases just before and after it (bench_flood.baseline);
    # p99w: the median of the p99s of five windows of 400 messages (bench_flood.WINDOWS).
    keys = ("p50_us", "p99_us", "p99_window_median_us")

    def figures(x: dict[str, float]) -> str:
        return "".join(f"{x[k]:>9.0f}" for k in keys)

    lines = [f"{'phase':<12}{'p50':>9}{'p99':>9}{'p99w':>9}  (us; quiet: the larger "
             f"neighbour's)   x p50   x p99  x p99w", f"{'quiet':<12}{figures(r['quiet'])}"]
    for phase in ATTACKS:
        if phase == "starved":  # its quiet neighbours carry vm-cmd's commands too
            lines.append(f"{'quiet+cmds':<12}{figures(r['quiet_before'][phase])}")
        x = r[phase]
        ratios = "".join(f"{x[k] / baseline(r, phase, k):>8.2f}" for k in keys)
        lines.append(f"{phase:<12}{figures(x)}  {figures({k: baseline(r, phase, k) for k in keys})}"
                     f"{ratios}")
        lines.append(f"{'quiet':<12}{figures(r['quiet_after'][phase])}")
    for phase in ("quiet_commands", "starved_commands", "quiet_after_commands"):
        x = r[phase]
        lines.append(f"{phase:<16} p50 {x['p50_us']:.0f} us p99 {x['p99_us']:.0f} us "
                     f"answered {x['answered']} stuck {x['stuck']}")
    print(f"\nhonest latency per attack class (ratios to the larger adjacent quiet value; "
          f"nice {r['nice']})\n"
          + "\n".join(lines))
    assert r["honest_lost"] == 0
    for phase in ("quiet_commands", "starved_commands", "quiet_after_commands"):
        assert r[phase]["answered"] == {"ok": 200} and r[phase]["unanswered"] == 0
    # vm-mute holds its share of vm-cmd's slots (64), the rest answered limite at once.
    assert r["starved_commands"]["stuck"] == {"limite": 200 - 64}
    for phase in ATTACKS:
        bound = P50_RATIO_FANOUT if phase == "fanout" else P50_RATIO
        assert r[phase]["p50_us"] <= bound * baseline(r, phase, "p50_us"), (phase, r[phase])
        assert (r[phase]["p99_window_median_us"]
                <= P99_RATIO * baseline(r, phase, "p99_window_median_us")), (phase, r[phase])
