"""A broadcaster, a slow reader and a domain or a dom0 service that reads nothing, over
real socat ptys and the broker started as users start it; a lost socket's last frames
and a removed domain's queue over real unix sockets: counted message by message."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import threading
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from broker.config import Limits
from broker.endpoint import MAX_FRAMES_PER_TURN
from messagerie import BlockingClient, Commande, FrameDecoder, Message, Notification, encode
from tests.support.broker_process import BrokerSystem
from tests.support.peers import is_sentinel
from tests.support.socket_endpoints import broker_with_domains, connect_over_socketpair
from tests.support.waiting import async_wait_until

pytestmark = pytest.mark.integration


def shout(i: int) -> bytes:
    return (b'{"type":"notification","source":"vm-a","destination":"tous","payload":'
            b'{"categorie":"entree","evenement":"souris","data":{"i":%d,'
            b'"position":{"x":%d,"y":7}}}}\n' % (i, i % 1024))


class SlowReader(threading.Thread):
    """Reads its pty in 2 KiB bites every 10 ms (about 200 KiB/s, a tenth of what the
    broadcaster sends): it always reads, slower than the burst."""

    def __init__(self, fd: int, n: int) -> None:
        super().__init__(daemon=True)
        self.fd, self.n = fd, n
        self.got: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        decoder = FrameDecoder(1 << 20)
        while not self.stop.is_set() and len(self.got) < self.n:
            ready, _, _ = select.select([self.fd], [], [], 0.05)
            if ready:
                try:
                    data = os.read(self.fd, 2048)
                except (BlockingIOError, OSError):
                    data = b""
                for m in decoder.feed(data):
                    if isinstance(m, Message) and m.source == "vm-a":
                        self.got.append(m.payload["data"]["i"])
            time.sleep(0.01)


@pytest.mark.slow
def test_a_mute_recipient_holds_no_broadcaster_and_a_slow_one_loses_nothing(
        tmp_path: Path) -> None:
    # delai_blocage = 60: a broadcaster held by vm-mute, even once, would be held for a
    # minute, and vm-b would wait with it (the wait below gives up after 45 s).
    s = BrokerSystem(tmp_path, ("vm-a", "vm-b", "vm-slow", "vm-mute"),
                     extra="[limites]\nfile_octets = 65536\ndelai_blocage = 60\n"
                           "debit = 1000000\nrafale = 1000000\n", wait_connected=True)
    n = 4000  # 460 KiB to each recipient
    slow = SlowReader(s.domus["vm-slow"].fd, n)
    try:
        a, b = s.domus["vm-a"], s.domus["vm-b"]
        s.domus["vm-mute"].close()  # vm-mute's side is never read again
        slow.start()
        burst = b"".join(shout(i) for i in range(n))
        writer = threading.Thread(target=a.write, args=(burst,), daemon=True)
        started = time.monotonic()
        writer.start()
        try:
            msgs = [m for m in b.wait_messages(n, timeout=45) if m.source == "vm-a"]
        except AssertionError as exc:  # say who held or dropped what
            raise AssertionError(f"{exc}; dropped: {s.broker.find('message.dropped')}; "
                                 f"stalled: {s.broker.find('domain.stalled')}") from None
        elapsed = time.monotonic() - started
        # vm-b's last message is the sentinel: vm-mute was never stalled before it.
        assert [m.payload["data"]["i"] for m in msgs] == list(range(n)), "lost or reordered"
        assert s.broker.find("domain.stalled") == []
        slow.join(60)
        assert slow.got == list(range(n)), "the slow reader lost or reordered some"
        writer.join(10)
        drops = s.broker.find("message.dropped", domain="vm-mute")
        assert [d["why"] for d in drops] == ["not_reading"]  # once for the burst
        assert s.broker.find("message.dropped", domain="vm-slow") == []
        assert s.broker.find("message.dropped", domain="vm-b") == []
        print(f"vm-b got {n} broadcasts in {elapsed:.2f} s; vm-slow all of them")
    finally:
        slow.stop.set()
        s.domus.pop("vm-mute")
        assert s.close() == 0


async def test_a_closed_socket_peer_s_frames_past_one_turn_are_all_routed(
        tmp_path: Path) -> None:
    """Real unix sockets: the peer writes 1 500 frames (three turns' worth, within its
    burst) and closes; the broker's write to it fails first (EPIPE). Every frame is
    still routed, in order, over the next turns; none is dropped."""
    broker = broker_with_domains(("vm-a", "vm-b"))
    eps = {}
    eps["vm-a"], theirs = await connect_over_socketpair(broker, "vm-a")
    eps["vm-b"], receiver = await connect_over_socketpair(broker, "vm-b")
    n = 3 * MAX_FRAMES_PER_TURN - 36
    theirs.sendall(b"".join(encode(Notification("vm-a", "vm-b", "fichier", "etat", {"n": i}))
                            for i in range(n)))
    theirs.close()
    assert eps["vm-a"].transport is not None
    eps["vm-a"].transport.write(b"anything\n")  # before the loop reads vm-a: EPIPE
    receiver.setblocking(False)
    decoder = FrameDecoder(1 << 20)
    got: list[int] = []

    def arrived() -> bool:
        with contextlib.suppress(BlockingIOError):
            got.extend(m.payload["data"]["n"] for m in decoder.feed(receiver.recv(1 << 16))
                       if isinstance(m, Message) and m.source == "vm-a")
        return len(got) >= n
    await async_wait_until(arrived, interval=0.005)
    assert got == list(range(n))
    assert eps["vm-a"].stats.throttled == 0 and eps["vm-a"].transport is None
    for ep in eps.values():
        ep.detach()
    receiver.close()


class Dom0Reader(threading.Thread):
    """A dom0 service on the broker's socket that reads slowly: 2 KiB every ``pause``
    seconds (at 10 ms about 200 KiB/s, a fifth of what the broadcaster sends); it keeps
    the broadcasts from ``source``, in order, until a sentinel."""

    def __init__(self, sock: socket.socket, source: str, pause: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.sock, self.source, self.pause = sock, source, pause
        self.got: list[int] = []
        self.done = threading.Event()

    def run(self) -> None:
        decoder = FrameDecoder(1 << 20)
        self.sock.settimeout(60)
        with contextlib.suppress(OSError):
            while not self.done.is_set():
                data = self.sock.recv(2048)
                if not data:
                    return
                time.sleep(self.pause)
                for m in decoder.feed(data):
                    if isinstance(m, Message) and m.source == self.source:
                        if m.payload["evenement"] == "sentinelle":
                            self.done.set()
                        else:
                            self.got.append(m.payload["data"]["i"])


def dom0_service(path: Path) -> socket.socket:
    """A dom0 service connected to the broker's socket: it asks ``ping`` and reads the
    answer (the broker serves it: it is connected, and gets every broadcast)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    sock.sendall(encode(Commande("dom0", "dom0", "ping", {}, id="p1")))
    decoder = FrameDecoder(1 << 20)
    sock.settimeout(10)
    while not any(isinstance(m, Message) and m.type == "reponse"
                  for m in decoder.feed(sock.recv(1 << 16))):
        pass
    return sock


@pytest.mark.slow
@pytest.mark.parametrize("pause", [0.01, 0.025])
def test_a_mute_dom0_service_holds_no_broadcaster(tmp_path: Path, pause: float) -> None:
    # A dom0 service that stops reading is a recipient like a domain: it holds no
    # broadcaster (a slow one does, and loses nothing: at 2 KiB every 25 ms, 80 KiB/s,
    # the socket is writable again only after more than a second, and the slow one
    # would seem mute if what the kernel holds for it were not counted). A
    # broadcaster the mute one held, even once, would be held for a minute, and vm-b
    # with it (the wait gives up at 45 s).
    s = BrokerSystem(tmp_path, ("vm-a", "vm-b"),
                     extra="[limites]\nfile_octets = 65536\ndelai_blocage = 60\n"
                           "debit = 1000000\nrafale = 1000000\n", wait_connected=True)
    n = 4000  # 460 KiB to each recipient: past what the kernel's socket buffer holds
    mute = dom0_service(s.dom0_socket)  # never read again
    slow = Dom0Reader(dom0_service(s.dom0_socket), "vm-a", pause)
    try:
        a, b = s.domus["vm-a"], s.domus["vm-b"]
        slow.start()
        s.broker.wait_event("dom0.service_connected", count=2)
        burst = b"".join(shout(i) for i in range(n))
        writer = threading.Thread(target=a.write, args=(burst + encode(Notification(
            "vm-a", "tous", "entree", "sentinelle")),), daemon=True)
        started = time.monotonic()
        writer.start()
        try:
            msgs = [m for m in b.until_sentinel(is_sentinel, timeout=45)
                    if m.source == "vm-a"]
        except AssertionError as exc:  # say who held or dropped what
            raise AssertionError(f"{exc}; dropped: {s.broker.find('message.dropped')}; "
                                 f"stalled: {s.broker.find('domain.stalled')}") from None
        elapsed = time.monotonic() - started
        assert [m.payload["data"]["i"] for m in msgs[:-1]] == list(range(n))
        assert slow.done.wait(30), f"the slow service got {len(slow.got)} of {n}"
        assert slow.got == list(range(n)), "the slow service lost or reordered some"
        writer.join(10)
        assert s.broker.find("domain.stalled") == []
        drops = s.broker.find("message.dropped", domain="dom0")
        assert [d["why"] for d in drops] == ["not_reading"]  # once for the burst
        assert s.broker.find("message.dropped", domain="vm-b") == []
        # Every copy for the two services is counted, queued (envoyes) or dropped
        # (perdus): the burst, its sentinel and the answer to ping, each.
        with BlockingClient("dom0", path=s.dom0_socket, reconnect=False) as c:
            stats = c.command("dom0", "statistiques").resultat["dom0"]
        assert stats["perdus"] >= 1
        assert stats["envoyes"] + stats["perdus"] == 2 * (n + 2), stats
        print(f"vm-b got {n} broadcasts in {elapsed:.2f} s, the slow service all of them; "
              f"{stats['perdus']} dropped for the mute service")
    finally:
        slow.done.set()
        mute.close()
        slow.sock.close()
        assert s.close() == 0


async def test_what_was_queued_for_a_removed_domain_is_counted_dropped(
        tmp_path: Path) -> None:
    """Real unix sockets: vm-b reads nothing; 3 000 notifications for it fill the
    kernel's socket buffer and part of its transport's. Removed, it loses what the
    kernel did not take: counted in its perdus and in ``domain.removed``, exactly the
    messages its end can no longer read."""
    names = ("vm-a", "vm-b")
    broker = broker_with_domains(names, Limits(rate=1e9, burst=10**9))
    loop = asyncio.get_running_loop()
    eps, far = {}, {}
    for name in names:
        # The sockets' buffers set, not the host's defaults (net.core.wmem_default,
        # 208 KiB here, more elsewhere): the kernel then takes about 256 KiB of vm-b's
        # queue on any host (whose wmem_max is at least the kernel's default, 208 KiB).
        eps[name], far[name] = await connect_over_socketpair(broker, name, buffer=128 * 1024)
    n = 3000  # 386 KiB: the transport keeps what the kernel does not take (130 KiB),
    # under its high-water mark (256 KiB): nothing held
    far["vm-a"].setblocking(False)
    await loop.sock_sendall(far["vm-a"], b"".join(
        encode(Notification("vm-a", "vm-b", "fichier", "etat", {"n": i})) for i in range(n)))
    b = eps["vm-b"]
    await async_wait_until(lambda: b.stats.sent == n and b.queued() > 0)
    assert not b.paused_writing  # nothing held, nothing dropped yet
    with capture_logs() as logs:
        broker.remove_domain("vm-b")
    far["vm-b"].setblocking(False)
    data = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := far["vm-b"].recv(1 << 16):
            data += chunk
    readable = [m for m in FrameDecoder(1 << 20).feed(data) if isinstance(m, Message)]
    assert [m.payload["data"]["n"] for m in readable] == list(range(len(readable)))
    assert 0 < len(readable) < n
    assert b.stats.dropped == n - len(readable)
    (removed,) = [e for e in logs if e["event"] == "domain.removed"]
    assert removed["dropped"] == n - len(readable)
    await async_wait_until(lambda: b.transport is None)  # lost: nothing counted twice
    assert b.stats.dropped == n - len(readable)
    print(f"{len(readable)} of {n} readable after the removal, {b.stats.dropped} dropped")
    eps["vm-a"].detach()
    for sock in far.values():
        sock.close()
