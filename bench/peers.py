"""Benchmark peers, run as separate processes so that no GIL is shared with the broker
or with each other. Each prints one JSON line of results on stdout.

    python bench/peers.py send PATH COUNT [--rate R] [--source S] [--dest D] [--junk|--heavy]
                                   [--forever]
    python bench/peers.py recv PATH COUNT [--latency] [--from SOURCE] [--windows N]
    python bench/peers.py recvmany PATH,PATH,... COUNT
    python bench/peers.py commands PATH COUNT --dest D,D,... [--rate R] [--stuck D:N]
    python bench/peers.py answer PATH 0 [--source S]

``send`` writes COUNT mouse-move notifications (the field's input traffic) to a DomU
end, as fast as possible or at ``--rate`` messages per second; each carries its send
time (CLOCK_MONOTONIC, shared by all processes on the machine); with ``--forever``
it writes them again and again until it is killed (a flood). ``recv`` reads them
from another DomU end and reports first/last arrival and, with ``--latency``, the
distribution of one-way latencies. Both open the pty raw. ``recvmany`` reads COUNT
messages on each of several DomU ends (broadcast fan-out) and reports when the last one
arrived. ``commands`` first sends N commands to the ``--stuck`` destination (one that
never answers them), then COUNT ``ping`` commands, in turn to each ``--dest``, at
``--rate`` a second, and reports how each was answered (``statut``, or the ``erreur``
code) and the round-trip latencies of those answered ``ok``. ``answer`` answers every
command it reads ``ok``, until it is killed.

A PATH may also be ``fd:N``: a stream socket inherited from the parent (the benchmark
suite connects it, to the broker or to an MQTT server, and hands it over). With
``send --mqtt`` each message is wrapped in an MQTT 3.1.1 PUBLISH (QoS 0, topic = the
destination, payload = the same bytes, newline included); receivers need no change,
since a PUBLISH header of these sizes never contains a newline byte.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import sys
import termios
import time
import tty
from collections.abc import Callable
from typing import Any


def open_raw(path: str) -> int:
    if path.startswith("fd:"):
        return int(path[3:])
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


def heavy(source: str, dest: str) -> bytes:
    """A valid notification of ~63 KiB that is as costly as a frame gets for the broker:
    non-canonical (spaces), 15 000 empty objects to walk."""
    head = (f'{{"type": "notification", "source": "{source}", "destination": "{dest}", '
            '"payload": {"categorie": "fichier", "evenement": "lourd", "data": {"l": [')
    return (head + ", ".join(["{}"] * 15_000) + "]}}}\n").encode()


def mqtt_publish(topic: str, payload: bytes) -> bytes:
    """An MQTT 3.1.1 PUBLISH packet, QoS 0."""
    body = len(topic).to_bytes(2, "big") + topic.encode() + payload
    n, length = len(body), bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        length.append(digit | (0x80 if n else 0))
        if not n:
            break
    return b"\x30" + bytes(length) + body


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def send(args: argparse.Namespace) -> dict[str, float]:
    fd = open_raw(args.path)

    def frame(line: bytes) -> bytes:
        return mqtt_publish(args.mqtt, line) if args.mqtt else line
    start = time.monotonic_ns()
    if args.rate:
        period = 1e9 / args.rate
        for i in range(args.count):
            due = start + int(i * period)
            while (now := time.monotonic_ns()) < due:
                if due - now > 200_000:
                    time.sleep((due - now - 100_000) / 1e9)
            write_all(fd, frame(mouse(args.source, args.dest, i, time.monotonic_ns())))
    else:
        # One burst, built in advance, so that the sender is never the bottleneck.
        t = time.monotonic_ns()
        if args.junk:
            burst = b"x\n" * args.count
        elif args.heavy:
            burst = heavy(args.source, args.dest) * args.count
        else:
            burst = b"".join(frame(mouse(args.source, args.dest, i, t))
                             for i in range(args.count))
        write_ns = time.monotonic_ns()
        write_all(fd, burst)
        while args.forever:  # a flood that lasts: no new process (its start-up) per burst
            write_all(fd, burst)
        # write_ns: when the first byte went out (start_ns also counts building the burst).
        return {"start_ns": start, "write_ns": write_ns, "end_ns": time.monotonic_ns()}
    return {"start_ns": start, "write_ns": start, "end_ns": time.monotonic_ns()}


def recv(args: argparse.Namespace) -> dict[str, Any]:
    fd = open_raw(args.path)
    print(json.dumps({"ready": True}), flush=True)
    seen = 0
    first = last = 0
    latencies: list[int] = []
    pending = b""
    # Only the flow measured: a broadcast flood reaches this domain too.
    wanted = b'"source":"%s"' % args.source_filter.encode() if args.source_filter else None
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
                if b'"seq"' in line and (wanted is None or wanted in line):
                    t = int(line.rsplit(b'"t":', 1)[1].split(b"}", 1)[0])
                    latencies.append(now - t)
                    seen += 1
        else:
            seen += data.count(b"\n")
    out: dict[str, Any] = {"received": seen, "first_ns": first, "last_ns": last}
    if latencies and args.windows > 1:
        # p99 of each window of consecutive messages, in arrival order: one stall of
        # the machine lands in one window, a lasting cost in all of them.
        size = -(-len(latencies) // args.windows)
        out["p99_windows_us"] = [
            sorted(w)[min(len(w) - 1, int(len(w) * 0.99))] / 1000
            for w in (latencies[i:i + size] for i in range(0, len(latencies), size))]
    if latencies:
        latencies.sort()
        n = len(latencies)
        for q in (50, 99, 99.9):
            out[f"p{q}_us"] = latencies[min(n - 1, int(n * q / 100))] / 1000
        out["max_us"] = latencies[-1] / 1000
    return out


def _command(source: str, dest: str, ident: str) -> bytes:
    return (b'{"type":"commande","source":"%s","destination":"%s","payload":{"id":"%s",'
            b'"commande":"ping"}}\n' % (source.encode(), dest.encode(), ident.encode()))


def commands(args: argparse.Namespace) -> dict[str, Any]:
    fd = open_raw(args.path)
    os.set_blocking(fd, False)  # never blocked writing while answers wait to be read
    dests = args.dest.split(",")
    sent: dict[str, int] = {}
    outcomes: dict[str, int] = {}
    stuck: dict[str, int] = {}
    latencies: list[int] = []
    pending = [b""]
    out = bytearray()

    def read_some(timeout: float) -> None:
        readable, writable, _ = select.select([fd], [fd] if out else [], [], timeout)
        if writable:
            with contextlib.suppress(BlockingIOError):
                del out[:os.write(fd, out)]
        if not readable:
            return
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        now = time.monotonic_ns()
        lines = (pending[0] + data).split(b"\n")
        pending[0] = lines.pop()
        for line in lines:
            if b'"reponse"' not in line:
                continue
            p = json.loads(line)["payload"]
            how = p["statut"] if p["statut"] == "ok" else p.get("erreur", {}).get("code", "?")
            if p["id"] in sent:
                latencies.append(now - sent.pop(p["id"]))
                outcomes[how] = outcomes.get(how, 0) + 1
            else:
                stuck[how] = stuck.get(how, 0) + 1

    stuck_dest, _, stuck_n = (args.stuck or ":0").partition(":")
    out += b"".join(_command(args.source, stuck_dest, f"s{i}") for i in range(int(stuck_n)))
    deadline = time.monotonic() + args.timeout
    while out and time.monotonic() < deadline:
        read_some(0.1)
    start = time.monotonic_ns()
    period = 1e9 / args.rate if args.rate else 0
    i = 0
    while (i < args.count or sent or out) and time.monotonic() < deadline:
        now = time.monotonic_ns()
        if i < args.count and now >= start + i * period:
            ident = f"c{i}"
            sent[ident] = now
            out += _command(args.source, dests[i % len(dests)], ident)
            i += 1
            continue
        wait = (start + i * period - now) / 1e9 if i < args.count else 0.5
        read_some(max(0.0, min(wait, 0.5)))
    result: dict[str, Any] = {"answered": outcomes, "unanswered": len(sent), "stuck": stuck}
    if latencies:
        latencies.sort()
        n = len(latencies)
        for q in (50, 99):
            result[f"p{q}_us"] = latencies[min(n - 1, int(n * q / 100))] / 1000
        result["max_us"] = latencies[-1] / 1000
    return result


def answer(args: argparse.Namespace) -> dict[str, float]:
    fd = open_raw(args.path)
    print(json.dumps({"ready": True}), flush=True)
    pending = b""
    while True:
        data = os.read(fd, 1 << 16)
        lines = (pending + data).split(b"\n")
        pending = lines.pop()
        out = []
        for line in lines:
            if b'"commande"' in line and b'"type":"commande"' in line:
                m = json.loads(line)
                p = m["payload"]
                out.append(json.dumps(
                    {"type": "reponse", "source": args.source, "destination": m["source"],
                     "payload": {"id": p["id"], "commande": p["commande"], "statut": "ok",
                                 "resultat": {}}}, separators=(",", ":")).encode() + b"\n")
        if out:
            write_all(fd, b"".join(out))


def recvmany(args: argparse.Namespace) -> dict[str, float]:
    fds = [open_raw(p) for p in args.path.split(",")]
    seen = dict.fromkeys(fds, 0)
    last = dict.fromkeys(fds, 0)
    first = 0
    poller = select.epoll()
    for fd in fds:
        poller.register(fd, select.EPOLLIN)
    print(json.dumps({"ready": True}), flush=True)
    waiting = len(fds)
    deadline = time.monotonic() + args.timeout
    while waiting and time.monotonic() < deadline:
        for fd, _ in poller.poll(0.5):
            data = os.read(fd, 1 << 16)
            now = time.monotonic_ns()
            first = first or now
            last[fd] = now
            before = seen[fd]
            seen[fd] += data.count(b"\n")
            if before < args.count <= seen[fd]:
                waiting -= 1
    return {"receivers": len(fds), "received_min": min(seen.values()),
            "received": sum(seen.values()), "first_ns": first, "last_ns": max(last.values())}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["send", "recv", "recvmany", "commands", "answer"])
    p.add_argument("path")
    p.add_argument("count", type=int)
    p.add_argument("--rate", type=float, default=0)
    p.add_argument("--source", default="vm-sys-usb")
    p.add_argument("--dest", default="vm-ui")
    p.add_argument("--latency", action="store_true")
    p.add_argument("--mqtt", metavar="TOPIC", help="send: wrap each message in an MQTT PUBLISH")
    p.add_argument("--timeout", type=float, default=120)
    p.add_argument("--junk", action="store_true",
                   help="send: COUNT tiny invalid lines (x and a newline) instead")
    p.add_argument("--heavy", action="store_true",
                   help="send: COUNT costly frames (60 KiB, non-canonical, 15 000 {}) instead")
    p.add_argument("--forever", action="store_true",
                   help="send without --rate: write the burst again and again until killed")
    p.add_argument("--windows", type=int, default=1, metavar="N",
                   help="recv --latency: also the p99 of each of N windows of consecutive "
                        "messages (p99_windows_us)")
    p.add_argument("--from", dest="source_filter", default=None,
                   help="recv --latency: count only the messages from this source")
    p.add_argument("--stuck", default=None, metavar="DEST:N",
                   help="commands: first send N commands to DEST, which never answers")
    args = p.parse_args()
    modes: dict[str, Callable[[argparse.Namespace], Any]] = {
        "send": send, "recv": recv, "recvmany": recvmany, "commands": commands,
        "answer": answer}
    result = modes[args.mode](args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
