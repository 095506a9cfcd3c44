"""A broadcaster, a slow reader and a domain that reads nothing, over real socat ptys
and the broker started as users start it: counted message by message."""

from __future__ import annotations

import os
import select
import threading
import time
from pathlib import Path

import pytest

from messagerie import FrameDecoder, Message
from tests.support.broker_process import BrokerSystem

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
        msgs = [m for m in b.wait_messages(n, timeout=45) if m.source == "vm-a"]
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
