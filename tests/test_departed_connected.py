"""A discovered domain that departs while the broker's connection to it is still open,
with real processes (the broker with socket discovery, QEMU-like unix sockets, a real
SQLite spool): what the broker had queued for the old channel and not written is
spooled once, in its place, for the domain's next channel; nothing is lost, nothing is
delivered twice out of order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.broker_process import BrokerSystem
from tests.support.peers import QemuSocket
from tests.support.spool_system import (
    appear,
    domain_stats,
    frame,
    leave,
    spool_system,
    system_with_discovery,
)
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


def seqs(raw: bytes, source: str = "vm-a") -> list[int]:
    """The ``i`` of each whole test notification from ``source`` in ``raw``, in order."""
    out = []
    for line in raw.split(b"\n"):
        try:
            m = json.loads(line)
        except ValueError:
            continue  # a frame cut by the kernel, or the empty tail
        if m.get("source") == source and m["payload"].get("categorie") == "test":
            out.append(m["payload"]["data"]["i"])
    return out


def drain(peer: QemuSocket) -> bytes:
    """Everything the broker's aborted connection left in ``peer``'s socket."""
    got = bytearray()
    assert peer.conn is not None
    peer.conn.setblocking(True)
    peer.conn.settimeout(2.0)
    try:
        while chunk := peer.conn.recv(1 << 16):
            got += chunk
    except OSError:
        pass  # reset by the abort, or nothing more
    return bytes(got)


def sentinel(s: BrokerSystem, peer: QemuSocket) -> None:
    s.domus["vm-a"].send({"type": "notification", "source": "vm-a", "destination": "vm-d",
                          "payload": {"categorie": "sentinelle", "evenement": "fin"}})
    wait_until(lambda: (peer.pump(), b"sentinelle" in peer.raw)[1], 20, what="the sentinel")


def test_a_socket_that_moves_keeps_what_was_queued_for_the_old_channel(
        tmp_path: Path) -> None:
    # vm-d connected, not reading; 1500 notifications queued for it. Its socket moves
    # (a new file in another watched directory, then the old one removed): the rescan
    # departs it and adds the new endpoint in the same call, the old connection open.
    n = 1500
    r1, r2 = tmp_path / "r1", tmp_path / "r2"
    r1.mkdir()
    r2.mkdir()
    s = spool_system(tmp_path, ("vm-a",), spool_file=tmp_path / "state" / "spool.sqlite3",
                     extra=(f'[decouverte]\nmotifs = ["{r1}/*-msg.sock", "{r2}/*-msg.sock"]\n'
                            'intervalle = 0.1\n'))
    try:
        d = QemuSocket(r1 / "vm-d-msg.sock")
        d.accept()
        s.broker.wait_event("domain.connected", domain="vm-d")
        s.domus["vm-a"].write(b"".join(frame("vm-a", "vm-d", i) for i in range(n)))
        wait_until(lambda: (domain_stats(s, "vm-d") or {}).get("envoyes") == n, 20,
                   what="all queued for vm-d")
        d2 = QemuSocket(r2 / "vm-d-msg.sock")
        (r1 / "vm-d-msg.sock").unlink()
        d2.accept()
        s.broker.wait_event("domain.returned", domain="vm-d")
        first = seqs(drain(d))  # what the kernel had taken: the domain's
        sentinel(s, d2)
        second = seqs(bytes(d2.raw))
        recovered = sum(e["messages"] for e in s.broker.find("spool.recovered", domain="vm-d"))
        print("old channel", len(first), "new channel", len(second), "recovered", recovered)
        # Each once, in order: the old channel's head, the new channel the rest.
        assert first == list(range(len(first)))
        assert second == list(range(len(first), n)) or second == list(range(len(first) - 1, n))
        assert recovered >= len(second) > 0
        assert domain_stats(s, "vm-d")["spool"]["messages"] == 0  # type: ignore[index]
        d2.close()
    finally:
        s.close()


def test_a_domain_departing_during_its_replay_gets_each_row_once_in_order(
        tmp_path: Path) -> None:
    # vm-d departs, 2000 notifications are spooled, it comes back and does not read:
    # its replay stalls with rows in the transport's buffer. Its socket file is then
    # removed with the connection open. A new listener on the path reads everything.
    n = 2000
    s = system_with_discovery(tmp_path)
    try:
        d = appear(s, "vm-d")
        leave(s, d, "vm-d")
        s.domus["vm-a"].write(b"".join(frame("vm-a", "vm-d", i) for i in range(n)))
        wait_until(lambda: (domain_stats(s, "vm-d") or {})["spool"]["messages"] == n, 20,
                   what="all spooled")
        d2 = appear(s, "vm-d", count=2)  # does not read
        seen: list[int] = []

        def stalled() -> bool:  # the replay stopped on the full channel
            seen.append((domain_stats(s, "vm-d") or {})["spool"]["rejoues"])
            return len(seen) >= 3 and seen[-1] > 0 and seen[-1] == seen[-2] == seen[-3]
        wait_until(stalled, 20, what="the replay stalled")
        d2.path.unlink()
        s.broker.wait_event("domain.departed", domain="vm-d", count=2)
        first = seqs(drain(d2))
        d2.drop()
        d2.server.close()
        d3 = QemuSocket(d2.path)
        d3.accept()
        sentinel(s, d3)
        second = seqs(bytes(d3.raw))
        print("old channel", len(first), "new channel", len(second),
              "replayed before the departure", seen[-1])
        assert first == list(range(len(first)))
        # Replayed again from the first row not known to be out (the one the kernel
        # cut, at most, again): each row once, in order, nothing spooled twice.
        assert second and second == list(range(second[0], n))
        assert len(first) - 1 <= second[0] <= len(first)
        assert domain_stats(s, "vm-d")["spool"]["messages"] == 0  # type: ignore[index]
        d3.close()
    finally:
        s.close()
