"""Commands through the broker with and without the durable table of commands in flight,
over socat ptys, in the same run: what the group commit costs when every destination is
up.

    .venv/bin/python -m bench.bench_inflight                 # 5 000 commands, 5 runs each
    .venv/bin/python -m bench.bench_inflight --count 500 --repeats 1

Two brokers of this tree side by side, each on its own ptys: ``durable`` has a state
directory (``$STATE_DIRECTORY``: the table is committed every 50 ms), ``memory`` has
none (the table lives in memory only, as before). One process plays vm-a, which keeps
``--window`` commands in flight to vm-b, and vm-b, which answers each at once; runs
alternate between the two brokers. Reported: commands per second (answered), medians
and each run, and the ratio durable / memory per pair of runs.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from bench.lifetime import unwind_on_signals
from messagerie import FrameDecoder, Message
from tests.support.broker_process import BrokerProcess, write_config
from tests.support.peers import Domu
from tests.support.ptys import pty_pairs

UNLIMITED = "[limites]\ndebit = 1000000000\nrafale = 1000000000\ndelai_blocage = 60\n"


def command(n: int) -> bytes:
    return json.dumps({"type": "commande", "source": "vm-a", "destination": "vm-b",
                       "payload": {"id": f"c{n}", "commande": "lire",
                                   "arguments": {"n": n}}},
                      separators=(",", ":")).encode() + b"\n"


def answer(cmd: Message) -> bytes:
    return json.dumps({"type": "reponse", "source": "vm-b", "destination": "vm-a",
                       "payload": {"id": cmd.id, "commande": "lire", "statut": "ok",
                                   "resultat": cmd.payload["arguments"]}},
                      separators=(",", ":")).encode() + b"\n"


def run_commands(a: Domu, b: Domu, count: int, window: int) -> float:
    """``count`` commands from vm-a, ``window`` in flight, each answered by vm-b at
    once; returns commands per second."""
    decoders = {a.fd: FrameDecoder(1 << 20), b.fd: FrameDecoder(1 << 20)}
    sent = answered = 0
    start = time.perf_counter()
    deadline = start + 120
    while answered < count:
        while sent < count and sent - answered < window:
            a.write(command(sent))
            sent += 1
        ready, _, _ = select.select([a.fd, b.fd], [], [], 1.0)
        if time.perf_counter() > deadline:
            raise RuntimeError(f"only {answered} of {count} answered")
        for fd in ready:
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                continue
            for item in decoders[fd].feed(data):
                if not isinstance(item, Message):
                    continue
                if fd == b.fd and item.type == "commande":
                    b.write(answer(item))
                elif fd == a.fd and item.type == "reponse":
                    if item.payload.get("statut") != "ok":
                        raise RuntimeError(f"an error answer: {item}")
                    answered += 1
    return count / (time.perf_counter() - start)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=5000)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    unwind_on_signals()
    results: dict[str, list[float]] = {"durable": [], "memory": []}
    with tempfile.TemporaryDirectory(prefix="messagerie-bench-inflight-") as t, \
            ExitStack() as stack:
        tmp = Path(t)
        ends: dict[str, tuple[Domu, Domu]] = {}
        for system in results:
            d = tmp / system
            d.mkdir()
            pairs = stack.enter_context(pty_pairs(d, ["vm-a", "vm-b"]))
            config = write_config(d / "bench.toml", {n: q.dom0 for n, q in pairs.items()},
                                  extra='[broker]\nniveau_journal = "info"\n' + UNLIMITED)
            env = ({"STATE_DIRECTORY": str(d / "state")} if system == "durable"
                   else {"STATE_DIRECTORY": ""})
            broker = BrokerProcess(config, env=env)
            stack.callback(broker.stop)
            broker.wait_ready(timeout=60)
            a, b = Domu(pairs["vm-a"].domu), Domu(pairs["vm-b"].domu)
            stack.callback(a.close)
            stack.callback(b.close)
            ends[system] = (a, b)
        for a, b in ends.values():  # warm up
            run_commands(a, b, min(500, args.count), args.window)
        for i in range(args.repeats):
            order = list(ends) if i % 2 == 0 else list(reversed(ends))
            for system in order:
                results[system].append(run_commands(*ends[system], args.count, args.window))
    print(f"{args.count:,} commands, {args.window} in flight, {args.repeats} runs each")
    for system, values in results.items():
        print(f"{system:8} {statistics.median(values):8,.0f} commands/s (runs: "
              f"{', '.join(f'{v:,.0f}' for v in values)})")
    ratios = [d / m for d, m in zip(results["durable"], results["memory"], strict=True)]
    print(f"durable / memory {statistics.median(ratios):.2f}x (runs: "
          f"{', '.join(f'{r:.2f}' for r in ratios)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
