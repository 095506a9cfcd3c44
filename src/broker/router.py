"""The routing decision, as a pure function.

``route(message, origin, view)`` answers: to whom does this message go, or why is it
refused? It reads the registry and the policy through :class:`RoutingView` and does
no I/O, so every rule below is unit-testable and fuzzable without a loop or a pty.

Rules, in order:

1. ``source`` must be ``origin``, the domain whose channel the bytes came from
   (``dom0`` for the broker's local socket). Anything else is a forgery.
2. A ``reponse`` must answer a command the broker saw go from its destination to its
   source with that ``id``, and not yet answered: nobody can inject answers.
3. ``tous`` goes to every connected domain and to dom0, never back to the origin,
   each recipient filtered by the policy.
4. ``dom0`` goes to the broker's dom0 side; a domain name to that domain's channel,
   if it is known and connected.
5. The policy has the last word (answers to allowed commands always pass).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, Protocol

from messagerie import DOM0, TOUS, Code

BUILTINS: Final = frozenset({"ping", "domaines", "statistiques", "enregistrer"})
"""Commands the broker itself answers at destination ``dom0``."""

# Refusal kinds, for logs and counters.
SPOOFED: Final = "spoofed_source"
UNSOLICITED: Final = "unsolicited_reponse"
UNKNOWN: Final = "unknown_destination"
OFFLINE: Final = "offline_destination"
DENIED: Final = "policy_denied"


class DecisionLike(Protocol):
    @property
    def allowed(self) -> bool: ...

    @property
    def reason(self) -> str:
        """The deciding rule, described (``rule 3 (line 14): deny ...``)."""
        ...


class PolicyLike(Protocol):
    """What the router needs of a policy (``broker.policy.Policy``)."""

    def decide(self, source: str, destination: str, type: str, name: str | None = None,
               *, broadcast: bool = False) -> DecisionLike: ...


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


class RoutingView(Protocol):
    """What the router may know of the broker's state."""

    policy: PolicyLike

    def is_known(self, name: str) -> bool: ...

    def is_connected(self, name: str) -> bool: ...

    def connected(self) -> Iterable[str]: ...

    def expects_reponse(self, commander: str, id: str, replier: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class Deliver:
    """Send the message's bytes to each of ``targets`` (domain names or ``dom0``)."""

    targets: tuple[str, ...]
    denied: tuple[tuple[str, str], ...] = ()
    """Broadcast recipients the policy filtered out: (recipient, rule)."""


@dataclass(frozen=True, slots=True)
class Refuse:
    """Do not forward. Answer a ``commande`` with ``code``; log ``kind`` with ``detail``."""

    kind: str
    code: str
    detail: str
    security: bool = False
    """A security event: forged source, policy denial, unsolicited answer."""


Decision = Deliver | Refuse


def route(message: Routable, origin: str, view: RoutingView) -> Decision:
    source = message.source
    if source != origin:
        return Refuse(SPOOFED, Code.REFUSE,
                      f"source {source!r} arrived on the channel of {origin!r}", security=True)
    kind = message.type
    destination = message.destination
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
        return Deliver(tuple(targets), tuple(denied))
    if destination != DOM0 and not view.is_connected(destination):
        if not view.is_known(destination):
            return Refuse(UNKNOWN, Code.DESTINATION_INCONNUE,
                          f"no domain named {destination!r}")
        return Refuse(OFFLINE, Code.DESTINATION_HORS_LIGNE,
                      f"domain {destination!r} is not connected")
    if kind == "reponse":
        id = message.id
        if id is not None and view.expects_reponse(destination, id, source):
            return _unicast(destination)
        return Refuse(UNSOLICITED, Code.REFUSE,
                      "no command from the destination awaits this id", security=True)
    verdict = view.policy.decide(source, destination, kind, message.name)
    if not verdict.allowed:
        return Refuse(DENIED, Code.REFUSE, verdict.reason, security=True)
    return _unicast(destination)


@dataclass
class StaticView:
    """A :class:`RoutingView` held in memory: which domains exist, which are connected,
    which answers are awaited. For "what would the router do?" questions (tests,
    fuzzing, tools) without a broker."""

    policy: PolicyLike
    known: frozenset[str] = frozenset()
    up: frozenset[str] = frozenset()
    """Connected domains (a subset of ``known``)."""
    pending: set[tuple[str, str, str]] = field(default_factory=set)
    """Commands awaiting an answer: (commander, id, replier)."""

    def is_known(self, name: str) -> bool:
        return name in self.known

    def is_connected(self, name: str) -> bool:
        return name in self.up

    def connected(self) -> Iterable[str]:
        return iter(sorted(self.up))

    def expects_reponse(self, commander: str, id: str, replier: str) -> bool:
        return (commander, id, replier) in self.pending


_UNICAST: dict[str, Deliver] = {}


def _unicast(destination: str) -> Deliver:
    # Decisions are immutable: one per destination, reused (the hot path allocates
    # nothing). Bounded: only names the registry knows get here.
    try:
        return _UNICAST[destination]
    except KeyError:
        if len(_UNICAST) > 4096:
            _UNICAST.clear()
        decision = _UNICAST[destination] = Deliver((destination,))
        return decision
