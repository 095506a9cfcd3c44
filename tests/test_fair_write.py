"""A destination's queue handed to its transport in a fair order, in process: over a
transport that tells its protocol when it holds too much (as asyncio's and the broker's
tty transports do), the queue waits in the endpoint, one lane per sender, and an
honest message waits behind about one quantum of a flooder's bytes, not behind
everything the flooder queued before it."""

from __future__ import annotations

from typing import Any

from broker.endpoint import QUANTUM, WRITE_AHEAD, DomainEndpoint
from messagerie import Notification, decode, encode
from tests.test_broker_core import Setup
from tests.test_fair_queues import Buffering


class Paced(Buffering):
    """A :class:`~tests.test_fair_queues.Buffering` transport whose flow control goes to
    the protocol it was given (``set_protocol``, as the endpoint does), at the marks it
    was set. ``written``: the stream as handed to it."""

    def __init__(self) -> None:
        super().__init__(None)

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def read_all(self) -> None:
        while self.buffered:
            self.read(1024)


def paced(s: Setup, name: str) -> Paced:
    t = Paced()
    s.eps[name].connection_made(t)  # type: ignore[arg-type]
    s.t[name] = t
    return t


def move(source: str, i: int, pad: int = 200) -> Notification:
    return Notification(source, "vm-b", "entree", "souris", {"i": i, "pad": "p" * pad})


def flood(s: Setup, source: str, reads: int, per_read: int = 40, start: int = 0) -> int:
    """``reads`` reads of ``per_read`` moves from ``source`` to vm-b; the bytes."""
    total = 0
    for r in range(reads):
        data = b"".join(encode(move(source, start + r * per_read + k))
                        for k in range(per_read))
        total += len(data)
        s.send(s.eps[source], data)
    return total


async def test_an_honest_message_waits_behind_one_quantum_of_a_flood_not_all_of_it() -> None:
    s = Setup("vm-evil", "vm-a", "vm-b")
    t = paced(s, "vm-b")
    queued = flood(s, "vm-evil", 10)  # 135 KB, below vm-b's high-water mark: not full
    b = s.eps["vm-b"]
    assert not b.paused_writing and queued > 10 * WRITE_AHEAD
    # The transport was handed a few KiB (what it holds); the rest waits in the
    # endpoint.
    handed = len(t.written)
    assert handed <= WRITE_AHEAD + QUANTUM
    honest = encode(move("vm-a", 0, pad=10))
    s.send(s.eps["vm-a"], honest)
    t.read_all()
    stream = bytes(t.written)
    # Ahead of the honest message: what the transport held, then one quantum of the
    # flood at most (in arrival order: the whole flood, 135 KB).
    assert stream.index(honest) <= handed + QUANTUM
    # Everything arrived, each sender's frames in their order.
    got = [decode(line) for line in stream.splitlines()]
    evil = [m.data["i"] for m in got if m.source == "vm-evil"]  # type: ignore[attr-defined]
    assert evil == list(range(400))
    assert [m.source for m in got].count("vm-a") == 1
    assert b.queued() == 0


async def test_two_flooders_share_the_transport_by_bytes_each_in_its_order() -> None:
    s = Setup("vm-a", "vm-c", "vm-b")
    t = paced(s, "vm-b")
    flood(s, "vm-a", 4)
    flood(s, "vm-c", 4)  # queued after all of vm-a's
    t.read_all()
    got = [decode(line) for line in bytes(t.written).splitlines()]
    # In arrival order vm-c's first frame would come after all of vm-a's 160: here
    # it comes after a few KiB of them, and they alternate by quanta from then on.
    first_c = next(k for k, m in enumerate(got) if m.source == "vm-c")
    assert first_c * len(encode(move("vm-a", 0))) <= WRITE_AHEAD + 2 * QUANTUM
    half = got[:len(got) // 2]
    a_in_half = sum(m.source == "vm-a" for m in half)
    assert abs(a_in_half - len(half) / 2) <= 2 * QUANTUM / len(encode(move("vm-a", 0)))
    for source in ("vm-a", "vm-c"):
        assert [m.data["i"] for m in got  # type: ignore[attr-defined]
                if m.source == source] == list(range(160))


async def test_the_brokers_own_messages_end_where_position_says() -> None:
    """The spool's replay notes ``position()`` after each row it queues and deletes the
    row once the stream is out past it: the broker's own messages go first, so that
    position is exact whatever another sender has waiting."""
    s = Setup("vm-a", "vm-b")
    t = paced(s, "vm-b")
    b = s.eps["vm-b"]
    assert isinstance(b, DomainEndpoint)
    flood(s, "vm-a", 5)
    rows = [b"%s\n" % encode(move("vm-x", i)).rstrip(b"\n") for i in range(3)]
    ends = []
    for row in rows:
        assert b.send(row)
        ends.append(b.position())
    b.flush()
    t.read_all()
    stream = bytes(t.written)
    assert [stream.index(row) + len(row) for row in rows] == ends


async def test_a_paced_queue_still_fills_holds_its_flooder_and_drains() -> None:
    s = Setup("vm-evil", "vm-b", queue_bytes=64 * 1024, stall_timeout=60)
    t = paced(s, "vm-b")
    b = s.eps["vm-b"]
    flood(s, "vm-evil", 6)  # 81 KB: past the 16 KiB high-water mark, never read
    assert b.paused_writing  # full by its own count: most of it waits in the endpoint
    assert t.buffered <= WRITE_AHEAD + QUANTUM < b.queued()
    assert "pause" in s.t["vm-evil"].calls  # held: past its share
    t.read_all()
    assert not b.paused_writing and b.queued() == 0
    assert s.t["vm-evil"].calls[-1] == "resume"
    assert b.stats.dropped == 0 and len(t.written.splitlines()) == 240


async def test_closing_hands_the_transport_everything_queued() -> None:
    s = Setup("vm-a", "vm-b")
    t = paced(s, "vm-b")
    total = flood(s, "vm-a", 3)
    assert len(t.written) < total and t.paused  # most of it waits in the endpoint
    s.eps["vm-b"].close()  # the transport writes its buffer out, then closes
    assert len(t.written) == total
