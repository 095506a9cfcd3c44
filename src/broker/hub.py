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

from .config import Config
from .dom0 import Dom0Connection, Dom0Services
from .endpoint import DomainEndpoint, Endpoint, Settings, WriteCork
from .memory import MemoryBudget, cgroup_memory_max, default_budget
from .pending import Pending, PendingCommands
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
    Refuse,
    Routable,
    Route,
    dispatch,
    route,
)
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


ROUTE_CACHE_MAX = 4096
"""Routing decisions kept (per source, destination, type and name)."""
RouteKey = tuple[str, str, str, str | None]


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
        self._expiry: asyncio.TimerHandle | None = None
        self._expiry_at = float("inf")
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
        self.memory.limit = (config.limits.queues_memory
                             or default_budget(cgroup_memory_max()))
        self.memory.resize(len(self.domains))
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
            for target in targets:
                if target == DOM0:
                    self._to_dom0(peer, msg, data)
                else:
                    dest = self.domains[target]
                    if not dest.send(data, peer):
                        self._dropped(peer, dest, msg)
            if len(targets) > 1:
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
        else:
            assert dtype is Refuse, decision
            self.refuse(peer, msg, decision)  # type: ignore[arg-type]
            return False
        return True

    def _deliver(self, peer: Endpoint | None, msg: Routable, deliver: Deliver,
                 data: bytes) -> None:
        """A notification or a journal: to each target (dom0: its services and, for a
        journal, the broker's log). ``receive`` has this inlined."""
        for target in deliver.targets:
            if target == DOM0:
                self._to_dom0(peer, msg, data)
            else:
                dest = self.domains[target]
                if not dest.send(data, peer) and peer is not None:
                    self._dropped(peer, dest, msg)
        if deliver.dom0_services or deliver.denied:
            self._after_broadcast(peer, msg, deliver, data)

    def _after_broadcast(self, peer: Endpoint | None, msg: Routable, deliver: Deliver,
                         data: bytes) -> None:
        if deliver.dom0_services:
            self._to_dom0_services(peer, msg, data)
        if deliver.denied and peer is not None:
            if self.tracer is not None:
                self.tracer.filtered(peer, msg, deliver.denied)
            peer.stats.refused += 1
            if peer.log_budget.allow():
                peer.log.warning("message.filtered", security=True, type=msg.type,
                                 name=msg.name, denied=[d for d, _ in deliver.denied],
                                 rules=sorted({r for _, r in deliver.denied}))

    def _to_dom0(self, peer: Endpoint | None, msg: Routable, data: bytes) -> None:
        if msg.type == "journal" and peer is not None:
            self.dom0.received_journal += 1
            journal = self.complete(peer, msg)  # type: ignore[arg-type]
            if journal is None:
                return
            self.journal(journal, peer)  # type: ignore[arg-type]
        self._to_dom0_services(peer, msg, data)

    def _to_dom0_services(self, peer: Endpoint | None, msg: Routable, data: bytes) -> None:
        """To every dom0 service but ``peer`` (the sender, whose reading is held back
        while a service is full, as for a domain). Drops are counted and logged."""
        for conn in self.dom0.clients:
            if conn is not peer and not conn.send(data, peer):
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
        if not server.send(data, peer):
            self._dropped(peer, server, msg)

    def _answer(self, peer: Endpoint, msg: Envelope, answer: Answer[Endpoint],
                data: bytes) -> None:
        # The very endpoint that asked (a domain, or one of several dom0 services).
        command = answer.command
        self.pending.close(command.commander, command.id)
        if not command.asker.send(data, peer):
            self._dropped(peer, command.asker, msg)

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
        if self.tracer is not None:
            self.tracer.dropped(sender, dest, msg, count, run)
        if dest.log_budget.allow():
            dest.log.warning("message.dropped", why="queue_full", source=msg.source,
                             type=msg.type, name=msg.name, count=count, queued=dest.queued(),
                             suppressed=dest.log_budget.take_suppressed())
        if msg.type == "commande":
            assert msg.id is not None
            self.pending.close(msg.source, msg.id)
            self.answer(sender, msg, Code.DESTINATION_SATUREE,
                        f"{dest.name} is not reading its channel")

    # -- commands in flight ---------------------------------------------------------
    def fail_pending(self, gone: Endpoint, code: str, text: str) -> None:
        """Answer every command waiting on ``gone``; forget the ones it asked, and tell
        the endpoints serving those that they are abandoned."""
        abandoned: list[Pending[Endpoint]] = []
        for pending in self.pending.fail(gone, abandoned):
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
        ep = DomainEndpoint(self, name, path, discovered=discovered)
        self.domains[name] = ep
        self.memory.resize(len(self.domains))
        self.invalidate_routes()
        ep.start()
        self.log.info("domain.added", domain=name, path=path, discovered=discovered)
        return ep

    def remove_domain(self, name: str) -> None:
        """Forget a domain now (synchronously: a domain re-added under the same name
        right after is a new endpoint, untouched by this removal)."""
        ep = self.domains.pop(name, None)
        if ep is None:
            return
        self.memory.resize(len(self.domains))
        self.invalidate_routes()
        was_up = ep.connected_since is not None
        ep.detach()
        self.fail_pending(ep, Code.DESTINATION_INCONNUE, f"domain {name} was removed")
        self.log.info("domain.removed", domain=name)
        if was_up:
            self.emit_state(name, Evenement.DECONNECTE)

    def lost(self, endpoint: Endpoint) -> None:
        self.invalidate_routes()  # decisions sending there are stale
        self._deferred.pop(endpoint, None)

    def domain_up(self, ep: DomainEndpoint) -> None:
        self.invalidate_routes()
        self.emit_state(ep.name, Evenement.CONNECTE)

    def domain_down(self, ep: DomainEndpoint) -> None:
        if self.domains.get(ep.name) is not ep:
            return  # removed meanwhile: remove_domain() already answered and notified
        self.fail_pending(ep, Code.DESTINATION_HORS_LIGNE,
                          f"domain {ep.name} went down before answering")
        self.emit_state(ep.name, Evenement.DECONNECTE)

    def service_gone(self, conn: Dom0Connection) -> None:
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
                        "decouvert": ep.discovered})
        return out

    def statistics(self) -> dict[str, Any]:
        domains = {}
        for name, ep in sorted(self.domains.items()):
            d: dict[str, Any] = ep.stats.as_dict()
            d["file"] = ep.queued()
            d["en_vol"] = self.pending.in_flight(ep)
            d["echecs_connexion"] = ep.failed_connects
            d["echos"] = ep.echo.echoed
            d["etat"] = "connecte" if self.is_connected(name) else "deconnecte"
            domains[name] = d
        return {"uptime": round(time.monotonic() - self.started, 3), "domaines": domains,
                "dom0": self.dom0.statistics(), "commandes_en_attente": len(self.pending)}

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
        total = {"received": 0, "sent": 0, "refused": 0, "invalid": 0, "dropped": 0}
        for ep in self.domains.values():
            total["received"] += ep.stats.received
            total["sent"] += ep.stats.sent
            total["refused"] += ep.stats.refused
            total["invalid"] += ep.stats.invalid
            total["dropped"] += ep.stats.dropped
        return total

