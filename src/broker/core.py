"""The broker: registry of endpoints, the receive path, pending commands, built-ins.

Everything that decides is elsewhere (``router.route``, the policy); this module
applies decisions: it writes bytes, answers refused commands, counts and logs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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
from messagerie.envelope import Envelope, Run, decode_complete, decode_envelope, decode_runs

from .config import Config
from .endpoint import DomainEndpoint, Peer
from .policy import Policy
from .router import (
    BUILTINS,
    DENIED,
    UNSOLICITED,
    Decision,
    Deliver,
    PolicyLike,
    Refuse,
    Routable,
    route,
)

if TYPE_CHECKING:
    from .local import Dom0Hub, LocalConnection



Batch = Callable[[list[bytes]], list[Envelope | Run] | None]
FRAME_DECODERS: dict[str, tuple[Callable[[bytes], Envelope], Batch | None]] = {
    "enveloppe": (decode_envelope, decode_runs), "complete": (decode_complete, None)}
"""Per ``broker.validation``: how a frame is decoded, and how a read's frames may be."""
JOURNAL_TEXT_MAX = 2000
"""Characters of a domain's ``journal`` text written to the broker's log."""
JOURNAL_DATA_MAX = 4096
"""Bytes of a domain's ``journal`` data written to the broker's log."""
encode_json = msgspec.json.Encoder().encode


ROUTE_CACHE_MAX = 4096
"""Routing decisions kept (per source, destination, type and name)."""
RouteKey = tuple[str, str, str, str | None]


class _Route:
    """A cached routing decision and the messages it routed since the last summary."""

    __slots__ = ("count", "decision")

    def __init__(self, decision: Decision) -> None:
        self.decision = decision
        self.count = 0


@dataclass(slots=True)
class Pending:
    """A command on its way: who answers it, until when, and (dom0) who asked."""

    destination: str
    deadline: float
    asker: Peer
    target: Peer
    """The endpoint the command went to (a domain's, or the dom0 service serving it):
    compared by identity, so a domain re-added under the same name, or another dom0
    service, cannot answer in its place."""
    command: str = "inconnue"
    """The command's name, echoed by the answers the broker gives on its behalf."""


class Broker:
    """State and receive path. One per process; asyncio at the edges only."""

    def __init__(self, config: Config, policy: PolicyLike | None = None) -> None:
        self.config = config
        self._routes: dict[RouteKey, _Route] = {}
        self.traffic: dict[tuple[str, str, str], int] = {}
        """Messages routed per (source, destination, type) since the last summary
        (plus the counts kept with the cached decisions)."""
        self._policy: PolicyLike = policy or Policy.allow_all()
        self.domains: dict[str, DomainEndpoint] = {}
        self.dom0: Dom0Hub | None = None
        self.pending: dict[tuple[str, str], Pending] = {}
        self.started = time.monotonic()
        self.log = structlog.get_logger("broker").bind()
        self.debug = config.log_level == "debug"
        self.stopping = False
        """Shutdown began: peers are never resumed."""
        self.receiving = False
        """True while a peer's read is being processed: sends are corked until then."""
        self.dirty: list[Peer] = []
        self.frame_decode, self.frame_batch = FRAME_DECODERS[config.validation]
        """How each frame is decoded (``broker.validation``): its envelope only, or
        completely; and how the frames of one read may be validated together."""

    @property
    def policy(self) -> PolicyLike:
        return self._policy

    @policy.setter
    def policy(self, policy: PolicyLike) -> None:
        self._policy = policy
        self.invalidate_routes()

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

    def expects_reponse(self, commander: str, id: str, replier: str) -> bool:
        pending = self.pending.get((commander, id))
        return pending is not None and pending.destination == replier

    # -- receive path --------------------------------------------------------------
    def receive(self, peer: Peer, item: Envelope | Run | FrameError) -> None:
        """Called by a peer for every frame it decoded (or failed to). Hot path."""
        if type(item) is Run:
            self.receive_run(peer, item)
            return
        if type(item) is FrameError:
            self.invalid(peer, item)
            return
        msg: Envelope = item  # type: ignore[assignment]
        self._received(peer, 1)
        kind = msg.type
        decision, cached = self._decide(peer, msg)
        if type(decision) is Refuse:
            self.refuse(peer, msg, decision)
            return
        deliver: Deliver = decision  # type: ignore[assignment]
        data = msg.raw + b"\n"
        if kind == "notification":
            for target in deliver.targets:
                if target == DOM0:
                    self.dom0.deliver(msg, data, peer)  # type: ignore[union-attr]
                else:
                    dest = self.domains[target]
                    if not dest.send(data, peer):
                        self._dropped(peer, dest, msg)
        else:
            self._deliver_other(peer, msg, deliver, data)
        if msg.destination == TOUS:
            self._after_broadcast(peer, msg, deliver, data)
        if cached is not None:
            cached.count += 1
        else:
            flow = (msg.source, msg.destination, kind)
            self.traffic[flow] = self.traffic.get(flow, 0) + 1
        if self.debug:
            peer.log.debug("message.routed", source=msg.source, destination=msg.destination,
                           type=kind, name=msg.name, id=msg.id,
                           size=len(data), targets=list(deliver.targets))

    def receive_run(self, peer: Peer, run: Run) -> None:
        """Consecutive notifications from one source to one domain with one category:
        one decision, one write, the counters by ``count``. Hottest path."""
        msg = run.envelope
        n = run.count
        self._received(peer, n)
        decision, cached = self._decide(peer, msg)
        if type(decision) is Refuse:
            for _ in range(n):
                self.refuse(peer, msg, decision)
            return
        deliver: Deliver = decision  # type: ignore[assignment]
        # A run never goes to tous or dom0 (decode_runs): one target, a domain.
        dest = self.domains[deliver.targets[0]]
        if not dest.send(run.data, peer, count=n):
            self._dropped(peer, dest, msg, count=n)
        assert cached is not None  # a genuine source, or refused above
        cached.count += n
        if self.debug:
            peer.log.debug("message.routed", source=msg.source, destination=msg.destination,
                           type=msg.type, name=msg.name, id=None, size=len(run.data),
                           targets=list(deliver.targets), count=n)

    @staticmethod
    def _received(peer: Peer, n: int) -> None:
        """Count ``n`` messages read from ``peer`` and spend its rate budget."""
        stats = peer.stats
        stats.received += n
        peer.tokens -= n
        if peer.tokens < 0:
            stats.throttled += min(n, int(-peer.tokens) + 1)

    def _decide(self, peer: Peer, msg: Envelope) -> tuple[Decision, _Route | None]:
        """The routing decision, and its cache entry when it has one."""
        if msg.type != "reponse" and msg.source == peer.name:
            # Decisions on everything but answers depend only on the registry,
            # connectivity and the policy: cached until one of them changes.
            key = (msg.source, msg.destination, msg.type, msg.name)
            cached = self._routes.get(key)
            if cached is None:
                cached = self._route(msg, key)
            return cached.decision, cached
        return route(msg, peer.name, self), None

    def _route(self, msg: Envelope, key: RouteKey) -> _Route:
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

    def flush(self) -> None:
        """Write out what the read just processed queued, one write per destination."""
        dirty = self.dirty
        for peer in dirty:
            peer._flush()
        dirty.clear()

    def _deliver_other(self, peer: Peer, msg: Envelope, deliver: Deliver, data: bytes) -> None:
        if msg.type == "reponse":
            # The router checked that this answers a pending command: it goes to the
            # very peer that asked (a domain, or one of several dom0 services).
            assert msg.id is not None  # a reponse always has one
            key = (msg.destination, msg.id)
            pending = self.pending[key]
            if pending.target is not peer:
                # Several dom0 services share the name dom0, and a domain may have been
                # re-added under the same name: only the endpoint asked may answer.
                self.refuse(peer, msg, Refuse(UNSOLICITED, Code.REFUSE,
                                              "this endpoint was not asked", True))
                return
            del self.pending[key]
            pending.asker.in_flight -= 1
            if not pending.asker.send(data, peer):
                self._dropped(peer, pending.asker, msg)
            return
        if msg.type == "commande" and not self._track_command(peer, msg, deliver.targets[0]):
            return
        for target in deliver.targets:
            if target == DOM0:
                assert self.dom0 is not None
                self.dom0.deliver(msg, data, peer)
            else:
                dest = self.domains[target]
                if not dest.send(data, peer):
                    self._dropped(peer, dest, msg)

    def _after_broadcast(self, peer: Peer, msg: Envelope, deliver: Deliver,
                         data: bytes) -> None:
        if peer.kind == "dom0" and self.dom0 is not None:
            self.dom0.broadcast_local(data, exclude=peer, msg=msg)
        if deliver.denied:
            peer.stats.refused += 1
            if peer.log_budget.allow():
                peer.log.warning("message.filtered", security=True, type=msg.type,
                                 name=msg.name, denied=[d for d, _ in deliver.denied],
                                 rules=sorted({r for _, r in deliver.denied}))

    def complete(self, peer: Peer, msg: Envelope) -> Message | None:
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

    def invalid(self, peer: Peer, error: FrameError) -> None:
        stats = peer.stats
        stats.invalid += 1
        # A junk frame costs a decode attempt like a message: it spends the same rate
        # budget, or a domain flooding garbage would escape throttling.
        peer.tokens -= 1
        if peer.tokens < 0:
            stats.throttled += 1
        self._log_invalid(peer, error)

    @staticmethod
    def _log_invalid(peer: Peer, error: FrameError) -> None:
        if peer.log_budget.allow():
            peer.log.warning("frame.invalid", reason=str(error.reason), field=error.field,
                             detail=error.detail, size=error.size,
                             excerpt=error.excerpt[:32].decode("ascii", "backslashreplace"),
                             suppressed=peer.log_budget.take_suppressed())

    def refuse(self, peer: Peer, msg: Envelope, decision: Refuse) -> None:
        peer.stats.refused += 1
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

    def answer(self, peer: Peer, cmd: Routable, code: str, text: str) -> None:
        """Send the broker's error reponse to the command ``cmd`` back on ``peer``'s
        channel, addressed to the peer (not to a ``source`` it may have forged)."""
        assert cmd.id is not None and cmd.name is not None
        reply = Reponse(DOM0, peer.name, cmd.id, cmd.name, "erreur",
                        erreur={"code": code, "message": text})
        peer.send(encode(reply))

    def _dropped(self, sender: Peer, dest: Peer, msg: Routable, count: int = 1) -> None:
        if dest.log_budget.allow():
            dest.log.warning("message.dropped", why="queue_full", source=msg.source,
                             type=msg.type, name=msg.name, count=count, queued=dest.queued(),
                             suppressed=dest.log_budget.take_suppressed())
        if msg.type == "commande":
            self.pending.pop((msg.source, msg.id), None)  # type: ignore[arg-type]
            sender.in_flight -= 1
            self.answer(sender, msg, Code.DESTINATION_SATUREE,
                        f"{dest.name} is not reading its channel")

    # -- commands in flight -------------------------------------------------------
    def _track_command(self, peer: Peer, cmd: Envelope, target: str) -> bool:
        name, id = cmd.name, cmd.id
        assert name is not None and id is not None
        if target == DOM0 and name in BUILTINS:
            return True  # answered at once by the hub, nothing to track
        key = (cmd.source, id)
        if key in self.pending:
            self.refuse(peer, cmd, Refuse("duplicate_id", Code.MESSAGE_INVALIDE,
                                          f"a command with id {id!r} is already in flight"))
            return False
        limit = self.config.limits.commands_in_flight
        if peer.in_flight >= limit:
            self.refuse(peer, cmd, Refuse("too_many_commands", Code.LIMITE,
                                          f"more than {limit} commands in flight"))
            return False
        server: Peer | None
        if target == DOM0:
            assert self.dom0 is not None
            server = self.dom0.services.get(name)
            if server is None:
                return True  # the hub answers commande_inconnue
        else:
            server = self.domains[target]
        peer.in_flight += 1
        self.pending[key] = Pending(target, time.monotonic() + self.config.limits.command_ttl,
                                    peer, server, name)
        return True

    def fail_pending(self, gone: Peer, code: str, text: str) -> None:
        """Answer every command waiting on ``gone``; forget the ones it asked."""
        for key, pending in list(self.pending.items()):
            if pending.asker is gone:
                del self.pending[key]
                # A DomainEndpoint is reused when its domain comes back: free the slot.
                gone.in_flight -= 1
            elif pending.target is gone:
                del self.pending[key]
                pending.asker.in_flight -= 1
                commander, id = key
                self._answer_for(pending, commander, id, code, text)

    def _answer_for(self, pending: Pending, commander: str, id: str, code: str,
                    text: str) -> None:
        reply = Reponse(DOM0, commander, id, pending.command, "erreur",
                        erreur={"code": code, "message": text})
        pending.asker.send(encode(reply))

    def expire_pending(self) -> None:
        now = time.monotonic()
        for key, pending in list(self.pending.items()):
            if pending.deadline <= now:
                del self.pending[key]
                pending.asker.in_flight -= 1
                self._answer_for(pending, key[0], key[1], Code.DELAI_DEPASSE,
                                 f"{pending.destination} did not answer in "
                                 f"{self.config.limits.command_ttl:g} s")

    # -- domain lifecycle ----------------------------------------------------------
    def add_domain(self, name: str, path: str, *, discovered: bool = False) -> DomainEndpoint:
        ep = DomainEndpoint(self, name, path, discovered=discovered)
        self.domains[name] = ep
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
        self.invalidate_routes()
        was_up = ep.connected_since is not None
        ep.detach()
        self.fail_pending(ep, Code.DESTINATION_INCONNUE, f"domain {name} was removed")
        self.log.info("domain.removed", domain=name)
        if was_up:
            self.emit_state(name, Evenement.DECONNECTE)

    def domain_up(self, ep: DomainEndpoint) -> None:
        self.invalidate_routes()
        self.emit_state(ep.name, Evenement.CONNECTE)

    def domain_down(self, ep: DomainEndpoint) -> None:
        if self.domains.get(ep.name) is not ep:
            return  # removed meanwhile: remove_domain() already answered and notified
        self.fail_pending(ep, Code.DESTINATION_HORS_LIGNE,
                          f"domain {ep.name} went down before answering")
        self.emit_state(ep.name, Evenement.DECONNECTE)

    def local_gone(self, conn: LocalConnection) -> None:
        self.fail_pending(conn, Code.DESTINATION_HORS_LIGNE,
                          "the dom0 service serving this command disconnected")

    def emit_state(self, name: str, event: str) -> None:
        """Tell ``tous`` that a domain came or went (the field's domain-state
        notification), through the router like any message from dom0."""
        self.emit(Notification(DOM0, TOUS, Categorie.DOMAINE, event, {"domaine": name}))

    def emit(self, msg: Message) -> None:
        data = encode(msg)
        decision = route(msg, DOM0, self)  # a Message is routable like an Envelope
        if type(decision) is Deliver:
            for target in decision.targets:
                if target != DOM0:
                    self.domains[target].send(data)
        if self.dom0 is not None and msg.destination in (TOUS, DOM0):
            self.dom0.broadcast_local(data, exclude=None, msg=msg)

    # -- built-in commands ---------------------------------------------------------
    def builtin(self, cmd: Commande, peer: Peer) -> Reponse:
        name = cmd.commande
        if name == "ping":
            return cmd.reply({"pong": True, "version": messagerie.__version__,
                              "uptime": round(time.monotonic() - self.started, 3)})
        if name == "domaines":
            return cmd.reply(self.domain_list())
        if name == "statistiques":
            return cmd.reply(self.statistics())
        assert name == "enregistrer"
        if peer.kind != "dom0" or self.dom0 is None:
            return cmd.fail(Code.REFUSE, "only dom0 services register commands")
        return self.dom0.register(cmd, peer)  # type: ignore[arg-type]

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
            d["en_vol"] = ep.in_flight
            d["echecs_connexion"] = ep.failed_connects
            d["etat"] = "connecte" if self.is_connected(name) else "deconnecte"
            domains[name] = d
        dom0 = self.dom0.statistics() if self.dom0 is not None else {}
        return {"uptime": round(time.monotonic() - self.started, 3), "domaines": domains,
                "dom0": dom0, "commandes_en_attente": len(self.pending)}

    def journal(self, msg: Journal, peer: Peer) -> None:
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

