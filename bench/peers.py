"""Benchmark peers, run as separate processes so that no GIL is shared with the broker
or with each other. Each prints one JSON line of results on stdout.

    python bench/peers.py send PATH COUNT [--rate R] [--size S] [--source S] [--dest D]
    python bench/peers.py recv PATH COUNT [--latency]

``send`` writes COUNT mouse-move notifications (the field's input traffic) to a DomU
end, as fast as possible or at ``--rate`` messages per second; each carries its send
time (CLOCK_MONOTONIC, shared by all processes on the machine). ``recv`` reads them
from another DomU end and reports first/last arrival and, with ``--latency``, the
distribution of one-way latencies. Both open the pty raw.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import sys
import termios
import time
import tty


def open_raw(path: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    if os.isatty(fd):
        tty.setraw(fd, termios.TCSANOW)
    return fd


def mouse(source: str, dest: str, i: int, t_ns: int) -> bytes:
    # ~220 bytes, the shape of usage-reel.md's mouse input.
    return (b'{"type":"notification","source":"%s","destination":"%s","payload":'
            b'{"categorie":"entree","evenement":"souris","data":{"entree":"souris",'
            b'"position":{"x":%d,"y":%d},"boutons":{"gauche":0,"milieu":0,"droit":1},'
            b'"seq":%d,"t":%d}}}\n'
            % (source.encode(), dest.encode(), i % 1920, i % 1080, i, t_ns))


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def send(args: argparse.Namespace) -> dict[str, float]:
    fd = open_raw(args.path)
    start = time.monotonic_ns()
    if args.rate:
        period = 1e9 / args.rate
        for i in range(args.count):
            due = start + int(i * period)
            while (now := time.monotonic_ns()) < due:
                if due - now > 200_000:
                    time.sleep((due - now - 100_000) / 1e9)
            write_all(fd, mouse(args.source, args.dest, i, time.monotonic_ns()))
    else:
        # One burst, built in advance, so that the sender is never the bottleneck.
        t = time.monotonic_ns()
        write_all(fd, b"".join(mouse(args.source, args.dest, i, t) for i in range(args.count)))
    return {"start_ns": start, "end_ns": time.monotonic_ns()}


def recv(args: argparse.Namespace) -> dict[str, float]:
    fd = open_raw(args.path)
    print(json.dumps({"ready": True}), flush=True)
    seen = 0
    first = last = 0
    latencies: list[int] = []
    pending = b""
    deadline = time.monotonic() + args.timeout
    while seen < args.count:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if time.monotonic() > deadline:
            break
        if not ready:
            continue
        data = os.read(fd, 1 << 16)
        now = time.monotonic_ns()
        if not first:
            first = now
        last = now
        if args.latency:
            lines = (pending + data).split(b"\n")
            pending = lines.pop()
            for line in lines:
                if b'"seq"' in line:
                    t = int(line.rsplit(b'"t":', 1)[1].split(b"}", 1)[0])
                    latencies.append(now - t)
                    seen += 1
        else:
            seen += data.count(b"\n")
    out: dict[str, float] = {"received": seen, "first_ns": first, "last_ns": last}
    if latencies:
        latencies.sort()
        n = len(latencies)
        for q in (50, 99, 99.9):
            out[f"p{q}_us"] = latencies[min(n - 1, int(n * q / 100))] / 1000
        out["max_us"] = latencies[-1] / 1000
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["send", "recv"])
    p.add_argument("path")
    p.add_argument("count", type=int)
    p.add_argument("--rate", type=float, default=0)
    p.add_argument("--source", default="vm-sys-usb")
    p.add_argument("--dest", default="vm-ui")
    p.add_argument("--latency", action="store_true")
    p.add_argument("--timeout", type=float, default=120)
    args = p.parse_args()
    result = send(args) if args.mode == "send" else recv(args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
