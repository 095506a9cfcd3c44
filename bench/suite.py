"""Benchmark suite: the broker against the transport's limit, the field figure and two
established MQTT brokers, all in one run on the same machine.

    .venv/bin/python -m bench.suite              # full run (about 10 minutes)
    .venv/bin/python -m bench.suite --quick      # smaller counts (a minute or two)
    .venv/bin/python -m bench.suite --write      # also docs/benchmarks.md + .png
    .venv/bin/python -m bench.suite --smoke --write --out /tmp/b.md   # seconds (tests)

Systems: the raw relay (socat copying bytes between the two dom0-side ptys: the
transport's own limit); the broker over socat ptys and over unix sockets (the DomU end
of each domain is a listening unix socket, like QEMU's, that the broker connects to);
amqtt (pure-Python asyncio MQTT) and mosquitto (C), each carrying the same flows as
MQTT 3.1.1 QoS 0 publish/subscribe over loopback TCP, one topic per destination domain
(``tous`` for broadcasts), payload = the same bytes.

Every sender and receiver is a separate process (bench/peers.py), identical for every
system: the suite connects the sockets (MQTT CONNECT/SUBSCRIBE done here) and hands
each one over to a peer process as an inherited fd, so the data path is the same
pre-built burst written with write(2) and the same newline counting on the other side.

Scenarios: one-to-one burst; the field benchmark (1 000 mouse moves end to end, median
of 5); one-way latency at 100, 1 000 and 10 000 msg/s; broadcast fan-out to 10, 50 and
100 receivers; idle cost with 100 connected domains; honest-traffic latency at
1 000 msg/s while another domain floods a third one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.bench_broker import (
    PEERS,
    ROOT,
    UNLIMITED,
    _json_line,
    burst_seconds,
    machine,
    raw_relay,
    rss_kib,
    write_section,
)
from bench.lifetime import unwind_on_signals
from tests.support.broker_process import BrokerProcess, write_config
from tests.support.ptys import SOCAT, pty_pairs
from tests.support.waiting import wait_until

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
SYSTEMS = {
    "raw": "raw relay, ptys (socat)",
    "pty": "broker, ptys",
    "raw-unix": "raw relay, unix sockets (socat)",
    "unix": "broker, unix sockets",
    "amqtt": "amqtt",
    "mosquitto": "mosquitto",
}
BROKERS = ("pty", "unix")
RAW = {"pty": "raw", "unix": "raw-unix"}
"""Each broker's same-transport baseline: socat copying bytes between the same kind of
channel (ptys with ptys, unix sockets with unix sockets)."""
OTHERS = ("raw", "amqtt", "mosquitto")
"""The columns of the ratio table (``raw`` stands for each broker's own, :data:`RAW`)."""
HONEST, UI, FLOOD, SINK, PUB = "vm-sys-usb", "vm-ui", "vm-flood", "vm-sink", "vm-pub"


class NotApplicable(Exception):
    """This system has no equivalent of the scenario."""


@dataclass
class Sizes:
    burst: int
    field_runs: int
    latency: dict[int, int]          # rate -> messages
    fanout: dict[int, int]           # receivers -> messages
    idle_domains: int
    idle_seconds: float
    flood: int                       # messages per flood burst (repeated)
    flood_honest: int                # honest messages at 1 000/s during the flood
    paho: int                        # burst through the paho-mqtt client (check)


FULL = Sizes(200_000, 5, {100: 1_000, 1_000: 5_000, 10_000: 30_000},
             {10: 20_000, 50: 4_000, 100: 2_000}, 100, 10.0, 50_000, 3_000, 50_000)
QUICK = Sizes(10_000, 5, {100: 200, 1_000: 1_000, 10_000: 5_000},
              {10: 2_000, 50: 400, 100: 200}, 100, 3.0, 10_000, 1_000, 10_000)
SMOKE = Sizes(300, 1, {100: 5, 1_000: 20, 10_000: 50},
              {2: 20, 3: 20}, 5, 0.3, 500, 20, 200)


# ---------------------------------------------------------------- sessions

@dataclass
class Session:
    """The DomU ends of a set of domains, as peers.py paths (a pty or ``fd:N``)."""

    ends: dict[str, str]
    fds: tuple[int, ...] = ()
    server_pid: int | None = None
    mqtt: bool = False
    transport_pids: tuple[int, ...] = ()     # the socat processes standing in for Xen
    keep: list[Any] = field(default_factory=list)


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid``, in ns (schedstat: no 10 ms clock ticks)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


def io_counts(pid: int) -> dict[str, int]:
    """read(2)/write(2) calls and bytes of ``pid`` (for the average chunk sizes)."""
    try:
        return {k: int(v) for k, v in (line.split(": ") for line in
                                       Path(f"/proc/{pid}/io").read_text().splitlines())}
    except OSError:
        return {}


class Probe:
    """CPU and I/O of the server and of the transport processes over a measurement."""

    def __init__(self, sess: Session) -> None:
        self.sess = sess
        self.server = sess.server_pid
        self.cpu0 = cpu_ns(self.server) if self.server else 0
        self.io0 = io_counts(self.server) if self.server else {}
        self.transport0 = sum(cpu_ns(p) for p in sess.transport_pids)

    def result(self, seconds: float) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.sess.transport_pids:
            out["transport_cpu_percent"] = 100 * (sum(
                cpu_ns(p) for p in self.sess.transport_pids) - self.transport0) / 1e9 / seconds
        if not self.server:
            return out
        out["server_cpu_percent"] = 100 * (cpu_ns(self.server) - self.cpu0) / 1e9 / seconds
        io = io_counts(self.server)
        if io and self.io0:
            reads = io["syscr"] - self.io0["syscr"]
            writes = io["syscw"] - self.io0["syscw"]
            out["server_reads"] = reads
            out["server_writes"] = writes
            out["server_read_bytes_per_call"] = (io["rchar"] - self.io0["rchar"]) / max(reads, 1)
            out["server_write_bytes_per_call"] = (io["wchar"] - self.io0["wchar"]) / max(writes,
                                                                                         1)
        return out


def relay_pid(a: Path) -> int | None:
    """The pid of the raw relay's socat (bench_broker.raw_relay keeps it to itself)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                if b"65536" in argv and any(x.startswith(f"{a},".encode()) for x in argv):
                    return int(proc.name)
    return None


def drain(ends: list[str], quiet: float = 0.2) -> None:
    """Read what the broker sent before the run (its "domaine connecte" notifications)."""
    fds = []
    for end in ends:
        if end.startswith("fd:"):
            fds.append((int(end[3:]), False))
        else:
            fds.append((os.open(end, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK), True))
    try:
        last = time.monotonic()
        while time.monotonic() - last < quiet:
            for fd, _ in fds:
                os.set_blocking(fd, False)
                with contextlib.suppress(BlockingIOError, OSError):
                    while os.read(fd, 1 << 16):
                        last = time.monotonic()
            time.sleep(0.02)
    finally:
        for fd, opened in fds:
            if opened:
                os.close(fd)
            else:
                os.set_blocking(fd, True)


def _start_broker(tmp: Path, paths: dict[str, Path], limits: str) -> BrokerProcess:
    config = write_config(tmp / "suite.toml", paths,
                          extra=f'[broker]\nniveau_journal = "info"\n{limits}')
    proc = BrokerProcess(config)
    try:
        proc.wait_event("broker.ready", timeout=60)
    except BaseException:
        proc.stop()
        raise
    return proc


def _listeners(stack: ExitStack, tmp: Path,
               domains: list[str]) -> dict[str, tuple[socket.socket, Path]]:
    """The DomU end of each domain as a listening unix socket, as QEMU makes it for
    Xen's ``connection=socket``."""
    listeners = {}
    for n in domains:
        path = tmp / f"{n}.sock"
        path.unlink(missing_ok=True)
        s = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        s.bind(str(path))
        s.listen(1)
        listeners[n] = (s, path)
    return listeners


def _accept(stack: ExitStack, listeners: dict[str, tuple[socket.socket, Path]]
            ) -> dict[str, socket.socket]:
    conns = {}
    for n, (s, _) in listeners.items():
        s.settimeout(60)
        conn, _ = s.accept()
        conn.setblocking(True)
        conns[n] = stack.enter_context(conn)
    return conns


@contextmanager
def unix_relay(a: Path, b: Path) -> Iterator[int]:
    """The raw relay over unix sockets: socat connected to both listening sockets,
    copying bytes both ways (as :func:`bench.bench_broker.raw_relay` does between two
    ptys); yields its pid."""
    assert SOCAT
    proc = subprocess.Popen([SOCAT, "-b", "65536", f"UNIX-CONNECT:{a}", f"UNIX-CONNECT:{b}"],
                            stderr=subprocess.DEVNULL)
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def _pids(p: dict[str, Any]) -> tuple[int, ...]:
    return tuple(x.proc.pid for x in p.values() if x.proc is not None)


@contextmanager
def session(system: str, tmp: Path, domains: list[str], *,
            routes: list[tuple[str, str]] = (),  # type: ignore[assignment]
            broadcast: list[str] = (),  # type: ignore[assignment]
            limits: str = UNLIMITED) -> Iterator[Session]:
    """Connect ``domains`` through ``system``. ``routes`` are the one-to-one flows (the
    raw relay can only do those); ``broadcast`` the domains that receive ``tous``."""
    with ExitStack() as stack:
        if system == "raw":
            if broadcast or not routes:
                raise NotApplicable("a byte relay has no broadcast or routing")
            p = stack.enter_context(pty_pairs(tmp, domains))
            relays = []
            for a, b in routes:
                stack.enter_context(raw_relay(p[a], p[b]))
                relays.append(relay_pid(p[a].dom0))
            yield Session({n: str(x.domu) for n, x in p.items()},
                          server_pid=relays[0] if len(relays) == 1 else None,
                          transport_pids=_pids(p))
        elif system == "pty":
            p = stack.enter_context(pty_pairs(tmp, domains))
            b = _start_broker(tmp, {n: x.dom0 for n, x in p.items()}, limits)
            stack.callback(b.stop)
            wait_until(lambda: len(b.find("domain.connected")) >= len(domains), 60,
                       "all domains connected")
            ends = {n: str(x.domu) for n, x in p.items()}
            drain(list(ends.values()))
            yield Session(ends, server_pid=b.proc.pid, transport_pids=_pids(p))
        elif system == "raw-unix":
            if broadcast or not routes:
                raise NotApplicable("a byte relay has no broadcast or routing")
            listeners = _listeners(stack, tmp, domains)
            pids = [stack.enter_context(unix_relay(listeners[a][1], listeners[b][1]))
                    for a, b in routes]
            conns = _accept(stack, listeners)
            yield Session({n: f"fd:{c.fileno()}" for n, c in conns.items()},
                          tuple(c.fileno() for c in conns.values()),
                          server_pid=pids[0] if len(pids) == 1 else None)
        elif system == "unix":
            listeners = _listeners(stack, tmp, domains)
            b = _start_broker(tmp, {n: path for n, (_, path) in listeners.items()}, limits)
            stack.callback(b.stop)
            conns = _accept(stack, listeners)
            wait_until(lambda: len(b.find("domain.connected")) >= len(domains), 60,
                       "all domains connected")
            ends = {n: f"fd:{c.fileno()}" for n, c in conns.items()}
            drain(list(ends.values()))
            yield Session(ends, tuple(c.fileno() for c in conns.values()), b.proc.pid)
        else:
            port, pid = stack.enter_context(mqtt_server(system, tmp))
            conns = {}
            for n in domains:
                topics = [n, *(["tous"] if n in broadcast else [])]
                conns[n] = stack.enter_context(mqtt_client(port, n, topics))
            ends = {n: f"fd:{c.fileno()}" for n, c in conns.items()}
            yield Session(ends, tuple(c.fileno() for c in conns.values()), pid, mqtt=True)


# ---------------------------------------------------------------- MQTT servers, clients

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def mqtt_server(system: str, tmp: Path) -> Iterator[tuple[int, int]]:
    """A fresh server process on a free loopback port; yields (port, pid)."""
    port = free_port()
    if system == "mosquitto":
        conf = tmp / "mosquitto.conf"
        # No persistence, no logging; Nagle off like the broker's sockets; no per-client
        # queue limit, so QoS 0 bursts are not dropped (the broker applies back-pressure).
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                        "persistence false\nlog_dest none\nset_tcp_nodelay true\n"
                        "max_queued_messages 0\n")
        cmd = [MOSQUITTO, "-c", str(conf)]
    else:
        conf = tmp / "amqtt.yaml"
        # Only anonymous authentication: no packet logger, no $SYS publisher.
        conf.write_text(f"listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:{port}\n"
                        "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
                        "    allow_anonymous: true\n")
        cmd = [str(Path(sys.executable).parent / "amqtt"), "-c", str(conf)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"{system} exited with status {proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
            except OSError:
                return False
            return True
        wait_until(up, 30, f"{system} listening")
        yield port, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _utf8(s: str) -> bytes:
    return len(s).to_bytes(2, "big") + s.encode()


def _packet(kind: int, body: bytes) -> bytes:
    n, length = len(body), bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        length.append(digit | (0x80 if n else 0))
        if not n:
            return bytes([kind]) + bytes(length) + body


def _read_packet(sock: socket.socket) -> tuple[int, bytes]:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("MQTT server closed the connection")
            data += chunk
        return data
    kind = exactly(1)[0]
    length, shift = 0, 0
    while True:
        b = exactly(1)[0]
        length |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    return kind, exactly(length)


@contextmanager
def mqtt_client(port: int, client_id: str, topics: list[str]) -> Iterator[socket.socket]:
    """A connected, subscribed MQTT 3.1.1 session (clean, keep-alive off), blocking."""
    sock = socket.create_connection(("127.0.0.1", port), 10)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(_packet(0x10, _utf8("MQTT") + b"\x04\x02\x00\x00" + _utf8(client_id)))
        kind, body = _read_packet(sock)
        if kind != 0x20 or body[1] != 0:
            raise ConnectionError(f"CONNACK refused: {body!r}")
        sock.sendall(_packet(0x82, b"\x00\x01" + b"".join(_utf8(t) + b"\x00" for t in topics)))
        kind, body = _read_packet(sock)
        if kind != 0x90 or any(c & 0x80 for c in body[2:]):
            raise ConnectionError(f"SUBACK refused: {body!r}")
        sock.settimeout(None)
        yield sock
    finally:
        sock.close()


# ---------------------------------------------------------------- transfers

def _dest_args(sess: Session, src: str, dest: str) -> list[str]:
    return ["--source", src, "--dest", dest, *(["--mqtt", dest] if sess.mqtt else [])]


def transfer(sess: Session, src: str, dst: str, count: int, *, rate: float = 0,
             latency: bool = False) -> dict[str, Any]:
    """``count`` messages from ``src`` to ``dst``, sender and receiver in their own
    processes; elapsed time from the first byte written to the last one read."""
    probe = Probe(sess)
    recv = subprocess.Popen([*PEERS, "recv", sess.ends[dst], str(count),
                             *(["--latency"] if latency else [])],
                            stdout=subprocess.PIPE, text=True, pass_fds=sess.fds)
    try:
        _json_line(recv)  # ready
        send = subprocess.run([*PEERS, "send", sess.ends[src], str(count),
                               *(["--rate", str(rate)] if rate else []),
                               *_dest_args(sess, src, dst)],
                              capture_output=True, text=True, check=True, pass_fds=sess.fds)
        sent = json.loads(send.stdout)
        got = _json_line(recv)
        recv.wait(30)
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
    elapsed = burst_seconds(sent, got, count)
    return {**got, "seconds": elapsed, "per_second": count / elapsed,
            **probe.result(elapsed)}


def fanout(sess: Session, receivers: list[str], count: int) -> dict[str, Any]:
    """One publisher, ``tous``; receivers split over two processes (two cores)."""
    probe = Probe(sess)
    groups = [receivers[i::2] for i in range(min(2, len(receivers)))]
    procs = [subprocess.Popen([*PEERS, "recvmany", ",".join(sess.ends[r] for r in g),
                               str(count)], stdout=subprocess.PIPE, text=True,
                              pass_fds=sess.fds) for g in groups]
    try:
        for p in procs:
            _json_line(p)
        send = subprocess.run([*PEERS, "send", sess.ends[PUB], str(count),
                               *_dest_args(sess, PUB, "tous")],
                              capture_output=True, text=True, check=True, pass_fds=sess.fds)
        sent = json.loads(send.stdout)
        got = [_json_line(p) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    worst = min(g["received_min"] for g in got)
    if worst < count:
        raise RuntimeError(f"a receiver got only {worst} of {count} messages")
    elapsed = (max(g["last_ns"] for g in got) - sent["write_ns"]) / 1e9
    return {"seconds": elapsed, "messages": count, "receivers": len(receivers),
            "per_second": count * len(receivers) / elapsed, **probe.result(elapsed)}


def flood(sess: Session, chunk: int, honest: int) -> dict[str, Any]:
    """Honest latency at 1 000 msg/s from vm-sys-usb to vm-ui while vm-flood sends bursts
    of ``chunk`` messages to vm-sink, one after the other, until the honest run is over;
    vm-sink reads and discards (the flood is limited by the system, not by its reader)."""
    sink = subprocess.Popen([*PEERS, "recv", sess.ends[SINK], str(1 << 40), "--timeout",
                             "3600"], stdout=subprocess.PIPE, text=True, pass_fds=sess.fds)
    stop = threading.Event()
    state: dict[str, Any] = {"written": 0, "proc": None}

    def flooder() -> None:
        while not stop.is_set():
            state["proc"] = subprocess.Popen(
                [*PEERS, "send", sess.ends[FLOOD], str(chunk), *_dest_args(sess, FLOOD, SINK)],
                stdout=subprocess.DEVNULL, pass_fds=sess.fds)
            if state["proc"].wait() == 0:
                state["written"] += chunk

    thread = threading.Thread(target=flooder, daemon=True)
    try:
        _json_line(sink)
        thread.start()
        time.sleep(1.0)  # the first burst is built, then flowing
        t0, written0 = time.monotonic(), state["written"]
        out = transfer(sess, HONEST, UI, honest, rate=1000, latency=True)
        out["flood_written_per_second"] = (state["written"] - written0) / (time.monotonic() - t0)
    finally:
        stop.set()
        if state["proc"] is not None and state["proc"].poll() is None:
            state["proc"].kill()
        thread.join(60)
        sink.kill()
        sink.wait()
    return out


def idle(sess: Session, seconds: float) -> dict[str, Any]:
    assert sess.server_pid
    time.sleep(0.5)  # let connection set-up settle
    before = cpu_ns(sess.server_pid)
    time.sleep(seconds)  # measuring idle CPU: nothing to wait for
    return {"cpu_percent": 100 * (cpu_ns(sess.server_pid) - before) / 1e9 / seconds,
            "rss_kib": rss_kib(sess.server_pid), "domains": len(sess.ends)}


# ---------------------------------------------------------------- paho-mqtt check

def paho_peer(argv: list[str]) -> int:
    """``suite.py paho send|recv PORT TOPIC COUNT``: the same flow through paho-mqtt."""
    import paho.mqtt.client as mqtt

    from bench.peers import mouse

    mode, port, topic, count = argv[0], int(argv[1]), argv[2], int(argv[3])
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"paho-{mode}")
    client.connect("127.0.0.1", port, keepalive=0)
    if mode == "recv":
        state = {"seen": 0, "last": 0}

        def on_message(c: Any, _u: Any, _m: Any) -> None:
            state["seen"] += 1
            state["last"] = time.monotonic_ns()
            if state["seen"] >= count:
                c.disconnect()
        client.on_message = on_message
        client.subscribe(topic, 0)
        client.loop(1.0)
        print(json.dumps({"ready": True}), flush=True)
        client.loop_forever()
        print(json.dumps({"received": state["seen"], "last_ns": state["last"]}), flush=True)
    else:
        t = time.monotonic_ns()
        payloads = [mouse(HONEST, topic, i, t) for i in range(count)]
        client.loop_start()
        start = time.monotonic_ns()
        info = None
        for payload in payloads:
            info = client.publish(topic, payload, 0)
        assert info is not None
        info.wait_for_publish(60)
        client.loop_stop()
        client.disconnect()
        print(json.dumps({"write_ns": start, "end_ns": time.monotonic_ns()}), flush=True)
    return 0


def paho_burst(tmp: Path, count: int) -> dict[str, Any]:
    me = [sys.executable, "-m", "bench.suite", "paho"]
    with mqtt_server("mosquitto", tmp) as (port, _):
        recv = subprocess.Popen([*me, "recv", str(port), UI, str(count)],
                                stdout=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            _json_line(recv)
            sent = json.loads(subprocess.run([*me, "send", str(port), UI, str(count)],
                                             capture_output=True, text=True, cwd=ROOT,
                                             check=True).stdout)
            got = _json_line(recv)
        finally:
            if recv.poll() is None:
                recv.kill()
            recv.wait()
    elapsed = burst_seconds(sent, got, count)
    return {"seconds": elapsed, "per_second": count / elapsed}


# ---------------------------------------------------------------- the run

def attempt(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return fn()
    except NotApplicable as exc:
        return {"na": str(exc)}
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


Group = Callable[[str, Path, Sizes], dict[str, dict[str, Any]]]
"""A group of scenarios sharing one session of a system: their results by key."""


def one_to_one(system: str, tmp: Path, z: Sizes) -> dict[str, dict[str, Any]]:
    keys = ("burst", "field", *(f"lat{rate}" for rate in z.latency))
    r: dict[str, dict[str, Any]] = {}

    def measure() -> dict[str, Any]:
        with session(system, tmp, [HONEST, UI], routes=[(HONEST, UI)]) as s:
            r["burst"] = attempt(lambda: transfer(s, HONEST, UI, z.burst))

            def field_run() -> dict[str, Any]:
                runs = [transfer(s, HONEST, UI, 1000)["seconds"] for _ in range(z.field_runs)]
                return {"ms": 1000 * statistics.median(runs), "runs_ms": [
                    round(1000 * x, 2) for x in runs]}
            r["field"] = attempt(field_run)
            for rate, n in z.latency.items():
                r[f"lat{rate}"] = attempt(lambda rate=rate, n=n: transfer(
                    s, HONEST, UI, n, rate=rate, latency=True))
        return {}
    failed = attempt(measure)  # the session itself failed (or is not applicable)
    return {k: r.get(k) or failed or {"error": "session failed"} for k in keys}


def fan_out(n: int, count: int) -> Group:
    def group(system: str, tmp: Path, z: Sizes) -> dict[str, dict[str, Any]]:
        def measure() -> dict[str, Any]:
            rx = [f"rx-{i:03d}" for i in range(n)]
            with session(system, tmp, [PUB, *rx], broadcast=rx) as s:
                return fanout(s, rx, count)
        return {f"fan{n}": attempt(measure)}
    return group


def idle_group(system: str, tmp: Path, z: Sizes) -> dict[str, dict[str, Any]]:
    def measure() -> dict[str, Any]:
        if system in RAW.values():
            raise NotApplicable("no process holds the connections")
        names = [f"vm-{i:03d}" for i in range(z.idle_domains)]
        with session(system, tmp, names, routes=[]) as s:
            return idle(s, z.idle_seconds)
    return {"idle": attempt(measure)}


def flood_group(system: str, tmp: Path, z: Sizes) -> dict[str, dict[str, Any]]:
    def measure() -> dict[str, Any]:
        # The broker with its production limits (config defaults: 20 000 msg/s per domain).
        with session(system, tmp, [HONEST, UI, FLOOD, SINK],
                     routes=[(HONEST, UI), (FLOOD, SINK)], limits="") as s:
            return flood(s, z.flood, z.flood_honest)
    return {"flood": attempt(measure)}


def paho_group(system: str, tmp: Path, z: Sizes) -> dict[str, dict[str, Any]]:
    if system != "mosquitto":
        return {}
    return {"paho": attempt(lambda: paho_burst(tmp, z.paho))}


def groups(z: Sizes) -> list[Group]:
    return [one_to_one, *(fan_out(n, c) for n, c in z.fanout.items()), idle_group,
            flood_group, paho_group]


def run_rounds(systems: list[str], tmp: Path, z: Sizes, rounds: int,
               log: Callable[[str], None]) -> list[dict[str, dict[str, Any]]]:
    """Every group of scenarios, each run ``rounds`` times for every system, the systems
    alternating run by run in a rotating order: the machine's drift and noise hit all
    alike instead of whichever system ran during a bad minute. One result dict per round."""
    out: list[dict[str, dict[str, Any]]] = [{s: {} for s in systems} for _ in range(rounds)]
    for group in groups(z):
        for i in range(rounds):
            for system in systems[i % len(systems):] + systems[:i % len(systems)]:
                for key, value in group(system, tmp, z).items():
                    out[i][system][key] = value
                    log(f"round {i + 1} {system:9} {key:10} {json.dumps(value)[:150]}")
    return out


def medians(rounds: list[dict[str, dict[str, Any]]], ms: list[Metric]
            ) -> dict[str, dict[str, Any]]:
    """Per system and scenario, the round whose value is the median (the lower middle
    of an even count); a scenario that failed in every round keeps its first failure."""
    values = {m.key: m.value for m in ms}
    values["paho"] = lambda r: r["per_second"]
    out: dict[str, dict[str, Any]] = {}
    for system in rounds[0]:
        out[system] = {}
        for key in {k: None for r in rounds for k in r[system]}:
            got = [r[system][key] for r in rounds if key in r[system]]
            ok = [g for g in got if "na" not in g and "error" not in g]
            if not ok:
                out[system][key] = got[0]
                continue
            ok.sort(key=values[key])
            out[system][key] = {**ok[(len(ok) - 1) // 2], "rounds": len(ok)}
    return out


# ---------------------------------------------------------------- report

@dataclass
class Metric:
    key: str
    label: str
    higher_better: bool
    value: Callable[[dict[str, Any]], float]
    show: Callable[[dict[str, Any]], str]


def _lat(r: dict[str, Any]) -> str:
    return f"{r['p50_us']:,.0f} / {r['p99_us']:,.0f} / {r['p99.9_us']:,.0f} us"


def metrics(z: Sizes) -> list[Metric]:
    out = [
        Metric("burst", f"burst, {z.burst:,} msgs, msg/s", True, lambda r: r["per_second"],
               lambda r: f"{r['per_second']:,.0f}"),
        Metric("field", "field: 1 000 mouse moves, ms", False, lambda r: r["ms"],
               lambda r: f"{r['ms']:.1f}"),
    ]
    for rate in z.latency:
        out.append(Metric(f"lat{rate}", f"latency at {rate:,} msg/s, p50 / p99 / p99.9",
                          False, lambda r: r["p99_us"], _lat))
    for n, count in z.fanout.items():
        out.append(Metric(f"fan{n}", f"fan-out to {n} ({count:,} msgs), deliveries/s", True,
                          lambda r: r["per_second"],
                          lambda r: f"{r['per_second']:,.0f} ({r['seconds']:.2f} s)"))
    out += [
        Metric("idle", f"idle, {z.idle_domains} domains, CPU % (RSS MiB)", False,
               lambda r: r["cpu_percent"],
               lambda r: f"{r['cpu_percent']:.2f} % ({r['rss_kib'] / 1024:.1f})"),
        Metric("flood", "honest p50 / p99 / p99.9 at 1 000/s under flood (flood msg/s "
               "written)", False, lambda r: r["p99_us"],
               lambda r: f"{_lat(r)} ({r['flood_written_per_second']:,.0f})"),
    ]
    return out


def cell(r: dict[str, Any] | None, m: Metric) -> str:
    if r is None:
        return ""
    if "na" in r:
        return "n/a"
    if "error" in r:
        if "messages arrived" in r["error"]:  # the receiver gave up waiting (120 s)
            return "starved: " + r["error"].split(": ", 1)[1].replace(
                "messages arrived", "arrived in 120 s")
        return f"failed: {r['error'][:60]}"
    return m.show(r)


def ratio(results: dict[str, dict[str, Any]], m: Metric, a: str, b: str) -> float | None:
    """Performance of ``a`` relative to ``b``: > 1 means ``a`` is better (throughputs
    divided; for times and latencies, ``b``'s divided by ``a``'s)."""
    ra, rb = results.get(a, {}).get(m.key), results.get(b, {}).get(m.key)
    if not ra or not rb or "na" in ra or "na" in rb or "error" in ra or "error" in rb:
        return None
    va, vb = m.value(ra), m.value(rb)
    if va == vb == 0:
        return 1.0
    if m.higher_better:
        return va / vb if vb else None
    return vb / va if va else None


def paired(rounds: list[dict[str, dict[str, Any]]], m: Metric, a: str, b: str
           ) -> float | None:
    """:func:`ratio` within each round (the two systems measured minutes apart), the
    median over the rounds."""
    got = [x for r in rounds if (x := ratio(r, m, a, b)) is not None]
    return statistics.median(got) if got else None


def fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def targets(results: dict[str, dict[str, Any]], rounds: list[dict[str, dict[str, Any]]],
            ms: list[Metric]) -> list[str]:
    by = {m.key: m for m in ms}
    lines = []

    def check(what: str, value: float | None, ok: bool | None) -> None:
        verdict = "n/a" if value is None or ok is None else ("met" if ok else "NOT met")
        lines.append(f"- {what}: {verdict}" + ("" if value is None else f" ({value:.2f})"))
    for sysname in BROKERS:
        label = SYSTEMS[sysname]
        x = paired(rounds, by["burst"], sysname, RAW[sysname])
        check(f"{label}: burst >= 0.7x the raw relay over the same transport", x,
              None if x is None else x >= 0.7)
        x = paired(rounds, by["burst"], sysname, "amqtt")
        check(f"{label}: burst >= 5x amqtt", x, None if x is None else x >= 5)
        x = paired(rounds, by["burst"], sysname, "mosquitto")
        check(f"{label}: burst >= 0.5x mosquitto", x, None if x is None else x >= 0.5)
        idle_r = results[sysname].get("idle", {})
        v = idle_r.get("cpu_percent")
        check(f"{label}: idle CPU with {idle_r.get('domains', '?')} domains < 1 %", v,
              None if v is None else v < 1)
        v = results[sysname].get("lat1000", {}).get("p99_us")
        check(f"{label}: p99 at 1 000 msg/s <= 1 000 us", v,
              None if v is None else v <= 1000)
        v = results[sysname].get("field", {}).get("ms")
        check(f"{label}: field 1 000 moves <= 20 ms (117 ms on real Xen)", v,
              None if v is None else v <= 20)
        v = idle_r.get("rss_kib")
        check(f"{label}: RSS with {idle_r.get('domains', '?')} domains <= 60 MB (MiB)",
              None if v is None else v / 1024, None if v is None else v * 1024 <= 60e6)
    return lines


def versions() -> str:
    try:
        out = subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True,
                             check=False).stdout
        mosq = out.split("\n", 1)[0].replace("mosquitto version ", "")
    except OSError:
        mosq = "absent"

    def pkg(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "absent"
    return (f"mosquitto {mosq}, amqtt {pkg('amqtt')}, paho-mqtt {pkg('paho-mqtt')}, "
            f"Python {platform.python_version()}, socat "
            f"{_first_line([shutil.which('socat') or 'socat', '-V'], 1)}")


def _first_line(cmd: list[str], index: int = 0) -> str:
    try:
        lines = subprocess.run(cmd, capture_output=True, text=True,
                               check=False).stdout.splitlines()
        return lines[index].split()[-2] if len(lines) > index else "?"
    except (OSError, IndexError):
        return "?"


def report(results: dict[str, dict[str, Any]], rounds: list[dict[str, dict[str, Any]]],
           z: Sizes, *, command: str, date: str, png: str | None) -> str:
    ms = metrics(z)
    head = "| scenario | " + " | ".join(SYSTEMS.values()) + " |"
    out = [head, "|---|" + "---:|" * len(SYSTEMS)]
    for m in ms:
        out.append(f"| {m.label} | " + " | ".join(
            cell(results.get(s, {}).get(m.key), m) for s in SYSTEMS) + " |")
    pairs_ = [(b, RAW[b] if o == "raw" else o) for b in BROKERS for o in OTHERS]
    rat = ["| scenario | " + " | ".join(
        f"{b} / {'raw ' + b if o in RAW.values() else o}" for b, o in pairs_) + " |",
        "|---|" + "---:|" * len(pairs_)]
    for m in ms:
        rat.append(f"| {m.label} | " + " | ".join(
            fmt_ratio(paired(rounds, m, b, o)) for b, o in pairs_) + " |")
    paho = results.get("mosquitto", {}).get("paho")
    raw_mq = results.get("mosquitto", {}).get("burst", {})
    client_note = ""
    if paho and "per_second" in paho and "per_second" in raw_mq:
        client_note = (f"\nMQTT client check (mosquitto, one-to-one burst of {z.paho:,}): "
                       f"paho-mqtt publisher + subscriber {paho['per_second']:,.0f} msg/s; "
                       f"the suite's raw-socket peers {raw_mq['per_second']:,.0f} msg/s "
                       f"({z.burst:,} messages).\n")
    cpu = ["| system | server CPU | socat ptys CPU | server reads | bytes/read | "
           "server writes | bytes/write |", "|---|---:|---:|---:|---:|---:|---:|"]
    for s, label in SYSTEMS.items():
        b = results.get(s, {}).get("burst", {})
        if "per_second" in b:
            def pct(k: str, b: dict[str, Any] = b) -> str:
                return f"{b[k]:.0f} %" if k in b else "-"

            def num(k: str, b: dict[str, Any] = b) -> str:
                # Sockets read with recv(2), which /proc/PID/io does not count.
                return f"{b[k]:,.0f}" if b.get(k) else "-"
            cpu.append(f"| {label} | {pct('server_cpu_percent')} | "
                       f"{pct('transport_cpu_percent')} | {num('server_reads')} | "
                       f"{num('server_read_bytes_per_call')} | {num('server_writes')} | "
                       f"{num('server_write_bytes_per_call')} |")
    bf = results.get("bench_flood")
    flood_note = ""
    if bf and "quiet" in bf:
        flood_note = ("\nbench/bench_flood.py (broker over ptys only, its own run): honest "
                      "p99 at 1 000 msg/s quiet {:,.0f} us, under flood with the default "
                      "limits {:,.0f} us, without a rate limit {:,.0f} us.\n").format(
                          bf["quiet"]["p99_us"], bf["throttled"]["p99_us"],
                          bf["unlimited"]["p99_us"])
    elif bf:
        flood_note = f"\nbench/bench_flood.py: {bf.get('na') or bf.get('error')}\n"
    return "\n".join([
        "## Suite: broker vs raw relay, amqtt, mosquitto", "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}  ",
        f"Date: {date}  ",
        f"Versions: {versions()}", "",
        *([f"![benchmark suite]({png})", ""] if png else []),
        "How: every sender and receiver is its own process running bench/peers.py, the "
        "same code for every system: senders write a pre-built burst (or one message per "
        "tick at a fixed rate) with write(2); receivers count newlines, or parse each "
        "message's send time for latency (CLOCK_MONOTONIC, one-way). The broker gets "
        "~220-byte mouse-move notifications; amqtt and mosquitto get the same bytes as "
        "MQTT 3.1.1 QoS 0 PUBLISH payloads on topic = destination domain (`tous` for "
        "broadcasts) over loopback TCP with TCP_NODELAY; the suite does CONNECT/SUBSCRIBE "
        "itself and hands each connected socket to a peer process (paho-mqtt, measured "
        "below, is an order of magnitude slower than the servers, so it would measure "
        "itself). mosquitto runs with a generated config: no persistence, no logging, "
        "`max_queued_messages 0` (no QoS 0 drops: the broker applies back-pressure "
        "instead); amqtt 0.12 from its CLI with only anonymous auth (no packet logger, no "
        "$SYS). The broker runs at the production log level (info) with the rate limit "
        "lifted (benchmarks measure routing, not the token bucket), except in the flood "
        "scenario, which uses the default limits (20 000 msg/s per domain). The raw relays "
        "are socat copying bytes between the two dom0-side ptys, or between the two "
        "domains' listening unix sockets (the broker's figures over each transport are "
        "compared with the raw relay over the same one); no broadcast, so fan-out and "
        "idle are n/a. Elapsed times run from the first byte written to the last byte "
        "read; fan-out waits for every receiver to have every message (receivers in two "
        f"processes, epoll). Every scenario runs {len(rounds)} times per system, the "
        "systems alternating run by run in a rotating order, each with fresh server "
        "processes; the tables give the median run, the ratios the median of the ratios "
        "within each round. The machine has 2 cores shared by senders, receivers, socat "
        "and the server (and, on a shared machine, by whatever else runs).", "",
        *out, "",
        "Ratios: the broker's performance relative to each system (> 1: the broker is "
        "better; throughputs divided, times and p99 latencies inverted).", "",
        *rat, "",
        "Targets:", "", *targets(results, rounds, ms), "",
        f"During the one-to-one burst (CPU: 100 % = one core of {os.cpu_count()}; the "
        "socat ptys stand in for Xen's channels; read/write counts from /proc/PID/io):", "",
        *cpu, "", client_note, flood_note,
    ])


def _short(v: float) -> str:
    for div, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def plot(results: dict[str, dict[str, Any]], z: Sizes, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(SYSTEMS)
    palette = {"raw": "#888888", "pty": "#1f77b4", "raw-unix": "#bbbbbb", "unix": "#17becf",
               "amqtt": "#d62728", "mosquitto": "#2ca02c"}
    colors = {s: palette[s] for s in names}
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))

    def get(s: str, key: str, f: Callable[[dict[str, Any]], float]) -> float:
        r = results.get(s, {}).get(key)
        return f(r) if r and "na" not in r and "error" not in r else float("nan")

    def bars(ax: Any, key: str, f: Callable[[dict[str, Any]], float], title: str,
             log: bool = False) -> None:
        vals = [get(s, key, f) for s in names]
        ax.bar(range(len(names)), vals, color=[colors[s] for s in names])
        ax.set_xticks(range(len(names)), [SYSTEMS[s].replace(", ", "\n") for s in names],
                      fontsize=8)
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_yscale("log")
        for i, v in enumerate(vals):
            if not math.isnan(v):
                ax.annotate(_short(v), (i, v), ha="center", va="bottom", fontsize=8)
            elif "error" in results.get(names[i], {}).get(key, {}):
                ax.annotate("failed / starved", (i, 0.5), xycoords=("data", "axes fraction"),
                            ha="center", fontsize=8, color=colors[names[i]], rotation=90)

    bars(axes[0][0], "burst", lambda r: r["per_second"],
         f"one-to-one burst ({z.burst:,} msgs), msg/s, higher is better")
    bars(axes[0][1], "field", lambda r: r["ms"],
         "field: 1 000 mouse moves, ms, lower is better (117 ms on real Xen)")
    ax = axes[0][2]
    rates = list(z.latency)
    width = 0.8 / len(names)
    for j, s in enumerate(names):
        ax.bar([i + (j - (len(names) - 1) / 2) * width for i in range(len(rates))],
               [get(s, f"lat{r}", lambda x: x["p99_us"]) for r in rates], width,
               label=SYSTEMS[s], color=colors[s])
    ax.set_xticks(range(len(rates)), [f"{r:,}/s" for r in rates])
    ax.set_yscale("log")
    ax.set_title("one-way latency p99, us (log), lower is better", fontsize=10)
    ax.legend(fontsize=7)
    ax = axes[1][0]
    ns = list(z.fanout)
    for s in names:
        ys = [get(s, f"fan{n}", lambda x: x["per_second"]) for n in ns]
        if not all(math.isnan(y) for y in ys):
            ax.plot(ns, ys, marker="o", label=SYSTEMS[s], color=colors[s])
    ax.set_xticks(ns)
    ax.set_yscale("log")
    ax.set_xlabel("receivers")
    ax.set_title("broadcast fan-out, deliveries/s (log; no raw equivalent)", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    bars(axes[1][1], "idle", lambda r: r["cpu_percent"],
         f"idle with {z.idle_domains} domains: server CPU %, lower is better")
    bars(axes[1][2], "flood", lambda r: r["p99_us"],
         "honest p99 at 1 000/s while a domain floods, us (log)", log=True)
    fig.suptitle(f"messagerie benchmark suite - {machine()}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def bench_flood_run(quick: bool) -> dict[str, Any]:
    """The broker-only flood benchmark (bench/bench_flood.py), when it exists."""
    try:
        from bench import bench_flood
    except ImportError as exc:
        raise NotApplicable(f"not available ({exc})") from None
    result: dict[str, Any] = bench_flood.run(quick)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["paho"]:
        return paho_peer(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller counts (a minute or two)")
    p.add_argument("--smoke", action="store_true", help="tiny counts (seconds; for tests)")
    p.add_argument("--write", action="store_true",
                   help="write the table into --out and the plot beside it")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--json", type=Path, help="also dump the raw results here")
    p.add_argument("--from-json", type=Path, metavar="FILE",
                   help="no run: report (and --write) the results a --json run saved")
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help="comma-separated subset of " + ",".join(SYSTEMS))
    p.add_argument("--deadline", type=float, metavar="SECONDS",
                   help="stop (cleanly, status 142) if the run is not over by then")
    p.add_argument("--rounds", type=int, default=3,
                   help="runs of every scenario per system, alternating (default 3; medians)")
    args = p.parse_args(argv)
    z = SMOKE if args.smoke else QUICK if args.quick else FULL
    systems = args.systems.split(",")
    unknown = set(systems) - set(SYSTEMS)
    if unknown or args.rounds < 1:
        p.error(f"unknown systems {sorted(unknown)}" if unknown else "--rounds must be >= 1")
    command = ".venv/bin/python -m bench.suite" + "".join(
        f" {a}" for a in argv if a in ("--quick", "--smoke", "--write")) + (
        f" --rounds {args.rounds}" if args.rounds != 3 else "")
    date = time.strftime("%Y-%m-%d %H:%M")
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        rounds, command, date = saved["rounds"], saved["command"], saved["date"]
        extra = saved.get("extra", {})
    else:
        unwind_on_signals(args.deadline)
        with tempfile.TemporaryDirectory(prefix="messagerie-suite-") as t:
            rounds = run_rounds(systems, Path(t), z, args.rounds,
                                lambda s: print(s, file=sys.stderr, flush=True))
        extra = {}
        if not args.smoke and "pty" in systems:
            extra["bench_flood"] = attempt(lambda: bench_flood_run(args.quick))
    if args.json:
        args.json.write_text(json.dumps({"command": command, "date": date, "rounds": rounds,
                                         "extra": extra}, indent=2))
    results = {**medians(rounds, metrics(z)), **extra}
    png = args.out.with_suffix(".png") if args.write else None
    body = report(results, rounds, z, command=command, date=date,
                  png=png.name if png else None)
    print(body)
    if args.write:
        assert png is not None
        png.parent.mkdir(parents=True, exist_ok=True)
        plot(results, z, png)
        write_section(args.out, body, name="suite")
    return 0


if __name__ == "__main__":
    sys.exit(main())
