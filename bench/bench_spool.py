"""The spool's replay: how long a domain that comes back takes to get what was kept.

    .venv/bin/python -m bench.bench_spool                  # 10 000 messages, 5 runs
    .venv/bin/python -m bench.bench_spool --messages 2000 --repeats 1   # quick

Per run: the broker as users start it (its spool in a file of the run's directory),
vm-sys-usb and vm-ui on socat ptys. vm-ui's socat is killed; vm-sys-usb sends N mouse
moves (~220 bytes) to it, which the broker spools (timed until ``statistiques`` shows
them all: "spool"); vm-ui's socat starts again on the same path and a reader takes
everything (timed from socat's start to the N-th message read: "replay", which
includes the broker's reconnection, at most ``reconnexion.max`` = 20 ms here). The
broker's own ``spool.replayed`` event gives the time from the reconnection to the last
chunk handed to the channel ("broker"). The messages are checked: all there, in order,
byte for byte.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import termios
import time
import tty
from pathlib import Path
from typing import Any

from bench.bench_broker import UNLIMITED, machine
from bench.lifetime import unwind_on_signals
from tests.support.broker_process import CLI, BrokerProcess, write_config
from tests.support.ptys import PtyPair
from tests.support.waiting import wait_until


def mouse(i: int) -> bytes:
    body = {"type": "notification", "source": "vm-sys-usb", "destination": "vm-ui",
            "payload": {"categorie": "entree", "evenement": "souris",
                        "data": {"i": i, "position": {"x": i % 1920, "y": i % 1080},
                                 "boutons": [0, 0, 0], "horodatage": 1_700_000_000 + i}}}
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


def depth(dom0: Path) -> int:
    out = subprocess.run([str(CLI), "--path", str(dom0), "status", "--json"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    found: int = json.loads(out)["statistiques"]["domaines"]["vm-ui"]["spool"]["messages"]
    return found


def read_all(path: Path, want: bytes, timeout: float = 120.0) -> tuple[float, bytes]:
    """Read ``path`` until ``len(want)`` bytes came; when the last did, and the bytes."""
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    tty.setraw(fd, termios.TCSANOW)
    got = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while len(got) < len(want):
            if time.monotonic() > deadline:
                lines = got.count(b"\n")
                raise RuntimeError(f"replay: {lines} messages in {timeout} s")
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                try:
                    got += os.read(fd, 1 << 16)
                except BlockingIOError:
                    continue
        return time.monotonic(), bytes(got)
    finally:
        os.close(fd)


def one_run(tmp: Path, n: int) -> dict[str, float]:
    usb, ui = PtyPair(tmp, "vm-sys-usb"), PtyPair(tmp, "vm-ui")
    config = write_config(tmp / "bench.toml", {"vm-sys-usb": usb.dom0, "vm-ui": ui.dom0},
                          extra=UNLIMITED + "[reconnexion]\nmin = 0.01\nmax = 0.02\n"
                          f'[spool]\nchemin = "{tmp / "spool.sqlite3"}"\nmessages = {n}\n'
                          f"octets = {n * 1024}\n")
    broker = BrokerProcess(config)
    sender = -1
    try:
        broker.wait_ready(60)
        wait_until(lambda: len(broker.find("domain.connected")) >= 2, 60, "both connected")
        ui.kill()
        for link in (ui.dom0, ui.domu):
            link.unlink(missing_ok=True)
        broker.wait_event("domain.disconnected", domain="vm-ui")
        frames = [mouse(i) for i in range(n)]
        data = b"".join(frames)
        sender = os.open(usb.domu, os.O_RDWR | os.O_NOCTTY)
        started = time.monotonic()
        view = memoryview(data)
        while view:
            view = view[os.write(sender, view[:65536]):]
        wait_until(lambda: depth(tmp / "dom0.sock") >= n, 120, f"{n} spooled", interval=0.05)
        spooled = time.monotonic() - started
        ui.start()
        started = time.monotonic()
        done, got = read_all(ui.domu, data)
        if got != data:
            raise RuntimeError("the replay is not the bytes sent, in order")
        event = broker.wait_event("spool.replayed", domain="vm-ui")
        return {"spool": spooled, "replay": done - started, "broker": event["seconds"]}
    finally:
        if sender >= 0:
            os.close(sender)
        broker.stop()
        usb.kill()
        ui.kill()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--messages", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    unwind_on_signals()
    runs: list[dict[str, float]] = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="mb-spool-") as tmp:
            runs.append(one_run(Path(tmp), args.messages))
    out: dict[str, Any] = {"messages": args.messages, "machine": machine(), "runs": runs}
    for key in ("spool", "replay", "broker"):
        values = sorted(r[key] for r in runs)
        out[key] = {"median": statistics.median(values), "min": values[0],
                    "max": values[-1]}
    json.dump(out, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
