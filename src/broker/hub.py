"""The broker: the registry of endpoints and the receive path.

Everything that decides is in the pure layer (``router.decide``: the route, then the
per-message rules; the policy; ``PendingCommands``); this module applies decisions:
it writes bytes, answers refused commands, counts and logs, and answers the built-in
commands. It is the endpoints' :class:`~broker.endpoint.Sink` and the router's
:class:`~broker.router.RoutingView`.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import structlog

import messagerie
from messagerie import (
    DOM0,
    TOUS,
    Categorie,
    Code,
    Commande,
    Evenement,
    FrameError,
    Journal,
    Message,
    MessageInvalide,
    Notification,
    Reponse,
    decode,
    encode,
)
from messagerie.envelope import Envelope, Run

from .config import Config, Limits
from .dom0 import Dom0Connection, Dom0Services
from .endpoint import DomainEndpoint, Endpoint, Settings, WriteCork
from .inflight import KEEP_UNREACHABLE, Recovery
from .memory import MemoryBudget, cgroup_memory_max, default_budget
from .pending import ANSWER, DOMAIN, FORGOTTEN, Pending, PendingCommands, Restored
from .policy import Policy
from .router import (
    ABANDON_CATEGORY,
    ABANDON_EVENT,
    DENIED,
    DISPATCHED,
    SPOOFED,
    Answer,
    Builtin,
    Decision,
    Deliver,
    Forward,
    PolicyLike,
    Recovered,
    Refuse,
    Routable,
    Route,
    dispatch,
    route,
)
from .spool import (
    AVAILABLE,
    UNAVAILABLE,
    Bounds,
    Entry,
    Lane,
    Row,
    Spool,
    StoreError,
    default_path,
)
from .spool import now as spool_now
from .trace import Tracer

JOURNAL_TEXT_MAX = 2000
"""Characters of a domain's ``journal`` text written to the broker's log."""
JOURNAL_DATA_MAX = 4096
"""Bytes of a domain's ``journal`` data written to the broker's log."""
encode_json = msgspec.json.Encoder().encode
DEFERRED_MAX = 4096
"""Built-in commands of one asker whose answers may wait for its queue to drain."""
DEFERRED_RETRY = 0.005
"""Seconds before a waiting answer looks again at a queue that reported no drain."""


FRAGMENT = "fragment"
"""The spool's ``kind`` for the tail of a frame whose head the channel took before the
broker stopped (:meth:`Broker._spool_lost`): replayed as bytes, first."""
REPLAY_CHUNK = 256
"""Spooled messages one domain's replay hands its channel per loop turn (other domains'
traffic and replays take turns between chunks)."""
REPLAY_RETRY = 0.005
"""Seconds before a replay waiting on a full channel that reported no drain looks again."""
SPOOL_RETRY = 5.0
"""Seconds before an unavailable spool (unwritable or full state directory) is tried
again."""

ROUTE_CACHE_MAX = 4096
"""Routing decisions kept (per source, destination, type and name)."""
RouteKey = tuple[str, str, str, str | None]


DEPARTED_MAX = 64
"""Departed discovered domains remembered at once (:meth:`Broker.depart_domain`): past
it, the one that departed first is forgotten, its spool answered and dropped. Bounds
the endpoints (and spools) that a flurry of short-lived domains can leave behind."""


class _DelaiPayload(msgspec.Struct):
    delai: float | None = None


class _DelaiOf(msgspec.Struct):
    """What the broker reads of a valid ``commande`` beyond its envelope: the deadline
    its payload carries (every other field is skipped)."""

    payload: _DelaiPayload


_decode_delai = msgspec.json.Decoder(_DelaiOf).decode


def delai_of(raw: bytes) -> float | None:
    """The ``delai`` of the valid ``commande`` frame ``raw``, if it carries one."""
    try:
        return _decode_delai(raw).payload.delai
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None  # valid to the envelope check, beyond this parser (the receiver's call)


def lines_of(data: bytes) -> list[bytes]:
    """``data``'s frames, each with its newline (the last one maybe without): split at
    ``\n`` only. ``bytes.splitlines`` also splits at a ``\r``, which is JSON whitespace
    inside a frame (frames are forwarded as sent)."""
    parts = data.split(b"\n")
    lines = [part + b"\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def _lost_messages(unsent: tuple[int, bytes] | None, kept: set[int]) -> int:
    """The messages in ``unsent`` (stream position, bytes queued and not written) but
    those ending at a position in ``kept``; a frame whose head left counts (its tail
    did not), an empty line (a relay's nudge) does not."""
    if unsent is None:
        return 0
    position, data = unsent
    lost = 0
    for frame in lines_of(data):
        position += len(frame)
        if frame != b"\n" and position not in kept:
            lost += 1
    return lost


class _Route:
    """A cached routing decision and the messages it routed since the last summary."""

    __slots__ = ("count", "decision")

    def __init__(self, decision: Route) -> None:
        self.decision = decision
        self.count = 0


class Broker:
    """State and receive path. One per process; asyncio at the edges only."""

    def __init__(self, config: Config, policy: PolicyLike | None = None) -> None:
        self.config = config
        self.settings = Settings.of(config)
        """What every endpoint reads of the configuration (``Sink.settings``)."""
        self.cork = WriteCork()
        """Sends are corked while an endpoint's read is processed."""
        self._routes: dict[RouteKey, _Route] = {}
        self.traffic: dict[tuple[str, str, str], int] = {}
        """Messages routed per (source, destination, type) since the last summary
        (plus the counts kept with the cached decisions)."""
        self._policy: PolicyLike = policy or Policy.allow_all()
        self.domains: dict[str, DomainEndpoint] = {}
        self.dom0 = Dom0Services()
        limits = config.limits
        self.pending = PendingCommands[Endpoint](
            limit=limits.commands_in_flight, ttl=limits.command_ttl,
            per_target=min(limits.commands_per_destination, limits.commands_in_flight),
            limit_of=lambda ep: ep.limits.commands_in_flight,
            ttl_of=lambda ep: ep.limits.command_ttl,
            per_target_of=lambda ep: min(ep.limits.commands_per_destination,
                                         ep.limits.commands_in_flight))
        self.started = time.monotonic()
        self.log = structlog.get_logger("broker").bind()
        self.debug = config.log_level == "debug"
        self.stopping = False
        """Shutdown began: endpoints are never resumed."""
        self.tracer: Tracer | None = None
        """The traffic monitors (``messagerie trace``), while at least one listens."""
        self.memory = MemoryBudget(
            limits.queues_memory or default_budget(cgroup_memory_max()), self.endpoints)
        """All the queues' bytes together (``Sink.memory``)."""
        self._deferred: dict[Endpoint, collections.deque[Envelope]] = {}
        """Built-in commands whose answers wait for their asker's queue to drain."""
        self.recovery: Recovery | None = None
        """The commands in flight kept across restarts (``broker.inflight``), once the
        daemon opened the state directory."""
        self.spool = Spool(self._spool_bounds, total_bytes=config.spool_total_bytes)
        """Messages for offline declared domains (:meth:`open_spool`; until it is
        opened they are refused as offline)."""
        self._spool_commit: asyncio.Handle | None = None
        self._spool_failed_at = 0.0
        self._spool_logged: str | None = None
        """The unavailability last logged (logged again only when it changes)."""
        self._bounds: dict[str, tuple[Limits, Bounds]] = {}
        """Each destination's spool bounds, with the limits they were read from."""
        self._replays: set[DomainEndpoint] = set()
        """Domains whose replay step is scheduled."""
        self._expiry: asyncio.TimerHandle | None = None
        self._expiry_at = float("inf")
        self._removed_totals = {"received": 0, "sent": 0, "refused": 0, "invalid": 0,
                                "dropped": 0}
        """The counters of the domains removed so far (:meth:`totals`)."""
        self.departed: collections.OrderedDict[str, float] = collections.OrderedDict()
        """Discovered domains whose channel disappeared (socket file gone, released by
        xenstore), kept known as offline until the given ``time.monotonic()`` (their
        spool's age bound from departure), oldest departure first; at most
        :data:`DEPARTED_MAX` (:meth:`depart_domain`)."""
        """The timer that expires the next command due, and when (``pending.clock``)."""

    @property
    def policy(self) -> PolicyLike:
        return self._policy

    @policy.setter
    def policy(self, policy: PolicyLike) -> None:
        self._policy = policy
        self.invalidate_routes()

    def reconfigure(self, config: Config) -> None:
        """Apply a reloaded configuration's limits, validation and log level, now."""
        self.config = config
        self.settings = settings = Settings.of(config)
        self.spool.total_bytes = config.spool_total_bytes
        self.memory.limit = (config.limits.queues_memory
                             or default_budget(cgroup_memory_max()))
        self.memory.resize(len(self.domains) - len(self.departed))
        self.pending.limit = config.limits.commands_in_flight
        self.pending.per_target = min(config.limits.commands_per_destination,
                                      config.limits.commands_in_flight)
        self.pending.ttl = config.limits.command_ttl
        self.debug = config.log_level == "debug"
        self.log = structlog.get_logger("broker").bind()
        for ep in self.endpoints():
            ep.apply(settings)
            # Bound loggers keep the level they were made with: remake them, same context.
            ep.log = structlog.get_logger("broker").bind(**structlog.get_context(ep.log))

    def endpoints(self) -> list[Endpoint]:
        """Every endpoint: the domains' and dom0's services'."""
        return [*self.domains.values(), *self.dom0.clients]

    # -- RoutingView ---------------------------------------------------------------
    def is_known(self, name: str) -> bool:
        return name in self.domains

    def is_connected(self, name: str) -> bool:
        ep = self.domains.get(name)
        return ep is not None and ep.connected_since is not None and ep.transport is not None

    def connected(self) -> Iterator[str]:
        for name, ep in self.domains.items():
            if ep.connected_since is not None and ep.transport is not None:
                yield name

    def endpoint(self, name: str) -> Endpoint:
        return self.domains[name]

    def dom0_service(self, command: str) -> Endpoint | None:
        return self.dom0.services.get(command)

    def spools(self, name: str) -> bool:
        if self.spool.state != AVAILABLE:
            return False
        if not self.is_connected(name):
            return True
        lane = self.spool.lanes.get(name)
        return lane is not None and lane.replaying

    # -- receive path (Sink) -------------------------------------------------------
    def receive(self, peer: Endpoint, item: Envelope | Run | FrameError) -> None:
        """Called by an endpoint for every frame it decoded (or failed to). Hot path."""
        if type(item) is Run:
            self.receive_run(peer, item)
            return
        if type(item) is FrameError:
            self.invalid(peer, item)
            return
        msg: Envelope = item  # type: ignore[assignment]
        peer.stats.received += 1
        kind = msg.type
        routed, cached = self._route(peer, msg)
        if type(routed) is Refuse:
            self.refuse(peer, msg, routed)
            return
        deliver: Deliver = routed  # type: ignore[assignment]
        data = msg.raw + b"\n"
        if kind in DISPATCHED:
            if not self._dispatch(peer, msg, dispatch(msg, deliver, peer, self), data):
                return
        else:
            # A notification or a journal: the route decided (hot path, inlined).
            targets = deliver.targets
            fanout = len(targets) > 1
            if deliver.spool:
                self._to_spool(peer, msg, data)
            else:
                for target in targets:
                    if target == DOM0:
                        self._to_dom0(peer, msg, data, fanout)
                    else:
                        dest = self.domains[target]
                        if not dest.send(data, peer, fanout=fanout):
                            self._dropped(peer, dest, msg)
            if fanout:
                # The rate budget counts deliveries: a broadcast to N costs N tokens.
                peer.charge += len(targets) - 1
            if deliver.dom0_services or deliver.denied:
                self._after_broadcast(peer, msg, deliver, data)
        if cached is not None:
            cached.count += 1
        else:
            flow = (msg.source, msg.destination, kind)
            self.traffic[flow] = self.traffic.get(flow, 0) + 1
        if self.tracer is not None:
            self.tracer.routed(peer, msg, len(data), deliver)
        if self.debug:
            peer.log.debug("message.routed", source=msg.source, destination=msg.destination,
                           type=kind, name=msg.name, id=msg.id,
                           size=len(data), targets=list(deliver.targets))

    def receive_run(self, peer: Endpoint, run: Run) -> None:
        """Consecutive notifications from one source to one domain with one category:
        one decision, one write, the counters by ``count``. Hottest path."""
        msg = run.envelope
        n = run.count
        peer.stats.received += n
        decision, cached = self._route(peer, msg)
        if type(decision) is Refuse:
            # Each line on its own: an echo in front hides none of the forgeries behind.
            echoed = self._echoed(peer, msg, run.data, n) if decision.kind == SPOOFED else 0
            for _ in range(n - echoed):
                self.refuse(peer, msg, decision, echo=False)
            return
        deliver: Deliver = decision  # type: ignore[assignment]
        # A run never goes to tous or dom0 (decode_runs): one target, a domain.
        if deliver.spool:
            self._to_spool(peer, msg, run.data, count=n)
        else:
            dest = self.domains[deliver.targets[0]]
            if not dest.send(run.data, peer, count=n):
                self._dropped(peer, dest, msg, count=n, run=run.data)
        assert cached is not None  # a genuine source, or refused above
        cached.count += n
        if self.tracer is not None:
            self.tracer.routed(peer, msg, len(run.data), deliver, run=run.data)
        if self.debug:
            peer.log.debug("message.routed", source=msg.source, destination=msg.destination,
                           type=msg.type, name=msg.name, id=None, size=len(run.data),
                           targets=list(deliver.targets), count=n)

    def _route(self, peer: Endpoint, msg: Envelope) -> tuple[Route, _Route | None]:
        """The route's decision (``router.route``), and its cache entry when it has one."""
        if msg.type != "reponse" and msg.source == peer.name:
            # Routes of everything but answers depend only on the registry,
            # connectivity and the policy: cached until one of them changes.
            key = (msg.source, msg.destination, msg.type, msg.name)
            cached = self._routes.get(key)
            if cached is None:
                cached = self._cache_route(msg, key)
            return cached.decision, cached
        return route(msg, peer.name, self), None

    def _cache_route(self, msg: Envelope, key: RouteKey) -> _Route:
        routes = self._routes
        if len(routes) >= ROUTE_CACHE_MAX:  # bounded whatever names a domain invents
            self.invalidate_routes()
        cached = routes[key] = _Route(route(msg, msg.source, self))
        return cached

    def invalidate_routes(self) -> None:
        """Forget cached decisions: the registry, a domain's connection or the policy
        changed. Their traffic counts go to the next summary."""
        self._fold_counts()
        self._routes.clear()

    def _fold_counts(self) -> None:
        traffic = self.traffic
        for (source, destination, kind, _), cached in self._routes.items():
            if cached.count:
                flow = (source, destination, kind)
                traffic[flow] = traffic.get(flow, 0) + cached.count
                cached.count = 0

    def log_traffic(self, interval: float) -> None:
        """One ``traffic.summary`` event (info) with the messages routed per (source,
        destination, type) since the last one: what flows, at the production level,
        for the price of a counter per message (``message.routed`` is debug)."""
        self._fold_counts()
        if not self.traffic:
            return
        flows = [{"source": s, "destination": d, "type": t, "messages": n}
                 for (s, d, t), n in sorted(self.traffic.items())]
        total = sum(self.traffic.values())
        self.traffic = {}
        self.log.info("traffic.summary", interval=interval, messages=total, flows=flows)

    # -- applying decisions ----------------------------------------------------------
    def _dispatch(self, peer: Endpoint, msg: Envelope, decision: Decision[Endpoint],
                  data: bytes) -> bool:
        """Apply what ``router.dispatch`` decided on a commande or a reponse; False if
        it was refused."""
        dtype = type(decision)
        if dtype is Forward:
            self._forward(peer, msg, decision, data)  # type: ignore[arg-type]
        elif dtype is Answer:
            self._answer(peer, msg, decision, data)  # type: ignore[arg-type]
        elif dtype is Builtin:
            self._builtin(peer, msg)
        elif dtype is Recovered:
            self._answer_restored(peer, msg, decision.command, data)  # type: ignore[union-attr,arg-type]
        else:
            assert dtype is Refuse, decision
            self.refuse(peer, msg, decision)  # type: ignore[arg-type]
            return False
        return True

    def _deliver(self, peer: Endpoint | None, msg: Routable, deliver: Deliver,
                 data: bytes) -> None:
        """A notification or a journal: to each target (dom0: its services and, for a
        journal, the broker's log). ``receive`` has this inlined."""
        if deliver.spool:
            self._to_spool(peer, msg, data)
            return
        fanout = len(deliver.targets) > 1
        for target in deliver.targets:
            if target == DOM0:
                self._to_dom0(peer, msg, data, fanout)
            else:
                dest = self.domains[target]
                if not dest.send(data, peer, fanout=fanout) and peer is not None:
                    self._dropped(peer, dest, msg)
        if deliver.dom0_services or deliver.denied:
            self._after_broadcast(peer, msg, deliver, data)

    def _after_broadcast(self, peer: Endpoint | None, msg: Routable, deliver: Deliver,
                         data: bytes) -> None:
        if deliver.dom0_services:
            self._to_dom0_services(peer, msg, data, bool(deliver.targets))
        if deliver.denied and peer is not None:
            if self.tracer is not None:
                self.tracer.filtered(peer, msg, deliver.denied)
            peer.stats.refused += 1
            if peer.log_budget.allow():
                peer.log.warning("message.filtered", security=True, type=msg.type,
                                 name=msg.name, denied=[d for d, _ in deliver.denied],
                                 rules=sorted({r for _, r in deliver.denied}))

    def _to_dom0(self, peer: Endpoint | None, msg: Routable, data: bytes,
                 fanout: bool = False) -> None:
        if msg.type == "journal" and peer is not None:
            self.dom0.received_journal += 1
            journal = self.complete(peer, msg)  # type: ignore[arg-type]
            if journal is None:
                return
            self.journal(journal, peer)  # type: ignore[arg-type]
        self._to_dom0_services(peer, msg, data, fanout)

    def _to_dom0_services(self, peer: Endpoint | None, msg: Routable, data: bytes,
                          fanout: bool = False) -> None:
        """To every dom0 service but ``peer`` (the sender, whose reading is held back
        while a service is full, as for a domain). ``fanout``: the message has other
        recipients (a broadcast); so it has when it goes to several services. Each
        service is then a broadcast's recipient like a domain: one that reads nothing
        (mute) holds no broadcaster, its copies dropped for it alone past its overflow
        (``Endpoint._admit``). Drops are counted and logged."""
        clients = self.dom0.clients
        if not fanout:
            fanout = len(clients) - (peer in clients) > 1
        for conn in clients:
            if conn is not peer and not conn.send(data, peer, fanout=fanout):
                self._dropped(peer or conn, conn, msg)

    def _forward(self, peer: Endpoint, msg: Envelope, forward: Forward[Endpoint],
                 data: bytes) -> None:
        name, id = msg.name, msg.id
        assert name is not None and id is not None  # a commande has both
        server = forward.server
        pending = self.pending.add(msg.source, id, forward.target, name, asker=peer,
                                   target=server, delai=delai_of(msg.raw))
        if pending.deadline < self._expiry_at:
            self._schedule_expiry(pending.deadline)
        if forward.spool:
            pending.spooled = True
            # Its deadline as a Unix time: the row outlives this process's clock.
            deadline = spool_now() + (pending.deadline - self.pending.clock())
            self._to_spool(peer, msg, data, deadline=deadline)
        elif not server.send(data, peer):
            self._dropped(peer, server, msg)

    def _answer(self, peer: Endpoint, msg: Envelope, answer: Answer[Endpoint],
                data: bytes) -> None:
        # The very endpoint that asked (a domain, or one of several dom0 services).
        command = answer.command
        self.pending.close(command.commander, command.id)
        if not command.asker.send(data, peer):
            self._dropped(peer, command.asker, msg)

    def _answer_restored(self, peer: Endpoint, msg: Envelope, command: Restored,
                         data: bytes) -> None:
        """A late answer to a command the previous process forwarded."""
        self.pending.close_restored(command.key)
        if command.asker_kind != DOMAIN:
            peer.log.info("reponse.asker_gone", id=msg.id, command=msg.name,
                          detail="a dom0 service asked before the broker restarted: its "
                                 "call failed when its connection reset")
            return
        asker = self.domains[command.asker]  # route(): its destination, connected
        if not asker.send(data, peer):
            self._dropped(peer, asker, msg)
            return
        peer.log.info("reponse.after_restart", id=msg.id, command=msg.name,
                      destination=command.asker)

    def _builtin(self, peer: Endpoint, msg: Envelope) -> None:
        """Answer a built-in command; its answer waits while the asker's own queue is
        full (a pipeline of ``statistiques`` asks for more than it reads: it is held
        back, as a sender to a full destination is, and nothing is dropped)."""
        waiting = self._deferred.get(peer)
        # Beyond the bound, or once the asker is stalled, the answers go out now (dropped
        # past the queue's bound, counted): a peer cannot grow this list by not reading.
        if waiting is not None and not peer.stalled and len(waiting) < DEFERRED_MAX:
            waiting.append(msg)
            return
        self._answer_builtin(peer, msg)

    def _answer_builtin(self, peer: Endpoint, msg: Envelope) -> bool:
        """Answer now if the answer fits in the asker's queue (or its queue is empty);
        else keep the command for when it drains, hold the asker and return False."""
        # The broker reads this one itself: the whole message, arguments too.
        cmd = self.complete(peer, msg)
        if cmd is None:
            return True
        data = encode(self.builtin(cmd, peer))  # type: ignore[arg-type]
        queued = peer.queued()
        if queued and queued + len(data) > peer.queue_bytes and not peer.stalled:
            self._deferred.setdefault(peer, collections.deque()).appendleft(msg)
            peer.hold(peer)
            # Its drain is reported when its transport was over its high-water mark;
            # if the kernel took it all at once there is none: look again soon.
            asyncio.get_running_loop().call_later(DEFERRED_RETRY, self._retry, peer)
            return False
        peer.send(data)
        return True

    def _retry(self, endpoint: Endpoint) -> None:
        if endpoint in self._deferred and not endpoint.paused_writing:
            self.drained(endpoint)

    def drained(self, endpoint: Endpoint) -> None:
        """Answer the built-ins that waited for ``endpoint``'s queue, in order, while
        they fit; then read it again (or hold it on until it drains again)."""
        waiting = self._deferred.pop(endpoint, None)
        if waiting is None:
            return
        while waiting:
            msg = waiting.popleft()
            if not self._answer_builtin(endpoint, msg):
                # Back at the front of a fresh list: put the rest behind it.
                self._deferred[endpoint].extend(waiting)
                return
        endpoint.unhold(endpoint)

    def complete(self, peer: Endpoint, msg: Envelope) -> Message | None:
        """The whole message, for what the broker reads itself (built-in commands,
        ``journal``): decoded and validated completely. ``None`` if its contents are
        invalid, which is logged as an invalid frame (and a command answered)."""
        try:
            return decode(msg.raw)
        except MessageInvalide as exc:
            raw = msg.raw
            # Counted and logged as invalid; its rate budget was spent when it was read.
            peer.stats.invalid += 1
            self._log_invalid(peer, FrameError(exc.reason, exc.detail, len(raw), exc.field,
                                               raw[:64]))
            if msg.type == "commande":
                self.answer(peer, msg, Code.MESSAGE_INVALIDE, str(exc))
            return None

    def invalid(self, peer: Endpoint, error: FrameError) -> None:
        # Its rate budget was spent when it was read (Endpoint._process).
        peer.stats.invalid += 1
        self._log_invalid(peer, error)

    @staticmethod
    def _log_invalid(peer: Endpoint, error: FrameError) -> None:
        if peer.log_budget.allow():
            peer.log.warning("frame.invalid", reason=str(error.reason), field=error.field,
                             detail=error.detail, size=error.size,
                             excerpt=error.excerpt[:32].decode("ascii", "backslashreplace"),
                             suppressed=peer.log_budget.take_suppressed())

    def refuse(self, peer: Endpoint, msg: Envelope, decision: Refuse, *,
               echo: bool = True) -> None:
        """Refuse ``msg`` (counted, logged, a commande answered); a frame refused for
        its source that is an echo of the broker's output is only logged as one,
        unless ``echo`` is false (the caller looked it up)."""
        if echo and decision.kind == SPOOFED and self._echoed(peer, msg, msg.raw):
            return
        peer.stats.refused += 1
        if self.tracer is not None:
            self.tracer.refused(peer, msg, decision.kind, decision.detail)
        if peer.log_budget.allow():
            log = peer.log.warning if decision.security else peer.log.info
            log("message.refused", why=decision.kind, detail=decision.detail, type=msg.type,
                source=msg.source, destination=msg.destination, name=msg.name,
                id=msg.id, security=decision.security,
                suppressed=peer.log_budget.take_suppressed())
        if msg.type == "commande":
            # The deciding rule is for the log: a DomU is not told the policy's content.
            text = ("refused by the routing policy" if decision.kind == DENIED
                    else decision.detail)
            self.answer(peer, msg, decision.code, text)

    @staticmethod
    def _echoed(peer: Endpoint, msg: Envelope, data: bytes, count: int = 1) -> int:
        """How many of the ``count`` frames in ``data``, refused for their source, are
        the broker's own output coming back on a DomU's tty in echo mode
        (``broker.echo``): dropped, logged as what they are, not as forgeries. Looked
        up only for refused frames."""
        if not isinstance(peer, DomainEndpoint):
            return 0
        echo = peer.echo
        found = echo.echoes(data) if count > 1 else int(echo.is_echo(data))
        if not found:
            return 0
        if peer.log_budget.allow():
            peer.log.info("frame.echoed", type=msg.type, source=msg.source,
                          destination=msg.destination, name=msg.name, count=found,
                          echoed=echo.echoed, suppressed=peer.log_budget.take_suppressed(),
                          detail="the DomU's channel echoed what dom0 wrote (no raw-mode "
                                 "holder when it was opened)")
        return found

    def answer(self, peer: Endpoint, cmd: Routable, code: str, text: str) -> None:
        """Send the broker's error reponse to the command ``cmd`` back on ``peer``'s
        channel, addressed to the peer (not to a ``source`` it may have forged)."""
        assert cmd.id is not None and cmd.name is not None
        reply = Reponse(DOM0, peer.name, cmd.id, cmd.name, "erreur",
                        erreur={"code": code, "message": text})
        peer.send(encode(reply))

    def _dropped(self, sender: Endpoint, dest: Endpoint, msg: Routable, count: int = 1,
                 run: bytes | None = None) -> None:
        """Trace, log and answer what ``dest.send`` refused (and counted)."""
        why = dest.drop_why
        if self.tracer is not None:
            self.tracer.dropped(sender, dest, msg, count, run, why=why)
        # A mute recipient's broadcasts: logged once per burst (the first), all counted.
        if (why != "not_reading" or dest.overflow_dropped <= count) and \
                dest.log_budget.allow():
            dest.log.warning("message.dropped", why=why, source=msg.source,
                             type=msg.type, name=msg.name, count=count, queued=dest.queued(),
                             suppressed=dest.log_budget.take_suppressed())
        if msg.type == "commande":
            assert msg.id is not None
            self.pending.close(msg.source, msg.id)
            if why == "offline":
                self.answer(sender, msg, Code.DESTINATION_HORS_LIGNE,
                            f"{dest.name} is not connected")
            else:
                self.answer(sender, msg, Code.DESTINATION_SATUREE,
                            f"{dest.name} is not reading its channel")

    # -- the spool ---------------------------------------------------------------------
    def _spool_bounds(self, destination: str) -> Bounds:
        ep = self.domains.get(destination)
        # The endpoint's limits are resolved once (and again at a reload).
        limits = ep.limits if ep is not None else self.config.limits_for(destination)
        bounds = self._bounds.get(destination)
        if bounds is None or bounds[0] is not limits:
            bounds = self._bounds[destination] = (limits, Bounds(
                limits.spool_messages, limits.spool_bytes, limits.spool_age))
        return bounds[1]

    def open_spool(self) -> None:
        """Open the spool's file (``spool.chemin``, else the state directory). If it
        cannot be opened the broker routes on without it (as if ``spool.actif`` were
        false), says so once (``spool.unavailable``) and tries again every
        :data:`SPOOL_RETRY` seconds."""
        spool = self.spool
        if not self.config.spool:
            spool.disable()
            self.log.info("spool.disabled", detail="spool.actif = false: messages to "
                          "offline domains are dropped, commands answered "
                          "destination_hors_ligne")
            return
        if self.config.spool_path is not None:
            path, temporary = self.config.spool_path, False
        elif spool.path is not None:
            path, temporary = spool.path, spool.temporary
        else:
            path, temporary = default_path()
        try:
            spool.open(path, temporary=temporary)
        except StoreError as exc:
            self._spool_unavailable(exc)
            return
        self._spool_logged = None
        self.invalidate_routes()
        held = {d: lane.depth.count for d, lane in spool.lanes.items() if lane.depth.count}
        self.log.info("spool.opened", path=path, temporary=temporary, held=held,
                      **({"detail": "no state directory ($STATE_DIRECTORY) and no "
                          "spool.chemin: the spool lasts as long as this process"}
                         if temporary else {}))
        for name in held:
            ep = self.domains.get(name)
            if ep is not None and self.is_connected(name):
                self.domain_up(ep)

    def close_spool(self) -> None:
        """Commit what is batched and close the file (at shutdown)."""
        self._commit_spool()
        self.spool.close()

    def _spool_unavailable(self, exc: StoreError) -> None:
        self._spool_failed_at = time.monotonic()
        self.invalidate_routes()  # offline domains are refused again, as without a spool
        if self._spool_logged != exc.reason:
            self._spool_logged = exc.reason
            self.log.error("spool.unavailable", path=exc.path, error=exc.reason,
                           detail="messages to offline domains are dropped and commands "
                                  "answered destination_hors_ligne until the spool can be "
                                  f"written (tried again every {SPOOL_RETRY:g} s)")

    def _to_spool(self, peer: Endpoint | None, msg: Routable, data: bytes, count: int = 1,
                  deadline: float | None = None) -> None:
        """Into the spool of ``msg``'s destination, in the next commit: ``data`` (one
        frame, or ``count`` frames of a run). What is beyond its bounds is refused:
        counted, logged once per burst, a command answered at once."""
        spool = self.spool
        destination = msg.destination
        at = spool_now()
        frames = [data] if count == 1 else lines_of(data)
        for frame in frames:
            bound = spool.add(Entry(destination, msg.source, msg.type, msg.name, msg.id, at,
                                    deadline, frame))
            if bound is not None:
                self._spool_refused(peer, destination, msg, bound)
        if spool.dirty and self._spool_commit is None:
            self._spool_commit = asyncio.get_running_loop().call_soon(self._commit_spool)

    def _spool_refused(self, peer: Endpoint | None, destination: str, msg: Routable,
                       bound: str) -> None:
        lane = self.spool.lane(destination)
        dest = self.domains.get(destination)
        if dest is not None:
            dest.stats.dropped += 1
        if lane.overflow.refuse(bound):
            bounds = self._spool_bounds(destination)
            limit = {"messages": bounds.messages, "octets": bounds.bytes,
                     "octets_total": self.spool.total_bytes}.get(bound)
            self.log.warning("spool.full", domain=destination, bound=bound, limit=limit,
                             messages=lane.depth.count, bytes=lane.depth.bytes,
                             detail="messages beyond this bound are dropped (commands "
                                    "answered destination_hors_ligne) until it has room")
        if msg.type == "commande" and peer is not None:
            assert msg.id is not None
            self.pending.close(msg.source, msg.id)
            self.answer(peer, msg, Code.DESTINATION_HORS_LIGNE,
                        f"domain {destination} is not connected and its spool is full "
                        f"({bound})")

    def _commit_spool(self) -> None:
        """The group commit: everything spooled (and written out) this loop turn, in one
        transaction. On failure what it held for connected domains is written to their
        channels, the rest dropped as without a spool."""
        self._spool_commit = None
        lost = self.spool.commit()
        if not lost:
            return
        self._spool_unavailable(StoreError(self.spool.path or "?", self.spool.error or "?"))
        delivered = 0
        for entry in lost:
            dest = self.domains.get(entry.destination)
            waiting = (self.pending.get(entry.source, entry.msg_id)
                       if entry.kind == "commande" and entry.msg_id is not None else None)
            # Connected (spooled behind its replay): delivered now, as without a spool,
            # rather than dropped (a command only while its commander waits for it).
            live = (entry.kind != FRAGMENT and self.is_connected(entry.destination)
                    and (entry.kind != "commande"
                         or (waiting is not None and waiting.target is dest)))
            if dest is not None and live:
                if dest.send(entry.frame, self.domains.get(entry.source)):
                    if waiting is not None:
                        waiting.spooled = False  # with the domain now: answered if it drops
                    delivered += 1
                    continue
                # Refused: send() counted it.
            elif dest is not None:
                dest.stats.dropped += 1
            if entry.kind == "commande" and entry.msg_id is not None:
                pending = self.pending.close(entry.source, entry.msg_id)
                if pending is not None:
                    self._answer_for(pending, Code.DESTINATION_HORS_LIGNE,
                                     f"domain {entry.destination} is not connected and the "
                                     "spool cannot be written")
        if delivered < len(lost):
            self.log.warning("spool.dropped", why="unavailable",
                             messages=len(lost) - delivered,
                             domains=sorted({e.destination for e in lost}))

    def _spool_lost(self, ep: DomainEndpoint) -> None:
        """``ep``'s channel went down: its replay stops where its bytes stopped leaving
        the broker, and what the broker had queued for it and not written (when the
        transport tells) goes to its spool, before anything spooled after."""
        lane = self.spool.lanes.get(ep.name)
        unsent = ep.unsent
        # Rows of the replay in what was not written: still in the spool, not live.
        replayed = {end for _, _, end, _ in lane.written} if lane is not None else set()
        if lane is not None and lane.written:
            if unsent is not None:
                self._confirm(ep.name, lane, unsent[0])
                if self.stopping and lane.written:
                    self._spool_cut_row(ep, lane, *unsent)
            self.spool.rewind(ep.name)
        elif lane is not None:
            lane.replaying = False
        if unsent is None or self.spool.state != AVAILABLE:
            return
        start, data = unsent
        position = start
        kept = 0
        for frame in lines_of(data):
            cut = position == start  # the first: maybe a frame's tail
            position += len(frame)
            if position in replayed or not frame.endswith(b"\n"):
                continue  # still in the spool (replayed again), or cut short
            try:
                env = self.settings.decode(frame)
            except MessageInvalide:
                # A frame's tail, cut where the kernel took its head. When the broker
                # stops, the channel stays (the domain holds that head): the tail,
                # replayed first, completes the frame instead of spoiling the next.
                if cut and self.stopping and self.spool.add(Entry(
                        ep.name, DOM0, FRAGMENT, None, None, spool_now(), None,
                        frame)) is None:
                    kept += 1
                continue
            if (env.destination != ep.name or env.type == "reponse") and not self.stopping:
                # A channel that drops while the broker runs: the answers to it (its
                # commands are failed with it) and the broadcast copies are not kept.
                # At shutdown they are: already routed to this domain (a reponse
                # answers a command already closed), they are delivered on its return.
                continue
            deadline = None
            if env.type == "commande" and env.id is not None:
                pending = self.pending.get(env.source, env.id)
                if pending is None or pending.target is not ep:
                    continue
                pending.spooled = True
                deadline = spool_now() + (pending.deadline - self.pending.clock())
            if self.spool.add(Entry(ep.name, env.source, env.type, env.name, env.id,
                                    spool_now(), deadline, frame)) is None:
                kept += 1
        if kept:
            ep.stats.sent -= kept  # counted when queued; they will be sent again
            self.log.info("spool.recovered", domain=ep.name, messages=kept,
                          detail="queued for the domain and not written when its "
                                 "channel went down")
            if self._spool_commit is None:
                self._spool_commit = asyncio.get_running_loop().call_soon(
                    self._commit_spool)

    def _spool_cut_row(self, ep: DomainEndpoint, lane: Lane, start: int,
                       data: bytes) -> None:
        """The broker stops and the kernel took the head of the first replayed row not
        out (its bytes run over stream position ``start``): the channel stays, the
        domain holds that head, so the row is kept as its tail only (a FRAGMENT, in its
        place: replayed first), which completes the frame instead of spoiling it."""
        seq, size, end, _ = lane.written[0]
        if not end - size < start < end or len(data) < end - start:
            return  # not cut: replayed whole
        self.spool.cut(seq, FRAGMENT, data[:end - start])  # rewound next

    def _schedule_replay(self, ep: DomainEndpoint, delay: float = 0.0) -> None:
        # Keyed by endpoint: a stale step of a removed endpoint must not stand for the
        # replay of the new endpoint of the same name.
        if ep in self._replays:
            return
        self._replays.add(ep)
        loop = asyncio.get_running_loop()
        if delay:
            loop.call_later(delay, self._replay, ep)
        else:
            loop.call_soon(self._replay, ep)

    def _replay(self, ep: DomainEndpoint) -> None:
        """One step of ``ep``'s replay: a chunk of its spool handed to its channel, if
        the channel has room (at most its high-water mark queued); then the next step
        on the next loop turn (or when it drains)."""
        self._replays.discard(ep)
        spool = self.spool
        lane = spool.lanes.get(ep.name)
        if (lane is None or self.domains.get(ep.name) is not ep or ep.transport is None
                or self.stopping):
            return
        if spool.dirty:
            self._commit_spool()  # what was spooled this turn is read back in order
        out = ep.out_position()
        if out is not None:
            self._confirm(ep.name, lane, out)
        if not lane.replaying:
            if lane.written:
                self._schedule_replay(ep, REPLAY_RETRY)  # until they are out
            return
        if ep.paused_writing or ep.queued() >= ep.high_water:
            self._schedule_replay(ep, REPLAY_RETRY)
            return
        try:
            rows = spool.rows(ep.name, REPLAY_CHUNK)
        except StoreError as exc:
            self._spool_unavailable(exc)
            lane.replaying = False
            self.invalidate_routes()
            return
        if not rows:
            lane.replaying = False
            self.invalidate_routes()  # live traffic goes to the channel again
            self.log.info("spool.replayed", domain=ep.name, messages=lane.replayed,
                          seconds=round(time.monotonic() - lane.replay_started, 3))
            if lane.written:
                self._schedule_replay(ep, REPLAY_RETRY)
            return
        now = spool_now()
        for row in rows:
            if not self._replayable(ep, lane, row, now):
                continue
            # Full: this one again later. Asked before sending, so that send() never
            # refuses it (a refusal there counts a drop, and this row is not lost).
            if ep.paused_writing or not ep.send(row.frame):
                spool.lane(ep.name).cursor = row.seq - 1
                break
            if row.kind == "commande" and row.msg_id is not None:
                pending = self.pending.get(row.source, row.msg_id)
                if pending is not None:
                    pending.spooled = False  # with the domain now: answered if it drops
            lane.written.append((row.seq, len(row.frame), ep.position(), row.queued_at))
        self._schedule_replay(ep)

    def _replayable(self, ep: DomainEndpoint, lane: Lane, row: Row, now: float) -> bool:
        """Is ``row`` still to deliver? A command only while its commander waits for it
        (not answered meanwhile, its deadline not passed): else its row is dropped."""
        if row.kind != "commande" or row.msg_id is None:
            return True
        pending = self.pending.get(row.source, row.msg_id)
        if (pending is None and self.pending.awaits_restored(row.source, row.msg_id, ep.name)
                and (row.deadline is None or row.deadline > now)):
            return True  # spooled before a restart: its commander still waits
        if (pending is None or pending.target is not ep or not pending.spooled
                or (row.deadline is not None and row.deadline <= now)):
            lane.expired += 1
            # This row only: those before it may still be in the channel's buffer.
            self.spool.forget(ep.name, row.seq, len(row.frame), row.source)
            return False
        return True

    def _confirm(self, name: str, lane: Lane, out: int) -> None:
        """Rows of ``name`` whose last byte is before stream position ``out`` left the
        broker: deleted in the next commit."""
        written = lane.written
        done = 0
        for seq, size, end, queued_at in written:
            if end > out:
                break
            self.spool.written(name, seq, size)
            lane.replayed += 1
            if lane.depth.count:
                lane.depth.oldest = queued_at
            done += 1
        if done:
            del written[:done]
            if self._spool_commit is None and self.spool.dirty:
                self._spool_commit = asyncio.get_running_loop().call_soon(
                    self._commit_spool)

    def sweep_spool(self) -> None:
        """Every second: end the bursts of refusals (logged with their count), drop what
        passed the age bound (a command answered ``delai_depasse``), try an
        unavailable spool again."""
        spool = self.spool
        for name, lane in spool.lanes.items():
            ended = lane.overflow.end()
            if ended is not None:
                self.log.warning("spool.full_ended", domain=name, bound=ended[0],
                                 refused=ended[1])
        if spool.state == UNAVAILABLE:
            if time.monotonic() - self._spool_failed_at >= SPOOL_RETRY:
                if spool.store is None:
                    self.open_spool()
                elif spool.probe():
                    spool.state = AVAILABLE
                    self.invalidate_routes()
                else:
                    self._spool_failed_at = time.monotonic()  # still full: later
            return
        if spool.state != AVAILABLE or spool.store is None:
            return
        now = spool_now()
        for name, lane in list(spool.lanes.items()):
            before = lane.depth.expired_before(now, self._spool_bounds(name))
            if before is None:
                continue
            self._commit_spool()
            try:
                rows = spool.store.older_than(name, before)
                oldest = spool.store.oldest(name, before)
            except StoreError as exc:
                self._spool_unavailable(exc)
                return
            handed = {seq for seq, _, _, _ in lane.written}
            expired = 0
            for row in rows:
                if row.seq in handed:
                    continue
                expired += 1
                self._forget_row(name, row, Code.DELAI_DEPASSE,
                                 f"{name} stayed offline longer than its spool keeps messages")
            lane.expired += expired
            if lane.depth.count:
                lane.depth.oldest = oldest if oldest is not None else before
            if expired:
                self.log.warning("spool.expired", domain=name, messages=expired,
                                 bound="age", limit=self._spool_bounds(name).age)
        if spool.dirty:
            self._commit_spool()

    def _forget_row(self, name: str, row: Row, code: str, why: str) -> None:
        """Take ``row`` out of ``name``'s spool, never to be delivered; a command in it
        is answered ``code`` (its commander still waits for it)."""
        self.spool.forget(name, row.seq, len(row.frame), row.source)
        if row.kind == "commande" and row.msg_id is not None:
            pending = self.pending.close(row.source, row.msg_id)
            if pending is not None:
                self._answer_for(pending, code, why)

    def spool_statistics(self) -> dict[str, Any]:
        spool = self.spool
        out: dict[str, Any] = {"etat": spool.state, "chemin": spool.path}
        if spool.temporary:
            out["temporaire"] = True
        if spool.error is not None and spool.state == UNAVAILABLE:
            out["erreur"] = spool.error
        return out

    def lane_statistics(self, name: str) -> dict[str, Any]:
        lane = self.spool.lanes.get(name)
        if lane is None:
            return {"messages": 0, "octets": 0, "age": None}
        age = lane.depth.age(spool_now())
        return {"messages": lane.depth.count, "octets": lane.depth.bytes,
                "age": None if age is None else round(age, 3),
                "refuses": lane.overflow.total, "expires": lane.expired,
                "rejoues": lane.replayed}

    # -- commands in flight ---------------------------------------------------------
    def fail_pending(self, gone: Endpoint, code: str, text: str, *,
                     keep_spooled: bool = False) -> None:
        """Answer every command waiting on ``gone`` (but those in its spool, with
        ``keep_spooled``); forget the ones it asked, and tell the endpoints serving
        those that they are abandoned."""
        abandoned: list[Pending[Endpoint]] = []
        for pending in self.pending.fail(gone, abandoned, keep_spooled=keep_spooled):
            self._answer_for(pending, code, text)
        for pending in abandoned:
            self._abandon(pending, "commander_gone")

    @staticmethod
    def _answer_for(pending: Pending[Endpoint], code: str, text: str) -> None:
        reply = Reponse(DOM0, pending.commander, pending.id, pending.command, "erreur",
                        erreur={"code": code, "message": text})
        pending.asker.send(encode(reply))

    def expire_pending(self) -> None:
        """Answer ``delai_depasse`` to every command past its deadline (its slots are
        free at once) and tell the endpoints serving them that they are abandoned."""
        for pending in self.pending.expire():
            ttl = self.pending.ttl_for(pending.asker)
            delai = ttl if pending.delai is None else min(pending.delai, ttl)
            self._answer_for(pending, Code.DELAI_DEPASSE,
                             f"{pending.replier} did not answer in {delai:g} s")
            self._abandon(pending, "deadline")
        nxt = self.pending.next_deadline()
        self._expiry_at = float("inf")
        if nxt is not None:
            self._schedule_expiry(nxt)

    def expire_restored(self) -> None:
        """Answer ``delai_depasse`` for the restored commands whose deadline passed, to
        each commander that is connected (the others wait for it, up to
        ``KEEP_UNREACHABLE``), and tell the domains serving them that they are
        abandoned. Called with the live table's expiry (the daemon's tick)."""
        if not self.pending.restored:
            return
        for r, outcome in self.pending.expire_restored(time.time(), self.is_connected,
                                                       KEEP_UNREACHABLE):
            if outcome == ANSWER:
                reply = Reponse(DOM0, r.commander, r.id, r.command, "erreur",
                                erreur={"code": Code.DELAI_DEPASSE,
                                        "message": f"{r.replier} did not answer in time "
                                                   "(the broker restarted meanwhile)"})
                self.domains[r.asker].send(encode(reply))
            elif outcome == FORGOTTEN:
                self.log.warning("inflight.forgotten", commander=r.commander, id=r.id,
                                 command=r.command, replier=r.replier,
                                 detail="its commander did not connect after its deadline")
            # As for a live command: the domain serving it cancels its handler.
            target = self.domains.get(r.target) if r.target_kind == DOMAIN else None
            if target is not None and target.transport is not None:
                target.send(encode(Notification(
                    DOM0, r.replier, ABANDON_CATEGORY, ABANDON_EVENT,
                    {"source": r.commander, "id": r.id, "commande": r.command})))

    def _schedule_expiry(self, deadline: float) -> None:
        """Expire the commands due at ``deadline`` then, not at the next second's tick
        (``delai`` may be short, and its commander's slot must be free when the
        commander's own timeout is past)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # driven without a loop (tests): the caller expires
            return
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry_at = deadline
        self._expiry = loop.call_later(max(0.0, deadline - self.pending.clock()),
                                       self.expire_pending)

    def _abandon(self, pending: Pending[Endpoint], why: str) -> None:
        """Tell the endpoint serving ``pending`` that nobody awaits its answer any more
        (a notification from dom0 that no domain may send: ``router.ABANDON_CATEGORY``),
        so that its client cancels the handler. Best effort: dropped if its queue is
        full (its late answer, if any, is then dropped as late)."""
        target = pending.target
        if target.transport is None:
            return  # gone: nothing runs for it any more
        notice = Notification(DOM0, pending.replier, ABANDON_CATEGORY, ABANDON_EVENT,
                              {"source": pending.commander, "id": pending.id,
                               "commande": pending.command})
        target.send(encode(notice))
        if target.log_budget.allow():
            target.log.info("commande.abandoned", why=why, source=pending.commander,
                            id=pending.id, commande=pending.command,
                            suppressed=target.log_budget.take_suppressed())

    # -- domain lifecycle ----------------------------------------------------------
    def add_domain(self, name: str, path: str, *, discovered: bool = False) -> DomainEndpoint:
        """A new endpoint for ``name`` at ``path``, connecting at once. If ``name``
        departed (:meth:`depart_domain`) and is still remembered, the new endpoint takes
        its place: the commands spooled for it wait on the new one, and its spool is
        replayed first once it connects. The new endpoint inherits nothing else (its
        ``verify`` is the caller's to set, exactly as for a domain never seen)."""
        old = self.domains.get(name) if self.departed.pop(name, None) is not None else None
        ep = DomainEndpoint(self, name, path, discovered=discovered)
        if old is not None:
            self.pending.retarget(old, ep)
            self.log.info("domain.returned", domain=name, path=path, previous=old.path,
                          spooled=self.lane_statistics(name)["messages"])
        self.domains[name] = ep
        self.memory.resize(len(self.domains) - len(self.departed))
        self.invalidate_routes()
        ep.start()
        self.log.info("domain.added", domain=name, path=path, discovered=discovered)
        return ep

    def depart_domain(self, name: str, why: str) -> None:
        """A discovered domain's channel disappeared (``why``: its socket file is gone,
        xenstore released it or gave it a new domid): keep it known as offline for its
        spool's age bound, so that what is sent to it meanwhile is spooled (the policy
        decides first, as for any message) and replayed first to the domain of the same
        name discovered next. Without an available spool it is removed at once
        (:meth:`remove_domain`), as is the one that departed first when
        :data:`DEPARTED_MAX` are remembered."""
        ep = self.domains.get(name)
        if ep is None:
            return
        if not ep.discovered or self.spool.state != AVAILABLE or self.stopping:
            self.remove_domain(name)
            return
        if name in self.departed:
            return  # already departed: its bound runs from the first departure
        was_up = ep.connected_since is not None
        lane = self.spool.lanes.get(name)
        if ep.transport is not None:
            # Its channel is still open: the spool side of its loss runs now, while it
            # is still this name's endpoint (a rebind adds the next one in the same
            # call). Rows known to be out are confirmed, the replay rewound, and what
            # was queued and not written is spooled, once: its abort's ``lost()``
            # then does nothing (:meth:`lost`).
            out = ep.out_position()
            if lane is not None and out is not None and lane.written:
                self._confirm(name, lane, out)
            ep.take_unsent()
            self._spool_lost(ep)
            ep.unsent = None
        ep.detach()
        ep.connected_since = None
        if lane is not None:
            # A replay under way stops: what was handed to the channel and not known
            # to be out is replayed again to the next one (at-least-once, as on a drop).
            self.spool.rewind(name)
        self.invalidate_routes()
        # Commands already written to it are lost with it; those in its spool wait.
        self.fail_pending(ep, Code.DESTINATION_HORS_LIGNE,
                          f"domain {name} went away before answering", keep_spooled=True)
        bound = self._spool_bounds(name).age
        self.departed[name] = time.monotonic() + bound
        self.memory.resize(len(self.domains) - len(self.departed))  # no share of the queues
        self.log.info("domain.departed", domain=name, path=ep.path, why=why,
                      kept_for=bound, spooled=self.lane_statistics(name)["messages"])
        if was_up:
            self.emit_state(name, Evenement.DECONNECTE)
        while len(self.departed) > DEPARTED_MAX:
            oldest = next(iter(self.departed))
            self.forget_departed(oldest, "too many departed domains remembered "
                                 f"(at most {DEPARTED_MAX})", Code.DESTINATION_HORS_LIGNE)

    def forget_departed(self, name: str, why: str, code: str = Code.DELAI_DEPASSE) -> None:
        """A departed domain did not come back: forget it as :meth:`remove_domain` does,
        after dropping its spool (its spooled commands answered ``code``: past its
        bound ``delai_depasse``, as the spool's age bound answers; evicted by
        :data:`DEPARTED_MAX`, ``destination_hors_ligne``)."""
        if self.departed.pop(name, None) is None:
            return
        spool = self.spool
        lane = spool.lanes.get(name)
        dropped = 0
        if lane is not None and spool.store is not None and spool.state == AVAILABLE:
            self._commit_spool()
            try:
                rows = spool.store.older_than(name, float("inf"))
            except StoreError as exc:
                self._spool_unavailable(exc)
                rows = []
            for row in rows:
                dropped += 1
                self._forget_row(name, row, code,
                                 f"domain {name} went away and did not come back ({why})")
            if spool.dirty:
                self._commit_spool()
        if lane is not None and not lane.depth.count and not lane.written:
            spool.lanes.pop(name, None)
        self.log.warning("domain.forgotten", domain=name, why=why, dropped=dropped)
        self.remove_domain(name)

    def sweep_departed(self) -> None:
        """Every second: forget the departed domains whose bound passed."""
        if not self.departed:
            return
        now = time.monotonic()
        for name, until in list(self.departed.items()):
            if until <= now:
                self.forget_departed(name, "it stayed away longer than its spool's age "
                                     "bound")

    def remove_domain(self, name: str) -> None:
        """Forget a domain now (synchronously: a domain re-added under the same name
        right after is a new endpoint, untouched by this removal)."""
        self.departed.pop(name, None)
        ep = self.domains.pop(name, None)
        if ep is None:
            return
        self._bounds.pop(name, None)
        self.memory.resize(len(self.domains) - len(self.departed))
        self.invalidate_routes()
        was_up = ep.connected_since is not None
        lane = self.spool.lanes.get(name)
        # What was queued for it and not written goes with it, counted (perdus) but
        # the rows of a replay under way: they stay in the spool.
        replayed = {end for _, _, end, _ in lane.written} if lane is not None else set()
        ep.take_unsent()
        unsent, ep.unsent = ep.unsent, None
        if lane is not None:
            # A replay under way stops: rows known to be out are confirmed, the rest
            # (in the transport, dropped with it) replayed again to the next endpoint
            # of this name, from its first byte.
            out = ep.out_position()
            if out is not None and lane.written:
                self._confirm(name, lane, out)
            self.spool.rewind(name)
        ep.detach()
        dropped = _lost_messages(unsent, replayed)
        ep.stats.dropped += dropped
        self.fail_pending(ep, Code.DESTINATION_INCONNUE, f"domain {name} was removed")
        self.log.info("domain.removed", domain=name, dropped=dropped)
        if was_up:
            self.emit_state(name, Evenement.DECONNECTE)
        for key in self._removed_totals:  # the broker's totals keep what it did
            self._removed_totals[key] += getattr(ep.stats, key)

    def lost(self, endpoint: Endpoint) -> None:
        self.invalidate_routes()  # decisions sending there are stale
        self._deferred.pop(endpoint, None)
        if (isinstance(endpoint, DomainEndpoint) and self.domains.get(endpoint.name) is endpoint
                and endpoint.name not in self.departed):
            # A departed endpoint's loss was spooled by depart_domain, before its abort.
            self._spool_lost(endpoint)

    def domain_up(self, ep: DomainEndpoint) -> None:
        lane = self.spool.lanes.get(ep.name)
        if lane is not None and lane.depth.count and self.spool.store is not None:
            lane.replaying = True  # before the routes are recomputed: live traffic waits
            lane.replay_started = time.monotonic()
            self._schedule_replay(ep)
        self.invalidate_routes()
        self.emit_state(ep.name, Evenement.CONNECTE)

    def domain_down(self, ep: DomainEndpoint) -> None:
        if self.domains.get(ep.name) is not ep:
            return  # removed meanwhile: remove_domain() already answered and notified
        self.fail_pending(ep, Code.DESTINATION_HORS_LIGNE,
                          f"domain {ep.name} went down before answering", keep_spooled=True)
        self.emit_state(ep.name, Evenement.DECONNECTE)

    def service_gone(self, conn: Dom0Connection) -> None:
        if self.stopping and self.recovery is not None:
            return  # shutting down: its commands are kept for the next process
        self.fail_pending(conn, Code.DESTINATION_HORS_LIGNE,
                          "the dom0 service serving this command disconnected")

    def emit_state(self, name: str, event: str) -> None:
        """Tell ``tous`` that a domain came or went (the field's domain-state
        notification), through the router like any message from dom0; never the
        domain itself (it knows, and would take its own arrival for another's)."""
        self.emit(Notification(DOM0, TOUS, Categorie.DOMAINE, event, {"domaine": name}),
                  but=name)

    def emit(self, msg: Message, *, but: str | None = None) -> None:
        """A message from the broker itself (dom0, no endpoint), routed like any (to
        every recipient but the domain ``but``)."""
        decision = route(msg, DOM0, self)  # a Message is routable like an Envelope
        if type(decision) is Deliver:
            if but is not None and but in decision.targets:
                decision = Deliver(tuple(t for t in decision.targets if t != but),
                                   decision.denied, decision.dom0_services)
            self._deliver(None, msg, decision, encode(msg))

    # -- built-in commands ---------------------------------------------------------
    def builtin(self, cmd: Commande, peer: Endpoint) -> Reponse:
        name = cmd.commande
        if name == "ping":
            return cmd.reply({"pong": True, "version": messagerie.__version__,
                              "uptime": round(time.monotonic() - self.started, 3)})
        if name == "domaines":
            return cmd.reply(self.domain_list())
        if name == "statistiques":
            return cmd.reply(self.statistics())
        assert name == "enregistrer"
        if not isinstance(peer, Dom0Connection):
            return cmd.fail(Code.REFUSE, "only dom0 services register commands")
        return self.dom0.register(cmd, peer)

    def domain_list(self) -> list[dict[str, Any]]:
        out = []
        for name, ep in sorted(self.domains.items()):
            out.append({"nom": name, "etat": "connecte" if self.is_connected(name)
                        else "deconnecte", "chemin": ep.path, "type": ep.channel_type,
                        "decouvert": ep.discovered, **self._departure(name)})
        return out

    def _departure(self, name: str) -> dict[str, Any]:
        """For a departed domain (:meth:`depart_domain`): ``parti`` and the seconds
        before it is forgotten (``oubli_dans``); nothing for the others."""
        until = self.departed.get(name)
        if until is None:
            return {}
        return {"parti": True, "oubli_dans": round(max(0.0, until - time.monotonic()), 3)}

    def statistics(self) -> dict[str, Any]:
        domains = {}
        for name, ep in sorted(self.domains.items()):
            d: dict[str, Any] = ep.stats.as_dict()
            d["file"] = ep.queued()
            d["en_vol"] = self.pending.in_flight(ep)
            d["echecs_connexion"] = ep.failed_connects
            d["echos"] = ep.echo.echoed
            d["etat"] = "connecte" if self.is_connected(name) else "deconnecte"
            d["spool"] = self.lane_statistics(name)
            d.update(self._departure(name))
            domains[name] = d
        return {"uptime": round(time.monotonic() - self.started, 3), "domaines": domains,
                "dom0": self.dom0.statistics(), "commandes_en_attente": len(self.pending),
                "spool": self.spool_statistics()}

    def journal(self, msg: Journal, peer: Endpoint) -> None:
        """A ``journal`` message to dom0: into the broker's own log, as an event.

        A domain chooses the level and the text, so it has its own budget (separate
        from the broker's warnings about it, which it must not be able to crowd out of
        journald's rate limit) and its text and data are cut to a bounded size."""
        if not peer.journal_budget.allow():
            return
        payload = msg.payload
        level = payload.get("niveau", "info")
        method = {"debug": peer.log.debug, "info": peer.log.info,
                  "warning": peer.log.warning, "error": peer.log.error,
                  "critical": peer.log.critical}.get(level, peer.log.info)
        text = str(payload.get("texte", ""))
        data = payload.get("data") or {}
        size = len(encode_json(data))
        method("domain.journal", component=payload.get("composant"),
               text=text if len(text) <= JOURNAL_TEXT_MAX else text[:JOURNAL_TEXT_MAX] + "...",
               at=payload.get("horodatage"),
               data=data if size <= JOURNAL_DATA_MAX else {"truncated_bytes": size},
               suppressed=peer.journal_budget.take_suppressed())

    def totals(self) -> dict[str, int]:
        """The domains' counters summed since the broker started, the removed domains'
        included (``STATUS=``, ``broker.stopped``)."""
        total = dict(self._removed_totals)
        for ep in self.domains.values():
            total["received"] += ep.stats.received
            total["sent"] += ep.stats.sent
            total["refused"] += ep.stats.refused
            total["invalid"] += ep.stats.invalid
            total["dropped"] += ep.stats.dropped
        return total

