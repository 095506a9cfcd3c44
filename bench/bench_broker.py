"""Broker benchmark over socat ptys: the broker against the transport's own limit.

    .venv/bin/python -m bench.bench_broker            # full run (a few minutes)
    .venv/bin/python -m bench.bench_broker --quick    # under a minute (the test suite runs it)
    .venv/bin/python -m bench.bench_broker --write docs/benchmarks.md
    .venv/bin/python -m bench.bench_broker --baseline ../old --burst-only --repeats 11

``--baseline TREE`` also runs the broker of another source tree, e.g. a worktree of the
previous commit (``git worktree add ../old HEAD~1``), in the same run: this is how a
change to the hot path is measured, old and new alternating on the same machine. A tree
from before a limit existed (the CPU budget's ``part_cpu``, ``rafale_cpu``) gets a
configuration without it: it would refuse the key.

Scenarios, all in one run on the same machine, so that ratios are meaningful:

* burst: N mouse-move notifications (~220 bytes) from vm-sys-usb to vm-ui, through
  (a) a raw relay (socat copying bytes between the two dom0-side ptys: what the
  transport itself can do), (b) two Python copy loops (bench/py_relay.py: bare, and
  decoding every frame), (c) the broker at the production log level (info), with
  ``validation = "complete"``, and the baseline tree's broker if asked; every system
  has its own ptys and their bursts alternate run by run, in a rotating order;
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
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from bench.lifetime import unwind_on_signals
from tests.support.broker_process import BROKER, BrokerProcess, write_config
from tests.support.ptys import SOCAT, PtyPair, pty_pairs
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent

PEERS = [sys.executable, str(Path(__file__).with_name("peers.py"))]
# Benchmarks measure the transport and the broker, not the rate limit; and a receiver
# starved for a second by a loaded machine is not a stalled domain whose messages drop.
LIMITS = {"debit": "1000000000", "rafale": "1000000000", "delai_blocage": "60",
          "part_cpu": "1000000000", "rafale_cpu": "1000000000"}


def unlimited(keys: Sequence[str] = tuple(LIMITS)) -> str:
    """The ``[limites]`` section that lifts these limits."""
    return "[limites]\n" + "".join(f"{k} = {LIMITS[k]}\n" for k in keys)


UNLIMITED = unlimited()


def known_limits(tree: Path) -> list[str]:
    """The keys of :data:`LIMITS` that the broker of ``tree`` knows: an older tree
    refuses a configuration with a key it does not know (the CPU budget's came later).
    Its configuration module names each key it reads as a string literal."""
    text = (tree / "src" / "broker" / "config.py").read_text()
    return [k for k in LIMITS if f'"{k}"' in text]


def _json_line(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"peer exited without a result (status {proc.wait()})")
    result: dict[str, Any] = json.loads(line)
    return result


def burst_seconds(sent: dict[str, Any], got: dict[str, Any], count: int) -> float:
    """How long ``count`` messages took, from the sender's first byte written (not from
    building the burst) to the last one received, by the peers' own clocks; raises if
    fewer arrived."""
    if got["received"] < count:
        raise RuntimeError(f"only {got['received']} of {count} messages arrived")
    return float(got["last_ns"] - sent["write_ns"]) / 1e9


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
    elapsed = burst_seconds(sent, got, count)
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
           level: str = "info", *, command: Sequence[str] = (str(BROKER),),
           env: dict[str, str] | None = None) -> Iterator[BrokerProcess]:
    config = write_config(tmp / "bench.toml", {n: p.dom0 for n, p in domains.items()},
                          extra=f'[broker]\nniveau_journal = "{level}"\n{extra}')
    proc = BrokerProcess(config, command=command, env=env)
    try:
        proc.wait_ready(timeout=60)  # fails at once if the broker exits instead
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


BURSTS = ("raw", "python_relay", "python_relay_decode", "broker", "baseline",
          "broker_complete")
"""The systems whose bursts alternate, run by run (``baseline`` only with --baseline)."""


def baseline_broker(tree: Path) -> tuple[list[str], dict[str, str], str]:
    """How to start another source tree's broker (a worktree of another commit): its own
    venv's console script when it has one (``TREE/.venv``, ``pip install -e .`` done
    there), else this interpreter on ``TREE/src``. With a label for it."""
    if not (tree / "src" / "broker").is_dir():
        raise SystemExit(f"{tree} is not a source tree of the broker (no src/broker)")
    script = tree / ".venv" / "bin" / "messagerie-broker"
    command = [str(script)]
    if not script.exists():
        command = [sys.executable, "-c", "import sys; from broker.cli import main; "
                   "sys.exit(main())"]
    env = {"PYTHONPATH": str(tree.resolve() / "src")}  # whatever this run's PYTHONPATH is
    label = subprocess.run(["git", "-C", str(tree), "log", "-1", "--format=%h"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return command, env, label or tree.name


def run(quick: bool, baseline: Path | None = None, repeats: int | None = None,
        burst_only: bool = False) -> dict[str, Any]:
    burst = 20_000 if quick else 200_000
    latency_n = 500 if quick else 3_000
    idle_domains = 20 if quick else 100
    idle_seconds = 2.0 if quick else 10.0
    repeats = repeats or (2 if quick else 5)
    results: dict[str, Any] = {"burst_count": burst, "repeats": repeats}
    with tempfile.TemporaryDirectory(prefix="messagerie-bench-") as t, ExitStack() as stack:
        tmp = Path(t)
        # Every system of the burst runs side by side on its own ptys, and their bursts
        # alternate (in a rotating order): the machine's noise and drift hit all alike.
        # Ratios are taken within a run, against that run's raw relay; medians reported.
        ends: dict[str, tuple[Path, Path]] = {}
        brokers: dict[str, BrokerProcess] = {}
        for system in BURSTS:
            if system == "baseline" and baseline is None:
                continue
            d = tmp / system
            d.mkdir()
            p = stack.enter_context(pty_pairs(d, ["vm-sys-usb", "vm-ui"]))
            usb, ui = p["vm-sys-usb"], p["vm-ui"]
            ends[system] = (usb.domu, ui.domu)
            if system == "raw":
                stack.enter_context(raw_relay(usb, ui))
            elif system.startswith("python_relay"):
                stack.enter_context(python_relay(usb, ui, decode=system.endswith("decode")))
            elif system == "baseline":
                assert baseline is not None
                command, env, results["baseline_label"] = baseline_broker(baseline)
                keys = known_limits(baseline)
                if keys != list(LIMITS):
                    results["baseline_unlimited"] = keys
                brokers[system] = stack.enter_context(broker(
                    d, p, extra=unlimited(keys), command=command, env=env))
            else:
                extra = ('validation = "complete"\n' if system == "broker_complete" else "")
                # With a state directory, as the unit runs it (StateDirectory=): the spool
                # and the commands in flight kept in it.
                brokers[system] = stack.enter_context(broker(
                    d, p, extra=extra + UNLIMITED, env={"STATE_DIRECTORY": str(d / "state")}))
        order = list(ends)
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in order}
        for i in range(repeats):
            for system in order[i % len(order):] + order[:i % len(order)]:
                pid = brokers[system].proc.pid if system in brokers else None
                cpu_before = cpu_seconds(pid) if pid else 0.0
                try:
                    one = transfer(*ends[system], burst)
                except RuntimeError as exc:
                    raise RuntimeError(f"{system}: {exc}") from None
                if pid:
                    cpu = cpu_seconds(pid) - cpu_before
                    one["cpu_percent"] = 100 * cpu / one["seconds"]
                    one["cpu_us_per_message"] = 1e6 * cpu / burst
                runs[system].append(one)
        for system, rs in runs.items():
            results[system] = median(rs)
            results[system]["ratios"] = [r["per_second"] / raw["per_second"]
                                         for r, raw in zip(rs, runs["raw"], strict=True)]
            results[system]["ratio"] = statistics.median(results[system]["ratios"])
        for system in brokers:  # CPU time is steadier than throughput on a busy machine
            results[system]["cpu_us_per_message"] = statistics.median(
                r["cpu_us_per_message"] for r in runs[system])
        if "baseline" in runs:  # the two brokers' runs paired: this tree's / the baseline's
            results["vs_baseline"] = [b["per_second"] / o["per_second"] for b, o in
                                      zip(runs["broker"], runs["baseline"], strict=True)]
            results["cpu_vs_baseline"] = [
                b["cpu_us_per_message"] / o["cpu_us_per_message"]
                for b, o in zip(runs["broker"], runs["baseline"], strict=True)]
        if burst_only:
            return results
        usb_ui = ends["broker"]
        results["field"] = median([transfer(*usb_ui, 1000) for _ in range(3)], key="seconds")
        results["latency"] = transfer(*usb_ui, latency_n, rate=1000, latency=True)
        results["raw_latency"] = transfer(*ends["raw"], latency_n, rate=1000, latency=True)
        results["broker_rss_after_burst_kib"] = rss_kib(brokers["broker"].proc.pid)
        stack.close()
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
    return results


def table(r: dict[str, Any]) -> str:
    raw = r["raw"]

    def burst(key: str, label: str, note: str) -> tuple[str, str, str]:
        x = r[key]
        runs = ", ".join(f"{v:.2f}" for v in x["ratios"])
        cpu = (f"; CPU {x['cpu_us_per_message']:.2f} us per message ({x['cpu_percent']:.0f} %)"
               if "cpu_percent" in x else "")
        return (label, f"{x['per_second']:,.0f} msg/s",
                f"**{x['ratio']:.2f}x raw** (runs: {runs}){cpu}: {note}")
    rows = [
        ("burst, raw relay (socat)", f"{raw['per_second']:,.0f} msg/s",
         "baseline: socat copying between the two dom0-side ptys"),
        burst("python_relay", "burst, Python relay, no validation",
              "a blocking copy loop: the ceiling for any Python process here"),
        burst("python_relay_decode", "burst, Python relay + FrameDecoder",
              "the copy loop decoding every frame completely, one by one"),
        burst("broker", "burst, broker (info level)", "target >= 0.70"),
    ]
    if "baseline" in r:
        v, c = r["vs_baseline"], r["cpu_vs_baseline"]
        rows.append(burst("baseline", f"burst, broker at {r.get('baseline_label', '?')} "
                          "(info level)", "the baseline tree's broker, same run; this "
                          f"broker / it: {statistics.median(v):.2f}x (runs: "
                          f"{', '.join(f'{x:.2f}' for x in v)}), its CPU per message "
                          f"{statistics.median(c):.2f}x (runs: "
                          f"{', '.join(f'{x:.2f}' for x in c)})"
                          + (f"; it knows only the limits {', '.join(r['baseline_unlimited'])}"
                             if "baseline_unlimited" in r else "")))
    rows += [
        burst("broker_complete", 'burst, broker, validation = "complete"',
              "every frame decoded completely (docs/broker.md, Validation)"),
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
    p.add_argument("--baseline", type=Path, metavar="TREE",
                   help="also run the broker of this source tree (a worktree of another "
                   "commit; its own .venv if it has one), alternating with this one's")
    p.add_argument("--repeats", type=int, help="alternating runs per system (default 5)")
    p.add_argument("--burst-only", action="store_true",
                   help="only the alternating bursts, printed briefly (for profiling work)")
    args = p.parse_args()
    unwind_on_signals()
    results = run(args.quick, args.baseline, args.repeats, args.burst_only)
    if args.json:
        print(json.dumps(results, indent=2))
    if args.burst_only:
        for system in BURSTS:
            if system in results:
                x = results[system]
                cpu = (f", CPU {x['cpu_us_per_message']:.2f} us/msg"
                       if "cpu_us_per_message" in x else "")
                print(f"{system:20} {x['per_second']:9,.0f} msg/s {x['ratio']:.2f}x raw (runs: "
                      f"{', '.join(f'{v:.2f}' for v in x['ratios'])}){cpu}")
        if "vs_baseline" in results:
            v = results["vs_baseline"]
            print(f"broker / baseline    {statistics.median(v):.2f}x (runs: "
                  f"{', '.join(f'{x:.2f}' for x in v)})")
            c = results["cpu_vs_baseline"]
            print(f"CPU/msg, broker / baseline {statistics.median(c):.2f}x (runs: "
                  f"{', '.join(f'{x:.2f}' for x in c)})")
        return 0
    command = ".venv/bin/python -m bench.bench_broker" + "".join(
        a for a, on in ((" --quick", args.quick), (f" --repeats {args.repeats}", args.repeats),
                        (" --baseline TREE", args.baseline)) if on)
    baseline = (f"TREE: a worktree of commit {results['baseline_label']}.  \n"
                if args.baseline else "")
    body = (f"## Broker over socat ptys\n\nCommand: `{command}`  \n{baseline}"
            f"Machine: {machine()}  \n"
            f"Date: {time.strftime('%Y-%m-%d')}  \nBurst size: {results['burst_count']:,} "
            f"messages of ~220 bytes, {results['repeats']} alternating runs per system "
            f"(medians; ratios per run against the same run's raw relay).\n\n{table(results)}\n")
    print(body)
    if args.write:
        write_section(args.write, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
