"""``messagerie trace``: the broker's traffic live, from its trace socket (the real
broker on socat ptys, the CLI as a subprocess)."""

from __future__ import annotations

import asyncio
import grp
import json
import os
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker import trace as trace_module
from broker.trace import Tracer
from messagerie.cli import format_trace
from tests.support.broker_process import CLI, BrokerSystem
from tests.support.waiting import async_wait_until, wait_until

GROUP = grp.getgrgid(os.getgid()).gr_name

POLICY = """\
[[regle]]
source = "vm-b"
destination = "vm-a"
type = "commande"
action = "deny"

[[regle]]
source = "vm-b"
destination = "*"
type = "notification"
nom = "secret"
action = "deny"

[[regle]]
source = "*"
destination = "*"
type = "*"
action = "allow"
"""


def notif(src: str, dst: str, i: int, cat: str = "mesure") -> dict[str, Any]:
    return {"type": "notification", "source": src, "destination": dst,
            "payload": {"categorie": cat, "evenement": "lot", "data": {"i": i}}}


@pytest.fixture
def system(tmp_path: Path) -> Iterator[BrokerSystem]:
    (tmp_path / "policy.toml").write_text(POLICY)
    s = BrokerSystem(tmp_path, ("vm-a", "vm-b"), wait_connected=True, extra=(
        f'[broker]\npolitique = "{tmp_path / "policy.toml"}"\n\n'
        f'[trace]\nsocket = "{tmp_path / "trace.sock"}"\ngroupe = "{GROUP}"\n\n'
        "[limites]\ndebit = 1000000\nrafale = 1000000\n"))
    yield s
    assert s.close() == 0, s.broker.tail(20)
    assert not [t for t in s.broker.raw_lines if "Traceback" in t]


def trace(system: BrokerSystem, *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([str(CLI), "trace", "--path", str(system.tmp / "trace.sock"),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    n = len(system.broker.find("trace.started"))
    wait_until(lambda: len(system.broker.find("trace.started")) > n or proc.poll() is not None,
               what="trace.started")
    assert proc.poll() is None, proc.communicate()
    return proc


pytestmark = pytest.mark.integration


def test_routed_refused_and_filtered_each_one_line(system: BrokerSystem) -> None:
    sock = system.tmp / "trace.sock"
    st = os.stat(sock)
    assert (stat.S_IMODE(st.st_mode), grp.getgrgid(st.st_gid).gr_name) == (0o660, GROUP)
    every = trace(system, "--json", "--count", "4")
    refused_only = trace(system, "--verdict", "refused", "--count", "2")
    a, b = system.domus["vm-a"], system.domus["vm-b"]
    a.send(notif("vm-a", "vm-b", 1))                            # routed
    b.send(notif("vm-a", "vm-a", 2))                            # forged source: refused
    b.send({"type": "commande", "source": "vm-b", "destination": "vm-a",
            "payload": {"id": "c1", "commande": "lister", "arguments": {}}})   # denied
    a.send(notif("vm-a", "vm-b", 3))                            # routed
    out, err = every.communicate(timeout=20)
    assert every.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    # In order per channel (the two channels interleave as the broker reads them).
    by_channel = {ch: [(e["verdict"], e["source"], e["destination"], e["type"])
                       for e in events if e["channel"] == ch] for ch in ("vm-a", "vm-b")}
    assert by_channel == {
        "vm-a": [("routed", "vm-a", "vm-b", "notification")] * 2,
        "vm-b": [("refused", "vm-a", "vm-a", "notification"),
                 ("refused", "vm-b", "vm-a", "commande")]}
    routed = next(e for e in events if e["verdict"] == "routed")
    forged, denied = (e for e in events if e["verdict"] == "refused")
    assert routed["targets"] == ["vm-b"] and routed["name"] == "mesure"
    assert routed["rule"].startswith("rule 3 (line 14)")        # the rule that allowed it
    assert routed["size"] == len(json.dumps(notif("vm-a", "vm-b", 1),
                                            separators=(",", ":"))) + 1
    assert forged["why"] == "spoofed_source" and forged["channel"] == "vm-b"
    assert denied["why"] == "policy_denied" and denied["id"] == "c1"
    assert "rule 1 (line 1)" in denied["rule"]
    assert "payload" not in routed                              # not asked for
    out, err = refused_only.communicate(timeout=20)
    assert refused_only.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 2 and all(" REFUSED " in line for line in lines), lines
    assert " vm-b -> vm-a commande lister id=c1 " in lines[1]


def test_a_broadcast_filtered_for_everyone_is_one_filtered_line(system: BrokerSystem) -> None:
    proc = trace(system, "--domaine", "vm-b", "--json", "--count", "3")
    system.domus["vm-b"].send(notif("vm-b", "tous", 1, "secret"))   # nobody may get it
    system.domus["vm-b"].send(notif("vm-b", "tous", 2))             # vm-a may (not dom0)
    out, _ = proc.communicate(timeout=20)
    events = [json.loads(line) for line in out.splitlines()]
    assert [(e["verdict"], e["name"], sorted(e.get("denied") or e.get("targets") or []))
            for e in events] == [("filtered", "secret", ["dom0", "vm-a"]),
                                 ("filtered", "mesure", ["dom0"]),
                                 ("routed", "mesure", ["vm-a"])]
    assert events[2]["rule"].startswith("rule 3 (line 14)")     # vm-a's, not dom0's deny


def test_payloads_of_a_burst_are_each_its_own(system: BrokerSystem) -> None:
    # A burst of one flow is read and routed in runs: each line still shows its payload.
    n = 200
    proc = trace(system, "--payload", "--json", "--verdict", "routed", "--count", str(n))
    lines = [json.dumps(notif("vm-a", "vm-b", i), separators=(",", ":")).encode()
             for i in range(n)]
    system.domus["vm-a"].write(b"".join(line + b"\n" for line in lines))
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert [(json.loads(e["payload"])["data"]["i"], e["size"]) for e in events] == \
        [(i, len(line) + 1) for i, line in enumerate(lines)]


def test_payload_is_shown_only_when_asked_and_audited(system: BrokerSystem) -> None:
    proc = trace(system, "--payload", "--domaine", "vm-b", "--count", "1")
    audit = system.broker.wait_event("trace.payload_enabled")
    assert audit["security"] is True and audit["uid"] == os.getuid()
    system.domus["vm-a"].send(notif("vm-a", "tous", 0, "autre"))   # not vm-b's... but tous
    system.domus["vm-b"].send(notif("vm-b", "vm-a", 7))
    out, _ = proc.communicate(timeout=20)
    assert out.count("\n") == 1
    assert 'vm-b -> vm-a notification mesure' in out
    assert '"data": {"i": 7}' in out


@pytest.mark.slow
def test_a_monitor_that_does_not_read_never_slows_routing(system: BrokerSystem) -> None:
    n = 5000
    mon = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mon.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    mon.connect(str(system.tmp / "trace.sock"))
    mon.sendall(b'{"verdict": "routed"}\n')
    system.broker.wait_event("trace.started")
    a, b = system.domus["vm-a"], system.domus["vm-b"]
    a.write(b"".join(json.dumps(notif("vm-a", "vm-b", i)).encode() + b"\n"
                     for i in range(n)))
    # Every message arrives while the monitor reads nothing.
    assert len(b.wait_messages(n, timeout=60)) == n
    # It reads now: it got the start of the stream, then, once it has caught up, is
    # told how many it lost; what comes after reaches it again.
    mon.settimeout(30)
    stream = mon.makefile("rb")
    assert json.loads(stream.readline())["trace"] == "ok"
    seen = 0
    while "perdus" not in (event := json.loads(stream.readline())):
        assert event["verdict"] == "routed"
        seen += 1
    lost = event["perdus"]
    assert lost > 0 and seen + lost == n
    a.send(notif("vm-a", "vm-b", n))
    assert json.loads(stream.readline())["size"] > 0
    stream.close()
    mon.close()
    stats = system.broker.wait_event("trace.stopped")
    assert stats["dropped"] == lost


def test_format_trace_lines() -> None:
    line = format_trace({"time": 0.25, "source": "vm-a", "destination": "tous",
                         "type": "notification", "name": "x\x1b[31m", "id": None,
                         "size": 80, "verdict": "filtered", "denied": ["vm-b"],
                         "rule": "rule 2 (line 9): deny"})
    assert line.endswith(" vm-a -> tous notification x\\x1b[31m id=- 80B FILTERED denied "
                         "to vm-b: rule 2 (line 9): deny")
    line = format_trace({"time": 0.25, "source": "vm-a", "destination": "vm-b",
                         "type": "commande", "name": "ping", "id": "c1", "size": 90,
                         "verdict": "routed", "targets": ["vm-b"],
                         "rule": "rule 3 (line 15): allow vm-a -> vm-b commande *"})
    assert line.endswith(" vm-a -> vm-b commande ping id=c1 90B ROUTED -> vm-b: rule 3 "
                         "(line 15): allow vm-a -> vm-b commande *")
    assert format_trace({"perdus": 3}) == "# 3 events lost: this monitor read too slowly"


class _Hub:
    tracer: Tracer | None = None


async def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, path)
    except OSError:
        sock.close()
        raise
    return sock


async def _read_to_end(sock: socket.socket) -> bytes:
    loop, data = asyncio.get_running_loop(), b""
    while chunk := await asyncio.wait_for(loop.sock_recv(sock, 4096), 5):
        data += chunk
    return data


async def test_stop_closes_the_connections_that_never_subscribed(tmp_path: Path) -> None:
    # From Python 3.12 the server's wait_closed() waits for every connection: one that
    # connected and sent nothing would hold the broker's shutdown forever.
    hub = _Hub()
    tracer = Tracer(hub)
    path = str(tmp_path / "trace.sock")
    await tracer.start(path, GROUP)
    idle = await _connect(path)
    listening = await _connect(path)
    listening.sendall(b'{"verdict": "routed"}\n')
    # Accepted in order: once the second has subscribed, the first is connected too.
    await async_wait_until(lambda: hub.tracer is tracer, what="a subscription")
    await asyncio.wait_for(tracer.stop(), 5)
    assert await _read_to_end(idle) == b""                      # closed, not left open
    assert json.loads(await _read_to_end(listening))["trace"] == "ok"
    assert hub.tracer is None
    with pytest.raises(FileNotFoundError):                      # the socket is gone
        await _connect(path)
    idle.close()
    listening.close()


async def test_a_monitor_that_does_not_subscribe_in_time_is_disconnected(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trace_module, "SUBSCRIPTION_TIMEOUT", 0.3)
    tracer = Tracer(_Hub())
    path = str(tmp_path / "trace.sock")
    await tracer.start(path, GROUP)
    idle = await _connect(path)
    prompt = await _connect(path)
    prompt.sendall(b"{}\n")                                    # subscribed at once
    await async_wait_until(lambda: len(tracer.monitors) == 1, what="one subscription")
    reply = json.loads(await _read_to_end(idle))
    assert reply == {"trace": "erreur", "message": "no subscription within 0.3 s"}
    assert len(tracer.monitors) == 1                            # the subscribed one stays
    ok = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(prompt, 4096), 5)
    assert json.loads(ok)["trace"] == "ok"
    await tracer.stop()
    idle.close()
    prompt.close()


def test_the_broker_stops_while_a_monitor_has_not_subscribed(system: BrokerSystem) -> None:
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    idle.connect(str(system.tmp / "trace.sock"))
    # A monitor connected after it has subscribed: the broker accepted both (in order).
    trace(system, "--count", "1").kill()
    system.broker.wait_event("trace.stopped")
    assert system.broker.stop(timeout=10) == 0                 # the fixture's close() too
    idle.settimeout(5)
    assert idle.recv(10) == b""
    idle.close()


class _Transport:
    def __init__(self) -> None:
        self.out: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def is_closing(self) -> bool:
        return False


def test_each_frame_of_a_run_is_its_own_event() -> None:
    # Consecutive notifications of one flow come as one run: each still gets its own
    # event, with its own payload and size (not the first frame's, n times).
    from broker.policy import Policy
    from broker.router import Deliver
    from messagerie.envelope import Run, decode_runs

    lines = [json.dumps({"type": "notification", "source": "vm-a", "destination": "vm-b",
                         "payload": {"categorie": "mesure", "evenement": "lot",
                                     "data": {"i": i, "pad": "x" * i}}},
                        separators=(",", ":")).encode() for i in range(3)]
    (run,) = decode_runs(lines) or []
    assert isinstance(run, Run) and run.count == 3

    class Hub:
        tracer = None
        policy = Policy.allow_all()

    class Peer:
        name = "vm-a"

    tracer = Tracer(Hub())
    monitor = trace_module.Monitor(tracer)
    monitor.transport = _Transport()  # type: ignore[assignment]
    monitor.subscription = trace_module.Subscription(payload=True)
    tracer.add(monitor)

    class Dest:
        name = "vm-b"

    tracer.routed(Peer(), run.envelope, len(run.data), Deliver(("vm-b",)),  # type: ignore[arg-type]
                  run=run.data)
    tracer.dropped(Peer(), Dest(), run.envelope, run.count, run.data,  # type: ignore[arg-type]
                   why="queue_full")
    events = [json.loads(o) for o in monitor.transport.out]  # type: ignore[attr-defined]
    expected = [(json.loads(line)["payload"], len(line) + 1) for line in lines]
    assert [(e["verdict"], json.loads(e["payload"]), e["size"]) for e in events] == \
        [("routed", p, n) for p, n in expected] + [("dropped", p, n) for p, n in expected]
