"""The pure routing decision: ``route(message, origin, view)`` with a fake registry."""

from __future__ import annotations

import textwrap
from collections.abc import Iterable

import pytest

from broker.pending import ANSWER, DOMAIN, FORGOTTEN, SERVICE, SILENT, Restored
from broker.policy import Policy, parse_policy
from broker.router import (
    DENIED,
    DUPLICATE,
    LATE,
    OFFLINE,
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
    dispatch,
    route,
)
from messagerie import DOM0, TOUS, Code, Commande, Journal, Notification, Reponse


def View(connected: Iterable[str] = (), offline: Iterable[str] = (),
         policy: PolicyLike | None = None,
         pending: Iterable[tuple[str, ...]] = ()) -> StaticView:
    """A registry in a few lines: connected and offline domains, pending commands
    (commander, id, replier and optionally the command's name, ``x`` by default; asked
    by the commander's endpoint, sent to the replier's)."""
    up = frozenset(connected)
    view = StaticView(policy or Policy.allow_all(), up | frozenset(offline), up)
    for commander, id, replier, *command in pending:
        view.expect(commander, id, replier, command=command[0] if command else "x")
    return view


POLICY = parse_policy(textwrap.dedent("""\
    [[regle]]
    source = "vm-a"
    destination = "tous"
    type = "notification"
    nom = "usb_device"
    action = "allow"

    [[regle]]
    source = "vm-a"
    destination = "vm-c"
    type = "*"
    action = "deny"

    [[regle]]
    source = "vm-a"
    destination = "*"
    type = "*"
    action = "allow"

    [[regle]]
    source = "vm-a"
    destination = "dom0"
    type = "*"
    action = "allow"

    [[regle]]
    source = "dom0"
    destination = "*"
    type = "*"
    action = "allow"
    """), origin="test-policy.toml")


def usb(source: str = "vm-a", destination: str = TOUS, categorie: str = "usb_device"
        ) -> Notification:
    return Notification(source, destination, categorie, "usb_connect", {"id": "1"})


def test_unicast_allowed() -> None:
    view = View(connected=["vm-a", "vm-b"])
    decision = route(usb(destination="vm-b"), "vm-a", view)
    assert decision == Deliver(("vm-b",))


@pytest.mark.parametrize("origin", ["vm-b", DOM0])
def test_spoofed_source(origin: str) -> None:
    view = View(connected=["vm-a", "vm-b"])
    decision = route(usb(destination="vm-b"), origin, view)
    assert isinstance(decision, Refuse)
    assert decision.kind == SPOOFED
    assert decision.code == Code.REFUSE
    assert decision.security is True
    assert "vm-a" in decision.detail and origin in decision.detail


def test_spoofed_source_checked_before_anything_else() -> None:
    """Even a broadcast or a command to dom0 under a forged name is refused."""
    view = View(connected=["vm-a", "vm-b"])
    for msg in (usb(), Commande("vm-a", DOM0, "ping")):
        decision = route(msg, "vm-b", view)
        assert isinstance(decision, Refuse) and decision.kind == SPOOFED


def test_dom0_destination() -> None:
    view = View(connected=["vm-a"])
    assert route(Commande("vm-a", DOM0, "ping"), "vm-a", view) == Deliver((DOM0,))
    assert route(usb(destination=DOM0), "vm-a", view) == Deliver((DOM0,))
    journal = Journal("vm-a", DOM0, "info", "hello", "test")
    assert route(journal, "vm-a", view) == Deliver((DOM0,))


def test_dom0_destination_follows_policy() -> None:
    view = View(connected=["vm-a", "vm-b"], policy=POLICY)
    decision = route(Commande("vm-b", DOM0, "ping"), "vm-b", view)
    assert isinstance(decision, Refuse) and decision.kind == DENIED


@pytest.mark.parametrize(("destination", "kind", "code"), [
    ("vm-x", UNKNOWN, Code.DESTINATION_INCONNUE),
    ("vm-b", OFFLINE, Code.DESTINATION_HORS_LIGNE),
], ids=["unknown", "offline"])
def test_unknown_or_offline_destination(destination: str, kind: str, code: str) -> None:
    view = View(connected=["vm-a"], offline=["vm-b"])
    decision = route(Commande("vm-a", destination, "lister"), "vm-a", view)
    assert isinstance(decision, Refuse)
    assert (decision.kind, decision.code) == (kind, code)
    assert destination in decision.detail
    assert decision.security is False


def test_offline_destination_with_a_spool() -> None:
    view = View(connected=["vm-a", "vm-c"], offline=["vm-b"])
    view.spooled = frozenset({"vm-b", "vm-c"})  # vm-b offline, vm-c replaying its spool
    assert route(Notification("vm-a", "vm-b", "c", "e"), "vm-a", view) == Deliver(
        ("vm-b",), spool=True)
    assert decide(Commande("vm-a", "vm-b", "lister"), "vm-a", "ep-a", view) == Forward(
        "vm-b", "vm-b", spool=True)
    # Connected, its spool being replayed: behind what the spool holds.
    assert route(Notification("vm-a", "vm-c", "c", "e"), "vm-a", view) == Deliver(
        ("vm-c",), spool=True)
    # An answer is never spooled: to an offline commander it is refused as before.
    view.expect("vm-b", "r1", "vm-a")
    refused = route(Reponse("vm-a", "vm-b", "r1", "x", "ok"), "vm-a", view)
    assert isinstance(refused, Refuse) and refused.kind == OFFLINE
    # A broadcast goes to the connected, never to a spool.
    assert route(Notification("vm-a", TOUS, "c", "e"), "vm-a", view) == Deliver(
        ("vm-c", DOM0))
    unknown = route(Notification("vm-a", "vm-x", "c", "e"), "vm-a", view)
    assert isinstance(unknown, Refuse) and unknown.kind == UNKNOWN
    # The policy decides before the spool: vm-a may not write to vm-c at all.
    strict = View(connected=["vm-a"], offline=["vm-c"], policy=POLICY)
    strict.spooled = frozenset({"vm-c"})
    denied = route(Notification("vm-a", "vm-c", "c", "e"), "vm-a", strict)
    assert isinstance(denied, Refuse) and denied.kind == DENIED


def test_broadcast_excludes_origin_includes_dom0() -> None:
    view = View(connected=["vm-a", "vm-b", "vm-c"])
    decision = route(usb(), "vm-a", view)
    assert isinstance(decision, Deliver)
    assert decision.targets == ("vm-b", "vm-c", DOM0)
    assert decision.denied == ()


def test_broadcast_from_dom0_not_back_to_dom0() -> None:
    view = View(connected=["vm-a", "vm-b"])
    decision = route(usb(source=DOM0), DOM0, view)
    assert isinstance(decision, Deliver)
    assert decision.targets == ("vm-a", "vm-b")


def test_broadcast_with_nobody_else_connected() -> None:
    view = View(connected=["vm-a"], offline=["vm-b"])
    assert route(usb(), "vm-a", view) == Deliver((DOM0,))


def test_broadcast_filtered_per_recipient() -> None:
    """A broadcast is decided recipient by recipient: the 'tous' rule (rule 1) comes
    first and lets usb_device reach everyone, vm-c included."""
    view = View(connected=["vm-a", "vm-b", "vm-c"], policy=POLICY)
    decision = route(usb(), "vm-a", view)
    assert isinstance(decision, Deliver)
    assert decision.targets == ("vm-b", "vm-c", DOM0)
    assert decision.denied == ()
    # Another category: the tous rule does not match; unicast-style rules decide,
    # recipient by recipient: vm-c is denied (rule 2), the others allowed.
    decision = route(usb(categorie="disque"), "vm-a", view)
    assert isinstance(decision, Deliver)
    assert decision.targets == ("vm-b", DOM0)
    assert [name for name, _ in decision.denied] == ["vm-c"]
    reason = decision.denied[0][1]
    assert "rule 2" in reason and "deny" in reason


def test_broadcast_all_denied_names_default_deny() -> None:
    view = View(connected=["vm-b", "vm-c"], policy=POLICY)
    decision = route(usb(source="vm-b"), "vm-b", view)
    assert isinstance(decision, Deliver)
    assert decision.targets == ()
    assert [name for name, _ in decision.denied] == ["vm-c", DOM0]
    assert all("default deny" in reason for _, reason in decision.denied)


def test_reponse_only_when_expected() -> None:
    answer = Reponse("vm-b", "vm-a", "c1", "lister", resultat=[])
    view = View(connected=["vm-a", "vm-b"])
    decision = route(answer, "vm-b", view)
    assert isinstance(decision, Refuse)
    assert (decision.kind, decision.code, decision.security) == (UNSOLICITED, Code.REFUSE, True)
    view.expect("vm-a", "c1", "vm-b", command="lister")
    assert route(answer, "vm-b", view) == Deliver(("vm-a",))
    # Another id, or another replier for the same id: still unsolicited.
    other = Reponse("vm-b", "vm-a", "c2", "lister", resultat=[])
    assert isinstance(route(other, "vm-b", view), Refuse)
    view = View(connected=["vm-a", "vm-b"], pending=[("vm-a", "c1", "vm-c", "lister")])
    assert isinstance(route(answer, "vm-b", view), Refuse)


def test_reponse_must_name_the_command_it_answers() -> None:
    """The right id from the right replier, relabelled as the answer to another
    command, is refused: its asker would act on a result it never asked for."""
    view = View(connected=["vm-a", "vm-b"], pending=[("vm-a", "c1", "vm-b", "lister")])
    forged = Reponse("vm-b", "vm-a", "c1", "supprimer_tout", resultat=[])
    decision = route(forged, "vm-b", view)
    assert isinstance(decision, Refuse)
    assert (decision.kind, decision.code, decision.security) == (UNSOLICITED, Code.REFUSE, True)
    assert ("vm-a", "c1") in view.pending  # still awaits its genuine answer
    genuine = Reponse("vm-b", "vm-a", "c1", "lister", resultat=[])
    assert route(genuine, "vm-b", view) == Deliver(("vm-a",))


def test_reponse_not_subject_to_policy() -> None:
    """Whether a reponse passes comes from the pending table, not from the policy."""
    view = View(connected=["vm-a", "vm-c"], policy=POLICY,
                pending=[("vm-a", "k", "vm-c", "lister")])
    # vm-c has no rule at all (default deny), yet its expected answer passes.
    answer = Reponse("vm-c", "vm-a", "k", "lister", resultat=1)
    assert route(answer, "vm-c", view) == Deliver(("vm-a",))


def test_reponse_to_dom0() -> None:
    view = View(connected=["vm-a"], pending=[(DOM0, "d1", "vm-a", "etat")])
    answer = Reponse("vm-a", DOM0, "d1", "etat", resultat=None)
    assert route(answer, "vm-a", view) == Deliver((DOM0,))
    assert isinstance(route(Reponse("vm-a", DOM0, "d2", "etat"), "vm-a", view), Refuse)


def test_reponse_to_offline_commander_is_offline() -> None:
    view = View(connected=["vm-b"], offline=["vm-a"], pending=[("vm-a", "c1", "vm-b")])
    decision = route(Reponse("vm-b", "vm-a", "c1", "x"), "vm-b", view)
    assert isinstance(decision, Refuse) and decision.kind == OFFLINE


def test_policy_denial() -> None:
    view = View(connected=["vm-a", "vm-c"], policy=POLICY)
    decision = route(Commande("vm-a", "vm-c", "effacer"), "vm-a", view)
    assert isinstance(decision, Refuse)
    assert (decision.kind, decision.code, decision.security) == (DENIED, Code.REFUSE, True)
    assert "rule 2" in decision.detail
    assert "vm-a" in decision.detail and "vm-c" in decision.detail
    # The deciding rule differs for an unknown source: the default deny.
    decision = route(Commande("vm-c", "vm-a", "x"), "vm-c", view)
    assert isinstance(decision, Refuse) and "default deny" in decision.detail


def test_policy_allows_after_deny_rule() -> None:
    view = View(connected=["vm-a", "vm-b", "vm-c"], policy=POLICY)
    assert route(Commande("vm-a", "vm-b", "x"), "vm-a", view) == Deliver(("vm-b",))


def test_unicast_decisions_are_reused() -> None:
    view = View(connected=["vm-a", "vm-b"])
    first = route(usb(destination="vm-b"), "vm-a", view)
    second = route(Commande("vm-a", "vm-b", "lister"), "vm-a", view)
    assert isinstance(first, Deliver)
    assert first is second
    to_dom0 = route(Commande("vm-a", DOM0, "ping"), "vm-a", view)
    assert to_dom0 is route(usb(destination=DOM0), "vm-a", view)
    assert to_dom0 is not first


def test_route_does_not_mutate_view_or_message() -> None:
    view = View(connected=["vm-a", "vm-b"], pending=[("vm-a", "c1", "vm-b")])
    answer = Reponse("vm-b", "vm-a", "c1", "x")
    before = answer.to_dict()
    route(answer, "vm-b", view)
    route(answer, "vm-b", view)
    # The broker closes it, not the router.
    assert [(p.commander, p.id, p.replier) for p in view.pending] == [("vm-a", "c1", "vm-b")]
    assert answer.to_dict() == before


def test_broadcast_from_dom0_also_reaches_the_other_dom0_services() -> None:
    view = View(connected=["vm-a"])
    assert route(usb(source=DOM0), DOM0, view).dom0_services is True  # type: ignore[union-attr]
    assert route(usb(), "vm-a", view) == Deliver((DOM0,))  # a domain's: dom0 is a target


# -- dispatch: what depends on the message itself ------------------------------------

def test_notifications_and_journals_are_the_routes_to_decide() -> None:
    view = View(connected=["vm-a", "vm-b"])
    for msg in (usb(destination="vm-b"), usb(), Journal("vm-a", DOM0, "info", "t", "c")):
        decision = route(msg, "vm-a", view)
        assert isinstance(decision, Deliver)
        assert dispatch(msg, decision, "vm-a", view) is decision
        assert decide(msg, "vm-a", "vm-a", view) == decision


def test_command_forwarded_to_the_domains_endpoint() -> None:
    view = View(connected=["vm-a", "vm-b"])
    cmd = Commande("vm-a", "vm-b", "lister", id="c1")
    assert decide(cmd, "vm-a", "vm-a", view) == Forward("vm-b", "vm-b")
    assert len(view.pending) == 0  # the broker tracks it when it applies the decision


def test_duplicate_id_refused_before_the_limit() -> None:
    view = View(connected=["vm-a", "vm-b"], pending=[("vm-a", "c1", "vm-b")])
    view.pending.limit = 1  # vm-a is also at its limit: the duplicate is said first
    decision = decide(Commande("vm-a", "vm-b", "autre", id="c1"), "vm-a", "vm-a", view)
    assert isinstance(decision, Refuse)
    assert (decision.kind, decision.code, decision.security) == (
        DUPLICATE, Code.MESSAGE_INVALIDE, False)
    assert "'c1'" in decision.detail
    # Another commander may use the same id.
    assert decide(Commande("vm-b", "vm-a", "x", id="c1"), "vm-b", "vm-b", view) == Forward(
        "vm-a", "vm-a")


def test_in_flight_limit_is_per_endpoint() -> None:
    view = View(connected=["vm-a", "vm-b"])
    view.pending.limit = 1
    view.expect(DOM0, "d1", "vm-a", asker="svc-1")
    cmd = Commande(DOM0, "vm-a", "lister", id="d2")
    decision = decide(cmd, DOM0, "svc-1", view)
    assert isinstance(decision, Refuse)
    assert (decision.kind, decision.code) == (TOO_MANY, Code.LIMITE)
    assert "more than 1 commands in flight" in decision.detail
    # Another dom0 service (same name, another endpoint) has its own count.
    assert decide(cmd, DOM0, "svc-2", view) == Forward("vm-a", "vm-a")


def test_dom0_builtins_registered_services_and_unknown_commands() -> None:
    view = View(connected=["vm-a"], pending=[("vm-a", "same", "dom0")])
    view.pending.limit = 1  # at its limit, with the id in flight: built-ins still answer
    view.services = {"etat": "svc-1"}
    for name in ("ping", "domaines", "statistiques", "enregistrer"):
        assert decide(Commande("vm-a", DOM0, name, id="same"), "vm-a", "vm-a",
                      view) == Builtin(name)
    view.pending.limit = 5
    assert decide(Commande("vm-a", DOM0, "etat", id="e1"), "vm-a", "vm-a",
                  view) == Forward(DOM0, "svc-1")
    decision = decide(Commande("vm-a", DOM0, "inconnue", id="u1"), "vm-a", "vm-a", view)
    assert isinstance(decision, Refuse)
    assert (decision.kind, decision.code, decision.security) == (
        UNKNOWN_COMMAND, Code.COMMANDE_INCONNUE, False)
    assert "'inconnue'" in decision.detail


def test_reponse_accepted_only_from_the_endpoint_asked() -> None:
    view = View(connected=["vm-a", "vm-b"])
    command = view.expect("vm-a", "c1", "vm-b", target="vm-b#new", command="lister")
    answer = Reponse("vm-b", "vm-a", "c1", "lister", resultat=[])
    # The name matches (route() lets it through) but the stale endpoint was not asked.
    assert route(answer, "vm-b", view) == Deliver(("vm-a",))
    decision = decide(answer, "vm-b", "vm-b#old", view)
    assert isinstance(decision, Refuse)
    assert (decision.kind, decision.code, decision.security) == (UNSOLICITED, Code.REFUSE, True)
    assert decision.detail == "this endpoint was not asked"
    assert decide(answer, "vm-b", "vm-b#new", view) == Answer(command)


def test_reponse_from_a_dom0_service_only_from_the_one_asked() -> None:
    view = View(connected=["vm-a"])
    command = view.expect("vm-a", "e1", DOM0, target="svc-1", command="etat")
    answer = Reponse(DOM0, "vm-a", "e1", "etat", resultat="ok")
    assert isinstance(decide(answer, DOM0, "svc-2", view), Refuse)
    assert decide(answer, DOM0, "svc-1", view) == Answer(command)


# -- the previous process's commands (restored from the state file) ----------------------

def restored(commander: str, id: str, replier: str, command: str, *, asker: str | None = None,
             target: str | None = None, deadline: float = 2e9) -> Restored:
    """A row of the state file: domains by name, dom0 services by ``dom0`` (asking) or
    by the command they serve."""
    asker_kind = SERVICE if commander == DOM0 else DOMAIN
    target_kind = SERVICE if replier == DOM0 else DOMAIN
    return Restored(commander, id, replier, command, asker_kind,
                    asker or (DOM0 if commander == DOM0 else commander), target_kind,
                    target or (command if replier == DOM0 else replier), deadline)


def test_a_late_answer_to_a_restored_command_is_decided_by_the_router() -> None:
    view = View(connected=["vm-a", "vm-b"])
    row = restored("vm-a", "c1", "vm-b", "lister")
    view.pending.restore([row])
    answer = Reponse("vm-b", "vm-a", "c1", "lister", resultat=[])
    assert route(answer, "vm-b", view) == Deliver(("vm-a",))
    assert decide(answer, "vm-b", "vm-b", view) == Recovered(row)
    # From the domain's stale endpoint (removed and re-added since): not asked.
    stale = decide(answer, "vm-b", "vm-b#old", view)
    assert isinstance(stale, Refuse)
    assert (stale.kind, stale.security, stale.detail) == (
        UNSOLICITED, True, "this endpoint was not asked")
    # Relabelled as another command's answer, or from another domain: unsolicited.
    for forged, origin in ((Reponse("vm-b", "vm-a", "c1", "effacer", resultat=[]), "vm-b"),
                           (Reponse("vm-c", "vm-a", "c1", "lister", resultat=[]), "vm-c")):
        refused = decide(forged, origin, origin, view)
        assert isinstance(refused, Refuse)
        assert (refused.kind, refused.security) == (UNSOLICITED, True)
    # Restored commands hold none of this process's slots.
    assert view.pending.in_flight("vm-a") == 0 and len(view.pending) == 0
    # Answered: the next answer is unsolicited.
    assert view.pending.close_restored(row.key) == row
    again = decide(answer, "vm-b", "vm-b", view)
    assert isinstance(again, Refuse) and (again.kind, again.security) == (UNSOLICITED, True)


def test_a_restored_command_a_dom0_service_serves_is_answered_by_its_server_now() -> None:
    view = View(connected=["vm-a"])
    row = restored("vm-a", "s1", DOM0, "stocker")
    view.pending.restore([row])
    answer = Reponse(DOM0, "vm-a", "s1", "stocker", resultat="ok")
    # No service serves it yet: any dom0 connection may answer (before it registers).
    assert decide(answer, DOM0, "svc-2", view) == Recovered(row)
    view.services = {"stocker": "svc-1"}
    assert decide(answer, DOM0, "svc-1", view) == Recovered(row)
    other = decide(answer, DOM0, "svc-2", view)
    assert isinstance(other, Refuse) and (other.kind, other.security) == (UNSOLICITED, True)


def test_a_live_command_comes_before_a_restored_one_with_its_id() -> None:
    view = View(connected=["vm-a", "vm-b", "vm-c"])
    row = restored("vm-a", "c1", "vm-b", "lister")
    view.pending.restore([row])
    live = view.expect("vm-a", "c1", "vm-c", command="lister")  # its id, reused
    assert decide(Reponse("vm-c", "vm-a", "c1", "lister", resultat=[]), "vm-c", "vm-c",
                  view) == Answer(live)
    assert decide(Reponse("vm-b", "vm-a", "c1", "lister", resultat=[]), "vm-b", "vm-b",
                  view) == Recovered(row)


def test_restored_commands_expire_on_the_wall_clock_and_their_answers_are_late() -> None:
    view = View(connected=["vm-a", "vm-b"])
    view.pending.restore([
        restored("vm-a", "due", "vm-b", "lister", deadline=100.0),
        restored("vm-a", "later", "vm-b", "lister", deadline=200.0),
        restored(DOM0, "svc", "vm-b", "etat", deadline=100.0),
        restored("vm-gone", "away", "vm-b", "lister", deadline=100.0),
    ])
    up = {"vm-a", "vm-b"}.__contains__
    due = view.pending.expire_restored(150.0, up, 3600.0)
    assert sorted((r.id, outcome) for r, outcome in due) == [("due", ANSWER), ("svc", SILENT)]
    # Its commander away: it waits for it, up to ``keep`` past its deadline.
    assert set(view.pending.restored) == {("vm-a", "later"), ("vm-gone", "away")}
    due = view.pending.expire_restored(100.0 + 3601.0, up, 3600.0)
    assert sorted((r.id, outcome) for r, outcome in due) == [
        ("away", FORGOTTEN), ("later", ANSWER)]
    assert not view.pending.restored
    # Their answers, from the domain asked, are late; from anyone else, forgeries.
    late = decide(Reponse("vm-b", "vm-a", "due", "lister", resultat=[]), "vm-b", "vm-b", view)
    assert isinstance(late, Refuse) and (late.kind, late.security) == (LATE, False)
    forged = decide(Reponse("vm-a", "vm-b", "due", "lister", resultat=[]), "vm-a", "vm-a",
                    view)
    assert isinstance(forged, Refuse) and (forged.kind, forged.security) == (UNSOLICITED, True)


# -- the pure layer stays pure ---------------------------------------------------------

PURE = ("router", "pending", "ratelimit", "cpuspeed", "config", "discovery", "policy/__init__",
        "policy/rules", "policy/parser", "echo", "memory", "arguments")
EDGES = ("endpoint", "dom0", "hub", "daemon", "demo", "inflight", "spool", "trace",
         "xenstore", "notify", "logs", "sockets")


def _imports(module: str) -> set[str]:
    import ast
    from pathlib import Path

    import broker

    path = Path(broker.__file__).parent / f"{module}.py"
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            if node.module:
                names.add(base)
            else:  # from . import logs
                names.update(base + alias.name for alias in node.names)
    return names


TOP = ("cli", "__init__")
"""The command line, which may import anything, and the package's empty root."""


def test_every_module_has_its_place_in_the_layers() -> None:
    from pathlib import Path

    import broker

    root = Path(broker.__file__).parent
    found = {str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.py")}
    assert found == {*PURE, *EDGES, *TOP}, "a module to add to PURE or EDGES"


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_import_no_asyncio(module: str) -> None:
    assert not {n for n in _imports(module) if n.split(".")[0] == "asyncio"}


@pytest.mark.parametrize("module", [*PURE, *EDGES])
def test_dependencies_point_one_way(module: str) -> None:
    """Endpoints and the dom0 socket know the broker as a Sink, not its module; the
    daemon knows nothing of its command line, nor of the demo that runs it."""
    forbidden = {"endpoint": {".hub", ".dom0", ".daemon", ".cli"},
                 "dom0": {".hub", ".daemon", ".cli"},
                 "trace": {".hub", ".dom0", ".daemon", ".cli", ".demo"},
                 "hub": {".daemon", ".cli", ".demo"},
                 "daemon": {".cli", ".demo"},
                 "demo": {".cli"}}.get(module, {".hub", ".endpoint", ".dom0", ".daemon",
                                                ".cli", ".demo"})
    assert not _imports(module) & forbidden


def test_a_destination_that_never_answers_holds_only_its_share_of_slots() -> None:
    view = View(connected=["vm-ui", "vm-usb", "vm-diag"])
    view.pending.limit, view.pending.per_target = 8, 3
    view.services = {"etat": "svc-1"}
    for i in range(3):  # vm-usb never answers these
        view.expect("vm-ui", f"u{i}", "vm-usb")
    decision = decide(Commande("vm-ui", "vm-usb", "lister", id="u3"), "vm-ui", "vm-ui", view)
    assert isinstance(decision, Refuse)
    assert (decision.kind, decision.code) == (TOO_MANY, Code.LIMITE)
    assert decision.detail == "more than 3 commands in flight to vm-usb"
    # Every other destination, dom0's services included, still gets vm-ui's commands.
    assert decide(Commande("vm-ui", "vm-diag", "lister", id="d1"), "vm-ui", "vm-ui",
                  view) == Forward("vm-diag", "vm-diag")
    assert decide(Commande("vm-ui", DOM0, "etat", id="e1"), "vm-ui", "vm-ui",
                  view) == Forward(DOM0, "svc-1")
    # The per-commander bound still holds over all destinations.
    for i in range(5):
        view.expect("vm-ui", f"x{i}", f"vm-{i}")
    decision = decide(Commande("vm-ui", "vm-diag", "lister", id="d2"), "vm-ui", "vm-ui", view)
    assert isinstance(decision, Refuse) and decision.detail == "more than 8 commands in flight"
