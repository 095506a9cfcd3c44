"""Broker benchmark over socat ptys: the broker against the transport's own limit.

    .venv/bin/python -m bench.bench_broker            # full run (about a minute)
    .venv/bin/python -m bench.bench_broker --quick    # a few seconds (the test suite runs it)
    .venv/bin/python -m bench.bench_broker --write docs/benchmarks.md

Scenarios, all in one run on the same machine, so that ratios are meaningful:

* burst: N mouse-move notifications (~220 bytes) from vm-sys-usb to vm-ui, through
  (a) a raw relay (socat copying bytes between the two dom0-side ptys: what the
  transport itself can do) and (b) the broker at the production log level (info);
* field: the field benchmark, 1 000 mouse moves end to end (117 ms on real Xen);
* latency: one-way latency at 1 000 msg/s, through the broker and the raw relay;
* rss: the broker's resident memory with 100 connected domains, and its CPU use
  while they are idle.

Each peer (sender, receiver, relay, broker) is its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support.broker_process import BrokerProcess, write_config
from tests.support.ptys import SOCAT, PtyPair, pty_pairs
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent

PEERS = [sys.executable, str(Path(__file__).with_name("peers.py"))]
# Benchmarks measure the transport and the broker, not the rate limit.
UNLIMITED = "[limites]\ndebit = 1000000000\nrafale = 1000000000\n"


def _json_line(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"peer exited without a result (status {proc.wait()})")
    result: dict[str, Any] = json.loads(line)
    return result


def transfer(src: Path, dst: Path, count: int, *, rate: float = 0,
             latency: bool = False) -> dict[str, Any]:
    """Send ``count`` messages from one DomU end to another; timings from the peers."""
    recv = subprocess.Popen([*PEERS, "recv", str(dst), str(count),
                             *(["--latency"] if latency else [])],
                            stdout=subprocess.PIPE, text=True)
    _json_line(recv)  # ready
    send = subprocess.run([*PEERS, "send", str(src), str(count),
                           *(["--rate", str(rate)] if rate else [])],
                          capture_output=True, text=True, check=True)
    sent = json.loads(send.stdout)
    got = _json_line(recv)
    recv.wait(30)
    if got["received"] < count:
        raise RuntimeError(f"only {got['received']} of {count} messages arrived")
    # From the first byte written (not from building the burst) to the last received.
    elapsed = (got["last_ns"] - sent["write_ns"]) / 1e9
    return {**got, "seconds": elapsed, "per_second": count / elapsed}


@contextmanager
def raw_relay(a: PtyPair, b: PtyPair) -> Iterator[None]:
    assert SOCAT
    proc = subprocess.Popen([SOCAT, "-b", "65536", f"{a.dom0},raw,echo=0",
                             f"{b.dom0},raw,echo=0"], stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)  # socat gives no readiness signal; it opens both ends at once
        yield
    finally:
        proc.kill()
        proc.wait()


@contextmanager
def python_relay(a: PtyPair, b: PtyPair, *, decode: bool) -> Iterator[None]:
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("py_relay.py")),
                             str(a.dom0), str(b.dom0), *(["--decode"] if decode else [])])
    try:
        time.sleep(0.5)  # no readiness signal: it opens both ends at start
        yield
    finally:
        proc.kill()
        proc.wait()


@contextmanager
def broker(tmp: Path, domains: dict[str, PtyPair], extra: str = UNLIMITED,
           level: str = "info") -> Iterator[BrokerProcess]:
    config = write_config(tmp / "bench.toml", {n: p.dom0 for n, p in domains.items()},
                          extra=f'[broker]\nniveau_journal = "{level}"\n{extra}')
    proc = BrokerProcess(config)
    try:
        proc.wait_event("broker.ready", timeout=60)
        wait_until(lambda: len(proc.find("domain.connected")) >= len(domains), 60,
                   "all domains connected")
        yield proc
    finally:
        proc.stop()


def median(runs: list[dict[str, Any]], key: str = "per_second") -> dict[str, Any]:
    return sorted(runs, key=lambda r: r[key])[len(runs) // 2]


def rss_kib(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", text)
    return int(match.group(1)) if match else 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(quick: bool) -> dict[str, Any]:
    burst = 20_000 if quick else 200_000
    latency_n = 500 if quick else 3_000
    idle_domains = 20 if quick else 100
    idle_seconds = 2.0 if quick else 10.0
    repeats = 1 if quick else 5
    results: dict[str, Any] = {"burst_count": burst}
    with tempfile.TemporaryDirectory(prefix="messagerie-bench-") as t:
        tmp = Path(t)
        # The raw relay and the broker run side by side on their own ptys, and their
        # bursts alternate: the machine's noise hits both alike; medians are reported.
        full = tmp / "complete"  # a second broker, validation = "complete"
        full.mkdir()
        with pty_pairs(tmp, ["raw-a", "raw-b"]) as rp, \
                pty_pairs(tmp, ["vm-sys-usb", "vm-ui"]) as p, \
                pty_pairs(full, ["vm-sys-usb", "vm-ui"]) as fp, \
                raw_relay(rp["raw-a"], rp["raw-b"]), \
                broker(tmp, p) as b, \
                broker(full, fp, extra='validation = "complete"\n' + UNLIMITED):
            usb, ui = p["vm-sys-usb"], p["vm-ui"]
            raws, brokers, completes = [], [], []
            for _ in range(repeats):
                raws.append(transfer(rp["raw-a"].domu, rp["raw-b"].domu, burst))
                cpu_before = cpu_seconds(b.proc.pid)
                run_ = transfer(usb.domu, ui.domu, burst)
                run_["cpu_percent"] = 100 * (cpu_seconds(b.proc.pid) - cpu_before) / run_["seconds"]
                brokers.append(run_)
                completes.append(transfer(fp["vm-sys-usb"].domu, fp["vm-ui"].domu, burst))
            results["raw"] = median(raws)
            results["broker"] = median(brokers)
            results["broker_complete"] = median(completes)
            results["ratios"] = [br["per_second"] / ra["per_second"]
                                 for ra, br in zip(raws, brokers, strict=True)]
            results["field"] = median([transfer(usb.domu, ui.domu, 1000) for _ in range(3)],
                                      key="seconds")
            results["latency"] = transfer(usb.domu, ui.domu, latency_n, rate=1000,
                                          latency=True)
            results["raw_latency"] = transfer(rp["raw-a"].domu, rp["raw-b"].domu, latency_n,
                                              rate=1000, latency=True)
            results["broker_rss_after_burst_kib"] = rss_kib(b.proc.pid)
        for decode in (False, True):
            with pty_pairs(tmp, ["vm-sys-usb", "vm-ui"]) as p:
                usb, ui = p["vm-sys-usb"], p["vm-ui"]
                with python_relay(usb, ui, decode=decode):
                    key = "python_relay_decode" if decode else "python_relay"
                    results[key] = transfer(usb.domu, ui.domu, burst)
        with pty_pairs(tmp, ["vm-sys-usb", "vm-ui"]) as p:
            usb, ui = p["vm-sys-usb"], p["vm-ui"]
            with broker(tmp, p, extra="") as b:
                results["broker_default_limits"] = transfer(usb.domu, ui.domu, burst)
        names = [f"vm-{i:03d}" for i in range(idle_domains)]
        with pty_pairs(tmp, names) as p, broker(tmp, p) as b:
            pid = b.proc.pid
            before = cpu_seconds(pid)
            time.sleep(idle_seconds)  # measuring idle CPU: nothing to wait for
            results["idle"] = {"domains": idle_domains, "seconds": idle_seconds,
                               "cpu_percent": 100 * (cpu_seconds(pid) - before) / idle_seconds,
                               "rss_kib": rss_kib(pid)}
    results["ratio_broker_raw"] = results["broker"]["per_second"] / results["raw"]["per_second"]
    return results


def table(r: dict[str, Any]) -> str:
    raw, brk = r["raw"], r["broker"]
    rows = [
        ("burst, raw relay (socat)", f"{raw['per_second']:,.0f} msg/s",
         "baseline (median of the alternating runs)"),
        ("burst, Python relay, no validation", f"{r['python_relay']['per_second']:,.0f} msg/s",
         f"{r['python_relay']['per_second'] / raw['per_second']:.2f}x raw: ceiling for "
         "any Python process here"),
        ("burst, Python relay + FrameDecoder",
         f"{r['python_relay_decode']['per_second']:,.0f} msg/s",
         f"{r['python_relay_decode']['per_second'] / raw['per_second']:.2f}x raw: a blocking "
         "copy loop decoding every frame completely, one by one"),
        ("burst, broker (info level)", f"{brk['per_second']:,.0f} msg/s",
         f"**{r['ratio_broker_raw']:.2f}x raw** (target >= 0.70; per run: "
         f"{', '.join(f'{x:.2f}' for x in r['ratios'])}); broker CPU "
         f"{brk['cpu_percent']:.0f} %"),
        ('burst, broker, validation = "complete"',
         f"{r['broker_complete']['per_second']:,.0f} msg/s",
         f"{r['broker_complete']['per_second'] / raw['per_second']:.2f}x raw: every frame "
         "decoded completely (docs/broker.md, Validation)"),
        ("burst, broker, default rate limit",
         f"{r['broker_default_limits']['per_second']:,.0f} msg/s",
         "limites.debit = 20 000/s per domain"),
        ("field: 1 000 mouse moves end to end", f"{r['field']['seconds'] * 1000:.1f} ms",
         "target <= 20 ms; 117 ms on real Xen"),
        ("latency at 1 000 msg/s, broker", f"p50 {r['latency']['p50_us']:.0f} us, "
         f"p99 {r['latency']['p99_us']:.0f} us, p99.9 {r['latency']['p99.9_us']:.0f} us",
         "target p99 <= 1 000 us"),
        ("latency at 1 000 msg/s, raw relay", f"p50 {r['raw_latency']['p50_us']:.0f} us, "
         f"p99 {r['raw_latency']['p99_us']:.0f} us", "baseline"),
        (f"idle, {r['idle']['domains']} domains connected",
         f"RSS {r['idle']['rss_kib'] / 1024:.1f} MiB, CPU {r['idle']['cpu_percent']:.2f} %",
         "target RSS <= 60 MB, CPU < 1 %"),
    ]
    out = ["| scenario | result | note |", "|---|---|---|"]
    out += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(out)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}, "
            f"Python {platform.python_version()}")


def write_section(path: Path, body: str, name: str = "bench_broker") -> None:
    """Replace the block between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{body}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text,
                      flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (a few seconds)")
    p.add_argument("--write", type=Path, help="put the table into this Markdown file")
    p.add_argument("--json", action="store_true", help="print raw results as JSON")
    args = p.parse_args()
    results = run(args.quick)
    if args.json:
        print(json.dumps(results, indent=2))
    body = (f"## Broker over socat ptys\n\nCommand: `.venv/bin/python -m bench.bench_broker"
            f"{' --quick' if args.quick else ''}`  \nMachine: {machine()}  \n"
            f"Date: {time.strftime('%Y-%m-%d')}  \nBurst size: {results['burst_count']:,} "
            f"messages of ~220 bytes.\n\n{table(results)}\n")
    print(body)
    if args.write:
        write_section(args.write, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
