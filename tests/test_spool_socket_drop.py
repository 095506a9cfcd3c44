"""A socket channel (QEMU ``connection=socket``, what the package's discovery binds)
drops while the broker's socket transport still buffers frames for it: those frames are
spooled and delivered when the domain is back, not lost and counted as sent."""
from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.support.peers import QemuSocket, is_sentinel, sentinel
from tests.support.spool_system import spool_system, status
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


def flux(n: int) -> dict[str, Any]:
    return {"type": "notification", "source": "vm-a", "destination": "vm-s",
            "payload": {"categorie": "flux", "evenement": "n",
                        "data": {"n": n, "pad": "x" * 200}}}


def test_a_socket_channel_that_drops_has_its_transport_buffer_spooled(
        tmp_path: Path) -> None:
    qemu = QemuSocket(tmp_path / "vm-s-msg.sock")
    system = spool_system(tmp_path, ("vm-a",), spool_file=tmp_path / "s.sqlite3",
                          paths={"vm-s": qemu.path}, wait_connected=False)
    try:
        qemu.accept()
        system.broker.wait_event("domain.connected", domain="vm-s")
        qemu.conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        a = system.domus["vm-a"]
        total = 4000  # 1.3 MB: the kernel takes a few hundred KB, vm-s reads nothing
        size = len(json.dumps(flux(0), separators=(",", ":"))) + 1
        for n in range(total):
            a.send(flux(n))
        a.send({"type": "commande", "source": "vm-a", "destination": "dom0",
                "payload": {"id": "apres", "commande": "ping", "arguments": {}}})
        wait_until(lambda: [m for m in a.wait_messages(0) if m.id == "apres"],
                   what="the ping after the flow answered")
        before = status(system)["domaines"]["vm-s"]
        qemu.drop()  # the domain goes away (QEMU exits, the domain reboots)
        system.broker.wait_event("domain.disconnected", domain="vm-s")
        (recovered,) = system.broker.find("spool.recovered")
        qemu.accept()
        system.broker.wait_event("domain.connected", domain="vm-s", count=2)
        a.send(sentinel("vm-a", "vm-s"))
        wait_until(lambda: (qemu.pump(), any(is_sentinel(m) for m in qemu.messages()))[1],
                   timeout=30, interval=0, what="the sentinel")
        got = [m.payload["data"]["n"] for m in qemu.messages() if not is_sentinel(m)]
        after = status(system)["domaines"]["vm-s"]
        dropped = before["perdus"]
        lost = total - dropped - len(got)  # taken by the kernel, lost with the channel
        print(f"sent {total} x {size} B: dropped (queue full) {dropped}, spooled and "
              f"delivered {len(got)}, in the kernel's buffers {lost} "
              f"({lost * size} B); envoyes {before['envoyes']} -> {after['envoyes']}")
        assert got == sorted(set(got))  # in order, once
        assert len(got) == recovered["messages"] > 1000
        assert lost * size < 600_000  # what the kernel's buffers can hold, at most
        # Those spooled back are counted as sent once (when replayed), the sentinel too.
        assert after["envoyes"] == before["envoyes"] + 1
    finally:
        system.close()
        qemu.close()
