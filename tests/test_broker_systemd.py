"""The broker speaks systemd's notify protocol: a real datagram socket stands in for
systemd's NOTIFY_SOCKET, the broker runs as the unit runs it."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest

from tests.support.broker_process import BrokerProcess, write_config
from tests.support.ptys import PtyPair
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.received: list[dict[str, str]] = []

    def wait_for(self, key: str, value: str | None = None, timeout: float = 10.0) -> dict[str, str]:
        def found() -> dict[str, str] | None:
            for datagram in self.received:
                if key in datagram and (value is None or datagram[key] == value):
                    return datagram
            self.receive(0.05)
            return None
        return wait_until(found, timeout, lambda: f"{key}={value} from the broker; "
                          f"got {self.received}", interval=0)

    def receive(self, timeout: float) -> None:
        """Add the next datagram to ``received``, if one comes within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return
        self.received.append(dict(line.split("=", 1)
                                  for line in data.decode().splitlines() if "=" in line))

    def close(self) -> None:
        self.sock.close()


def test_ready_watchdog_reload_and_stopping(tmp_path: Path) -> None:
    pair = PtyPair(tmp_path, "vm-a")
    notify = NotifySocket(tmp_path / "notify.sock")
    config = write_config(tmp_path / "b.toml", {"vm-a": pair.dom0,
                                                "vm-gone": tmp_path / "missing"})
    broker = BrokerProcess(config, env={"NOTIFY_SOCKET": str(notify.path),
                                        "WATCHDOG_USEC": "200000"})
    try:
        ready = notify.wait_for("READY", "1")
        # READY=1 only once the channels had their first attempt and the dom0 socket
        # listens: the broker logged both before.
        # (The log lines are read by another thread: they may arrive after the datagram.)
        broker.wait_event("domain.connected", domain="vm-a")
        broker.wait_event("domain.unavailable", domain="vm-gone")
        assert (tmp_path / "dom0.sock").exists()
        assert "1/2 domains connected" in ready["STATUS"]
        # The watchdog is pinged from the event loop, every WATCHDOG_USEC / 2.
        notify.received.clear()
        notify.wait_for("WATCHDOG", "1", timeout=2)
        notify.received.clear()
        notify.wait_for("WATCHDOG", "1", timeout=2)
        # SIGHUP: RELOADING=1 (with MONOTONIC_USEC), then READY=1 again.
        notify.received.clear()
        broker.signal(signal.SIGHUP)
        reloading = notify.wait_for("RELOADING", "1")
        assert int(reloading["MONOTONIC_USEC"]) > 0
        notify.wait_for("READY", "1")
        # SIGTERM: STOPPING=1 and exit 0.
        broker.signal(signal.SIGTERM)
        notify.wait_for("STOPPING", "1")
        assert broker.proc.wait(15) == 0  # one SIGTERM: stop() would send another
    finally:
        if broker.proc.poll() is None:
            broker.stop()
        notify.close()
        pair.kill()


def test_without_notify_socket_nothing_breaks(tmp_path: Path) -> None:
    pair = PtyPair(tmp_path, "vm-a")
    config = write_config(tmp_path / "b.toml", {"vm-a": pair.dom0})
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    broker = BrokerProcess(config, env=env)
    try:
        broker.wait_event("broker.ready")
    finally:
        assert broker.stop() == 0
        pair.kill()


def test_journald_lines_carry_their_priority(tmp_path: Path) -> None:
    pair = PtyPair(tmp_path, "vm-a")
    config = write_config(tmp_path / "b.toml", {"vm-a": pair.dom0,
                                                "vm-gone": tmp_path / "missing"})
    broker = BrokerProcess(config, env={"JOURNAL_STREAM": "8:12345"})
    try:
        broker.wait_line('"broker.ready"')
        lines = broker.tail(50)
        ready = next(line for line in lines if '"broker.ready"' in line)
        unavailable = next(line for line in lines if '"domain.unavailable"' in line)
        assert ready.startswith("<6>{")        # info
        assert unavailable.startswith("<4>{")  # warning: journalctl -p warning shows it
    finally:
        assert broker.stop() == 0
        pair.kill()
