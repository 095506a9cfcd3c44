"""A domain that xenstore rebinds (released, then introduced again under the same name
with a new domid) while the broker's connection to its old channel is still open, with
real processes (the broker on a fake xenstored, QEMU-like unix sockets): what was
queued for the old channel and not written is spooled for the new one, not lost."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.support.broker_process import BrokerProcess
from tests.support.peers import QemuSocket
from tests.support.spool_system import status
from tests.support.waiting import wait_until
from tests.support.xenstored import FakeXenstored, introduce_socket_domain, socket_channel
from tests.test_departed_connected import drain, seqs
from tests.test_xenstore import broker_on_xenstore, ping, xenstored

pytestmark = pytest.mark.integration

__all__ = ["broker_on_xenstore", "xenstored"]  # fixtures


def test_a_rebind_keeps_what_was_queued_for_the_old_channel(
        tmp_path: Path, xenstored: FakeXenstored, broker_on_xenstore: BrokerProcess) -> None:
    n = 1500
    broker = broker_on_xenstore
    broker.wait_event("xenstore.connected")
    sender = introduce_socket_domain(xenstored, 2, "vm-s", tmp_path / "vm-s.sock")
    old = introduce_socket_domain(xenstored, 3, "vm-a", tmp_path / "vm-a-1.sock")
    broker.wait_event("domain.connected", domain="vm-a")
    assert sender.conn is not None
    sender.conn.setblocking(True)
    sender.conn.sendall(b"".join(json.dumps(
        {"type": "notification", "source": "vm-s", "destination": "vm-a",
         "payload": {"categorie": "test", "evenement": "seq",
                     "data": {"i": i, "pad": "x" * 300}}}).encode() + b"\n" for i in range(n)))
    sender.conn.setblocking(False)
    dom0 = SimpleNamespace(dom0_socket=tmp_path / "dom0.sock")

    def queued() -> Any:
        return status(dom0)["domaines"]["vm-a"]["envoyes"]  # type: ignore[arg-type]
    wait_until(lambda: queued() == n, 20, what="all queued for vm-a")  # vm-a does not read
    new = QemuSocket(tmp_path / "vm-a-2.sock")
    xenstored.remove_domain(3)  # back to back: the old channel is still open
    xenstored.add_domain(8, "vm-a", socket_channel(new.path))
    broker.wait_event("domain.bound", domain="vm-a", domid=8)
    new.accept(10)
    first = seqs(drain(old), "vm-s")
    assert ping(sender, "vm-s", "s2")["statut"] == "ok"
    sender.send({"type": "notification", "source": "vm-s", "destination": "vm-a",
                 "payload": {"categorie": "sentinelle", "evenement": "fin"}})
    wait_until(lambda: (new.pump(), b"sentinelle" in new.raw)[1], 20, what="the sentinel")
    second = seqs(bytes(new.raw), "vm-s")
    recovered = sum(e["messages"] for e in broker.find("spool.recovered", domain="vm-a"))
    print("old channel", len(first), "new channel", len(second), "recovered", recovered)
    assert first == list(range(len(first)))
    assert second == list(range(len(first), n)) or second == list(range(len(first) - 1, n))
    assert recovered >= len(second) > 0
    for peer in (sender, old, new):
        peer.close()
