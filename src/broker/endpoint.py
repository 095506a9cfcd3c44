"""Endpoints: one per channel the broker speaks on.

A :class:`Peer` is the asyncio protocol of one byte stream: it splits frames with the
sans-IO :class:`~messagerie.FrameDecoder`, hands every message or frame error to the
broker, and owns the outbound side with its bound and back-pressure.

Outbound policy, per destination (documented in docs/broker.md):

* below ``queue_bytes`` the bytes are queued in the transport;
* when the transport passes its high-water mark, the peers that sent to it stop being
  read (back-pressure: nothing is lost under a transient burst) until it drains;
* a destination that does not drain within ``stall_timeout`` is *stalled*: its
  senders are released (one slow reader never delays the others) and what does not
  fit in ``queue_bytes`` is dropped, counted and logged (``message.dropped``); a
  dropped ``commande`` is answered ``destination_saturee``.

A :class:`DomainEndpoint` is a :class:`Peer` that keeps its channel open: it connects,
and when the channel goes away (domain shutdown, pty hang-up, socket closed, EIO) it
retries with exponential backoff until the domain comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from messagerie import FrameDecoder
from messagerie.channel import READ_SIZE, ChannelError, channel_kind, open_channel
from messagerie.envelope import Envelope, Run

if TYPE_CHECKING:
    from .config import Limits
    from .core import Broker

THROTTLED_READ_SIZE = 4 * 1024
"""Bytes read per wake-up from a domain over its rate (see ``Peer.data_received``)."""
MAX_FRAMES_PER_TURN = 512
"""Frames of one channel processed per turn of the event loop: refusing 512 tiny junk
lines takes under 2 ms; a 64 KiB read of mouse moves (300 frames) is one turn. 256 gave
the same honest latency under a junk flood (bench_flood.py) and cost unix-socket bursts
a second turn per read."""
MIN_FRAME_BYTES = 2
"""The shortest frame that costs a rate token (``x`` and a newline)."""
MIN_HIGH_WATER = 16 * 1024
"""Back-pressure starts at a quarter of ``queue_bytes`` (at least this much)."""
HARD_LIMIT_FACTOR = 4
"""Even while its senders are held, a destination never queues more than this many
times ``queue_bytes`` (the senders' read chunks already in flight)."""


@dataclass(slots=True)
class Stats:
    received: int = 0
    """Messages read from this peer."""
    sent: int = 0
    """Messages written to this peer."""
    refused: int = 0
    """Messages from this peer the broker refused (spoofed, denied, unknown, ...)."""
    invalid: int = 0
    """Frames from this peer that did not decode."""
    dropped: int = 0
    """Messages for this peer dropped because its queue was full."""
    throttled: int = 0
    """Frames (messages and invalid ones) from this peer read late because it exceeded
    its rate."""

    def as_dict(self) -> dict[str, int]:
        return {"recus": self.received, "envoyes": self.sent, "refuses": self.refused,
                "invalides": self.invalid, "perdus": self.dropped, "limites": self.throttled}


class LogBudget:
    """At most ``per_second`` warnings a second from one peer; the rest are counted
    and reported with the next one, so a hostile domain cannot flood the journal."""

    __slots__ = ("_count", "_per_second", "_window", "suppressed")

    def __init__(self, per_second: int = 20) -> None:
        self._per_second = per_second
        self._window = 0.0
        self._count = 0
        self.suppressed = 0

    def allow(self) -> bool:
        now = time.monotonic()
        if now - self._window >= 1.0:
            self._window = now
            self._count = 0
        self._count += 1
        if self._count <= self._per_second:
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int:
        n, self.suppressed = self.suppressed, 0
        return n


class Peer(asyncio.Protocol):
    """One byte stream: a domain's channel or a dom0 service's connection."""

    kind = "peer"

    def __init__(self, broker: Broker, name: str) -> None:
        self.broker = broker
        self.name = name
        self.stats = Stats()
        self.transport: Any = None
        self.decoder = self._decoder()
        self.log_budget = LogBudget()
        self.journal_budget = LogBudget(per_second=50)
        """``journal`` messages a domain may have written to the broker's log."""
        self.log = structlog.get_logger("broker").bind(domain=name)
        self.queue_bytes = broker.config.limits.queue_bytes
        # Outbound back-pressure state.
        self.paused_writing = False
        self.stalled = False
        self._stall_timer: asyncio.TimerHandle | None = None
        self._waiters: set[Peer] = set()
        """Peers not being read because they sent to us while we were full."""
        self._held_by: set[Peer] = set()
        """Destinations we wait on; reading resumes when this is empty."""
        self._throttle_timer: asyncio.TimerHandle | None = None
        self._backlog: bytes | None = None
        """Bytes read but not yet processed (over MAX_FRAMES_PER_TURN in one read)."""
        # Rate limiting: a token bucket refilled per read.
        limits = broker.config.limits
        self.rate = limits.rate
        self.burst = float(limits.burst)
        self.tokens = self.burst
        self._last_refill = time.monotonic()
        self.in_flight = 0
        self._read_size = READ_SIZE
        self._out: list[bytes] = []
        self._out_size = 0
        self._loop = asyncio.get_event_loop()
        """Commands from this peer awaiting an answer."""

    def _decoder(self) -> FrameDecoder[Envelope | Run]:
        broker = self.broker
        return FrameDecoder[Envelope | Run](broker.config.max_frame, decode=broker.frame_decode,
                                           batch=broker.frame_batch)

    # -- asyncio.Protocol --------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self._loop = asyncio.get_running_loop()
        self.decoder = self._decoder()
        self._set_write_limits(transport)
        # asyncio's socket transports read 256 KiB per wake-up: cap them to the ttys'
        # 64 KiB, so that a flooding channel's turn in the loop is as short on a unix
        # socket (connection=socket) as on a pty (fairness); less while its rate
        # budget is low (see _budgeted_read_size).
        self._set_read_size(self._budgeted_read_size())
        self.paused_writing = False
        self.stalled = False

    def data_received(self, data: bytes) -> None:
        if self._backlog is not None:  # read meanwhile (reading is paused): keep the order
            self._backlog += data
            return
        self._take(data, first=True)

    def _take(self, data: bytes, *, first: bool) -> None:
        # At most MAX_FRAMES_PER_TURN frames now: 64 KiB of tiny junk lines is 30 000
        # frames to refuse, one long turn in the loop for everyone else. The rest waits
        # for the next iteration, the channel not being read meanwhile.
        if data.count(b"\n") > MAX_FRAMES_PER_TURN:
            rest = data.split(b"\n", MAX_FRAMES_PER_TURN)[-1]
            self._backlog = rest
            data = data[:len(data) - len(rest)]
            if first and self.transport is not None:
                self.transport.pause_reading()
            self._loop.call_soon(self._next_turn)
        self._process(data)

    def _next_turn(self) -> None:
        data, self._backlog = self._backlog, None
        if data is None or self.transport is None or self.transport.is_closing():
            return  # the channel went away meanwhile: what it had sent goes with it
        self._take(data, first=False)
        if self._backlog is None:
            self._resume()

    def _resume(self) -> None:
        """Read again, unless something else still holds the channel: a full destination,
        the rate limit, a backlog of frames, shutdown."""
        if (not self._held_by and self._throttle_timer is None and self._backlog is None
                and self.transport is not None and not self.broker.stopping
                and not self.transport.is_closing()):
            self.transport.resume_reading()

    def _process(self, data: bytes) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self._last_refill) * self.rate)
        self._last_refill = now
        broker = self.broker
        receive = broker.receive
        broker.receiving = True
        try:
            for item in self.decoder.feed(data):
                receive(self, item)
        finally:
            broker.receiving = False
            broker.flush()
        if self.tokens < 0 and self.transport is not None and self._throttle_timer is None:
            # Over its rate: stop reading this channel until the bucket refills. The
            # excess waits in the domain's own channel, costing us nothing. Until it is
            # back within its budget, it is read in small bites.
            self.transport.pause_reading()
            self._set_read_size(THROTTLED_READ_SIZE)
            delay = -self.tokens / self.rate
            self._throttle_timer = asyncio.get_running_loop().call_later(delay, self._unthrottle)
        else:
            size = self._budgeted_read_size()
            if size != self._read_size:
                self._set_read_size(size)

    def _budgeted_read_size(self) -> int:
        """Bytes the next wake-up may read: never more frames than the peer has tokens
        for (the shortest frame is 2 bytes), between 4 and 64 KiB. With the default
        burst (5 000) a flood of tiny junk lines is read 5 000 frames at first, not
        30 000 (and processed 512 a turn); mouse moves (220 bytes) come 10 KiB at a
        time."""
        budget = int(self.tokens) * MIN_FRAME_BYTES
        return READ_SIZE if budget >= READ_SIZE else max(THROTTLED_READ_SIZE, budget)

    def _set_write_limits(self, transport: Any) -> None:
        high = max(MIN_HIGH_WATER, self.queue_bytes // 4)
        with contextlib.suppress(AttributeError):
            transport.set_write_buffer_limits(high=high, low=high // 4)

    def _set_read_size(self, size: int) -> None:
        t = self.transport
        self._read_size = size
        if hasattr(t, "_max_read_size"):  # messagerie.channel's tty transport
            t._max_read_size = size
        elif hasattr(t, "max_size"):  # asyncio's unix socket transport
            t.max_size = size

    def _unthrottle(self) -> None:
        self._throttle_timer = None
        self._resume()

    def stop_reading(self) -> None:
        """Shutdown: read nothing more from this peer (its domain keeps it queued)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def apply_limits(self, limits: Limits) -> None:
        """Take the limits of a reloaded configuration, now."""
        self.queue_bytes = limits.queue_bytes
        self.rate = limits.rate
        self.burst = float(limits.burst)
        if self.transport is not None:
            self._set_write_limits(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._backlog = None
        self.broker.invalidate_routes()  # decisions sending here are stale
        if self._out:
            self.stats.dropped += len(self._out)
            self._out.clear()
            self._out_size = 0
        for waiter in list(self._waiters):
            waiter.release(self)
        self._waiters.clear()
        for dest in list(self._held_by):
            dest._waiters.discard(self)
        self._held_by.clear()
        for timer in (self._stall_timer, self._throttle_timer):
            if timer is not None:
                timer.cancel()
        self._stall_timer = self._throttle_timer = None
        self.paused_writing = False

    def pause_writing(self) -> None:
        self.paused_writing = True

    def resume_writing(self) -> None:
        self.paused_writing = False
        if self.stalled:
            self.stalled = False
            self.log.info("domain.drained")
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        for waiter in self._waiters:
            waiter.release(self)
        self._waiters.clear()

    # -- outbound ------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def queued(self) -> int:
        t = self.transport
        return self._out_size + (int(t.get_write_buffer_size()) if t is not None else 0)

    def send(self, data: bytes, sender: Peer | None = None, count: int = 1) -> bool:
        """Queue ``data`` for this peer; False when it was dropped (full or offline).

        Writes are corked while a read is processed: a read of 64 KiB carries ~300
        mouse moves, which leave in one write per destination instead of one system
        call each (outside a read, until the end of the loop iteration).
        """
        t = self.transport
        if t is None:
            return False
        if self.paused_writing:
            # Full. While its senders are held back (a transient burst) the chunks they
            # already read still fit; once it is stalled, what exceeds the bound drops.
            size = t.get_write_buffer_size() + self._out_size + len(data)
            if size > self.queue_bytes * (1 if self.stalled else HARD_LIMIT_FACTOR):
                self.stats.dropped += count
                return False
        out = self._out
        if not out:
            if self.broker.receiving:
                self.broker.dirty.append(self)  # flushed when this read is processed
            else:
                self._loop.call_soon(self._flush)
        out.append(data)
        self._out_size += len(data)
        self.stats.sent += count
        if self.paused_writing and sender is not None and sender is not self and not self.stalled:
            sender.hold(self)
        return True

    def _flush(self) -> None:
        out = self._out
        if not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self._out_size = 0
        if self.transport is not None:
            self.transport.write(data)

    def hold(self, dest: Peer) -> None:
        """Stop reading this peer until ``dest`` drains (or is declared stalled)."""
        if dest in self._held_by or self.transport is None:
            return
        self._held_by.add(dest)
        dest._waiters.add(self)
        self.transport.pause_reading()
        if dest._stall_timer is None:
            dest._stall_timer = asyncio.get_running_loop().call_later(
                self.broker.config.limits.stall_timeout, dest._stall)

    def release(self, dest: Peer) -> None:
        self._held_by.discard(dest)
        self._resume()

    def _stall(self) -> None:
        self._stall_timer = None
        if not self.paused_writing:
            return
        self.stalled = True
        self.log.warning("domain.stalled", queued=self.queued(),
                         waiting_senders=sorted(p.name for p in self._waiters))
        for waiter in self._waiters:
            waiter.release(self)
        self._waiters.clear()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class DomainEndpoint(Peer):
    """A DomU's channel, kept open: connect, serve, and reconnect with backoff."""

    kind = "domain"

    def __init__(self, broker: Broker, name: str, path: str, *, discovered: bool = False) -> None:
        super().__init__(broker, name)
        self.path = path
        self.discovered = discovered
        self.channel_type = "?"
        self.connected_since: float | None = None
        self._lost: asyncio.Event = asyncio.Event()
        self._lost_reason = ""
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.attempted = asyncio.Event()
        """Set once the first connection attempt is over (success or failure)."""
        self.failed_connects = 0
        """Connection attempts that failed (retries are counted here, logged only when
        their cause changes)."""

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._supervise(),
                                                            name=f"domain:{self.name}")

    def detach(self) -> asyncio.Task[None] | None:
        """Stop at once: no more reconnection, the channel aborted (not closed: a domain
        that stopped reading would keep its fd and buffer forever). Returns the
        supervisor task, cancelled, for the caller to await if it wants."""
        self._stopping = True
        self._backlog = None  # read but not yet routed: it goes with the domain
        if self.transport is not None:
            self.transport.abort()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        return task

    async def stop(self) -> None:
        task = self.detach()
        if task is not None:
            await asyncio.wait([task])  # not wait_for: our caller's cancellation stays its own

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._lost_reason = str(exc) if exc else "closed"
        self._lost.set()

    async def _supervise(self) -> None:
        cfg = self.broker.config
        delay = cfg.reconnect_min
        failing: str | None = None
        while not self._stopping:
            try:
                self.channel_type = channel_kind(self.path)
                self._lost.clear()
                await open_channel(self.path, lambda: self, exclusive=False)
            except (ChannelError, OSError) as exc:
                self.failed_connects += 1
                self.attempted.set()
                reason = str(exc)
                if reason != failing:  # log state changes, not every retry
                    self.log.warning("domain.unavailable", path=self.path, error=reason,
                                     retry_in=round(delay, 3))
                    failing = reason
                await asyncio.sleep(delay * (0.8 + 0.4 * random.random()))
                delay = min(delay * 2, cfg.reconnect_max)
                continue
            failing = None
            delay = cfg.reconnect_min
            self.connected_since = time.time()
            self.log.info("domain.connected", path=self.path, channel=self.channel_type)
            self.broker.domain_up(self)
            self.attempted.set()
            await self._lost.wait()
            self.connected_since = None
            self.log.info("domain.disconnected", reason=self._lost_reason)
            self.broker.domain_down(self)
            # A channel that drops at once (a pty nobody holds) should not spin.
            await asyncio.sleep(delay)
