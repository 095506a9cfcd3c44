"""Every routing decision, as pure functions.

``decide(message, origin, sender, view)`` answers: to whom does this message go, or why
is it refused? It reads the registry, the commands in flight and the policy through
:class:`RoutingView` and does no I/O, so every rule below is unit-testable and
fuzzable without a loop or a pty. The broker applies the :data:`Decision` it returns
and decides nothing itself.

It is two stages, because the first one can be cached and the second one cannot:

:func:`route` (``message``, ``origin``): depends only on the registry, connectivity,
the policy and (for a ``reponse``) the names in the table of commands in flight.
Rules, in order:

1. ``source`` must be ``origin``, the domain whose channel the bytes came from
   (``dom0`` for the broker's local socket). Anything else is a forgery.
2. ``tous`` goes to every connected domain and to dom0, never back to the origin,
   each recipient filtered by the policy; from dom0, also to the other dom0 services.
3. ``dom0`` goes to the broker's dom0 side; a domain name to that domain's channel,
   if it is known and connected; to its spool if it is known and offline (or its
   spool is being replayed) and the spool is available, except a ``reponse`` (its
   commander's commands are forgotten when it goes down). Broadcasts are never
   spooled.
4. A ``reponse`` must answer a command the broker saw go from its destination to its
   source with that ``id`` and that ``commande`` name, and not yet answered: nobody
   can inject answers, nor relabel one as the answer to another command. The commands
   the previous broker process had in flight count (restored from the state file).
   One that answers a command abandoned lately (expired, or its commander gone) is
   late, and dropped without alarm.
5. A notification of the category :data:`ABANDON_CATEGORY` is the broker's own (it tells
   a domain that a command it serves was abandoned): nobody else may send one, dom0's
   services included.
6. The policy has the last word (answers to allowed commands always pass).

:func:`dispatch` (the ``sender`` endpoint too): for the types in :data:`DISPATCHED`,
whose fate depends on the message itself and not only on its route. For the others
it returns the route's decision unchanged.

7. A ``reponse`` is accepted only from the endpoint the command went to (a domain
   re-added under the same name, or another dom0 service, was not asked). For a
   restored command (:class:`Recovered`), whose endpoints were the previous process's:
   the endpoint of the domain asked, or the dom0 service serving its name now (any
   dom0 service while none does: its client may answer before it registers again).
8. A ``commande`` to dom0 that the broker implements (:data:`BUILTINS`) is answered by
   the broker (:class:`Builtin`); it is never tracked.
9. Any other ``commande`` is refused if its id is already in flight for its source,
   or if its sender has ``limit`` commands in flight; one to dom0 goes to the service
   that registered its name (``commande_inconnue`` if none); it is refused if its
   sender has ``per_target`` commands in flight to that endpoint (one that never
   answers holds only those slots). It is then forwarded and tracked until answered
   (:class:`Forward`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Generic, Protocol, TypeAlias, TypeVar

from messagerie import DOM0, TOUS, Categorie, Code, Evenement

from .pending import DOMAIN, Pending, PendingCommands, Restored

E = TypeVar("E")
"""An endpoint (the broker's objects; strings in tests), compared by identity."""

BUILTINS: Final = frozenset({"ping", "domaines", "statistiques", "enregistrer"})
"""Commands the broker itself answers at destination ``dom0``."""

ABANDON_CATEGORY: Final = Categorie.COMMANDE
"""The category of the broker's notification that a command was abandoned (event
:data:`ABANDON_EVENT`, ``data`` ``{"source", "id", "commande"}``), sent as ``dom0`` to
the endpoint serving it. Reserved: refused from any sender."""
ABANDON_EVENT: Final = Evenement.ABANDONNEE

DISPATCHED: Final = frozenset({"commande", "reponse"})
"""Types whose decision :func:`dispatch` refines; for the others the route decides."""

# Refusal kinds, for logs and counters.
SPOOFED: Final = "spoofed_source"
UNSOLICITED: Final = "unsolicited_reponse"
UNKNOWN: Final = "unknown_destination"
OFFLINE: Final = "offline_destination"
DENIED: Final = "policy_denied"
DUPLICATE: Final = "duplicate_id"
TOO_MANY: Final = "too_many_commands"
UNKNOWN_COMMAND: Final = "unknown_command"
LATE: Final = "late_reponse"
RESERVED: Final = "reserved_category"
KINDS: Final = frozenset({SPOOFED, UNSOLICITED, UNKNOWN, OFFLINE, DENIED, DUPLICATE,
                          TOO_MANY, UNKNOWN_COMMAND, LATE, RESERVED})


class VerdictLike(Protocol):
    """What the router reads of a policy's answer (``broker.policy.Verdict``)."""

    @property
    def allowed(self) -> bool: ...

    @property
    def reason(self) -> str:
        """The deciding rule, described (``rule 3 (line 14): deny ...``)."""
        ...


class PolicyLike(Protocol):
    """What the router needs of a policy (``broker.policy.Policy``)."""

    def decide(self, source: str, destination: str, type: str, name: str | None = None,
               *, broadcast: bool = False) -> VerdictLike: ...


class Routable(Protocol):
    """What the router reads of a message: a :class:`messagerie.Message`, or the
    :class:`messagerie.envelope.Envelope` of a frame (the broker's hot path)."""

    @property
    def type(self) -> str: ...

    @property
    def source(self) -> str: ...

    @property
    def destination(self) -> str: ...

    @property
    def name(self) -> str | None: ...

    @property
    def id(self) -> str | None: ...


class RoutingView(Protocol[E]):
    """What the router may know of the broker's state."""

    policy: PolicyLike
    pending: PendingCommands[E]

    def is_known(self, name: str) -> bool: ...

    def is_connected(self, name: str) -> bool: ...

    def connected(self) -> Iterable[str]: ...

    def endpoint(self, name: str) -> E:
        """The endpoint of a known domain."""
        ...

    def dom0_service(self, command: str) -> E | None:
        """The dom0 service that registered ``command``, if any."""
        ...

    def spools(self, name: str) -> bool:
        """Do messages to the known domain ``name`` go to its spool (it is offline, or
        connected with its spool being replayed, and the spool is available)?"""
        ...


@dataclass(frozen=True, slots=True)
class Deliver:
    """Send the message's bytes to each of ``targets`` (domain names, or ``dom0``: every
    dom0 service but the sender, and the broker's log for a ``journal``)."""

    targets: tuple[str, ...]
    denied: tuple[tuple[str, str], ...] = ()
    """Broadcast recipients the policy filtered out: (recipient, rule)."""
    dom0_services: bool = False
    """Also to every dom0 service but the sender: a broadcast from dom0 (they all speak
    as dom0, so the policy has no say among them; dom0 is never its own recipient)."""
    spool: bool = False
    """Into the spool of its one target, a declared domain that is offline (or whose
    spool is being replayed): it is delivered when the domain is back."""


@dataclass(frozen=True, slots=True)
class Refuse:
    """Do not forward. Answer a ``commande`` with ``code``; log ``kind`` with ``detail``."""

    kind: str
    code: str
    detail: str
    security: bool = False
    """A security event: forged source, policy denial, unsolicited answer."""


@dataclass(frozen=True, slots=True)
class Builtin:
    """A command the broker answers itself (one of :data:`BUILTINS`)."""

    name: str


@dataclass(frozen=True, slots=True)
class Forward(Generic[E]):
    """Forward a ``commande`` to ``server`` (``target``'s endpoint, or the dom0 service
    that registered it) and track it until it is answered."""

    target: str
    server: E
    spool: bool = False
    """Into the spool of ``server``, an offline domain (:attr:`Deliver.spool`)."""


@dataclass(frozen=True, slots=True)
class Answer(Generic[E]):
    """An awaited ``reponse``: deliver it to ``command.asker``, and close ``command``."""

    command: Pending[E]


@dataclass(frozen=True, slots=True)
class Recovered:
    """An awaited ``reponse`` to a command the previous broker process forwarded: close
    ``command`` and deliver the answer to its commander, a domain (a dom0 service that
    asked is gone with that process: the answer is then dropped, quietly)."""

    command: Restored


Route: TypeAlias = Deliver | Refuse
"""What :func:`route` decides."""
Decision: TypeAlias = Deliver | Refuse | Builtin | Forward[E] | Answer[E] | Recovered
"""What :func:`decide` (and :func:`dispatch`) decide: the broker's one decision type."""


def decide(message: Routable, origin: str, sender: E, view: RoutingView[E]) -> Decision[E]:
    """The whole decision on ``message``, read from ``sender``'s channel (whose domain
    is ``origin``): :func:`route`, then :func:`dispatch`."""
    decision = route(message, origin, view)
    if type(decision) is Deliver and message.type in DISPATCHED:
        return dispatch(message, decision, sender, view)
    return decision


def route(message: Routable, origin: str, view: RoutingView[Any]) -> Route:
    source = message.source
    if source != origin:
        return Refuse(SPOOFED, Code.REFUSE,
                      f"source {source!r} arrived on the channel of {origin!r}", security=True)
    kind = message.type
    destination = message.destination
    if kind == "notification" and message.name == ABANDON_CATEGORY:
        return Refuse(RESERVED, Code.REFUSE,
                      f"the category {ABANDON_CATEGORY!r} is the broker's own", security=True)
    if destination == TOUS:
        targets: list[str] = []
        denied: list[tuple[str, str]] = []
        name = message.name
        decide = view.policy.decide
        recipients = [t for t in view.connected() if t != origin]
        if origin != DOM0:
            recipients.append(DOM0)
        for target in recipients:
            verdict = decide(source, target, kind, name, broadcast=True)
            if verdict.allowed:
                targets.append(target)
            else:
                denied.append((target, verdict.reason))
        return Deliver(tuple(targets), tuple(denied), dom0_services=origin == DOM0)
    spool = False
    if destination != DOM0:
        if not view.is_connected(destination):
            if not view.is_known(destination):
                return Refuse(UNKNOWN, Code.DESTINATION_INCONNUE,
                              f"no domain named {destination!r}")
            if kind == "reponse" or not view.spools(destination):
                return Refuse(OFFLINE, Code.DESTINATION_HORS_LIGNE,
                              f"domain {destination!r} is not connected")
            spool = True
        elif kind != "reponse" and view.spools(destination):
            spool = True  # connected, its spool being replayed: behind what it holds
    if kind == "reponse":
        id = message.id
        if id is not None and view.pending.expects(destination, id, source, message.name):
            return _unicast(destination)
        if id is not None and view.pending.abandoned(destination, id, source):
            return Refuse(LATE, Code.DELAI_DEPASSE,
                          "the command was abandoned (its deadline passed, or its commander "
                          "left) before this answer came")
        return Refuse(UNSOLICITED, Code.REFUSE,
                      "no command from the destination awaits this id and command",
                      security=True)
    verdict = view.policy.decide(source, destination, kind, message.name)
    if not verdict.allowed:
        return Refuse(DENIED, Code.REFUSE, verdict.reason, security=True)
    return _unicast(destination, _SPOOLED) if spool else _unicast(destination)


def dispatch(message: Routable, decision: Deliver, sender: E,
             view: RoutingView[E]) -> Decision[E]:
    """Rules 7 to 9, for a message :func:`route` let through (``decision``)."""
    kind = message.type
    if kind == "reponse":
        id = message.id
        assert id is not None  # route() let it through: it answers a pending command
        awaited = view.pending.awaited(message.destination, id, message.source,
                                       message.name)
        # Several dom0 services share the name dom0, and a domain may have been
        # re-added under the same name: only the endpoint asked may answer.
        if type(awaited) is Pending:
            if awaited.target == sender:
                return Answer(awaited)
        elif type(awaited) is Restored and _asked_before(awaited, sender, view):
            return Recovered(awaited)
        return Refuse(UNSOLICITED, Code.REFUSE, "this endpoint was not asked", True)
    if kind != "commande":
        return decision
    name, id = message.name, message.id
    assert name is not None and id is not None  # a valid commande has both
    (target,) = decision.targets
    if target == DOM0 and name in BUILTINS:
        return Builtin(name)
    pending = view.pending
    if (message.source, id) in pending:
        return Refuse(DUPLICATE, Code.MESSAGE_INVALIDE,
                      f"a command with id {id!r} is already in flight")
    if pending.at_limit(sender):
        return Refuse(TOO_MANY, Code.LIMITE,
                      f"more than {pending.limit_for(sender)} commands in flight")
    if target != DOM0:
        server = view.endpoint(target)
    else:
        found = view.dom0_service(name)
        if found is None:
            return Refuse(UNKNOWN_COMMAND, Code.COMMANDE_INCONNUE,
                          f"no dom0 service serves {name!r}")
        server = found
    if pending.at_target_limit(sender, server):
        return Refuse(TOO_MANY, Code.LIMITE,
                      f"more than {pending.per_target_for(sender)} commands in flight to {target}")
    return Forward(target, server, decision.spool)


def _asked_before(command: Restored, sender: object, view: RoutingView[Any]) -> bool:
    """Is ``sender`` the endpoint, in this process, of the party the previous process
    sent ``command`` to?"""
    if command.target_kind == DOMAIN:
        return view.is_known(command.target) and view.endpoint(command.target) == sender
    # A dom0 service (the answer's source is dom0, so its sender is one): the one
    # serving the command now, or any while none does.
    server = view.dom0_service(command.command)
    return server is None or server == sender


@dataclass
class StaticView:
    """A :class:`RoutingView` held in memory, whose endpoints are names: which domains
    exist, which are connected, which commands are in flight, which dom0 services
    serve what. For "what would the router do?" questions (tests, fuzzing, tools)
    without a broker."""

    policy: PolicyLike
    known: frozenset[str] = frozenset()
    up: frozenset[str] = frozenset()
    """Connected domains (a subset of ``known``)."""
    pending: PendingCommands[str] = field(
        default_factory=lambda: PendingCommands[str](limit=64, ttl=300.0))
    services: dict[str, str] = field(default_factory=dict)
    """dom0 commands registered: command name -> the service (a name of its own)."""
    spooled: frozenset[str] = frozenset()
    """Known domains whose messages go to the spool (:meth:`RoutingView.spools`)."""

    def is_known(self, name: str) -> bool:
        return name in self.known

    def is_connected(self, name: str) -> bool:
        return name in self.up

    def connected(self) -> Iterable[str]:
        return iter(sorted(self.up))

    def endpoint(self, name: str) -> str:
        return name

    def dom0_service(self, command: str) -> str | None:
        return self.services.get(command)

    def spools(self, name: str) -> bool:
        return name in self.spooled

    def expect(self, commander: str, id: str, replier: str, *, asker: str | None = None,
               target: str | None = None, command: str = "x") -> Pending[str]:
        """Record a command in flight from ``commander`` to ``replier`` (asked by the
        endpoint ``asker``, sent to ``target``: the names themselves by default)."""
        return self.pending.add(commander, id, replier, command,
                                asker=commander if asker is None else asker,
                                target=replier if target is None else target)


_UNICAST: dict[str, Deliver] = {}
_SPOOLED: dict[str, Deliver] = {}


def _unicast(destination: str, cache: dict[str, Deliver] = _UNICAST) -> Deliver:
    # Decisions are immutable: one per destination, reused (the hot path allocates
    # nothing). Bounded: only names the registry knows get here.
    try:
        return cache[destination]
    except KeyError:
        if len(cache) > 4096:
            cache.clear()
        decision = cache[destination] = Deliver((destination,), spool=cache is _SPOOLED)
        return decision
