"""MQTT bridge benchmark: DomU -> broker -> messagerie-pont -> mosquitto -> subscriber,
against mosquitto_pub -> mosquitto -> mosquitto_sub, in the same run on the same machine.

    .venv/bin/python -m bench.bench_pont            # full run (about a minute)
    .venv/bin/python -m bench.bench_pont --quick    # a few seconds (the test suite runs it)

Scenarios:

* burst: N notifications (~220 bytes) written at once; the bridge path from the DomU's
  pty (the broker, the bridge at QoS 0, mosquitto), the baseline from mosquitto_pub
  reading the same lines from stdin (``-l``) into the same mosquitto; the subscriber is
  mosquitto_sub in both (``-C N``). Elapsed from the first byte written to the
  subscriber's exit; the ratio is bridge / baseline msg/s.
* latency at 1 000 msg/s: one message per millisecond, each carrying its send time
  (CLOCK_MONOTONIC, same machine), written to the DomU's pty or to mosquitto_pub's
  stdin; one-way latency measured at the line mosquitto_sub prints (it flushes after
  each message). "Added" is the bridge path minus the baseline, per percentile.

Every part is its own process: the broker and the bridge as users start them, mosquitto
with a generated configuration (no persistence, no logging).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from tests.support.broker_process import BrokerProcess, write_config
from tests.support.mqtt import Mosquitto, PontProcess, pont_config
from tests.support.ptys import PtyPair

SUB = shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub"
PUB = shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub"
TOPIC = "messagerie/bench/vm-a/notification/entree"
POLICY = '[[regle]]\nsource = "vm-a"\ndestination = "supervision"\ntype = "notification"\n' \
         'action = "allow"\n'


def frame(n: int, t: float = 0.0) -> bytes:
    """A mouse-move notification of ~220 bytes, numbered, with a send time."""
    return json.dumps({
        "type": "notification", "source": "vm-a", "destination": "tous",
        "payload": {"categorie": "entree", "evenement": "souris",
                    "data": {"entree": "souris", "position": {"x": n % 1920, "y": n % 1080},
                             "boutons": {"gauche": 0, "milieu": 0, "droit": 0},
                             "n": n, "t": round(t, 6)}}},
        separators=(",", ":")).encode() + b"\n"


class Subscriber:
    """mosquitto_sub -C count on TOPIC; records each line's arrival time."""

    def __init__(self, port: int, count: int) -> None:
        self.proc = subprocess.Popen([SUB, "-h", "127.0.0.1", "-p", str(port), "-t", TOPIC,
                                      "-q", "0", "-C", str(count)],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.lines: list[tuple[float, bytes]] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line))

    def wait(self, timeout: float) -> float:
        self.proc.wait(timeout)
        self.thread.join(5)
        return time.monotonic()


def subscribed(port: int, count: int) -> Subscriber:
    """A subscriber, once its subscription is in place (a probe message came back)."""
    sub = Subscriber(port, count + 1)
    deadline = time.monotonic() + 10
    while not sub.lines:
        subprocess.run([PUB, "-h", "127.0.0.1", "-p", str(port), "-t", TOPIC, "-m", "probe"],
                       check=True, timeout=10)
        time.sleep(0.05)
        if time.monotonic() > deadline:
            raise RuntimeError("mosquitto_sub never subscribed")
    return sub


@contextmanager
def bridge_path(tmp: Path, port: int) -> Iterator[PtyPair]:
    with ExitStack() as stack:
        pair = PtyPair(tmp, "vm-a")
        stack.callback(pair.kill)
        channel = tmp / "pont.sock"
        conf = pont_config(tmp / "pont.toml", host="bench", port=port, channel=channel,
                           extra='[sortie]\nsujets = ["messagerie/bench/+/notification/#"]\n'
                                 "[tampon]\nmessages = 1000000\noctets = 1000000000\n")
        pont = PontProcess(conf, "--log-level", "warning")
        stack.callback(pont.stop)
        wait_for(channel.exists, "the bridge's socket")
        (tmp / "policy.toml").write_text(POLICY)
        config = write_config(tmp / "broker.toml", {"vm-a": pair.dom0, "supervision": channel},
                              extra=f'[broker]\npolitique = "{tmp / "policy.toml"}"\n'
                                    "[limites]\ndebit = 1000000000\nrafale = 1000000000\n"
                                    "part_cpu = 1000000000\nrafale_cpu = 1000000000\n"
                                    "file_octets = 67108864\ndelai_blocage = 30.0\n")
        broker = BrokerProcess(config)
        stack.callback(broker.stop)
        broker.wait_ready()
        status = tmp / "bench-status.json"
        wait_for(lambda: status.exists() and json.loads(status.read_text())["broker_connecte"]
                 and json.loads(status.read_text())["mqtt_connecte"], "the bridge connected")
        yield pair


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            time.sleep(0.0005)
            continue
        view = view[n:]


def burst(sink: int, port: int, n: int) -> float:
    """msg/s of n messages written at once to ``sink`` (a pty or a pipe)."""
    data = b"".join(frame(i) for i in range(n))
    sub = subscribed(port, n)
    start = time.monotonic()
    write_all(sink, data)
    end = sub.wait(120)
    got = len(sub.lines) - 1
    if got < n:
        raise RuntimeError(f"burst: {got} of {n} arrived")
    return n / (end - start)


def paced(sink: int, port: int, n: int, rate: float) -> list[float]:
    """One-way latencies (ms) of n messages at ``rate`` msg/s."""
    sub = subscribed(port, n)
    period = 1.0 / rate
    start = time.monotonic()
    for i in range(n):
        target = start + i * period
        while (now := time.monotonic()) < target:
            if target - now > 0.002:
                time.sleep(target - now - 0.001)
        write_all(sink, frame(i, time.monotonic()))
    sub.wait(60)
    out = []
    for arrived, line in sub.lines:
        if line.startswith(b"{"):
            out.append((arrived - json.loads(line)["payload"]["data"]["t"]) * 1000)
    if len(out) < n:
        raise RuntimeError(f"latency: {len(out)} of {n} arrived")
    return out


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def run(n_burst: int, n_latency: int, rounds: int) -> dict[str, object]:
    results: dict[str, list[float]] = {"bridge": [], "baseline": []}
    latency: dict[str, list[float]] = {"bridge": [], "baseline": []}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        mosq = Mosquitto(tmp)
        try:
            with bridge_path(tmp, mosq.port) as pair:
                fd = os.open(pair.domu, os.O_WRONLY | os.O_NOCTTY)
                try:
                    for _ in range(rounds):
                        results["bridge"].append(burst(fd, mosq.port, n_burst))
                        results["baseline"].append(baseline_burst(mosq.port, n_burst))
                    latency["bridge"] = paced(fd, mosq.port, n_latency, 1000)
                    latency["baseline"] = baseline_paced(mosq.port, n_latency)
                finally:
                    os.close(fd)
        finally:
            mosq.stop()
    return {"burst": results, "latency": latency}


@contextmanager
def publisher(port: int) -> Iterator[int]:
    proc = subprocess.Popen([PUB, "-h", "127.0.0.1", "-p", str(port), "-t", TOPIC, "-q", "0",
                             "-l"], stdin=subprocess.PIPE)
    assert proc.stdin is not None
    try:
        yield proc.stdin.fileno()
    finally:
        proc.stdin.close()
        proc.wait(30)


def baseline_burst(port: int, n: int) -> float:
    with publisher(port) as fd:
        time.sleep(0.3)  # mosquitto_pub connects before the clock starts
        return burst(fd, port, n)


def baseline_paced(port: int, n: int) -> list[float]:
    with publisher(port) as fd:
        time.sleep(0.3)
        return paced(fd, port, n, 1000)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small counts (a few seconds)")
    args = p.parse_args()
    n_burst, n_latency, rounds = (2000, 500, 1) if args.quick else (20000, 5000, 3)
    r = run(n_burst, n_latency, rounds)
    burst_r: dict[str, list[float]] = r["burst"]  # type: ignore[assignment]
    lat: dict[str, list[float]] = r["latency"]  # type: ignore[assignment]
    bridge, base = statistics.median(burst_r["bridge"]), statistics.median(burst_r["baseline"])
    print(f"# bench_pont: {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, "
          f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"burst of {n_burst} (median of {rounds} rounds):")
    print("| path | msg/s |\n|---|---|")
    print(f"| DomU -> broker -> messagerie-pont -> mosquitto -> mosquitto_sub | {bridge:,.0f} |")
    print(f"| mosquitto_pub -> mosquitto -> mosquitto_sub | {base:,.0f} |")
    print(f"ratio bridge / baseline: {bridge / base:.2f}")
    print(f"\nlatency at 1 000 msg/s ({n_latency} messages), one-way, ms:")
    print("| path | p50 | p99 | max |\n|---|---|---|---|")
    for name, label in (("bridge", "through the bridge"), ("baseline", "mosquitto_pub")):
        v = lat[name]
        print(f"| {label} | {pct(v, 50):.2f} | {pct(v, 99):.2f} | {max(v):.2f} |")
    print(f"| added by the bridge path | {pct(lat['bridge'], 50) - pct(lat['baseline'], 50):.2f}"
          f" | {pct(lat['bridge'], 99) - pct(lat['baseline'], 99):.2f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
