"""Honest latency under a flood: what a hostile domain's flood costs the others.

    .venv/bin/python -m bench.bench_flood            # full run (about 40 s)
    .venv/bin/python -m bench.bench_flood --quick    # a few seconds (the test suite runs it)
    .venv/bin/python -m bench.bench_flood --write docs/benchmarks.md

Domains on socat ptys, one broker: vm-ui sends mouse-move-sized notifications to
vm-diag at 1 000 msg/s and vm-diag measures their one-way latency (``peers.py recv
--latency``), while vm-evil writes as fast as it can (one ``peers.py send --forever``
without ``--rate`` until the honest run is over; its destinations drain their end so
that the flood is limited by the broker, not by back-pressure). First two brokers,
each with the quiet flow then a flood of mouse moves to vm-sink:

* flood, default limits (``limites.debit`` 20 000/s, ``rafale`` 5 000): throttled;
* flood, no rate limit: what the budgets buy.

Then one broker with every attack class in turn, each against the quiet phase of the
same run (:func:`hostile_run`, which the hostile-load test runs too): a junk flood
(tiny invalid lines, each a decode attempt and a refusal), a broadcast flood (mouse
moves to ``tous``: the rate budget counts deliveries), a flood sharing the honest
flow's destination, CPU-heavy frames (valid 60 KiB non-canonical frames of 15 000
``{}``), and command starvation (a destination that never answers 200 commands while
the same commander's ``ping`` commands to another domain and to dom0 go on).

Each peer (senders, receivers, flooder, sink, broker) is its own process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from statistics import median
from typing import Any

import structlog

from bench.bench_broker import (
    PEERS,
    UNLIMITED,
    _json_line,
    broker,
    machine,
    rss_kib,
    write_section,
)
from bench.lifetime import unwind_on_signals
from messagerie import BlockingClient
from tests.support.ptys import SOCAT, PtyPair, pty_pairs
from tests.support.waiting import wait_until

DOMAINS = ["vm-ui", "vm-diag", "vm-evil", "vm-sink"]
LISTENERS = 16
"""Extra domains for the broadcast flood (drained, as honest readers are)."""
FANOUT_POLICY = "".join(
    f'[[regle]]\nsource = "{s}"\ndestination = "{d}"\ntype = "*"\naction = "{a}"\n\n'
    for s, d, a in [("vm-evil", "dom0", "deny"), ("vm-evil", "vm-ui", "deny"),
                    ("vm-evil", "vm-cmd", "deny"),
                    ("*", "tous", "allow"), ("*", "*", "allow"), ("*", "dom0", "allow"),
                    ("dom0", "*", "allow"), ("dom0", "dom0", "allow")])
"""Everything allowed but vm-evil's broadcasts to dom0 (whose statistics client would
read the flood too) and to vm-ui and vm-cmd (honest senders, which read nothing or
only while they send commands: a socat stops relaying a domain's writes once the other
direction is full)."""


WINDOWS = 5
"""Windows of consecutive honest messages whose p99s :func:`honest` reports
(``p99_windows_us``), and their median (``p99_window_median_us``): a stall of the
machine (tens of ms on a shared 2-core machine, now and then, quiet or not) lands in
one window and moves the phase's p99 by itself; a cost the attack adds to every
message, or to more than 1 % of them in most windows, moves the median."""


def honest(src: PtyPair, dst: PtyPair, count: int,
           during: AbstractContextManager[Any] | None = None) -> dict[str, Any]:
    """vm-ui -> vm-diag at 1 000 msg/s; latencies measured by the receiver. ``during``:
    an attack (a :func:`flood`) started once the receiver reads (a flood to vm-diag
    itself needs it read), its figures added to the result.

    ``bench_broker.transfer`` sends as vm-sys-usb to vm-ui; here the honest pair has
    its own names, so the peers get ``--source``/``--dest``.
    """
    recv = subprocess.Popen([*PEERS, "recv", str(dst.domu), str(count), "--latency",
                             "--from", "vm-ui", "--timeout", "30", "--windows", str(WINDOWS)],
                            stdout=subprocess.PIPE, text=True)
    _json_line(recv)  # ready
    with during or nullcontext({}) as attack:
        subprocess.run([*PEERS, "send", str(src.domu), str(count), "--rate", "1000",
                        "--source", "vm-ui", "--dest", "vm-diag"],
                       capture_output=True, text=True, check=True)
        got = _json_line(recv)
    got.update(attack)  # the flood's figures, complete once it is over
    got["p99_window_median_us"] = median(got["p99_windows_us"])
    recv.wait(30)
    if got["received"] < count:
        raise RuntimeError(f"honest traffic lost: {got['received']} of {count} arrived")
    return got


def commands(commander: PtyPair, count: int, *, stuck: int = 0) -> dict[str, Any]:
    """vm-cmd's ``ping`` commands, 200 a second, to vm-srv (which answers) and to dom0
    in turn; first ``stuck`` commands to vm-mute, which never answers (command
    starvation). Round trips measured by the commander."""
    proc = subprocess.run([*PEERS, "commands", str(commander.domu), str(count), "--rate",
                           "200", "--source", "vm-cmd", "--dest", "vm-srv,dom0",
                           "--stuck", f"vm-mute:{stuck}", "--timeout", "30"],
                          capture_output=True, text=True, check=True)
    got: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return got


@contextmanager
def answering(srv: PtyPair) -> Iterator[None]:
    """vm-srv answers every command ``ok``."""
    proc = subprocess.Popen([*PEERS, "answer", str(srv.domu), "0", "--source", "vm-srv"],
                            stdout=subprocess.PIPE, text=True)
    try:
        _json_line(proc)  # ready
        yield
    finally:
        proc.kill()
        proc.wait()


def statistics(sock: Path) -> dict[str, Any]:
    with BlockingClient("dom0", path=sock, reconnect=False) as c:
        result: dict[str, Any] = c.commande("dom0", "statistiques", timeout=10).resultat
    return result


def read(stats: dict[str, Any]) -> int:
    """Frames the broker read from a domain: messages and invalid frames."""
    return int(stats["recus"]) + int(stats["invalides"])


@contextmanager
def flood(evil: PtyPair, sinks: list[PtyPair], sock: Path, chunk: int,
          kind: str = "") -> Iterator[dict[str, Any]]:
    """vm-evil -> vm-sink as fast as it can, for as long as the block runs (``kind``:
    ``junk`` tiny invalid lines, each refused at the cost of a decode attempt;
    ``heavy`` costly frames; ``tous`` a broadcast to every domain; ``shared`` to
    vm-diag, the honest flow's destination; ``sinks`` drained)."""
    assert SOCAT
    drains = [subprocess.Popen([SOCAT, "-u", "-b", "65536", f"OPEN:{s.domu},rdonly,raw",
                                "OPEN:/dev/null"], stderr=subprocess.DEVNULL) for s in sinks]
    flags = {"junk": ["--junk"], "heavy": ["--heavy"], "tous": ["--dest", "tous"],
             "shared": ["--dest", "vm-diag"]}.get(kind, [])
    if kind == "heavy":
        chunk = max(1, chunk // 400)  # each one is 60 KiB
    out: dict[str, Any] = {}
    before = statistics(sock)["domaines"]["vm-evil"]
    # One writer for the whole flood (a new process per burst would add its start-up,
    # tens of ms of CPU, to the machine's load at every burst).
    writer = subprocess.Popen([*PEERS, "send", str(evil.domu), str(chunk), "--source",
                               "vm-evil", "--dest", "vm-sink", "--forever", *flags],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = time.monotonic()
    try:
        # Under way once the broker has read more than the burst allowance.
        ahead = 1 if kind == "heavy" else 5000 // (len(sinks) + 3) if kind == "tous" else 5000
        wait_until(lambda: read(statistics(sock)["domaines"]["vm-evil"]) > read(before) + ahead,
                   30, "the flood to be under way", interval=0.05)
        yield out
    finally:
        after = statistics(sock)["domaines"]["vm-evil"]
        elapsed = time.monotonic() - started
        writer.kill()
        writer.wait()
        out["read_per_second"] = (read(after) - read(before)) / elapsed
        out["throttled"] = after["limites"] - before["limites"]
        # What vm-evil's channel still holds is read before the next phase: until the
        # count stays the same for 1.5 s (a throttled channel is paused that long), at
        # most 20 s (heavy frames are read only a few a second: they come last).
        counts = [-1]
        give_up = time.monotonic() + 20
        while time.monotonic() < give_up and not (len(counts) > 3 and len(set(counts[-4:])) == 1):
            counts.append(read(statistics(sock)["domaines"]["vm-evil"]))
            time.sleep(0.5)
        for drain in drains:
            drain.kill()
            drain.wait()


def scenario(tmp: Path, extra: str, n_honest: int, chunk: int, *,
             quiet_too: bool, kind: str = "", listeners: int = 0) -> dict[str, Any]:
    results: dict[str, Any] = {}
    extra_names = [f"vm-l{i:02d}" for i in range(listeners)]
    with pty_pairs(tmp, DOMAINS + extra_names) as p, broker(tmp, p, extra=extra) as b:
        sock = tmp / "dom0.sock"
        if quiet_too:
            results["quiet"] = honest(p["vm-ui"], p["vm-diag"], n_honest)
        sinks = [p["vm-sink"], *(p[n] for n in extra_names)]
        with flood(p["vm-evil"], sinks, sock, chunk, kind) as f:
            results["flood"] = honest(p["vm-ui"], p["vm-diag"], n_honest)
            results["rss_kib"] = rss_kib(b.proc.pid)
        results["flood"].update(f)
        stats = statistics(sock)["domaines"]
        # honest() fails if one of its messages did not arrive; vm-diag's drops are
        # honest messages too, but for a broadcast flood that reaches vm-diag as well.
        results["honest_lost"] = stats["vm-ui"]["refuses"] + (
            0 if kind == "tous" else stats["vm-diag"]["perdus"])
    return results


ATTACKS = ("junk", "fanout", "shared", "heavy", "starved")
"""The attack classes of :func:`hostile_run`, in the order they run."""
COMMANDERS = ["vm-cmd", "vm-srv", "vm-mute"]


PRIORITY = -5
"""The nice value :func:`hostile_run` runs its processes at, when it may (root or
CAP_SYS_NICE): every process of the run alike (the broker, the relays, the honest
peers and the attacker's), ahead of whatever else the machine runs. Other jobs on a
shared machine then take less of the run's CPU; within the run nothing changes."""


@contextmanager
def priority(nice: int) -> Iterator[int]:
    """Start processes at ``nice`` (this thread's value, which the processes and the
    threads it starts inherit) if allowed; yields the value they get."""
    before = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except PermissionError:
        nice = before
    try:
        yield nice
    finally:
        if nice != before:
            os.setpriority(os.PRIO_PROCESS, 0, before)


def hostile_run(tmp: Path, n_honest: int, chunk: int, listeners: int,
                kinds: Sequence[str] = ATTACKS) -> dict[str, Any]:
    """:func:`attack_run` at :data:`PRIORITY` (``nice`` in the result: what it got)."""
    with priority(PRIORITY) as nice:
        out = attack_run(tmp, n_honest, chunk, listeners, kinds)
    out["nice"] = nice
    return out


def attack_run(tmp: Path, n_honest: int, chunk: int, listeners: int,
               kinds: Sequence[str] = ATTACKS) -> dict[str, Any]:
    """One broker, every attack class in turn, each between two quiet phases of the same
    run (``quiet_before[kind]``, ``quiet_after[kind]``: the quiet phase after one attack
    is the one before the next; :func:`baseline` is the larger of the two). On a shared
    machine the load moves p99 tenfold within a minute, quiet or not: a quiet phase a
    minute away is no baseline for an attack, its neighbours are. Default limits.

    * ``junk``: tiny invalid lines from vm-evil;
    * ``fanout``: vm-evil broadcasts mouse moves to every domain (``listeners`` more);
    * ``shared``: vm-evil floods vm-diag, the honest flow's own destination;
    * ``heavy``: 60 KiB non-canonical frames of 15 000 ``{}`` from vm-evil;
    * ``starved``: vm-cmd has 200 commands to vm-mute, which never answers, while its
      ``ping`` commands to vm-srv and to dom0 go on.

    ``kinds``: these classes only (in this order), each between its quiet phases.

    The honest flow (``honest``) runs in every phase, the commands (``commands``) in the
    starved one and in the two quiet ones around it (its baseline carries the same
    honest load). Every honest message is counted: ``honest`` raises if one is missing;
    ``honest_lost`` adds what the broker refused or dropped of them.
    """
    names = [*DOMAINS, *COMMANDERS, *(f"vm-l{i:02d}" for i in range(listeners))]
    tmp.mkdir(parents=True, exist_ok=True)
    policy = tmp / "hostile-policy.toml"
    policy.write_text(FANOUT_POLICY)
    out: dict[str, Any] = {}
    with pty_pairs(tmp, names) as p, broker(tmp, p, extra=f'politique = "{policy}"\n') as b, \
            answering(p["vm-srv"]):
        sock = tmp / "dom0.sock"
        ui, diag, evil = p["vm-ui"], p["vm-diag"], p["vm-evil"]
        listening = [p["vm-sink"], *(p[n] for n in names if n.startswith("vm-l")),
                     p["vm-mute"]]
        def with_commands(key: str, stuck: int = 0) -> dict[str, Any]:
            with ThreadPoolExecutor(1) as pool:
                future = pool.submit(commands, p["vm-cmd"], 200, stuck=stuck)
                got = honest(ui, diag, n_honest)
                out[key] = future.result(60)
            return got

        out["quiet"] = quiet = honest(ui, diag, n_honest)
        out["quiet_before"], out["quiet_after"] = {}, {}
        for kind in kinds:
            if kind == "starved":
                out["quiet_before"][kind] = with_commands("quiet_commands")
                out[kind] = with_commands("starved_commands", stuck=200)
                out["quiet_after"][kind] = with_commands("quiet_after_commands")
                continue
            out["quiet_before"][kind] = quiet
            attack = flood(evil, [] if kind == "shared" else listening, sock, chunk,
                           "tous" if kind == "fanout" else kind)
            out[kind] = honest(ui, diag, n_honest, during=attack)
            out["rss_kib"] = max(out.get("rss_kib", 0), rss_kib(b.proc.pid))
            out["quiet_after"][kind] = quiet = honest(ui, diag, n_honest)
        stats = statistics(sock)["domaines"]
        # vm-diag's drops are the flood's in the shared and fan-out phases (honest()
        # counted every honest message there): what the broker refused of vm-ui's
        # messages and of vm-cmd's, less the commands to vm-mute answered ``limite``
        # (past its slots there: the starving ones, not the honest ones).
        refused_stuck = sum(out["starved_commands"]["stuck"].values()) if "starved" in kinds else 0
        unanswered = sum(out[k]["unanswered"] + sum(v for how, v in out[k]["answered"].items()
                                                     if how != "ok")
                         for k in ("quiet_commands", "starved_commands",
                                   "quiet_after_commands") if k in out)
        out["honest_lost"] = (stats["vm-ui"]["refuses"] + stats["vm-cmd"]["refuses"]
                              - refused_stuck + unanswered)
    return out


def baseline(r: dict[str, Any], kind: str, key: str) -> float:
    """An attack phase's quiet value: the larger of its two quiet neighbours'."""
    return max(float(r["quiet_before"][kind][key]), float(r["quiet_after"][kind][key]))


def run(quick: bool) -> dict[str, Any]:
    n_honest = 500 if quick else 3_000
    chunk = 20_000 if quick else 100_000
    listeners = 4 if quick else LISTENERS
    with tempfile.TemporaryDirectory(prefix="messagerie-flood-") as t:
        tmp = Path(t)
        limited = scenario(tmp, "", n_honest, chunk, quiet_too=True)
        unlimited = scenario(tmp, UNLIMITED, n_honest, chunk, quiet_too=False)
        attacks = hostile_run(tmp, n_honest, chunk, listeners)
    return {"honest_count": n_honest, "quiet": limited["quiet"], "throttled": limited["flood"],
            "unlimited": unlimited["flood"], "attacks": attacks, "listeners": listeners,
            "rss_kib": max(limited["rss_kib"], unlimited["rss_kib"], attacks["rss_kib"]),
            "honest_lost": limited["honest_lost"] + unlimited["honest_lost"]
            + attacks["honest_lost"]}


NOTES = {
    "junk": "tiny invalid lines (x and a newline), each refused",
    "fanout": "mouse moves to tous: {recipients} recipients each",
    "shared": "mouse moves to vm-diag, the honest flow's destination",
    "heavy": "60 KiB non-canonical frames of 15 000 {{}} each",
    "starved": "vm-mute never answers 200 of vm-cmd's commands; its pings go on",
}


def table(r: dict[str, Any]) -> str:
    def row(name: str, x: dict[str, Any], q: dict[str, Any] | None, note: str) -> str:
        ratio = ("baseline" if q is None else " / ".join(
            f"{x[k] / q[k]:.2f}x" for k in ("p50_us", "p99_us", "p99_window_median_us",
                                            "p99.9_us")))
        flood_rate = (f"{x['read_per_second']:,.0f} msg/s, {x['throttled']:,} throttled"
                      if "read_per_second" in x else "-")
        return (f"| {name} | {x['p50_us']:.0f} | {x['p99_us']:.0f} | "
                f"{x['p99_window_median_us']:.0f} | {x['p99.9_us']:.0f} | "
                f"{x['max_us']:.0f} | {ratio} | {flood_rate} | {note} |")

    q, a = r["quiet"], r["attacks"]
    aq = a["quiet"]
    rows = [
        "| scenario | p50 (us) | p99 (us) | p99w (us) | p99.9 (us) | max (us) | flood/quiet "
        "(p50 / p99 / p99w / p99.9) | vm-evil read by the broker | note |",
        "|---|---:|---:|---:|---:|---:|---|---|---|",
        row("quiet", q, None, "vm-ui -> vm-diag at 1 000 msg/s"),
        row("flood, default limits", r["throttled"], q, "debit 20 000/s, rafale 5 000"),
        row("flood, no rate limit", r["unlimited"], q,
            "debit, rafale, part_cpu 10^9, delai_blocage 60 s"),
        row("quiet, attack run", aq, None, "one broker for the rows below"),
    ]
    names = {"junk": "junk flood", "fanout": "broadcast flood", "shared": "shared destination",
             "heavy": "CPU-heavy frames", "starved": "command starvation"}
    for kind in ATTACKS:
        if kind == "starved":  # its own quiet phase before it, with the same commands
            rows.append(row("quiet", a["quiet_before"][kind], None,
                            "with vm-cmd's commands (200 a second)"))
        near = {k: baseline(a, kind, k)
                for k in ("p50_us", "p99_us", "p99_window_median_us", "p99.9_us")}
        rows.append(row(names[kind], a[kind], near,
                        NOTES[kind].format(recipients=r["listeners"] + 4)
                        + "; ratios to the larger of the quiet rows around it"))
        rows.append(row("quiet", a["quiet_after"][kind], None, f"after the {names[kind]}"
                        + (", with vm-cmd's commands" if kind == "starved" else "")))
    commands = [f"- commands, {phase}: {a[key]['answered'].get('ok', 0)} of 200 answered ok, "
                f"p50 {a[key]['p50_us']:.0f} us, p99 {a[key]['p99_us']:.0f} us"
                + (f"; the {sum(a[key]['stuck'].values())} past vm-mute's 64 slots answered "
                   f"{', '.join(a[key]['stuck'])} at once" if a[key]["stuck"] else "")
                for phase, key in (("quiet", "quiet_commands"),
                                   ("starved", "starved_commands"))]
    return "\n".join(rows) + "\n\n" + "\n".join(commands)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (a few seconds)")
    p.add_argument("--write", type=Path, help="put the table into this Markdown file")
    p.add_argument("--json", action="store_true", help="print raw results as JSON")
    args = p.parse_args()
    # The dom0 client used for statistics logs its connections: keep stdout for results.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    unwind_on_signals()
    r = run(args.quick)
    if args.json:
        print(json.dumps(r, indent=2))
    body = (f"## Honest latency under a flood\n\nCommand: `.venv/bin/python "
            f"-m bench.bench_flood{' --quick' if args.quick else ''}`  \n"
            f"Machine: {machine()}  \nDate: {time.strftime('%Y-%m-%d')}  \n"
            f"Honest traffic: {r['honest_count']:,} notifications of ~220 bytes, vm-ui -> "
            f"vm-diag at 1 000 msg/s, one-way latency measured by the receiver; p99w: the "
            f"median of the p99s of {WINDOWS} windows of consecutive messages. Processes at "
            f"nice {r['attacks']['nice']} in the attack run. Floods: "
            f"vm-evil, written as fast as its channel takes them. Honest messages "
            f"lost: {r['honest_lost']}. Broker RSS under flood: "
            f"{r['rss_kib'] / 1024:.1f} MiB.\n\n{table(r)}\n")
    print(body)
    if args.write:
        write_section(args.write, body, "bench_flood")
    return 0


if __name__ == "__main__":
    sys.exit(main())
