"""Slow readers told from mute ones, in process (transports that buffer what the peer
does not read): a broadcaster is never held by a recipient that reads nothing, a slow
reader keeps every broadcast, the memory budget cuts the mute first, a lost channel's
remainder is routed over later turns within the rate budget, and the trace tells why
each message was dropped."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from structlog.testing import capture_logs

from broker import endpoint
from broker.endpoint import HARD_LIMIT_FACTOR, MAX_FRAMES_PER_TURN, DomainEndpoint
from broker.trace import Monitor, Subscription, Tracer
from messagerie import TOUS, Notification, encode
from tests.test_broker_core import FakeTransport, Setup, wait_for


class Buffering(FakeTransport):
    """A transport whose peer reads only what :meth:`read` says: what is written stays
    buffered, and flow control is reported to the protocol as asyncio does."""

    def __init__(self, protocol: DomainEndpoint | None) -> None:
        super().__init__()
        self.protocol: Any = protocol
        self.paused = False
        self.high = self.low = 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        super().set_write_buffer_limits(high, low)
        self.high, self.low = high or 0, low or 0

    def write(self, data: bytes) -> None:
        super().write(data)
        self.buffered += len(data)
        if not self.paused and self.buffered > self.high:
            self.paused = True
            self.protocol.pause_writing()

    def read(self, n: int) -> None:
        self.buffered = max(0, self.buffered - n)
        if self.paused and self.buffered <= self.low:
            self.paused = False
            self.protocol.resume_writing()


def buffering(s: Setup, name: str) -> Buffering:
    t = Buffering(s.eps[name])
    s.eps[name].connection_made(t)  # type: ignore[arg-type]
    s.t[name] = t
    return t


def shout(i: int, size: int = 1000) -> Notification:
    return Notification("vm-a", TOUS, "entree", "souris", {"i": i, "pad": "p" * size})


def numbers(s: Setup, name: str) -> list[int]:
    return [m.data["i"] for m in s.out(name)]  # type: ignore[union-attr]


# -- a broadcaster and a recipient that never reads ---------------------------------

async def test_a_broadcaster_is_never_held_by_a_recipient_that_reads_nothing() -> None:
    s = Setup("vm-a", "vm-b", "vm-mute", queue_bytes=64 * 1024, stall_timeout=60)
    a, mute = s.eps["vm-a"], s.eps["vm-mute"]
    buffering(s, "vm-mute")  # never read
    sent = 0
    for _ in range(6):  # 48 KiB of broadcasts, 8 a read: vm-mute fills up at once
        s.send(a, *[shout(sent + k) for k in range(8)])
        sent += 8
    assert mute.paused_writing and not mute.stalled  # full, and a minute from stalling
    assert s.t["vm-a"].calls == []  # vm-a was not held: it goes on for everyone
    assert numbers(s, "vm-b") == list(range(sent))
    # Not judged yet (full for less than a progress window): nothing dropped, within
    # its overflow.
    assert mute.stats.dropped == 0 and len(s.out("vm-mute")) == sent
    await wait_for(mute.mute)  # a progress window without a byte taken: mute
    with capture_logs() as logs:
        for _ in range(40):
            s.send(a, *[shout(sent + k) for k in range(8)])
            sent += 8
    assert s.t["vm-a"].calls == []
    assert numbers(s, "vm-b") == list(range(48, sent))  # vm-b still gets every one
    assert mute.stats.dropped > 200  # past its overflow: dropped for vm-mute alone
    assert len(s.out("vm-mute")) + mute.stats.dropped == 320
    assert mute.queued() <= 64 * 1024 + 8 * 1100
    drops = [e for e in logs if e["event"] == "message.dropped"]
    assert [e["why"] for e in drops] == ["not_reading"]  # once for the burst


async def test_a_burst_past_the_overflow_before_judging_holds_until_judged() -> None:
    # A broadcaster faster than file_octets in the first window: held, but only until
    # the recipient is judged (a window), not until it stalls (a minute here).
    s = Setup("vm-a", "vm-b", "vm-mute", queue_bytes=64 * 1024, stall_timeout=60)
    a, mute = s.eps["vm-a"], s.eps["vm-mute"]
    buffering(s, "vm-mute")
    for i in range(12):  # 96 KiB at once
        s.send(a, *[shout(8 * i + k) for k in range(8)])
    assert s.t["vm-a"].calls == ["pause"] and mute.progress() is None
    await wait_for(lambda: s.t["vm-a"].calls == ["pause", "resume"])
    assert mute.mute() and not mute.stalled
    assert mute.stats.dropped == 0  # what it had read meanwhile still fitted
    s.send(a, *[shout(96 + k) for k in range(8)])
    assert s.t["vm-a"].calls == ["pause", "resume"]  # not held again
    assert mute.stats.dropped == 8


async def test_a_slow_reader_keeps_every_broadcast_and_holds_the_broadcaster() -> None:
    s = Setup("vm-a", "vm-b", "vm-slow", queue_bytes=64 * 1024, stall_timeout=60)
    a, slow = s.eps["vm-a"], s.eps["vm-slow"]
    reader = buffering(s, "vm-slow")
    n, sent, held = 2000, 0, 0
    while sent < n:
        if not a._held_by:  # a held sender is not read: nothing comes from it
            s.send(a, *[shout(sent + k) for k in range(min(8, n - sent))])
            sent += min(8, n - sent)
        else:
            held += 1
        reader.read(2 * 1024)  # reads, at a quarter of what vm-a sends
        await asyncio.sleep(0)
    reader.read(1 << 30)
    s.flush()
    assert numbers(s, "vm-slow") == list(range(n))  # every one, in order
    assert numbers(s, "vm-b") == list(range(n))
    assert slow.stats.dropped == 0
    assert held > 0  # back-pressure from the slow reader, not drops


async def test_a_mute_and_a_slow_recipient_of_the_same_broadcasts() -> None:
    # The broadcaster is held by the one that reads, never by the one that does not;
    # the slow reader loses nothing, the mute one only what exceeds its overflow.
    s = Setup("vm-a", "vm-b", "vm-slow", "vm-mute", queue_bytes=64 * 1024,
              stall_timeout=60)
    a, slow, mute = s.eps["vm-a"], s.eps["vm-slow"], s.eps["vm-mute"]
    reader = buffering(s, "vm-slow")
    buffering(s, "vm-mute")
    n, sent = 3000, 0
    while sent < n:
        if not a._held_by:
            s.send(a, *[shout(sent + k) for k in range(min(8, n - sent))])
            sent += min(8, n - sent)
        # Held by vm-mute at most until it is judged (the first burst here is faster
        # than its overflow): never once it is known to read nothing.
        assert mute not in a._held_by or mute._progress is None
        reader.read(3 * 1024)
        await asyncio.sleep(0.001)  # the progress windows pass
    reader.read(1 << 30)
    s.flush()
    assert numbers(s, "vm-slow") == list(range(n)) and slow.stats.dropped == 0
    assert numbers(s, "vm-b") == list(range(n))
    assert mute.stats.dropped > 0
    assert len(s.out("vm-mute")) + mute.stats.dropped == n
    assert mute.queued() == 0 or mute.queued() <= HARD_LIMIT_FACTOR * 64 * 1024


# -- the memory budget's order --------------------------------------------------------

async def test_the_memory_budget_cuts_the_mute_before_the_slow_reader() -> None:
    s = Setup("vm-a", "vm-slow", "vm-mute", "vm-x", queues_memory=256 * 1024,
              queue_bytes=1 << 20, stall_timeout=60)
    s.broker.memory.resize(4)  # 64 KiB each
    a, slow, mute = s.eps["vm-a"], s.eps["vm-slow"], s.eps["vm-mute"]
    reader, silent = buffering(s, "vm-slow"), buffering(s, "vm-mute")
    for ep in (slow, mute):
        ep.send(b"p" * 100 * 1024 + b"\n")  # 100 KiB each: past their share
        ep.flush()
        s.t[ep.name].take()
    assert reader.paused and silent.paused
    await wait_for(mute.mute)
    # vm-slow takes some (64 bytes a millisecond): it reads, slowly.
    await wait_for(lambda: (reader.read(64), slow.progress())[1] is True)

    def one(to: str, i: int) -> None:
        s.send(a, Notification("vm-a", to, "entree", "souris", {"i": i, "pad": "p" * 900}))

    # 200 KiB in all: past three quarters of the budget, under the whole of it. The
    # one that reads nothing takes no more; the slow reader is not touched.
    one("vm-mute", 0)
    one("vm-slow", 0)
    assert mute.stats.dropped == 1 and mute.drop_why == "memory_budget"
    assert slow.stats.dropped == 0 and numbers(s, "vm-slow") == [0]
    def fill_to(total: int) -> None:  # a fourth queue makes up the rest
        others = sum(ep.queued() for name, ep in s.eps.items() if name != "vm-x")
        s.t["vm-x"].buffered = total - others

    # Past the whole budget, a queue past its share is cut whoever it is.
    fill_to(264 * 1024)
    await wait_for(lambda: s.broker.memory.total() > 256 * 1024)
    reader.read(1)
    one("vm-slow", 1)
    assert slow.stats.dropped == 1 and slow.drop_why == "memory_budget"
    # Back under the whole budget (past three quarters): the slow reader takes more
    # again ...
    fill_to(232 * 1024)
    await wait_for(lambda: s.broker.memory.total() < 240 * 1024)
    reader.read(1)
    one("vm-slow", 2)
    assert slow.stats.dropped == 1
    # ... unless it holds more than twice its share (now 32 KiB: 8 endpoints), which
    # is cut at three quarters of the budget even while it reads.
    s.broker.memory.resize(8)
    reader.read(1)
    one("vm-slow", 3)
    assert slow.stats.dropped == 2
    assert numbers(s, "vm-slow") == [2]


async def test_a_slow_reader_keeps_its_broadcasts_while_mute_ones_fill_the_budget() -> None:
    # Eight recipients that read nothing and one slow reader share a budget the
    # broadcasts would exceed: the mute ones are cut at three quarters of it, so the
    # slow reader (held back by, not dropped) gets every broadcast.
    mutes = [f"vm-m{i}" for i in range(8)]
    s = Setup("vm-a", "vm-slow", *mutes, queues_memory=512 * 1024,
              queue_bytes=1 << 20, stall_timeout=60)
    s.broker.memory.resize(10)  # 51 KiB each
    a, slow = s.eps["vm-a"], s.eps["vm-slow"]
    reader = buffering(s, "vm-slow")
    for name in mutes:
        buffering(s, name)
    n, sent = 1500, 32
    s.send(a, *[shout(k) for k in range(sent)])  # all of them full (32 KiB each)
    # They have been full for a while: the mute ones took nothing, vm-slow reads.
    await wait_for(lambda: (reader.read(16), slow.progress())[1] is True
                   and all([s.eps[m].mute() for m in mutes]))
    steps = 0
    while sent < n:
        steps += 1
        assert steps < 20_000, "the broadcaster was held for good"
        if not a._held_by:
            s.send(a, *[shout(sent + k) for k in range(min(8, n - sent))])
            sent += min(8, n - sent)
        assert not any(s.eps[m] in a._held_by for m in mutes)
        reader.read(4 * 1024)
        await asyncio.sleep(0.0005)
    reader.read(1 << 30)
    s.flush()
    assert numbers(s, "vm-slow") == list(range(n)) and slow.stats.dropped == 0
    mute_bytes = sum(s.eps[m].queued() for m in mutes)
    assert mute_bytes <= 512 * 1024  # the budget held
    assert all(s.eps[m].stats.dropped > 0 for m in mutes)


# -- a lost channel's remainder -------------------------------------------------------

def moves(n: int, source: str = "vm-h", dest: str = "vm-b") -> bytes:
    return b"".join(encode(Notification(source, dest, "entree", "souris", {"i": i}))
                    for i in range(n))


async def test_an_honest_remainder_is_routed_over_later_turns(
        monkeypatch: pytest.MonkeyPatch) -> None:
    s = Setup("vm-h", "vm-b")
    h = s.eps["vm-h"]
    n = 4 * MAX_FRAMES_PER_TURN + 10  # within its burst (5 000), past one turn
    monkeypatch.setattr(endpoint, "read_remaining", lambda transport: moves(n))
    with capture_logs() as logs:
        h.connection_lost(OSError(32, "EPIPE"))
        s.flush()
        got = numbers(s, "vm-b")
        assert got == []  # nothing in connection_lost itself
        turns = 0
        while len(got) < n:
            await asyncio.sleep(0)
            turns += 1
            s.flush()
            batch = numbers(s, "vm-b")
            assert len(batch) <= MAX_FRAMES_PER_TURN  # one turn's worth at a time
            got += batch
    assert got == list(range(n))  # every one, in order
    assert turns >= 5
    assert h.stats.throttled == 0
    assert [e for e in logs if e["event"] == "frames.dropped"] == []


async def test_a_hostile_remainder_stays_within_the_rate_budget(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The review's case: 2 000 broadcasts read at close, 100/s and a burst of 10.
    s = Setup("vm-h", "vm-b", "vm-c", rate=100, burst=10)
    h = s.eps["vm-h"]
    frames = b"".join(encode(Notification("vm-h", TOUS, "entree", "souris", {"i": i}))
                      for i in range(2000))
    monkeypatch.setattr(endpoint, "read_remaining", lambda transport: frames)
    loop = asyncio.get_running_loop()
    with capture_logs() as logs:
        start = loop.time()
        h.connection_lost(OSError(32, "EPIPE"))
        got: list[int] = []
        while len(got) < 20:
            await asyncio.sleep(0.01)
            s.flush()
            got += numbers(s, "vm-b")
            # Its burst, then at least two deliveries (vm-b, vm-c) per token refilled:
            # the budget's share only.
            assert len(got) <= 10 + 100 * (loop.time() - start) / 2
    assert got == list(range(len(got)))
    # What it may keep: one turn's worth (its burst is smaller); the rest is counted.
    assert [e["frames"] for e in logs if e["event"] == "frames.dropped"] == [
        2000 - MAX_FRAMES_PER_TURN]
    assert h.stats.throttled >= 2000 - MAX_FRAMES_PER_TURN


async def test_a_junk_remainder_is_bounded_in_frames(
        monkeypatch: pytest.MonkeyPatch) -> None:
    s = Setup("vm-h", "vm-b")
    h = s.eps["vm-h"]
    monkeypatch.setattr(endpoint, "read_remaining", lambda transport: b"x\n" * 128 * 1024)
    with capture_logs():
        h.connection_lost(OSError(32, "EPIPE"))
        await asyncio.sleep(0)
        assert h.stats.invalid == MAX_FRAMES_PER_TURN  # one turn
        burst = int(h.bucket.burst)
        assert h.stats.throttled == 128 * 1024 - burst  # kept: its burst's worth
        await wait_for(lambda: h.stats.invalid == burst)


async def test_a_reconnected_channel_is_read_after_the_last_one_s_remainder(
        monkeypatch: pytest.MonkeyPatch) -> None:
    s = Setup("vm-h", "vm-b")
    h = s.eps["vm-h"]
    n = 3 * MAX_FRAMES_PER_TURN
    monkeypatch.setattr(endpoint, "read_remaining", lambda transport: moves(n))
    h.connection_lost(OSError(32, "EPIPE"))
    again = FakeTransport()
    h.connection_made(again)  # type: ignore[arg-type]
    assert again.calls == ["pause"]  # not read until the remainder is through
    await wait_for(lambda: again.calls == ["pause", "resume"])
    h.data_received(moves(1, dest="vm-b").replace(b'"i":0', b'"i":-1'))
    s.flush()
    assert numbers(s, "vm-b") == [*range(n), -1]


# -- why each drop happened, as the trace tells it ----------------------------------

class _Collect:
    """A trace monitor's transport: every event written, decoded."""

    def __init__(self) -> None:
        self.events: list[dict[str, object]] = []

    def write(self, data: bytes) -> None:
        self.events.extend(json.loads(line) for line in data.splitlines())

    def is_closing(self) -> bool:
        return False


def watch_drops(s: Setup) -> _Collect:
    """A monitor of ``s``'s broker subscribed to its drops."""
    tracer = Tracer(s.broker)
    monitor = Monitor(tracer)
    monitor.transport = collect = _Collect()  # type: ignore[assignment]
    monitor.subscription = Subscription(verdict="dropped")
    tracer.add(monitor)
    return collect


def reasons(collect: _Collect) -> list[tuple[object, object]]:
    return [(e["why"], e["targets"]) for e in collect.events if e["verdict"] == "dropped"]


async def test_the_trace_tells_why_each_message_was_dropped() -> None:
    # Past a stalled queue's bound: queue_full.
    s = Setup("vm-a", "vm-b", queue_bytes=8 * 1024, stall_timeout=0.02)
    drops = watch_drops(s)
    a, b = s.eps["vm-a"], s.eps["vm-b"]
    b.pause_writing()
    s.send(a, *[shout(i, 100) for i in range(2)])  # held, then released at the stall
    await wait_for(lambda: b.stalled)
    s.t["vm-b"].buffered = 8 * 1024
    with capture_logs() as logs:
        s.send(a, Notification("vm-a", "vm-b", "entree", "souris", {"i": 0}))
    assert reasons(drops) == [("queue_full", ["vm-b"])]
    assert [e["why"] for e in logs if e["event"] == "message.dropped"] == ["queue_full"]

    # A broadcast past a mute recipient's overflow: not_reading (mute after
    # delai_blocage, when shorter than MUTE_AFTER: stalled too, which changes nothing).
    s = Setup("vm-a", "vm-b", "vm-mute", queue_bytes=64 * 1024, stall_timeout=0.25)
    drops = watch_drops(s)
    a, mute = s.eps["vm-a"], s.eps["vm-mute"]
    buffering(s, "vm-mute")
    s.send(a, *[shout(k) for k in range(48)])
    await wait_for(mute.mute)
    s.send(a, *[shout(k) for k in range(80)])
    assert mute.stats.dropped > 0
    assert reasons(drops) == [("not_reading", ["vm-mute"])] * mute.stats.dropped

    # Past the memory budget, a mute queue past its share: memory_budget.
    s = Setup("vm-a", "vm-mute", "vm-x", "vm-y", queues_memory=256 * 1024,
              queue_bytes=1 << 20, stall_timeout=0.25)
    s.broker.memory.resize(4)  # 64 KiB each
    drops = watch_drops(s)
    a, mute = s.eps["vm-a"], s.eps["vm-mute"]
    buffering(s, "vm-mute")
    mute.send(b"p" * 100 * 1024 + b"\n")
    mute.flush()
    s.t["vm-y"].buffered = 100 * 1024
    await wait_for(mute.mute)
    s.send(a, Notification("vm-a", "vm-mute", "entree", "souris", {"pad": "p" * 900}))
    assert reasons(drops) == [("memory_budget", ["vm-mute"])]

    # Its channel gone after the route was decided (cached): offline, counted.
    s = Setup("vm-a", "vm-b")
    drops = watch_drops(s)
    a, b = s.eps["vm-a"], s.eps["vm-b"]
    s.send(a, Notification("vm-a", "vm-b", "entree", "souris", {"i": 0}))
    assert len(s.out("vm-b")) == 1
    b.transport = None  # gone, the broker not told yet
    with capture_logs() as logs:
        s.send(a, Notification("vm-a", "vm-b", "entree", "souris", {"i": 1}))
    assert reasons(drops) == [("offline", ["vm-b"])]
    assert [e["why"] for e in logs if e["event"] == "message.dropped"] == ["offline"]
    assert b.stats.dropped == 1
