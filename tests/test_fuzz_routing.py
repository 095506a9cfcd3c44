"""Hypothesis properties of the routing decision.

``broker.router.decide(message, origin, sender, view)`` is pure: these properties drive
it with a fake :class:`~broker.router.RoutingView` (registry, commands in flight, dom0
services and the endpoints involved drawn by Hypothesis) and real :mod:`broker.policy`
policies: allow-all, deny-all, the example policy of ``config/policy.toml``, and random
rule lists parsed from TOML. Both stages are covered: :func:`~broker.router.route` (the
cached one) and :func:`~broker.router.dispatch` (duplicate ids, the in-flight limit,
answers only from the endpoint asked, dom0's built-ins and services), the latter also
as a sequence of messages applied to the table of commands in flight as the broker
applies them. The last property feeds arbitrary and mutated bytes through the sans-IO
decode-then-route pipeline. Long runs: ``fuzz/`` (atheris), see ``docs/fuzzing.md``.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from broker.pending import ANSWER, DOMAIN, SERVICE, SILENT, Restored
from broker.policy import Policy, load_policy, parse_policy
from broker.router import (
    ABANDON_CATEGORY,
    BUILTINS,
    DENIED,
    DISPATCHED,
    DUPLICATE,
    KINDS,
    LATE,
    OFFLINE,
    RESERVED,
    SPOOFED,
    TOO_MANY,
    UNKNOWN,
    UNKNOWN_COMMAND,
    UNSOLICITED,
    Answer,
    Builtin,
    Deliver,
    Forward,
    PolicyLike,
    Recovered,
    Refuse,
    StaticView,
    decide,
    route,
)
from messagerie import DOM0, TOUS, Code, FrameDecoder, Message, encode, from_dict

SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

DOMAINS = ["vm-a", "vm-b", "vm-c", "vm-sys-usb", "vm-ui", "vm-diag"]
NAMES = [*DOMAINS, DOM0]
CODES = {v for k, v in vars(Code).items() if k.isupper()}
ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = load_policy(ROOT / "config" / "policy.toml")
DENY_ALL = parse_policy('[[regle]]\nsource = "*"\ndestination = "*"\ntype = "*"\n'
                        'action = "deny"\n', origin="<deny-all>")


View = StaticView


# -- strategies --------------------------------------------------------------------

names = st.sampled_from(NAMES) | st.from_regex(r"\Avm-[a-z]{1,6}\Z")
labels = st.sampled_from(["entree", "disque", "fichier", "domaine", "liste_disques",
                          "lit_fichier", "ping", "statistiques", "enregistrer", "x",
                          ABANDON_CATEGORY]) \
    | st.from_regex(r"\A[a-z][a-z_]{0,11}\Z")
ids = st.sampled_from(["1", "2", "c1"]) | st.from_regex(r"\A[a-z0-9]{1,8}\Z")


@st.composite
def messages(draw: st.DrawFn, kinds: tuple[str, ...] = ("notification", "commande", "reponse",
                                                         "journal"),
             broadcast: bool = False) -> Message:
    kind = draw(st.sampled_from(kinds))
    source = draw(names)
    broadcastable = kind in ("notification", "journal")
    if broadcast:
        destination = TOUS
    else:
        destination = draw(names | st.just(TOUS)) if broadcastable else draw(names)
    label = draw(labels)
    if kind == "notification":
        payload: dict[str, Any] = {"categorie": label, "evenement": "e", "data": {}}
    elif kind == "commande":
        payload = {"id": draw(ids), "commande": label, "arguments": {}}
        delai = draw(st.sampled_from([None, None, 0.001, 0.5, 2.0, 10.0, 100.0]))
        if delai is not None:
            payload["delai"] = delai
    elif kind == "reponse":
        payload = {"id": draw(ids), "commande": label, "statut": "ok", "resultat": None}
    else:
        payload = {"niveau": "info", "texte": "t", "horodatage": "2026-01-01T00:00:00Z",
                   "composant": label}
    return from_dict({"type": kind, "source": source, "destination": destination,
                      "payload": payload})


patterns = st.sampled_from([*DOMAINS, DOM0, "*", "@metier", "@tout"])
rule_types = st.sampled_from(["notification", "commande", "journal", "*"])


@st.composite
def random_policies(draw: st.DrawFn) -> Policy:
    lines = ['[groupes]\nmetier = ["vm-ui", "vm-diag"]\ntout = ["vm-a", "dom0"]\n']
    for _ in range(draw(st.integers(1, 8))):
        lines.append("[[regle]]")
        lines.append(f'source = "{draw(patterns)}"')
        lines.append(f'destination = "{draw(patterns | st.just(TOUS))}"')
        lines.append(f'type = "{draw(rule_types)}"')
        nom = draw(st.none() | st.lists(st.sampled_from(
            ["entree", "disque", "liste_*", "l?t_fichier", "*", "ping"]), min_size=1,
            max_size=3))
        if nom is not None:
            lines.append(f"nom = {json.dumps(nom)}")
        lines.append(f'action = "{draw(st.sampled_from(["allow", "deny"]))}"\n')
    return parse_policy("\n".join(lines), origin="<random>")


policies = st.sampled_from([Policy.allow_all(), DENY_ALL, EXAMPLE]) | random_policies()


SERVICES = ["svc-1", "svc-2"]
"""Endpoints of dom0 services: they all speak as dom0, each is an endpoint of its own."""


def endpoints_of(name: str) -> st.SearchStrategy[str]:
    """The endpoints a name may be read from: its own (``StaticView.endpoint``), a
    stale one (the domain was removed and re-added under the same name), and for dom0
    one of its services."""
    own = st.sampled_from([name, f"{name}#old"])
    return own | st.sampled_from(SERVICES) if name == DOM0 else own


@st.composite
def views(draw: st.DrawFn, policy: st.SearchStrategy[PolicyLike] = policies) -> View:
    known = frozenset(draw(st.sets(st.sampled_from(DOMAINS))))
    up = frozenset(draw(st.sets(st.sampled_from(sorted(known)))) if known else ())
    view = View(draw(policy), known, up)
    view.pending.limit = draw(st.integers(1, 4))
    view.pending.per_target = draw(st.integers(1, view.pending.limit))
    view.services = draw(st.dictionaries(labels, st.sampled_from(SERVICES), max_size=4))
    for commander, id, replier in draw(st.lists(st.tuples(names, ids, names), max_size=6)):
        if (commander, id) not in view.pending:
            view.expect(commander, id, replier, asker=draw(endpoints_of(commander)),
                        target=draw(endpoints_of(replier)))
    rows = draw(st.lists(st.tuples(names, ids, names, labels), max_size=3))
    view.pending.restore(restored(*row) for row in rows)
    return view


def restored(commander: str, id: str, replier: str, command: str,
             deadline: float = 2e9) -> Restored:
    """A command the previous process had in flight, as its state file names its
    parties: a domain by its name, a dom0 service by ``dom0`` when it asked and by the
    command it serves when it served."""
    return Restored(commander, id, replier, command,
                    SERVICE if commander == DOM0 else DOMAIN, commander,
                    SERVICE if replier == DOM0 else DOMAIN,
                    command if replier == DOM0 else replier, deadline)


def asked_before(command: Restored, sender: str, view: View) -> bool:
    """docs/broker.md: the domain asked (its endpoint now), or the dom0 service serving
    the command now, or any dom0 service while none does."""
    if command.target_kind == DOMAIN:
        # Its endpoint now (StaticView.endpoint(name) is the name): a removed one has none.
        return command.target in view.known and sender == command.target
    return view.services.get(command.command) in (None, sender)


def awaiting(view: View, commander: str, id: str, replier: str, *, target: str,
             command: str) -> None:
    """Make ``view`` await this answer (replacing a command with the same id)."""
    view.pending.close(commander, id)
    view.expect(commander, id, replier, target=target, command=command)


@st.composite
def scenarios(draw: st.DrawFn, msgs: st.SearchStrategy[Message] | None = None
              ) -> tuple[Message, str, View]:
    """A message, the channel it came from (usually its source), and a view in which
    replies often match a pending command."""
    msg = draw(msgs if msgs is not None else messages())
    origin = draw(st.just(msg.source) | names)
    view = draw(views())
    if msg.type == "reponse" and draw(st.booleans()):
        # Usually the command it names; sometimes another one (a relabelled answer).
        command = draw(st.just(msg.payload["commande"]) | labels)
        awaiting(view, msg.destination, msg.payload["id"], msg.source, target=msg.source,
                 command=command)
    if msg.type == "reponse" and draw(st.integers(0, 3)) == 0:
        # Awaited by the previous process (sometimes this process awaits it too).
        command = draw(st.just(msg.payload["commande"]) | labels)
        view.pending.restored[(msg.destination, msg.payload["id"])] = restored(
            msg.destination, msg.payload["id"], msg.source, command)
    return msg, origin, view


@st.composite
def dispatch_scenarios(draw: st.DrawFn) -> tuple[Message, str, str, View]:
    """A well-sourced message, the endpoint it came from, and a view in which its id
    is often in flight, answers often awaited (from this endpoint or another one),
    and its sender often at its limit."""
    msg = draw(messages(("commande", "reponse", "notification", "journal")))
    if msg.type in DISPATCHED and draw(st.integers(0, 2)) == 0:
        wire = msg.to_dict()
        wire["destination"] = DOM0  # built-ins, services
        if msg.type == "commande" and draw(st.booleans()):
            wire["payload"]["commande"] = draw(st.sampled_from(sorted(BUILTINS)))
        msg = from_dict(wire)
    sender = draw(endpoints_of(msg.source))
    # Mostly allow-all: the policy's part is route()'s, tested above.
    view = draw(views(st.just(Policy.allow_all()) if draw(st.integers(0, 3)) else policies))
    destination = msg.destination
    if destination not in (DOM0, TOUS) and draw(st.integers(0, 3)):
        view.known |= {destination}  # usually routable: the point is what comes next
        view.up |= {destination}
    if msg.type == "reponse" and draw(st.booleans()):
        target = draw(st.just(sender) | endpoints_of(msg.source))
        command = draw(st.just(msg.payload["commande"]) | labels)
        awaiting(view, msg.destination, msg.payload["id"], msg.source, target=target,
                 command=command)
    if msg.type == "reponse" and draw(st.booleans()):
        command = draw(st.just(msg.payload["commande"]) | labels)
        view.pending.restored[(msg.destination, msg.payload["id"])] = restored(
            msg.destination, msg.payload["id"], msg.source, command)
        if draw(st.booleans()):  # a dom0 service serves it now
            view.services[command] = draw(st.sampled_from(SERVICES))
        if msg.source != DOM0 and draw(st.integers(0, 3)):
            view.known |= {msg.source}  # usually the domain asked is still declared
        if destination not in (DOM0, TOUS) and draw(st.integers(0, 3)):
            view.known |= {destination}  # and its commander back
            view.up |= {destination}
    if msg.type == "commande":
        key = (msg.source, msg.payload["id"])
        view.pending.close(*key)
        if draw(st.integers(0, 3)) == 0:  # its id already in flight
            view.expect(*key, draw(names), asker=draw(endpoints_of(msg.source)))
        if draw(st.booleans()):  # a dom0 service serves it
            view.services[msg.payload["commande"]] = draw(st.sampled_from(SERVICES))
        for i in range(draw(st.integers(0, view.pending.limit))):
            key = (msg.source, f"other-{i}")
            if key not in view.pending:
                # Often to the very endpoint this command would go to.
                replier = draw(st.just(destination) | names)
                view.expect(*key, replier, asker=sender,
                            target=draw(st.just(replier) | st.sampled_from(SERVICES)))
    return msg, msg.source, sender, view


def recipients(origin: str, view: View) -> set[str]:
    out = {t for t in view.up if t != origin}
    if origin != DOM0:
        out.add(DOM0)
    return out


# -- properties --------------------------------------------------------------------

@SETTINGS
@given(scenarios())
def test_route_never_raises_and_its_decision_is_well_formed(s: tuple[Message, str, View]
                                                            ) -> None:
    msg, origin, view = s
    decision = route(msg, origin, view)
    assert type(decision) in (Deliver, Refuse)
    assert route(msg, origin, view) == decision, "not deterministic"
    if type(decision) is Refuse:
        assert decision.kind in (SPOOFED, UNSOLICITED, UNKNOWN, OFFLINE, DENIED, RESERVED)
        assert decision.code in CODES and decision.detail
        if decision.kind in (SPOOFED, UNSOLICITED, DENIED, RESERVED):
            assert decision.security
        return
    assert type(decision) is Deliver
    for target in decision.targets:
        assert target == DOM0 or view.is_connected(target), (target, view.up)
    assert len(set(decision.targets)) == len(decision.targets), "duplicate target"


@pytest.mark.slow
@SETTINGS
@given(scenarios())
def test_a_forged_source_is_always_refused(s: tuple[Message, str, View]) -> None:
    msg, origin, view = s
    assume(msg.source != origin)
    decision = route(msg, origin, view)
    assert type(decision) is Refuse
    assert decision.kind == SPOOFED and decision.code == Code.REFUSE and decision.security


@SETTINGS
@given(scenarios(messages(("notification", "journal"), broadcast=True)))
def test_a_broadcast_never_targets_its_origin(s: tuple[Message, str, View]) -> None:
    msg, _, view = s
    decision = route(msg, msg.source, view)
    if is_reserved(msg):
        return
    assert type(decision) is Deliver  # a broadcast is filtered, never refused whole
    assert msg.source not in decision.targets
    denied = {d for d, _ in decision.denied}
    assert msg.source not in denied
    # Every recipient is decided exactly once: delivered or denied with a rule.
    assert set(decision.targets) | denied == recipients(msg.source, view)
    assert not set(decision.targets) & denied
    assert all(rule for _, rule in decision.denied)


@SETTINGS
@given(scenarios(messages(("commande",))))
def test_a_refused_commande_always_has_an_error_code(s: tuple[Message, str, View]) -> None:
    msg, origin, view = s
    decision = route(msg, origin, view)
    if type(decision) is Refuse:
        assert decision.code in CODES
    else:
        assert type(decision) is Deliver and len(decision.targets) == 1
        assert decision.targets == (msg.destination,)


def is_reserved(msg: Message) -> bool:
    """A notification of the broker's reserved category: refused from anyone, whatever
    the policy (checked here, for the differential tests to skip it)."""
    if msg.type != "notification" or msg.name != ABANDON_CATEGORY:
        return False
    decision = route(msg, msg.source, View(Policy.allow_all(), frozenset(DOMAINS),
                                           frozenset(DOMAINS)))
    assert type(decision) is Refuse and (decision.kind, decision.security) == (RESERVED, True)
    return True


@SETTINGS
@given(messages(), views(st.sampled_from([Policy.allow_all(), DENY_ALL, EXAMPLE])
                         | random_policies()))
def test_the_policy_has_the_last_word(msg: Message, view: View) -> None:
    """Differential: a well-sourced message goes exactly where the policy allows."""
    decision = route(msg, msg.source, view)
    policy = view.policy
    if is_reserved(msg):
        return
    if msg.destination == TOUS:
        assert type(decision) is Deliver
        allowed = {t for t in recipients(msg.source, view)
                   if policy.decide(msg.source, t, msg.type, msg.name, broadcast=True).allowed}
        assert set(decision.targets) == allowed
        return
    if msg.destination != DOM0 and msg.destination not in view.up:
        assert type(decision) is Refuse
        assert decision.kind == (OFFLINE if msg.destination in view.known else UNKNOWN)
        return
    if msg.type == "reponse":  # follows its command, whatever the rules
        command = view.pending.get(msg.destination, msg.payload["id"])
        solicited = (command is not None and command.replier == msg.source
                     and command.command == msg.payload["commande"])
        assert (type(decision) is Deliver) == solicited
        return
    verdict = policy.decide(msg.source, msg.destination, msg.type, msg.name)
    if verdict.allowed:
        assert decision == Deliver((msg.destination,))
    else:
        assert type(decision) is Refuse and decision.kind == DENIED
        assert decision.code == Code.REFUSE and decision.detail == verdict.reason


@SETTINGS
@given(messages(), views(st.just(Policy.allow_all())))
def test_allow_all_delivers_everything_routable(msg: Message, view: View) -> None:
    decision = route(msg, msg.source, view)
    if is_reserved(msg):
        return
    if msg.destination == TOUS:
        assert type(decision) is Deliver and not decision.denied
        assert set(decision.targets) == recipients(msg.source, view)
    elif msg.type != "reponse" and (msg.destination == DOM0 or msg.destination in view.up):
        assert decision == Deliver((msg.destination,))


@SETTINGS
@given(messages(), views(st.just(DENY_ALL)))
def test_deny_all_delivers_nothing_but_solicited_answers(msg: Message, view: View) -> None:
    decision = route(msg, msg.source, view)
    if is_reserved(msg):
        return
    if type(decision) is Deliver:
        if msg.destination == TOUS:
            # "*" never names dom0 and no rule names tous: only dom0 could be let
            # through, and the default deny refuses it too.
            assert decision.targets == ()
        else:
            assert msg.type == "reponse"
            assert view.pending.expects(msg.destination, msg.payload["id"], msg.source,
                                        msg.payload["commande"])
    elif msg.type != "reponse" and (msg.destination == DOM0 or msg.destination in view.up):
        assert decision.kind == DENIED


# -- dispatch: the rules that depend on the message itself ----------------------------

def in_flight_table(view: View) -> list[tuple[str, str, str, str, str]]:
    return sorted((p.commander, p.id, p.replier, p.asker, p.target) for p in view.pending)


@SETTINGS
@given(dispatch_scenarios() | scenarios().map(lambda s: (s[0], s[1], s[1], s[2])))
def test_decide_never_raises_and_its_decision_is_well_formed(
        s: tuple[Message, str, str, View]) -> None:
    msg, origin, sender, view = s
    before = in_flight_table(view)
    routed = route(msg, origin, view)
    decision = decide(msg, origin, sender, view)
    assert decide(msg, origin, sender, view) == decision, "not deterministic"
    assert in_flight_table(view) == before, "the router changed the table"
    if type(routed) is Refuse or msg.type not in DISPATCHED:
        # What route() refuses stays refused; other types are the route's to decide
        # (the broker skips dispatch() for them on its hot path).
        assert decision == routed
        return
    kind, name, id = msg.type, msg.name, msg.payload.get("id")
    if type(decision) is Refuse:
        assert decision.kind in KINDS and decision.code in CODES and decision.detail
    elif type(decision) is Builtin:
        assert (kind, msg.destination, decision.name) == ("commande", DOM0, name)
        assert name in BUILTINS
    elif type(decision) is Forward:
        assert kind == "commande" and (name not in BUILTINS or msg.destination != DOM0)
        assert decision.target == msg.destination
        assert (msg.source, id) not in view.pending, "a duplicate id forwarded"
        assert view.pending.in_flight(sender) < view.pending.limit, "over the limit"
        expected = (view.services.get(name) if msg.destination == DOM0  # type: ignore[arg-type]
                    else msg.destination)
        assert decision.server == expected
    elif type(decision) is Recovered:
        assert kind == "reponse"
        old = decision.command
        assert old is view.pending.restored[(msg.destination, id)]  # type: ignore[index]
        assert (old.replier, old.command) == (msg.source, name)
        assert asked_before(old, sender, view), "answered by an endpoint not asked"
        live = view.pending.get(msg.destination, id)  # type: ignore[arg-type]
        assert live is None or (live.replier, live.command) != (msg.source, name), \
            "a live command's answer taken for a restored one's"
        assert view.pending.in_flight(sender) == before_count(before, sender)
    else:
        assert type(decision) is Answer, decision
        assert kind == "reponse"
        command = decision.command
        assert command is view.pending.get(msg.destination, id)  # type: ignore[arg-type]
        assert command.replier == msg.source and command.target == sender


def before_count(table: list[tuple[str, str, str, str, str]], asker: str) -> int:
    return sum(1 for row in table if row[3] == asker)


@SETTINGS
@given(dispatch_scenarios())
def test_dispatch_applies_its_rules_in_order(s: tuple[Message, str, str, View]) -> None:
    """Differential: the decision a reader of docs/broker.md expects, rule by rule."""
    msg, origin, sender, view = s
    routed = route(msg, origin, view)
    decision = decide(msg, origin, sender, view)
    if type(routed) is not Deliver or msg.type not in DISPATCHED:
        return
    id = msg.payload["id"]
    if msg.type == "reponse":
        # route() let it through: a live command, else a restored one, has its id,
        # replier and name; the live one comes first.
        key, answers = (msg.destination, id), (msg.source, msg.payload["commande"])
        live = view.pending.get(*key)
        old = view.pending.restored.get(key)
        if live is not None and (live.replier, live.command) == answers:
            expected: Any = Answer(live) if live.target == sender else None
        else:
            assert old is not None and (old.replier, old.command) == answers
            expected = Recovered(old) if asked_before(old, sender, view) else None
        if expected is not None:
            assert decision == expected
        else:
            assert type(decision) is Refuse
            assert (decision.kind, decision.code, decision.security) == (
                UNSOLICITED, Code.REFUSE, True)
        return
    name = msg.payload["commande"]
    to_dom0 = msg.destination == DOM0
    if to_dom0 and name in BUILTINS:
        assert decision == Builtin(name)  # never tracked: neither a duplicate nor limited
    elif (msg.source, id) in view.pending:
        assert type(decision) is Refuse
        assert (decision.kind, decision.code) == (DUPLICATE, Code.MESSAGE_INVALIDE)
    elif view.pending.in_flight(sender) >= view.pending.limit:
        assert type(decision) is Refuse and (decision.kind, decision.code) == (
            TOO_MANY, Code.LIMITE)
    elif to_dom0 and name not in view.services:
        assert type(decision) is Refuse and (decision.kind, decision.code) == (
            UNKNOWN_COMMAND, Code.COMMANDE_INCONNUE)
    else:
        server = view.services[name] if to_dom0 else msg.destination
        to_server = sum(1 for p in view.pending if p.asker == sender and p.target == server)
        if to_server >= view.pending.per_target:
            assert type(decision) is Refuse and (decision.kind, decision.code) == (
                TOO_MANY, Code.LIMITE)
            assert f"in flight to {msg.destination}" in decision.detail
        else:
            assert decision == Forward(msg.destination, server)
    if type(decision) is Refuse:
        assert not decision.security  # the sender's own mistake or bound, not an attack


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(messages(("commande", "reponse", "notification")),
                          st.sampled_from(["", "#old", "svc-1", "svc-2"]),
                          st.sampled_from([0.0, 0.0, 0.0, 0.5, 3.0, 30.0])),
                max_size=40),
       st.integers(1, 3), st.integers(1, 3), st.sampled_from([1.0, 10.0, 300.0]),
       st.lists(st.tuples(st.sampled_from(NAMES), ids, st.sampled_from(NAMES), labels,
                          st.sampled_from([0.5, 5.0, 50.0])), max_size=4))
def test_commands_in_flight_stay_consistent(traffic: list[tuple[Message, str, float]],
                                            limit: int, per_target: int, ttl: float,
                                            previous: list[tuple[str, str, str, str, float]]
                                            ) -> None:
    """A sequence of messages, each decided and applied as the broker does (a Forward
    is tracked with the delai it carries, an Answer closes its command), time passing
    between them and the commands past their deadline expiring: each endpoint's count
    is the number of its commands in the table and never exceeds the limit, nor per
    target endpoint its per-target limit; a command is due at min(delai, ttl) from its
    receipt, expires then and not before, and is answered at most once, only by the
    endpoint it went to; an answer to an expired command from the one asked is late
    (not a security event), from anyone else unsolicited. The commands a previous
    process had in flight (restored) hold no slot, are answered at most once by the
    party asked, and past their deadline are answered for, or forgotten, once."""
    view = View(Policy.allow_all(), frozenset(DOMAINS), frozenset(DOMAINS))
    clock = Clock()
    view.pending.restore(restored(c, i, r, n, clock.now + d) for c, i, r, n, d in previous)
    before = dict(view.pending.restored)
    view.pending.clock = clock
    view.pending.limit = limit
    view.pending.per_target = per_target
    view.pending.ttl = ttl
    view.services = {"liste_disques": "svc-1", "etat": "svc-2"}
    answered: set[tuple[str, str]] = set()
    expired: dict[tuple[str, str], str] = {}  # (commander, id) -> replier
    for msg, variant, advance in traffic:
        sender = variant if msg.source == DOM0 and variant.startswith("svc") else (
            msg.source + ("#old" if variant == "#old" else ""))
        decision = decide(msg, msg.source, sender, view)
        if type(decision) is Forward:
            delai = msg.payload.get("delai")
            command = view.pending.add(msg.source, msg.payload["id"], msg.destination,
                                       msg.payload["commande"], asker=sender,
                                       target=decision.server, delai=delai)
            assert command.deadline == clock.now + (ttl if delai is None else min(delai, ttl))
        elif type(decision) is Answer:
            command = decision.command
            assert command.target == sender
            assert command.command == msg.payload["commande"], "another command's answer"
            assert command.key not in answered, "answered twice"
            assert command.deadline > clock.now, "answered past its deadline"
            answered.add(command.key)
            assert view.pending.close(*command.key) is command
        elif type(decision) is Recovered:
            old = decision.command
            assert (old.replier, old.command) == (msg.source, msg.payload["commande"])
            assert asked_before(old, sender, view)
            assert ("restored", *old.key) not in answered, "answered twice"
            assert old.deadline > clock.now, "answered past its deadline"
            answered.add(("restored", *old.key))
            assert view.pending.close_restored(old.key) is old
        elif type(decision) is Refuse and msg.type == "reponse":
            key = (msg.destination, msg.payload["id"])
            # (Its id may be in flight again, to another replier or command name.)
            late = expired.get(key) == msg.source
            if decision.kind == LATE:
                assert late and not decision.security
            elif decision.kind == UNSOLICITED:
                assert not late and decision.security
        clock.now += advance
        for command in view.pending.expire():
            assert command.deadline <= clock.now
            expired[command.key] = command.replier
            assert view.pending.abandoned(command.commander, command.id, command.replier)
        for old, outcome in view.pending.expire_restored(clock.now, view.is_connected, 3600.0):
            assert old.deadline <= clock.now and ("restored", *old.key) not in answered
            assert outcome == (SILENT if old.commander == DOM0 else ANSWER)  # all are up
            assert before.pop(old.key) is old, "expired twice"
            expired[old.key] = old.replier
        assert all(r.deadline > clock.now for r in view.pending.restored.values())
        assert all(p.deadline > clock.now for p in view.pending), "overdue, not expired"
        deadlines = [p.deadline for p in view.pending]
        assert view.pending.next_deadline() == (min(deadlines) if deadlines else None)
        counts: dict[str, int] = {}
        pairs: dict[tuple[str, str], int] = {}
        for p in view.pending:
            counts[p.asker] = counts.get(p.asker, 0) + 1
            pairs[p.asker, p.target] = pairs.get((p.asker, p.target), 0) + 1
        for endpoint, n in counts.items():
            assert view.pending.in_flight(endpoint) == n <= limit
        for (asker, target), n in pairs.items():
            assert view.pending.in_flight_to(asker, target) == n <= per_target
        assert sum(counts.values()) == len(view.pending)  # restored ones hold no slot
        assert view.pending._pairs == pairs  # no stale entry left behind


# -- decode then route ---------------------------------------------------------------

valid_frames = messages().map(encode)


@st.composite
def hostile_streams(draw: st.DrawFn) -> bytes:
    """Valid frames, raw bytes, and valid frames with bytes flipped, cut or spliced."""
    parts: list[bytes] = []
    for _ in range(draw(st.integers(1, 6))):
        choice = draw(st.integers(0, 3))
        if choice == 0:
            parts.append(draw(valid_frames))
        elif choice == 1:
            parts.append(draw(st.binary(max_size=200)))
        else:
            frame = bytearray(draw(valid_frames))
            for _ in range(draw(st.integers(1, 4))):
                i = draw(st.integers(0, len(frame) - 1))
                if choice == 2:
                    frame[i] = draw(st.integers(0, 255))
                else:
                    frame[i:i] = draw(st.binary(min_size=1, max_size=8))
            parts.append(bytes(frame))
    return b"".join(parts)


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_streams(), st.lists(st.integers(0, 2000), max_size=6), names, views(),
       st.sampled_from([64, 256, 65536]))
def test_decode_then_route_never_raises(data: bytes, cuts: list[int], origin: str,
                                        view: View, max_frame: int) -> None:
    decoder = FrameDecoder(max_frame)
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    for a, b in itertools.pairwise(bounds):
        for item in decoder.feed(data[a:b]):
            assert decoder.buffered <= max_frame + 1
            if isinstance(item, Message):
                decision = route(item, origin, view)
                assert type(decision) in (Deliver, Refuse)
                if item.source != origin:
                    assert type(decision) is Refuse and decision.kind == SPOOFED
                full = decide(item, origin, origin, view)
                assert type(full) in (Deliver, Refuse, Builtin, Forward, Answer)
