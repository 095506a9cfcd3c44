"""Endpoints: one per channel the broker speaks on.

An :class:`Endpoint` is the asyncio protocol of one byte stream: it splits frames with
the sans-IO :class:`~messagerie.FrameDecoder`, spends its rate budget
(:class:`~broker.ratelimit.TokenBucket`), hands every message or frame error to its
:class:`Sink` (the broker), and owns the outbound side with its bound and
back-pressure. It knows the broker only as a :class:`Sink` and its limits only as
:class:`Settings`: nothing here imports the broker.

Outbound policy, per destination (documented in docs/broker.md):

* the bytes wait in the endpoint, one lane per sender, and are handed to the
  transport ``WRITE_AHEAD`` at a time in a fair order: the broker's own messages
  first, then a deficit round robin by bytes over the senders (:meth:`Endpoint.flush`);
* when what is queued (lanes and transport) passes its high-water mark, the peers that
  sent to it stop being read (back-pressure: nothing is lost under a transient burst)
  until it drains;
* a destination that does not drain within ``stall_timeout`` is *stalled*: its
  senders are released (one slow reader never delays the others) and what does not
  fit in ``queue_bytes`` is dropped, counted and logged (``message.dropped``); a
  dropped ``commande`` is answered ``destination_saturee``;
* a broadcast never waits on a destination (a domain or a dom0 service) that took
  none of its bytes for ``MUTE_AFTER`` (*mute*): it goes to that one's overflow (up
  to ``queue_bytes``) or is dropped for it alone; a slow reader (takes bytes,
  however few) holds the broadcaster back like any sender and loses nothing
  (``Endpoint._admit``);
* a lost channel's unprocessed frames are routed over the next loop turns within
  its rate budget (``Endpoint._keep_remainder``).

A :class:`DomainEndpoint` is an :class:`Endpoint` that keeps its channel open: it connects,
and when the channel goes away (domain shutdown, pty hang-up, socket closed, EIO) it
retries with exponential backoff until the domain comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import random
import struct
import termios
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from time import thread_time
from typing import Any, Protocol

import structlog

from messagerie import FrameDecoder, FrameError
from messagerie.channel import (
    READ_SIZE,
    REMAINING_MAX,
    ChannelError,
    channel_kind,
    open_channel,
    read_remaining,
)
from messagerie.envelope import Envelope, Run, decode_complete, decode_envelope, decode_runs

from .config import Config, Limits
from .cpuspeed import budget, cpu_scale
from .echo import EchoWindow
from .memory import MemoryBudget
from .ratelimit import LogBudget, TokenBucket

Batch = Callable[[list[bytes]], list[Envelope | Run] | None]
FRAME_DECODERS: dict[str, tuple[Callable[[bytes], Envelope], Batch | None]] = {
    "enveloppe": (decode_envelope, decode_runs), "complete": (decode_complete, None)}
"""Per ``broker.validation``: how a frame is decoded, and how a read's frames may be."""

THROTTLED_READ_SIZE = 4 * 1024
"""Bytes read per wake-up from a domain over its rate (see ``Endpoint._process``)."""
UNTHROTTLE_SLACK = 1e-4
"""Seconds of debt a throttled channel may still owe when its timer fires and reading
resumes: what a timer's rounding leaves. The debt stays in its bucket, so the next
read pays it; a longer one (later turns of the read that went over) is waited for."""
MAX_FRAMES_PER_TURN = 512
"""Frames of one channel processed per turn of the event loop: refusing 512 tiny junk
lines takes under 2 ms; a 64 KiB read of mouse moves (300 frames) is one turn. 256 gave
the same honest latency under a junk flood (bench_flood.py) and cost unix-socket bursts
a second turn per read."""
TURN_CPU = 0.0005
"""CPU seconds one channel's turn in the event loop should take at most: a read whose
frames are estimated (by this channel's measured cost per byte) to cost more is
processed over several turns, so that the other channels are read in between. A turn
that costs more anyway (one frame can take longer) is charged more than its time
(``long_turn_charge``)."""
MIN_MEASURED_BYTES = 256
"""A turn shorter than this, unless the budget chose its length (a read cut into
turns), does not update its channel's cost per byte: its fixed costs (the loop's, the
cork's) would say more than its bytes. No floor on a turn's length but one frame: a
floor of 256 bytes was 128 junk lines (``x``), a turn of 1.5-2.5 ms where each costs
10 us (the benchmark machine), and an honest message read behind it waited that long
(honest p99w 4.7-6.2x its quiet value under a junk flood)."""
NUDGE_BYTES = 4 * 1024
"""A read of a domain's socket channel this long (or as long as the read size) says
its relay may have met a full socket (:meth:`Endpoint._nudge_soon`): QEMU writes at
most a console ring (2 KiB) at a time when it keeps up, so longer reads mean writes
piled up in the socket, the broker lagging."""
NUDGE_QUIET = 0.05
"""Seconds without input after such a read before the relay is nudged."""
ALL = 1 << 62
"""A budget of bytes that takes everything (:meth:`Endpoint._gather`)."""
MIN_FRAME_BYTES = 2
"""The shortest frame that costs a rate token (``x`` and a newline)."""
MIN_HIGH_WATER = 16 * 1024
"""Back-pressure starts at a quarter of ``queue_bytes`` (at least this much)."""
HARD_LIMIT_FACTOR = 4
"""Even while its senders are held, a destination never queues more than this many
times ``queue_bytes`` (the senders' read chunks already in flight)."""
STALL_MEMORY_FACTOR = 10
"""A destination that drains after being stalled is stalled again at once (its senders
not held) if it fills up within this many ``stall_timeout``: a reader that stops and
starts again does not hold its senders once per cycle."""
PROGRESS_SETTLE = 0.05
"""Seconds after a destination gets full before its progress is measured: what the
kernel and a relay (socat, xenconsoled) still take right after is not reading."""
PROGRESS_MEMORY = 1.0
"""Seconds: a destination that fills up again this soon after draining is taken to
read (judged again after a window), not judged afresh."""
PROGRESS_WINDOW = 0.1
"""Seconds (``delai_blocage`` over 4 when shorter): a full destination that took some
of its queued bytes over one of these *reads* (``Endpoint.progress``)."""
MUTE_AFTER = 1.0
"""Seconds (``delai_blocage`` when shorter): a full destination that took none of its
queued bytes for this long is *mute*: it holds no broadcaster, and the memory budget
cuts it first. Longer than a window, so that a reader starved for a moment on a
loaded machine is not taken for one that does not read."""
RECLAIM_AT = 0.75
"""Of the memory budget: past it, a full queue past its share that makes no progress,
or past twice its share, takes no more; past the whole budget, any full queue past its
share (see broker.memory)."""
WRITE_AHEAD = 8 * 1024
"""Bytes a transport's buffer holds before it is handed no more (its high-water mark,
when it tells the protocol: :class:`_Pacer`): a destination's queue waits in the
endpoint, one lane per sender, and is handed over a few KiB at a time in a fair order
(:meth:`Endpoint.flush`). An honest message waits behind at most this much, a quantum
per other active sender, and what the kernel and the relay hold, not behind everything
a flooder queued (at a relay's ~10 MB/s, 256 KiB of queue is 25 ms). Never more than
the queue's low-water mark (see ``_set_write_limits``)."""
QUANTUM = 4 * 1024
"""Bytes a sender's lane is handed per round (deficit round robin by bytes: a lane
whose frame is longer than its credit waits for more rounds)."""
REMAINDER_MAX_BYTES = READ_SIZE + REMAINING_MAX
"""A lost channel's unprocessed bytes kept for later turns: one read and what a socket
still held (``read_remaining``); what is beyond is dropped and counted."""


def long_turn_charge(cost: float) -> float:
    """What a turn of ``cost`` CPU seconds takes from its channel's CPU budget: its
    cost, times how many ``TURN_CPU`` it lasted when it lasted longer. A turn blocks
    every other channel for its whole length, and delays each message that arrives
    meanwhile by up to that long: the harm to the others grows as the square of the
    turn's length, not as its length. Turns kept within ``TURN_CPU`` (every honest
    read) are charged their time; a turn of ``t`` seconds past it is charged
    ``t * t / TURN_CPU``, so a channel whose every turn is one such frame gets
    ``part_cpu * TURN_CPU / t**2`` of them a second: at the default ``part_cpu`` (0.1),
    12 a second at 2 ms, 1.4 at 6 ms (the costliest valid frame, 60 KiB of ``{}``, takes
    2-6 ms to check on the reference machine), instead of 50 and 17 charged by time."""
    return cost * (cost / TURN_CPU) if cost > TURN_CPU else cost


def unread_by_peer(fd: int) -> int:
    """What a unix socket's peer has not read yet (``SIOCOUTQ``: the kernel counts what
    it allocated for it, the bytes and their overhead). Raises OSError when the kernel
    cannot tell."""
    return int(struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0" * 4))[0])


def _frames(data: bytes) -> int:
    """The newlines in ``data``, exactly. ``bytes.count`` looks at every byte (70 us for
    a 64 KiB read on the benchmark machine, 5 % of the broker's CPU in a burst);
    ``replace`` jumps from newline to newline (memchr) and copies the rest, 8x faster on
    ~220-byte frames, slower on tiny ones: the first KiB decides which to use."""
    if data.count(b"\n", 0, 1024) > 16:
        return data.count(b"\n")
    return len(data) - len(data.replace(b"\n", b""))


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
    """Messages for this peer dropped: its queue was full, its channel was gone when
    they were routed, or it was removed with them queued."""
    throttled: int = 0
    """Frames (messages and invalid ones) from this peer read late because it exceeded
    its rate, or dropped unread when its channel closed with more than its budget left
    (``Endpoint._process_remainder``)."""

    def as_dict(self) -> dict[str, int]:
        return {"recus": self.received, "envoyes": self.sent, "refuses": self.refused,
                "invalides": self.invalid, "perdus": self.dropped, "limites": self.throttled}


@dataclass(slots=True)
class Settings:
    """What endpoints read of the configuration: their limits and how frames are
    decoded. One object for all of them; a reload replaces it (``Sink.settings``)."""

    limits: Limits
    max_frame: int
    decode: Callable[[bytes], Envelope]
    batch: Batch | None
    reconnect_min: float
    reconnect_max: float
    limits_for: Callable[[str], Limits]
    """One domain's limits (``[domaines.NAME]`` over ``[limites]``): ``Config.limits_for``."""
    cpu_scale: float = 1.0
    """This machine's slowness against the reference (``broker.cpuspeed``): a turn's CPU
    seconds are divided by it before they are charged or compared with ``TURN_CPU``."""

    @classmethod
    def of(cls, config: Config) -> Settings:
        decode, batch = FRAME_DECODERS[config.validation]
        return cls(config.limits, config.max_frame, decode, batch, config.reconnect_min,
                   config.reconnect_max, config.limits_for, cpu_scale())


class WriteCork:
    """Writes queued while one read is processed leave together when it ends: a read
    of 64 KiB carries ~300 mouse moves, which leave in one write per destination
    instead of one system call each. Outside a read, a write waits for the end of the
    loop iteration."""

    __slots__ = ("active", "dirty")

    def __init__(self) -> None:
        self.active = False
        self.dirty: list[Endpoint] = []

    def release(self) -> None:
        self.active = False
        dirty = self.dirty
        for endpoint in dirty:
            endpoint.flush()
        dirty.clear()


class _Lane:
    """One sender's frames queued for a destination and not yet handed to its
    transport, oldest first; ``head``: the bytes of the first already handed (a long
    write is handed a frame boundary at a time)."""

    __slots__ = ("credit", "head", "size", "units")

    def __init__(self) -> None:
        self.units: deque[bytes] = deque()
        self.head = 0
        self.size = 0
        self.credit = 0
        """Bytes this lane may still be handed in the current round (deficit round
        robin; below zero after a frame longer than its credit)."""

    def take(self, budget: int) -> bytes:
        """Whole frames from the head, at most ``budget`` bytes (but at least one frame)."""
        units, head = self.units, self.head
        first = units[0]
        if len(first) - head > budget:
            cut = first.rfind(b"\n", head, head + budget) + 1
            if not cut:
                cut = first.find(b"\n", head + budget) + 1 or len(first)
            if cut < len(first):
                self.head = cut
                piece = first[head:cut]
                self.size -= len(piece)
                return piece
        units.popleft()
        self.head = 0
        piece = first[head:] if head else first
        total = len(piece)
        if not units or total + len(units[0]) > budget:
            self.size -= total
            return piece
        parts = [piece]
        while units and total + len(units[0]) <= budget:
            unit = units.popleft()
            parts.append(unit)
            total += len(unit)
        self.size -= total
        return b"".join(parts)

    def rest(self) -> bytes:
        units = list(self.units)
        if self.head:
            units[0] = units[0][self.head:]
        return b"".join(units)


class _Pacer(asyncio.Protocol):
    """The transport's protocol in front of an :class:`Endpoint`: everything goes to the
    endpoint, but the transport's flow control (past ``WRITE_AHEAD``) only stops and
    restarts handing it bytes; whether the destination's queue is full is the
    endpoint's own count (:meth:`Endpoint.pause_writing`)."""

    __slots__ = ("endpoint",)

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    def data_received(self, data: bytes) -> None:
        self.endpoint.data_received(data)

    def eof_received(self) -> bool | None:
        return self.endpoint.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.endpoint.connection_lost(exc)

    def pause_writing(self) -> None:
        self.endpoint._busy = True

    def resume_writing(self) -> None:
        self.endpoint._transport_ready()


class Sink(Protocol):
    """What an endpoint knows of the broker: where its frames go, whom it tells when it
    comes and goes, the limits it reads, the cork its writes share."""

    settings: Settings
    cork: WriteCork
    memory: MemoryBudget
    """Every queue's bytes together (checked on a full queue's path only)."""
    stopping: bool
    """Shutdown began: endpoints are never resumed."""

    def receive(self, endpoint: Endpoint, item: Envelope | Run | FrameError) -> None:
        """Every frame ``endpoint`` decoded (or failed to), in order. Hot path."""

    def lost(self, endpoint: Endpoint) -> None:
        """``endpoint``'s connection is gone (decisions sending there are stale)."""

    def drained(self, endpoint: Endpoint) -> None:
        """``endpoint``'s queue went back below its low-water mark."""

    def domain_up(self, endpoint: DomainEndpoint) -> None: ...

    def domain_down(self, endpoint: DomainEndpoint) -> None: ...


class Endpoint(asyncio.Protocol):
    """One byte stream: a domain's channel or a dom0 service's connection."""

    KEEPS_HANDED = False
    """Keep what was handed to a socket transport and not yet out (:attr:`_handed`)."""

    kind = "peer"

    def __init__(self, sink: Sink, name: str) -> None:
        self.sink = sink
        self.name = name
        self.stats = Stats()
        self.transport: Any = None
        self.decoder = self._decoder()
        self.log_budget = LogBudget()
        self.throttle_log = LogBudget(per_second=1)
        """``domain.throttled`` warnings (its own budget: a junk flood's ``frame.invalid``
        warnings would spend the shared one)."""
        self.journal_budget = LogBudget(per_second=50)
        """``journal`` messages a domain may have written to the broker's log."""
        self.log = structlog.get_logger("broker").bind(domain=name)
        self.limits = limits = sink.settings.limits_for(name)
        """This endpoint's own limits (its domain's, or ``[limites]`` for dom0's)."""
        self.queue_bytes = limits.queue_bytes
        # Outbound back-pressure state.
        self.paused_writing = False
        self.stalled = False
        self._stall_timer: asyncio.TimerHandle | None = None
        self._stalled_until = 0.0
        """Loop time until which filling up again means stalled again (it drained lately
        after a stall: ``STALL_MEMORY_FACTOR``)."""
        self._waiters: set[Endpoint] = set()
        """Peers not being read because they sent to us while we were full."""
        self._held_by: set[Endpoint] = set()
        """Destinations we wait on; reading resumes when this is empty."""
        self._throttle_timer: asyncio.TimerHandle | None = None
        self._backlog: bytes | None = None
        """Bytes read but not yet processed (over MAX_FRAMES_PER_TURN in one read)."""
        self.read_bytes = 0
        """Bytes read from this channel since the endpoint was made."""
        self._outq_fd: int | None = None
        """A socket transport's fd, for what its peer has not read (:meth:`_taken`)."""
        self._outq_failed = False
        """``unread_by_peer`` failed on this endpoint once (said once, at debug)."""
        self.nudges = False
        self.nudged = 0
        """Empty lines written to nudge the relay."""
        self._nudge_timer: asyncio.TimerHandle | None = None
        self._nudge_mark = 0
        self.bucket = TokenBucket(limits.rate, limits.burst)
        """Rate limiting: one token per frame read, refilled per read."""
        self.charge = 0
        """Tokens the broker charges beyond one per frame during the current read (a
        broadcast costs one per recipient), spent when the read is processed."""
        scale = sink.settings.cpu_scale
        self.cpu = TokenBucket(budget(limits.cpu_share, scale), budget(limits.cpu_burst, scale))
        """CPU budget: the broker's CPU seconds this channel's reads cost (measured per
        turn, ``long_turn_charge``), ``part_cpu`` a second."""
        self._cost_per_byte = TURN_CPU / (4 * READ_SIZE)
        """This channel's recent CPU cost per byte read (mouse moves: about 0.01 us):
        how much of a read one turn takes (``TURN_CPU``). Until it is measured, four
        full reads a turn (the frame cap decides)."""
        self._turn_bytes = int(TURN_CPU / self._cost_per_byte)
        self._read_size = READ_SIZE
        self._lanes: dict[Endpoint | None, _Lane] = {}
        """What is queued and not handed to the transport, per sender (None: the
        broker's own messages, handed first: :meth:`flush`), in round-robin order."""
        self._flush_due = False
        self._busy = False
        """The transport holds ``WRITE_AHEAD``: it is handed nothing until it says so."""
        self._paced = False
        """The transport's flow control comes to a :class:`_Pacer` (real transports):
        the queue waits in ``_lanes``. Else (a transport that cannot be given another
        protocol) everything is handed at once and its own marks say full."""
        self._ahead = WRITE_AHEAD
        self._shares: dict[Endpoint | None, int] = {}
        """Bytes accepted per sender since this queue got full (``_admit``)."""
        self._shares_total = 0
        self._top: Endpoint | None = None
        """The sender with the most bytes in ``_shares``."""
        self._high = MIN_HIGH_WATER
        """The transport's high-water mark (``_set_write_limits``)."""
        self._out_size = 0
        """Bytes in ``_lanes``."""
        self.written = 0
        """Bytes handed to the transport's ``write`` since this endpoint was made: with
        the transport's buffer, which of them left the broker (the spool's replay)."""
        self._handed: deque[tuple[int, bytes]] | None = None
        """On a socket channel of a domain (its transport does not tell what it did not
        write): (stream position of its end, bytes) of each write not yet known to
        have left the broker, oldest first: what the transport still buffers, at most
        (trimmed at each write, drain and end of input)."""
        self._out_at = 0
        """The stream position last known to have left the broker (``_handed``)."""
        self.unsent: tuple[int, bytes] | None = None
        """When the channel went down: (stream position, bytes) of what the broker had
        queued and not written, for the spool (:meth:`take_unsent`)."""
        self._mark_at = self._idle_since = 0.0
        self._mark: int | None = None
        """Bytes taken at the start of the current progress window (None: not started)."""
        self._progress: bool | None = None
        """Did it take bytes over the last progress window? None: not judged yet."""
        self._fanout_waiters: set[Endpoint] = set()
        """Broadcasters among ``_waiters``: released once it makes no progress."""
        self._progress_timer: asyncio.TimerHandle | None = None
        self._drained_at = float("-inf")
        """Loop time it last drained below its low-water mark."""
        self.overflow_dropped = 0
        """Broadcasts dropped for this destination since it got full (logged once)."""
        self.drop_why = "queue_full"
        """Why the last message refused by :meth:`send` was: ``queue_full``,
        ``memory_budget``, ``not_reading`` (a broadcast past a mute one's overflow) or
        ``offline`` (no channel)."""
        self._remainder: bytes | None = None
        """A lost channel's frames not processed yet (``_process_remainder``)."""
        self._remainder_decoder: FrameDecoder[Envelope | Run] | None = None
        self._remainder_timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_event_loop()

    def _decoder(self) -> FrameDecoder[Envelope | Run]:
        settings = self.sink.settings
        return FrameDecoder[Envelope | Run](settings.max_frame, decode=settings.decode,
                                           batch=settings.batch)

    # -- asyncio.Protocol --------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self._loop = asyncio.get_running_loop()
        self.decoder = self._decoder()
        self._busy = False
        self._paced = (hasattr(transport, "set_protocol")
                       and hasattr(transport, "set_write_buffer_limits"))
        if self._paced:
            transport.set_protocol(_Pacer(self))
        self._set_write_limits(transport)
        # asyncio's socket transports read 256 KiB per wake-up: cap them to the ttys'
        # 64 KiB, so that a flooding channel's turn in the loop is as short on a unix
        # socket (connection=socket) as on a pty (fairness); less while its rate
        # budget is low (see _budgeted_read_size).
        self._set_read_size(self._budgeted_read_size())
        self.paused_writing = False
        self.stalled = False
        self._stalled_until = 0.0
        self._out_at = self.written
        self._handed = (deque() if self.KEEPS_HANDED
                        and getattr(transport, "unwritten", None) is None else None)
        sock = transport.get_extra_info("socket")
        self._outq_fd = sock.fileno() if sock is not None else None
        if self._remainder is not None:
            self.transport.pause_reading()  # the last connection's frames go first

    @property
    def nudges(self) -> bool:
        """Nudge this channel's relay after a long read (:meth:`_nudge_soon`): a
        domain's unix socket, chosen when it connects. Its reads then go through
        :meth:`_read_and_nudge`; the other channels' reads pay no test for it."""
        return "data_received" in self.__dict__

    @nudges.setter
    def nudges(self, on: bool) -> None:
        if on:
            self.data_received = self._read_and_nudge  # type: ignore[method-assign]
        else:
            self.__dict__.pop("data_received", None)

    def _read_and_nudge(self, data: bytes) -> None:
        """:meth:`data_received` of a channel that :attr:`nudges`."""
        long = len(data) >= min(NUDGE_BYTES, self._read_size)
        type(self).data_received(self, data)
        if long:
            self._nudge_soon()

    def data_received(self, data: bytes) -> None:
        self.read_bytes += len(data)
        if self._backlog is not None:  # read meanwhile (reading is paused): keep the order
            self._backlog += data
            return
        self._take(data, first=True)

    def _take(self, data: bytes, *, first: bool) -> None:
        # At most a turn's worth now: what this channel's frames have cost lately says
        # how many bytes fit in TURN_CPU (64 KiB of mouse moves do; 64 KiB of tiny junk
        # lines, each a decode attempt and a refusal, would be a 100 ms turn for
        # everyone else), and never more than MAX_FRAMES_PER_TURN frames. The rest
        # waits for the next iteration, the channel not being read meanwhile.
        end = whole = len(data)
        if end > self._turn_bytes:
            limit = self._turn_bytes
            end = data.rfind(b"\n", 0, limit) + 1 or data.find(b"\n", limit) + 1 or end
        if _frames(data[:end] if end < len(data) else data) > MAX_FRAMES_PER_TURN:
            end -= len(data[:end].split(b"\n", MAX_FRAMES_PER_TURN)[-1])
        if end < len(data):
            self._backlog = data[end:]
            data = data[:end]
            if first and self.transport is not None:
                self.transport.pause_reading()
            self._loop.call_soon(self._next_turn)
        self._process(data, budgeted=end < whole)

    def _next_turn(self) -> None:
        data, self._backlog = self._backlog, None
        if data is None or self.transport is None:
            return  # the channel went away meanwhile: what it had sent goes with it
        if self.transport.is_closing():
            # Closing: connection_lost decides (routed within the rate after a failed
            # write, dropped if the broker closed it).
            self._backlog = data
            return
        self._take(data, first=False)
        if self._backlog is None:
            self._resume()

    def _resume(self) -> None:
        """Read again, unless something else still holds the channel: a full destination,
        the rate limit, a backlog of frames, shutdown."""
        if (not self._held_by and self._throttle_timer is None and self._backlog is None
                and self._remainder is None and self.transport is not None
                and not self.sink.stopping and not self.transport.is_closing()):
            self.transport.resume_reading()

    def _process(self, data: bytes, decoder: FrameDecoder[Envelope | Run] | None = None,
                 *, budgeted: bool = False) -> None:
        """Route ``data``'s frames (one turn) and charge what it cost; ``budgeted``: its
        length is what the cost per byte allowed (a read was cut)."""
        started = thread_time()
        self._route(data, decoder)
        # The turn's CPU (decoding, routing, the writes it caused), charged to this
        # channel: the thread's own clock, so that being preempted by another process
        # on a busy machine costs nobody anything; in the reference machine's seconds
        # (broker.cpuspeed), so that the budget means the same on a slower one.
        cost = (thread_time() - started) / self.sink.settings.cpu_scale
        self.cpu.refill()
        self.cpu.tokens -= long_turn_charge(cost)
        if budgeted or len(data) > MIN_MEASURED_BYTES:
            # A cut turn is measured however short it is: it tests the estimate that
            # chose its length (else a turn cut short would never grow again).
            self._cost_per_byte = (self._cost_per_byte + cost / len(data)) / 2
            self._turn_bytes = max(1, int(TURN_CPU / self._cost_per_byte))
        bucket, cpu = self.bucket, self.cpu
        if ((bucket.tokens < 0 or cpu.tokens < 0) and self.transport is not None
                and self._throttle_timer is None):
            # Over its rate or its CPU share: stop reading this channel until both
            # budgets are back. The excess waits in the domain's own channel, costing us
            # nothing. Until it is back within its budget, it is read in small bites.
            self.transport.pause_reading()
            self._set_read_size(THROTTLED_READ_SIZE)
            delay = max(bucket.deficit, cpu.deficit)
            if cpu.tokens < 0 and self.throttle_log.allow():
                self.log.warning("domain.throttled", why="cpu", turn_ms=round(cost * 1e3, 2),
                                 share=cpu.rate, paused_ms=round(delay * 1e3, 1),
                                 suppressed=self.throttle_log.take_suppressed())
            self._throttle_timer = self._loop.call_later(delay, self._unthrottle)
        else:
            size = self._budgeted_read_size()
            if size != self._read_size:
                self._set_read_size(size)

    def _route(self, data: bytes,
               decoder: FrameDecoder[Envelope | Run] | None = None) -> None:
        """Decode ``data``'s frames and hand them to the sink, spending rate tokens."""
        bucket = self.bucket
        spend = bucket.spend
        # The balance in a local while the read is processed: only what is over budget
        # costs a call (TokenBucket.spend counts it), nothing else reads the bucket then.
        tokens = bucket.refill()
        sink = self.sink
        receive = sink.receive
        cork = sink.cork
        cork.active = True
        try:
            for item in (decoder or self.decoder).feed(data):
                # A junk frame costs a decode attempt like a message: it spends the same
                # rate budget, or a domain flooding garbage would escape throttling.
                n = item.count if type(item) is Run else 1
                if tokens >= n:
                    tokens -= n
                else:
                    bucket.tokens = tokens
                    self.stats.throttled += spend(n)
                    tokens = bucket.tokens
                receive(self, item)
        finally:
            # What the frames cost beyond one token each (a broadcast's deliveries).
            bucket.tokens = tokens - self.charge
            self.charge = 0
            cork.release()

    def _budgeted_read_size(self) -> int:
        """Bytes the next wake-up may read: never more frames than the peer has tokens
        for (the shortest frame is 2 bytes), between 4 and 64 KiB. With the default
        burst (5 000) a flood of tiny junk lines is read 5 000 frames at first, not
        30 000 (and processed 512 a turn); mouse moves (220 bytes) come 10 KiB at a
        time."""
        budget = int(self.bucket.tokens) * MIN_FRAME_BYTES
        return READ_SIZE if budget >= READ_SIZE else max(THROTTLED_READ_SIZE, budget)

    def _set_write_limits(self, transport: Any) -> None:
        # A quarter of the queue's bound, and never more than half of its share of the
        # memory budget: a thousand destinations that stop reading each hold this much.
        # The transport holds WRITE_AHEAD at most (its own marks, a pacer behind them),
        # never more than the queue's low-water mark: a transport that holds no more
        # than that while the lanes are empty leaves a full queue nothing to wait for.
        high = max(MIN_HIGH_WATER, min(self.queue_bytes // 4, self.sink.memory.share // 2))
        self._high = high
        if self._paced:
            self._ahead = ahead = min(WRITE_AHEAD, high // 4)
            transport.set_write_buffer_limits(high=ahead, low=ahead // 2)
            return
        with contextlib.suppress(AttributeError):
            transport.set_write_buffer_limits(high=high, low=high // 4)

    def _set_read_size(self, size: int) -> None:
        t = self.transport
        self._read_size = size
        if hasattr(t, "_max_read_size"):  # messagerie.channel's tty transport
            t._max_read_size = size
        elif hasattr(t, "max_size"):  # asyncio's unix socket transport
            t.max_size = size

    def _nudge_soon(self) -> None:
        """After a long read, once input has been quiet for ``NUDGE_QUIET``, write an
        empty line (which every reader skips) to the channel.

        QEMU's Xen console backend relays a DomU's output to its unix socket; a write
        that meets a full socket (the broker was busy, or paused this channel) leaves
        the rest in QEMU's buffer, and QEMU retries only at the DomU's next event. It
        has no writability watch: the tail of a burst would wait there until the DomU
        writes again, maybe never. Input for the DomU is such an event (the DomU's
        console driver notifies the backend when it reads it), so the empty line makes
        QEMU send what it holds. A long read is the sign: a socket that never filled
        is read in short reads. The cost: one byte to the DomU per burst."""
        if self._nudge_timer is None:
            self._nudge_mark = self.read_bytes
            self._nudge_timer = self._loop.call_later(NUDGE_QUIET, self._nudge)

    def _nudge(self) -> None:
        self._nudge_timer = None
        if self.transport is None or self.transport.is_closing() or self.sink.stopping:
            return
        if self.read_bytes != self._nudge_mark:  # still flowing: look again later
            self._nudge_soon()
            return
        if self.queued():  # it holds output: the DomU will read, and that is an event
            return
        self.nudged += 1
        self.log.debug("channel.nudged", read_bytes=self.read_bytes, nudged=self.nudged)
        self.send(b"\n", count=0)

    def _unthrottle(self) -> None:
        self._throttle_timer = None
        # The timer was armed for the debt of the turn that went over; the turns of the
        # same read that followed it added to that debt. Wait for the rest, or the next
        # read comes early and a domain whose reads are cut into turns escapes its rate.
        self.bucket.refill()
        self.cpu.refill()
        delay = max(self.bucket.deficit, self.cpu.deficit)
        if delay > UNTHROTTLE_SLACK and self.transport is not None:
            self._throttle_timer = self._loop.call_later(delay, self._unthrottle)
            return
        self._resume()

    def stop_reading(self) -> None:
        """Shutdown: read nothing more from this peer (its domain keeps it queued)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def apply(self, settings: Settings) -> None:
        """Take the settings of a reloaded configuration, now."""
        self.limits = limits = settings.limits_for(self.name)
        self.queue_bytes = limits.queue_bytes
        self.bucket.configure(limits.rate, limits.burst)
        scale = settings.cpu_scale
        self.cpu.configure(budget(limits.cpu_share, scale), budget(limits.cpu_burst, scale))
        self.decoder.decode, self.decoder.batch = settings.decode, settings.batch
        if self.transport is not None:
            self._set_write_limits(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self.transport is not None and not self.sink.stopping:
            # A failed write (EPIPE) closed a socket before its last frames were read:
            # they are still in the socket, read them now (it closes after we return).
            rest = (self._backlog or b"") + read_remaining(self.transport)
            self._backlog = None
            if rest:
                self._keep_remainder(rest)
        self.unsent = self._unsent(self.transport)
        self.transport = None
        self._backlog = None
        self.sink.lost(self)  # decisions sending here are stale (the spool takes unsent)
        self.unsent = None
        if self._out_size:
            self.stats.dropped += sum(len(lane.units) for lane in self._lanes.values())
            self._lanes.clear()
            self._out_size = 0
        for waiter in list(self._waiters):
            waiter.release(self)
        self._waiters.clear()
        self._fanout_waiters.clear()
        for dest in list(self._held_by):
            dest._waiters.discard(self)
            dest._fanout_waiters.discard(self)
        self._held_by.clear()
        for timer in (self._stall_timer, self._throttle_timer, self._progress_timer,
                      self._nudge_timer):
            if timer is not None:
                timer.cancel()
        self._stall_timer = self._throttle_timer = self._progress_timer = None
        self._nudge_timer = None  # a nudge is for the connection whose read armed it
        self.paused_writing = False

    def _unsent(self, transport: Any) -> tuple[int, bytes] | None:
        """What was queued here and not written out, at its position in the stream:
        the transport's buffer when it tells (``unwritten``: the broker's tty
        transport does; asyncio's socket transports clear theirs unseen), then what
        was corked. None if nothing is known to be left."""
        unwritten = getattr(transport, "unwritten", None)
        corked = self._held()
        handed, self._handed = self._handed, None
        if unwritten is None and handed:
            # asyncio's socket transport cleared its buffer unseen: what it held is
            # the stream from the last position known to be out (maybe less: what the
            # kernel took since that was noted is handed back too, a duplicate).
            start = handed[0][0] - len(handed[0][1])
            data = b"".join(chunk for _, chunk in handed)
            return (self._out_at, data[self._out_at - start:] + corked)
        if unwritten is None:
            return (self.written, corked) if corked else None
        return (self.written - len(unwritten), bytes(unwritten) + corked)

    def take_unsent(self) -> None:
        """The channel is about to be dropped by the broker (its transport still
        open): :attr:`unsent` is what was queued and not written, taken now (what was
        corked is taken from the queue: it is never written, nor counted again when
        the connection is lost)."""
        self._note_out()
        self.unsent = self._unsent(self.transport)
        self._lanes.clear()
        self._out_size = 0

    def out_position(self) -> int | None:
        """Stream position up to which bytes have left the broker (taken by the
        kernel); None when unknown (no transport)."""
        t = self.transport
        if t is None:
            return None
        return self.written - int(t.get_write_buffer_size())

    @property
    def high_water(self) -> int:
        """The transport's high-water mark: back-pressure starts past it."""
        return self._high

    def position(self) -> int:
        """Stream position of the end of the broker's own messages queued here (the
        spool's replay): they are handed over first (:meth:`flush`), so the last one
        queued ends there, whatever the other senders queue."""
        own = self._lanes.get(None)
        return self.written + (own.size if own is not None else 0)

    def _held(self) -> bytes:
        """What the lanes hold, in the order it would be handed over as far as the
        spool cares (the broker's own messages first; each sender's in its order)."""
        lanes = self._lanes
        if not lanes:
            return b""
        own = lanes.get(None)
        rest = [lane.rest() for key, lane in lanes.items() if key is not None]
        return b"".join([own.rest(), *rest] if own is not None else rest)

    def _keep_remainder(self, data: bytes) -> None:
        """A lost channel's last bytes, kept to be processed over the next loop turns
        (``_process_remainder``) like any read: at most MAX_FRAMES_PER_TURN frames a
        turn, within the rate budget. Kept: at most REMAINDER_MAX_BYTES, and as many
        frames as the rate budget's burst (or one turn, when the burst is smaller): what
        a peer within its budget can have sent unread. The rest is dropped, counted as
        throttled and logged once (``frames.dropped why=closed_over_budget``)."""
        if self._remainder is not None:  # still processing the last one: behind it
            data = self._remainder + data
        keep = max(MAX_FRAMES_PER_TURN, int(self.bucket.burst))
        if len(data) > REMAINDER_MAX_BYTES or _frames(data) > keep:
            kept = data[:REMAINDER_MAX_BYTES]
            if _frames(kept) > keep:
                kept = kept[:len(kept) - len(kept.split(b"\n", keep)[-1])]
            else:
                kept = kept[:kept.rfind(b"\n") + 1]
            rest = data[len(kept):]
            data = kept
            dropped = _frames(rest) + (not rest.endswith(b"\n"))
            self.stats.throttled += dropped
            self.log.warning("frames.dropped", why="closed_over_budget", frames=dropped,
                             detail="the channel closed with more frames unread than its "
                                    "rate budget or the bytes kept allow")
        if not data:
            return
        if self._remainder is None:
            self._remainder_decoder = self.decoder
            self._loop.call_soon(self._process_remainder)
        self._remainder = data

    def _process_remainder(self) -> None:
        """One turn of a lost channel's remainder: as many frames as the rate budget
        has tokens, at most MAX_FRAMES_PER_TURN; then again next turn, or when the
        bucket has refilled. Reading a new connection waits until it is done."""
        self._remainder_timer = None
        data = self._remainder
        if data is None:
            return
        if self.sink.stopping:
            self._drop_remainder()
            return
        allowed = min(MAX_FRAMES_PER_TURN, int(self.bucket.refill()))
        if allowed < 1:
            self._remainder_timer = self._loop.call_later(
                self._refill_delay(), self._process_remainder)
            return
        rest = b""
        if _frames(data) > allowed:
            rest = data.split(b"\n", allowed)[-1]
            data = data[:len(data) - len(rest)]
        self._remainder = rest or None
        self._process(data, self._remainder_decoder)
        if self._remainder is not None:
            if self.bucket.tokens >= 1:
                self._loop.call_soon(self._process_remainder)
            else:
                self._remainder_timer = self._loop.call_later(
                    self._refill_delay(), self._process_remainder)
        else:
            self._remainder_decoder = None
            self._resume()

    def _refill_delay(self) -> float:
        """Seconds until the bucket holds one token again."""
        return max(1e-3, (1 - self.bucket.tokens) / self.bucket.rate)

    def _drop_remainder(self) -> None:
        """The domain is removed or the broker stops: what is left goes, counted."""
        if self._remainder is not None:
            self.stats.throttled += _frames(self._remainder)
            self._remainder = None
        self._remainder_decoder = None
        if self._remainder_timer is not None:
            self._remainder_timer.cancel()
            self._remainder_timer = None

    def pause_writing(self) -> None:
        self.paused_writing = True
        if self._stalled_until and self._loop.time() < self._stalled_until:
            self.stalled = True  # it stops reading again soon after a stall: still stalled
        else:
            self._watch_stall()  # stalled if it does not drain in time, held senders or not
        self._shares.clear()
        self._shares_total = 0
        self._top = None
        self.overflow_dropped = 0
        now = self._loop.time()
        self._mark_at = now + PROGRESS_SETTLE
        self._mark = None
        if now - self._drained_at > PROGRESS_MEMORY:
            self._progress = None  # judged afresh; one that drained lately reads

    def _taken(self) -> int:
        """Bytes the peer took since it connected: written, less what the transport
        still holds and, on a unix socket, what the kernel holds that the peer has not
        read. A socket reports writable only once that falls to a quarter of its send
        buffer: a service reading 2 KiB every 20 ms takes over a second to get there,
        and judged by the transport alone it would seem to take nothing (mute)."""
        t = self.transport
        if t is None:
            return self.written
        taken = self.written - int(t.get_write_buffer_size())
        if self._outq_fd is not None:
            try:
                taken -= unread_by_peer(self._outq_fd)
            except OSError as exc:  # judged by the transport alone, as on a pty
                if not self._outq_failed:
                    self._outq_failed = True
                    self.log.debug("channel.unread_unknown", error=str(exc))
        return taken

    def progress(self) -> bool | None:
        """Does this full destination read? True when it took some of its bytes over
        the last progress window (a slow reader does, however slowly), False when it
        took none for MUTE_AFTER (mute), None meanwhile (not judged: the first window
        starts PROGRESS_SETTLE after it got full). Asked on a full queue's path and by
        the progress timer only."""
        now = self._loop.time()
        if now < self._mark_at:
            return self._progress
        taken = self._taken()
        if self._mark is None:
            self._mark, self._mark_at = taken, now
            self._idle_since = now
        elif now - self._mark_at >= min(PROGRESS_WINDOW, self.limits.stall_timeout / 4):
            if taken > self._mark:
                self._progress = True
                self._idle_since = now
            elif now - self._idle_since >= min(MUTE_AFTER, self.limits.stall_timeout):
                self._progress = False
            else:
                self._progress = None  # idle lately, not for long: not judged
            self._mark, self._mark_at = taken, now
        return self._progress

    def mute(self) -> bool:
        """Full, and took none of its bytes for MUTE_AFTER."""
        return self.progress() is False

    def _watch_progress(self) -> None:
        """While broadcasters wait on this destination, look again every window: they
        are released as soon as it makes no progress."""
        if self._progress_timer is None:
            self._progress_timer = self._loop.call_later(
                min(PROGRESS_WINDOW, self.limits.stall_timeout / 4), self._check_progress)

    def _check_progress(self) -> None:
        self._progress_timer = None
        if not self.paused_writing or not self._fanout_waiters:
            return
        if self.mute():
            for waiter in self._fanout_waiters:
                self._waiters.discard(waiter)
                waiter.release(self)
            self._fanout_waiters.clear()
        else:
            self._watch_progress()

    def resume_writing(self) -> None:
        self._note_out()
        self.paused_writing = False
        self._drained_at = self._loop.time()
        self._progress = True  # it read its queue down: until judged again, it reads
        if self.stalled:
            self.stalled = False
            again = self._loop.time() < self._stalled_until
            self._stalled_until = (self._loop.time()
                                   + STALL_MEMORY_FACTOR * self.limits.stall_timeout)
            if not again:
                self.log.info("domain.drained")
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        for waiter in self._waiters:
            waiter.release(self)
        self._waiters.clear()
        self._fanout_waiters.clear()
        self.sink.drained(self)

    # -- outbound ------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def queued(self) -> int:
        t = self.transport
        return self._out_size + (int(t.get_write_buffer_size()) if t is not None else 0)

    def send(self, data: bytes, sender: Endpoint | None = None, count: int = 1, *,
             fanout: bool = False) -> bool:
        """Queue ``data`` for this peer; False when it was dropped (full or offline).
        ``fanout``: one delivery of a message to several recipients (a broadcast).
        Every drop is counted here (``stats.dropped``, its reason in ``drop_why``),
        whoever sent it: the callers only log and answer it.

        Writes are corked while a read is processed (:class:`WriteCork`)."""
        t = self.transport
        if t is None:
            self.stats.dropped += count
            self.drop_why = "offline"  # its channel went away since the route was decided
            return False
        if self.paused_writing and not self._admit(t, data, sender, count, fanout):
            return False
        if not self._flush_due:
            self._flush_due = True
            cork = self.sink.cork
            if cork.active:
                cork.dirty.append(self)  # flushed when this read is processed
            else:
                self._loop.call_soon(self.flush)
        lane = self._lanes.get(sender)
        if lane is None:
            lane = self._lanes[sender] = _Lane()
        lane.units.append(data)
        n = len(data)
        lane.size += n
        self._out_size += n
        self.stats.sent += count
        return True

    def _admit(self, t: Any, data: bytes, sender: Endpoint | None, count: int,
               fanout: bool) -> bool:
        """A full queue shared among its senders (the slow path of :meth:`send`).

        Bytes accepted since the queue got full are counted per sender (``None``: the
        broker's own messages). A sender whose bytes since then pass its equal share of
        the high-water mark stops being read until the queue drains: back-pressure on
        whoever fills it, not on the honest senders of a few messages (a broadcast of
        one notification holds nobody). Once the queue is stalled and past
        ``queue_bytes``, the senders filling it (the one that sent the most, or one
        past its equal share of it) have their messages dropped, while the others' are
        still queued up to the hard bound (``HARD_LIMIT_FACTOR`` times it): a flooder
        fills only its own share, honest senders keep theirs.

        A broadcast is never held back by a recipient that makes no progress
        (:meth:`progress`): one that reads nothing would hold the broadcaster, and so
        every other recipient, until it stalls. Such a recipient keeps the broadcasts
        up to ``queue_bytes`` queued (its overflow, counted in the memory budget);
        beyond, they are dropped for it alone, counted and logged once per burst. A
        recipient that reads, however slowly, holds the broadcaster like any sender
        past its share: it loses nothing. While it is not judged (idle for less than
        MUTE_AFTER), it holds nobody within its overflow; past it, the broadcaster is
        held until it reads again or is judged mute, and released then
        (``_check_progress``): a starved reader loses nothing, a mute one costs at most
        MUTE_AFTER once, and only to a broadcaster faster than its overflow.

        The memory budget of all the queues together cuts in order: past
        ``RECLAIM_AT`` of it, a queue past its share of the budget that makes no
        progress, or past twice its share, takes no more; past the whole budget, any
        queue past its share. Readers that stopped are cut first, slow readers last."""
        n = len(data)
        shares = self._shares
        mine = shares.get(sender, 0) + n
        senders = len(shares) + (sender not in shares)
        top = self._top
        filling = top is sender or not shares or mine > shares.get(top, 0)
        queued = t.get_write_buffer_size() + self._out_size + n
        bound = self.queue_bytes
        over_share = filling or mine > bound // senders
        if queued > bound * HARD_LIMIT_FACTOR or (
                self.stalled and queued > bound and over_share):
            self.stats.dropped += count
            self.drop_why = "queue_full"
            if fanout and self.mute():
                self.overflow_dropped += count
                self.drop_why = "not_reading"
            return False
        memory = self.sink.memory
        if queued > memory.share and self._over_budget(memory, queued, n):
            self.stats.dropped += count
            self.drop_why = "memory_budget"
            return False
        if (sender is not None and sender is not self and not self.stalled
                and mine > self._high // senders):
            progress = self.progress() if fanout else True
            if progress or (progress is None and queued > bound):
                # Reads (held until it drains), or not judged yet and past its
                # overflow (held until judged: released at once if it reads nothing).
                sender.hold(self, fanout=fanout)
            elif queued > bound and progress is False:  # overflow full: for it alone
                self.stats.dropped += count
                self.overflow_dropped += count
                self.drop_why = "not_reading"
                return False
        memory.add(n)
        shares[sender] = mine
        if filling:
            self._top = sender
        self._shares_total += n
        if self._shares_total > 2 * bound:  # recent shares count, not all since full
            for key in shares:
                shares[key] //= 2
            self._shares_total //= 2
        return True

    def _over_budget(self, memory: MemoryBudget, queued: int, n: int) -> bool:
        """Is this queue (past its share of the memory budget) cut? See :meth:`_admit`."""
        if not memory.over(n, RECLAIM_AT):
            return False
        return memory.over(n) or queued > 2 * memory.share or self.mute()

    def flush(self, *, everything: bool = False) -> None:
        """Hand the transport what is queued: while it holds less than ``WRITE_AHEAD``
        (a paced transport: it says when it has room again, :meth:`_transport_ready`),
        else all of it in one write.

        The order is fair among the senders: the broker's own messages first (few: its
        answers, notifications and the spool's replay, whose stream positions rely on
        it, :meth:`position`), then a round robin over the senders' lanes, ``QUANTUM``
        bytes each per round (deficit round robin by bytes), each sender's frames in
        their order. With one sender (the common case) its frames go as they came, as
        many as fit in one write. Then, on a paced transport, the queue's own marks:
        past the high-water mark it is full (:meth:`pause_writing`), at a quarter of it
        it drained (:meth:`resume_writing`)."""
        self._flush_due = False
        t = self.transport
        if t is None or t.is_closing():
            return  # kept: what is lost with the channel is counted or spooled
        if self._out_size and (everything or not self._busy):
            if self._paced and not everything:
                while self._lanes and not self._busy and not t.is_closing():
                    room = self._ahead + 1 - int(t.get_write_buffer_size())
                    self._hand(t, self._gather(max(room, QUANTUM)))
            else:
                self._hand(t, self._gather(None))
        if self._paced:
            queued = self._out_size + int(t.get_write_buffer_size())
            if self.paused_writing:
                if queued <= self._high // 4:
                    self.resume_writing()
            elif queued > self._high:
                self.pause_writing()

    def _gather(self, room: int | None) -> bytes:
        """About ``room`` bytes of whole frames from the lanes (None: all), in the
        order of :meth:`flush`."""
        lanes = self._lanes
        pieces: list[bytes] = []
        total = 0
        left = ALL if room is None else room
        while lanes and total < left:
            own = lanes.get(None)
            if own is not None or len(lanes) == 1:
                key, lane = (None, own) if own is not None else next(iter(lanes.items()))
                lane.credit = 0
                piece = lane.take(left - total)
            else:
                key = next(iter(lanes))
                lane = lanes[key]
                lane.credit += QUANTUM
                piece = b""
                if lane.credit > 0:
                    piece = lane.take(lane.credit)
                    lane.credit -= len(piece)
                if lane.size:
                    del lanes[key]  # to the end of the round
                    lanes[key] = lane
            if piece:
                pieces.append(piece)
                total += len(piece)
            if not lane.size:
                del lanes[key]
        self._out_size -= total
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _hand(self, t: Any, data: bytes) -> None:
        """One write to the transport, at stream position ``written``."""
        self.written += len(data)
        t.write(data)
        if self._handed is not None:
            self._handed.append((self.written, data))
            self._note_out()

    def _transport_ready(self) -> None:
        """The transport went below its low-water mark: hand it more."""
        self._busy = False
        self._note_out()
        self.flush()

    def _note_out(self) -> None:
        """Take the stream position that left the broker now, and forget what
        ``_handed`` kept before it."""
        t, handed = self.transport, self._handed
        if t is None or handed is None:
            return
        self._out_at = out = self.written - int(t.get_write_buffer_size())
        while handed and handed[0][0] <= out:
            handed.popleft()

    def eof_received(self) -> bool | None:
        # The peer closed: nothing more leaves (the transport's buffer is dropped when
        # its next write fails), so what it still buffers is known exactly here.
        self._note_out()
        return None

    def hold(self, dest: Endpoint, *, fanout: bool = False) -> None:
        """Stop reading this peer until ``dest`` drains (or is declared stalled; or,
        for a broadcaster, makes no progress)."""
        if dest in self._held_by or self.transport is None:
            return
        self._held_by.add(dest)
        dest._waiters.add(self)
        if fanout:
            dest._fanout_waiters.add(self)
            dest._watch_progress()
        self.transport.pause_reading()
        dest._watch_stall()  # started when it got full; again if it fired meanwhile

    def _watch_stall(self) -> None:
        """Declare this destination stalled if it does not drain within its timeout."""
        if self._stall_timer is None:
            self._stall_timer = self._loop.call_later(self.limits.stall_timeout,
                                                      self._stall)

    def release(self, dest: Endpoint) -> None:
        self._held_by.discard(dest)
        self._resume()

    def unhold(self, dest: Endpoint) -> None:
        """Undo :meth:`hold` before ``dest`` drains: ``dest`` forgets this peer and the
        peer is read again (unless another destination still holds it)."""
        dest._waiters.discard(self)
        dest._fanout_waiters.discard(self)
        self.release(dest)

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
        self._fanout_waiters.clear()

    def close(self) -> None:
        if self.transport is not None:
            self.flush(everything=True)  # the transport writes it out, then closes
            self.transport.close()


class DomainEndpoint(Endpoint):
    """A DomU's channel, kept open: connect, serve, and reconnect with backoff."""

    KEEPS_HANDED = True
    kind = "domain"

    def __init__(self, sink: Sink, name: str, path: str, *, discovered: bool = False) -> None:
        super().__init__(sink, name)
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
        self.echo = EchoWindow()
        """What was written here lately, to recognise it if the DomU's tty echoes it."""
        self.verify: Callable[[], Awaitable[bool]] | None = None
        """Asked before every connection attempt, when set: is ``path`` still this
        domain's channel? (xenstore-bound domains: a path it no longer lists is never
        opened.)"""

    def _hand(self, t: Any, data: bytes) -> None:
        self.echo.sent((data,))
        super()._hand(t, data)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._supervise(),
                                                            name=f"domain:{self.name}")

    def detach(self) -> asyncio.Task[None] | None:
        """Stop at once: no more reconnection, the channel aborted (not closed: a domain
        that stopped reading would keep its fd and buffer forever). Returns the
        supervisor task, cancelled, for the caller to await if it wants."""
        self._stopping = True
        self.nudges = False  # its bound method held the endpoint in a cycle
        self._backlog = None  # read but not yet routed: it goes with the domain
        self._drop_remainder()
        if self.transport is not None:
            self._note_out()  # exact: the transport's buffer is dropped with the abort
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
        delay = self.sink.settings.reconnect_min
        failing: str | None = None
        while not self._stopping:
            try:
                if self.verify is not None and not await self.verify():
                    raise ChannelError(errno.ESTALE, "xenstore no longer gives this path "
                                       "to this domain", self.path)
                self.channel_type = channel_kind(self.path)
                self.nudges = self.channel_type == "socket"
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
                delay = min(delay * 2, self.sink.settings.reconnect_max)
                continue
            failing = None
            delay = self.sink.settings.reconnect_min
            self.connected_since = time.time()
            self.log.info("domain.connected", path=self.path, channel=self.channel_type)
            self.sink.domain_up(self)
            self.attempted.set()
            await self._lost.wait()
            self.connected_since = None
            self.log.info("domain.disconnected", reason=self._lost_reason)
            self.sink.domain_down(self)
            # A channel that drops at once (a pty nobody holds) should not spin.
            await asyncio.sleep(delay)
