"""The spool with real processes: the broker as users start it, domains on socat ptys
that are killed and started again on the same paths, a real SQLite file."""

from __future__ import annotations

import json
import os
import select
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.broker_process import CLI, BrokerSystem
from tests.support.peers import Domu
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


class RawDomu(Domu):
    """A DomU end that also keeps the exact bytes it read."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.raw = bytearray()

    def pump(self, timeout: float = 0.05) -> None:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return
        try:
            data = os.read(self.fd, 1 << 16)
        except (BlockingIOError, OSError):
            return
        self.raw += data
        self.inbox.extend(self.decoder.feed(data))

    def lines_from(self, source: str) -> list[bytes]:
        """Every complete line read that comes from ``source``, as read."""
        marker = b'"source":"%s"' % source.encode()
        return [line + b"\n" for line in bytes(self.raw).split(b"\n")[:-1] if marker in line]


def frame(src: str, dst: str, i: int) -> bytes:
    # Sizes vary (a few bytes to ~1 KiB) so that frames cross write boundaries.
    body = {"type": "notification", "source": src, "destination": dst,
            "payload": {"categorie": "test", "evenement": "seq",
                        "data": {"i": i, "pad": "x" * (i * 37 % 1000)}}}
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


def status(system: BrokerSystem) -> dict[str, Any]:
    out = subprocess.run([str(CLI), "--path", str(system.dom0_socket), "status", "--json"],
                         capture_output=True, text=True, timeout=20, check=True).stdout
    stats: dict[str, Any] = json.loads(out)["statistiques"]
    return stats


def spooled(system: BrokerSystem, name: str) -> int:
    depth: int = status(system)["domaines"][name]["spool"]["messages"]
    return depth


def reconnect(system: BrokerSystem, name: str) -> RawDomu:
    """Start the domain's socat again on the same paths; its new DomU end."""
    system.pairs[name].start()
    domu = RawDomu(system.pairs[name].domu)
    system.domus[name] = domu  # closed by the fixture
    return domu


def down(system: BrokerSystem, name: str) -> None:
    """Kill the domain's socat (its channel hangs up) and wait until the broker saw it."""
    before = len(system.broker.find("domain.disconnected", domain=name))
    system.pairs[name].kill()
    wait_until(lambda: len(system.broker.find("domain.disconnected", domain=name)) > before,
               what=f"{name} disconnected")


@pytest.fixture
def system(tmp_path: Path) -> Iterator[BrokerSystem]:
    s = BrokerSystem(tmp_path, ("vm-a", "vm-b", "vm-c"), wait_connected=True,
                     extra=f'[spool]\nchemin = "{tmp_path / "state" / "spool.sqlite3"}"\n')
    yield s
    s.close()


def test_a_rebooted_domain_gets_what_was_sent_meanwhile_in_order(
        system: BrokerSystem) -> None:
    a = system.domus["vm-a"]
    down(system, "vm-b")
    sent = [frame("vm-a", "vm-b", i) for i in range(500)]
    a.write(b"".join(sent))
    wait_until(lambda: spooled(system, "vm-b") == 500, what="500 messages spooled")
    stats = status(system)
    assert stats["spool"]["etat"] == "disponible"
    assert stats["domaines"]["vm-b"]["spool"]["octets"] == sum(len(f) for f in sent)
    assert stats["domaines"]["vm-b"]["perdus"] == 0
    b = reconnect(system, "vm-b")
    wait_until(lambda: (b.pump(), len(b.lines_from("vm-a")) >= 500)[1], timeout=20,
               what="500 replayed", interval=0)
    assert b.lines_from("vm-a") == sent  # all, in order, byte for byte
    system.broker.wait_event("spool.replayed", domain="vm-b")
    wait_until(lambda: spooled(system, "vm-b") == 0, what="the spool emptied")
    # Live traffic flows again, after the replay.
    a.write(frame("vm-a", "vm-b", 1000))
    wait_until(lambda: (b.pump(), len(b.lines_from("vm-a")) > 500)[1], interval=0,
               what="live traffic after the replay")
    assert b.lines_from("vm-a")[500:] == [frame("vm-a", "vm-b", 1000)]


KERNEL_BUFFERS = 256 * 1024
"""More than a pty pair and socat can hold between the broker's write and the DomU's
read (the tty layer's buffers and socat's 8 KiB): what is lost when socat dies."""


def test_a_domain_killed_mid_flow_loses_only_what_the_kernel_held(
        system: BrokerSystem) -> None:
    """vm-b stops reading, so the broker's queue for it fills; its socat is killed with
    frames queued in the broker; then more are sent. What arrives is everything sent
    but the frames the kernel had taken (in the ptys' buffers and socat's) when socat
    died: gone with it, never known to the broker. Everything the broker still held
    went to the spool and arrives, in order, after what vm-b read before the kill."""
    a, b0 = system.domus["vm-a"], RawDomu(system.pairs["vm-b"].domu)
    system.domus["vm-b"].close()
    system.domus["vm-b"] = b0  # closed by the fixture
    sent = [frame("vm-a", "vm-b", i) for i in range(2000)]
    a.write(b"".join(sent[:1500]))
    wait_until(lambda: (b0.pump(), len(b0.lines_from("vm-a")) >= 100)[1], interval=0,
               what="vm-b reading")
    # vm-b stops reading: the rest piles up in the broker's queue for it.
    wait_until(lambda: status(system)["domaines"]["vm-b"]["file"] > 0,
               what="frames queued in the broker for vm-b")
    system.pairs["vm-b"].kill()
    for _ in range(3):
        b0.pump(0.05)  # what the pty still hands over after the hang-up
    before = b0.lines_from("vm-a")
    wait_until(lambda: system.broker.find("domain.disconnected", domain="vm-b"),
               what="vm-b disconnected")
    a.write(b"".join(sent[1500:]))
    b = reconnect(system, "vm-b")
    recovered = system.broker.wait_event("spool.recovered", domain="vm-b")
    assert recovered["messages"] > 0
    tail = sent[-1]
    wait_until(lambda: (b.pump(), tail in b.lines_from("vm-a"))[1], timeout=30,
               interval=0, what="the last frame")
    after = b.lines_from("vm-a")
    assert before == sent[:len(before)]
    gap_end = sent.index(after[0])
    assert after == sent[gap_end:], "after the kill: everything, in order, once"
    lost = sent[len(before):gap_end]
    assert sum(len(f) for f in lost) <= KERNEL_BUFFERS
    assert len(after) >= recovered["messages"] + 500
