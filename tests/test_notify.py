"""The systemd notify protocol, against real AF_UNIX datagram sockets."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.notify import Notifier, watchdog_interval, watchdog_loop

TIMEOUT = 5.0


class Supervisor:
    """What systemd does: a bound datagram socket that reads notifications."""

    def __init__(self, address: str | bytes, text: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(TIMEOUT)  # wait on the datagram, never sleep
        self.text = text  # the NOTIFY_SOCKET value

    def receive(self) -> list[str]:
        data = self.sock.recv(4096)
        return data.decode().split("\n")

    def nothing_pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(TIMEOUT)
        return False


@pytest.fixture
def path_supervisor(tmp_path: Path) -> Iterator[Supervisor]:
    path = tmp_path / "notify.sock"
    supervisor = Supervisor(str(path), str(path))
    yield supervisor
    supervisor.sock.close()


@pytest.fixture
def abstract_supervisor() -> Iterator[Supervisor]:
    name = f"messagerie-test-{os.getpid()}-{os.urandom(4).hex()}"
    supervisor = Supervisor(b"\0" + name.encode(), "@" + name)
    yield supervisor
    supervisor.sock.close()


@pytest.fixture(params=["path", "abstract"])
def supervisor(request: pytest.FixtureRequest, path_supervisor: Supervisor,
               abstract_supervisor: Supervisor) -> Supervisor:
    return path_supervisor if request.param == "path" else abstract_supervisor


@pytest.mark.integration
def test_protocol_messages(supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", supervisor.text)
    with Notifier() as notifier:
        assert notifier.enabled
        assert notifier.ready()
        assert supervisor.receive() == ["READY=1"]
        assert notifier.status("3 domains connected\n(1 offline)")
        assert supervisor.receive() == ["STATUS=3 domains connected (1 offline)"]
        assert notifier.ready(status="serving")
        assert supervisor.receive() == ["READY=1", "STATUS=serving"]
        assert notifier.watchdog()
        assert supervisor.receive() == ["WATCHDOG=1"]
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert notifier.reloading()
        reloading = supervisor.receive()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert reloading[0] == "RELOADING=1"
        key, value = reloading[1].split("=")
        assert key == "MONOTONIC_USEC" and before <= int(value) <= after
        assert notifier.stopping()
        assert supervisor.receive() == ["STOPPING=1"]
        assert notifier.stopping("draining")
        assert supervisor.receive() == ["STOPPING=1", "STATUS=draining"]


@pytest.mark.integration
def test_explicit_address(path_supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier(path_supervisor.text)
    assert notifier.send("READY=1", "STATUS=x", "MAINPID=1")
    assert path_supervisor.receive() == ["READY=1", "STATUS=x", "MAINPID=1"]
    notifier.close()
    notifier = Notifier(environ={"NOTIFY_SOCKET": path_supervisor.text})
    assert notifier.watchdog()
    assert path_supervisor.receive() == ["WATCHDOG=1"]
    notifier.close()


def test_noop_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled
    assert repr(notifier) == "Notifier(disabled)"
    for call in (notifier.ready, notifier.watchdog, notifier.stopping, notifier.reloading):
        assert call() is False
    assert notifier.status("x") is False
    assert not Notifier("").enabled
    assert not Notifier("vsock:2:1234").enabled  # not supported: disabled, not an error


@pytest.mark.integration
def test_send_failure_returns_false(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "nobody-listens.sock"))
    assert notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False
    # A supervisor that appears later is reached: the socket is not left broken.
    supervisor = Supervisor(str(tmp_path / "nobody-listens.sock"), "")
    try:
        assert notifier.watchdog()
        assert supervisor.receive() == ["WATCHDOG=1"]
    finally:
        supervisor.sock.close()
        notifier.close()


@pytest.mark.parametrize(("env", "pid", "expected"), [
    ({}, None, None),
    ({"WATCHDOG_USEC": "10000000"}, None, 5.0),
    ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "4242"}, 4242, 1.5),
    ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "4242"}, 4243, None),
    ({"WATCHDOG_USEC": "0"}, None, None),
    ({"WATCHDOG_USEC": "-5"}, None, None),
    ({"WATCHDOG_USEC": "abc"}, None, None),
    ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "x"}, None, None),
    ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": ""}, None, 0.5),
])
def test_watchdog_interval(env: dict[str, str], pid: int | None,
                           expected: float | None) -> None:
    assert watchdog_interval(env, pid) == expected


def test_watchdog_interval_defaults_to_our_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 1.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval() is None


@pytest.mark.integration
async def test_watchdog_loop_pings_from_the_loop(path_supervisor: Supervisor) -> None:
    notifier = Notifier(path_supervisor.text)
    task = asyncio.create_task(watchdog_loop(notifier, 0.01))
    try:
        for _ in range(3):
            message = await asyncio.to_thread(path_supervisor.receive)
            assert message == ["WATCHDOG=1"]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        notifier.close()


@pytest.mark.integration
async def test_watchdog_loop_skips_pings_while_unhealthy(path_supervisor: Supervisor) -> None:
    notifier = Notifier(path_supervisor.text)
    healthy = asyncio.Event()
    asked = 0

    def check() -> bool:
        nonlocal asked
        asked += 1
        if asked >= 3:
            healthy.set()
        return asked >= 3

    task = asyncio.create_task(watchdog_loop(notifier, 0.01, healthy=check))
    try:
        await asyncio.wait_for(healthy.wait(), TIMEOUT)
        assert await asyncio.to_thread(path_supervisor.receive) == ["WATCHDOG=1"]
        assert asked >= 3  # the first two checks sent nothing before it
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        notifier.close()


async def test_watchdog_loop_reports_failures(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "absent.sock"))
    failed = asyncio.Event()
    task = asyncio.create_task(watchdog_loop(notifier, 0.01, on_failure=failed.set))
    try:
        await asyncio.wait_for(failed.wait(), TIMEOUT)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_watchdog_loop_returns_when_disabled() -> None:
    await asyncio.wait_for(watchdog_loop(Notifier(""), 0.01), TIMEOUT)
    await asyncio.wait_for(watchdog_loop(Notifier("/x"), 0), TIMEOUT)


@pytest.mark.integration
def test_a_wedged_loop_stops_the_pings(path_supervisor: Supervisor) -> None:
    """The point of pinging from the loop: a blocked loop sends nothing."""
    notifier = Notifier(path_supervisor.text)

    async def main() -> None:
        task = asyncio.create_task(watchdog_loop(notifier, 0.001))
        await asyncio.sleep(0)  # first ping
        assert await asyncio.to_thread(path_supervisor.receive) == ["WATCHDOG=1"]
        while not path_supervisor.nothing_pending():  # drain
            pass
        time.sleep(0.05)  # noqa: ASYNC251  (deliberate: this wedges the loop)
        assert path_supervisor.nothing_pending()
        task.cancel()

    asyncio.run(main())
    notifier.close()
