"""The pure routing decision: ``route(message, origin, view)`` with a fake registry."""

from __future__ import annotations

import textwrap
from collections.abc import Iterable

import pytest

from broker.policy import Policy, parse_policy
from broker.router import (
    DENIED,
    OFFLINE,
    SPOOFED,
    UNKNOWN,
    UNSOLICITED,
    Deliver,
    PolicyLike,
    Refuse,
    StaticView,
    route,
)
from messagerie import DOM0, TOUS, Code, Commande, Journal, Notification, Reponse


def View(connected: Iterable[str] = (), offline: Iterable[str] = (),
         policy: PolicyLike | None = None,
         pending: Iterable[tuple[str, str, str]] = ()) -> StaticView:
    """A registry in a few lines: connected and offline domains, pending commands."""
    up = frozenset(connected)
    return StaticView(policy or Policy.allow_all(), up | frozenset(offline), up, set(pending))


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


def test_unknown_destination() -> None:
    view = View(connected=["vm-a"], offline=["vm-b"])
    decision = route(Commande("vm-a", "vm-x", "lister"), "vm-a", view)
    assert isinstance(decision, Refuse)
    assert (decision.kind, decision.code) == (UNKNOWN, Code.DESTINATION_INCONNUE)
    assert "vm-x" in decision.detail
    assert decision.security is False


def test_offline_destination() -> None:
    view = View(connected=["vm-a"], offline=["vm-b"])
    decision = route(Commande("vm-a", "vm-b", "lister"), "vm-a", view)
    assert isinstance(decision, Refuse)
    assert (decision.kind, decision.code) == (OFFLINE, Code.DESTINATION_HORS_LIGNE)
    assert "vm-b" in decision.detail
    assert decision.security is False


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
    view.pending.add(("vm-a", "c1", "vm-b"))
    assert route(answer, "vm-b", view) == Deliver(("vm-a",))
    # Another id, or another replier for the same id: still unsolicited.
    other = Reponse("vm-b", "vm-a", "c2", "lister", resultat=[])
    assert isinstance(route(other, "vm-b", view), Refuse)
    view.pending = {("vm-a", "c1", "vm-c")}
    assert isinstance(route(answer, "vm-b", view), Refuse)


def test_reponse_not_subject_to_policy() -> None:
    """Whether a reponse passes comes from the pending table, not from the policy."""
    view = View(connected=["vm-a", "vm-c"], policy=POLICY, pending=[("vm-a", "k", "vm-c")])
    # vm-c has no rule at all (default deny), yet its expected answer passes.
    answer = Reponse("vm-c", "vm-a", "k", "lister", resultat=1)
    assert route(answer, "vm-c", view) == Deliver(("vm-a",))


def test_reponse_to_dom0() -> None:
    view = View(connected=["vm-a"], pending=[(DOM0, "d1", "vm-a")])
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
    assert view.pending == {("vm-a", "c1", "vm-b")}  # the broker pops it, not the router
    assert answer.to_dict() == before
