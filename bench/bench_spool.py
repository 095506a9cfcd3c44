"""Spool replay over socat ptys: N notifications spooled for an offline domain, then the
domain comes back; how long until all of them arrived, against the same N sent live to
the same domain in the same run.

    .venv/bin/python -m bench.bench_spool                    # 10 000 messages, 5 runs
    .venv/bin/python -m bench.bench_spool --count 1000 --repeats 1

Per run: the broker (started as users start it, with a state directory) has vm-a
connected and vm-c declared on a pty that does not exist yet; vm-a sends N
notifications (~200 bytes) to vm-c, all spooled (the SQLite file is read until it holds
N rows); vm-c's pty appears and its DomU end reads. Reported: from the pty appearing to
the last message read (end to end, reconnection included), the broker's own
``spool.replayed`` seconds (from the channel up to the last row handed to it), and the
same N sent live to vm-c once it is up (first write to last read). The burst's messages
are checked: all N, in order.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.lifetime import unwind_on_signals
from messagerie import Message
from tests.support.broker_process import BrokerProcess, write_config
from tests.support.peers import Domu
from tests.support.ptys import PtyPair
from tests.support.waiting import wait_until

UNLIMITED = ("[limites]\ndebit = 1000000000\nrafale = 1000000000\ndelai_blocage = 60\n"
             "[reconnexion]\nmin = 0.02\nmax = 0.05\n")


def frames(count: int, offset: int) -> bytes:
    return b"".join(json.dumps(
        {"type": "notification", "source": "vm-a", "destination": "vm-c",
         "payload": {"categorie": "souris", "evenement": "deplacement",
                     "data": {"n": offset + n, "x": 1024, "y": 768, "boutons": [0, 0, 0],
                              "horodatage": "2026-01-01T00:00:00.000000Z"}}},
        separators=(",", ":")).encode() + b"\n" for n in range(count))


def spooled(db: Path) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        try:
            return int(conn.execute("SELECT count(*) FROM spool WHERE destination = "
                                    "'vm-c'").fetchone()[0])
        except sqlite3.OperationalError:
            return 0


def read_all(domu: Domu, count: int, offset: int, timeout: float = 120.0) -> float:
    """Read until ``count`` notifications numbered from ``offset`` arrived; the time of
    the last read. Checks they are all there, in order."""
    def numbers() -> list[int]:
        return [m.payload["data"]["n"] for m in domu.messages()
                if isinstance(m, Message) and m.type == "notification"]
    wait_until(lambda: (domu.pump(0.05), len(numbers()) >= count)[1], timeout,
               lambda: f"{count} messages, got {len(numbers())}", interval=0)
    last = time.perf_counter()
    got = numbers()
    if got != list(range(offset, offset + count)):
        raise RuntimeError(f"messages missing or out of order: {len(got)} read")
    return last


def one_run(count: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="messagerie-bench-spool-") as t:
        tmp = Path(t)
        a_pair = PtyPair(tmp, "vm-a")
        c_pair = PtyPair(tmp, "vm-c", start=False)
        state = tmp / "state"
        config = write_config(tmp / "bench.toml", {"vm-a": a_pair.dom0, "vm-c": c_pair.dom0},
                              extra='[broker]\nniveau_journal = "info"\n' + UNLIMITED
                              + f"[spool]\nmessages = {2 * count}\n"
                              f"octets = {1000 * count}\n")
        broker = BrokerProcess(config, env={"STATE_DIRECTORY": str(state)})
        a = c = None
        try:
            broker.wait_ready(timeout=60)
            a = Domu(a_pair.domu)
            a.write(frames(count, 0))
            wait_until(lambda: spooled(state / "spool.sqlite3") >= count, 120,
                       f"{count} messages in the spool")
            began = time.perf_counter()
            c_pair.start()
            c = Domu(c_pair.domu)
            end_to_end = read_all(c, count, 0) - began
            replayed = broker.wait_event("spool.replayed", timeout=60, domain="vm-c")
            # The same count, live, to the same domain: the transport's own pace here.
            c.inbox.clear()
            burst = frames(count, count)
            writer = threading.Thread(target=a.write, args=(burst,))
            started = time.perf_counter()
            writer.start()  # written while vm-c reads: the queues are bounded
            live = read_all(c, count, count) - started
            writer.join(60)
        finally:
            for d in (a, c):
                if d is not None:
                    d.close()
            broker.stop()
            a_pair.kill()
            c_pair.kill()
    return {"replay_seconds": end_to_end, "broker_replay_seconds": replayed["seconds"],
            "live_seconds": live, "replay_per_second": count / end_to_end,
            "replay_vs_live": live / end_to_end}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    unwind_on_signals()
    runs = [one_run(args.count) for _ in range(args.repeats)]
    if args.json:
        print(json.dumps(runs, indent=2))

    def show(key: str, fmt: str) -> str:
        values = [r[key] for r in runs]
        return (f"{key:22} median {fmt.format(statistics.median(values))} "
                f"(runs: {', '.join(fmt.format(v) for v in values)})")

    print(f"spool replay of {args.count:,} notifications, {args.repeats} runs")
    for key, fmt in (("replay_seconds", "{:.3f}"), ("broker_replay_seconds", "{:.3f}"),
                     ("live_seconds", "{:.3f}"), ("replay_per_second", "{:,.0f}"),
                     ("replay_vs_live", "{:.2f}")):
        print(show(key, fmt))
    return 0


if __name__ == "__main__":
    sys.exit(main())
