"""A discovered domain that goes away for a while, with real processes: the broker as
users start it with socket discovery (``[decouverte] motifs`` over a temporary
directory), a DomU's unix socket that disappears (its file removed, its end gone) and
comes back under the same name, a real SQLite spool."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.broker_process import BrokerSystem
from tests.support.spool_system import (
    answers,
    appear,
    cmd,
    domain_stats,
    frame,
    leave,
    system_with_discovery,
)
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def system(tmp_path: Path) -> Iterator[BrokerSystem]:
    s = system_with_discovery(tmp_path)
    yield s
    s.close()


@pytest.mark.slow
def test_a_discovered_domain_that_comes_back_gets_what_was_sent_meanwhile(
        system: BrokerSystem) -> None:
    a = system.domus["vm-a"]
    d = appear(system, "vm-d")
    leave(system, d, "vm-d")
    sent = [frame("vm-a", "vm-d", i) for i in range(200)]
    a.write(b"".join(sent))
    a.send(cmd("vm-a", "vm-d", "meanwhile"))
    wait_until(lambda: (domain_stats(system, "vm-d") or {})["spool"]["messages"] == 201,
               what=lambda: f"201 spooled: {domain_stats(system, 'vm-d')}")
    stats = domain_stats(system, "vm-d")
    assert stats is not None
    assert stats["parti"] is True and stats["etat"] == "deconnecte"
    assert 0 < stats["oubli_dans"] <= 3600
    assert system.broker.find("message.refused", destination="vm-d") == []
    # Back under the same name (a new socket, as a rebooted domain's QEMU makes).
    d2 = appear(system, "vm-d", count=2)
    system.broker.wait_event("domain.returned", domain="vm-d")
    wait_until(lambda: (d2.pump(), len(d2.messages()) >= 201)[1],
               what=lambda: f"201 delivered, got {len(d2.messages())}")
    assert d2.lines_from("vm-a")[:200] == sent  # in order, byte-identical
    asked = d2.messages()[200]
    assert asked.type == "commande" and asked.payload["id"] == "meanwhile"
    d2.send({"type": "reponse", "source": "vm-d", "destination": "vm-a",
             "payload": {"id": "meanwhile", "commande": "liste_disques", "statut": "ok",
                         "resultat": ["xvda"]}})
    assert answers(a, 1)["meanwhile"]["resultat"] == ["xvda"]
    after = domain_stats(system, "vm-d")
    assert after is not None and "parti" not in after and after["etat"] == "connecte"
    d2.close()


@pytest.mark.slow
def test_a_departed_domain_is_forgotten_after_its_bound(tmp_path: Path) -> None:
    s = system_with_discovery(tmp_path, '[domaines.vm-e]\nspool_age = 1.0\n')
    try:
        a = s.domus["vm-a"]
        e = appear(s, "vm-e")
        leave(s, e, "vm-e")
        a.send(cmd("vm-a", "vm-e", "spooled"))
        # Kept until the bound: the spooled command is answered by the age bound.
        got = answers(a, 1)
        assert got["spooled"]["erreur"]["code"] == "delai_depasse"
        s.broker.wait_event("domain.forgotten", domain="vm-e")
        assert domain_stats(s, "vm-e") is None
        a.send(cmd("vm-a", "vm-e", "unknown"))
        got = answers(a, 2)
        assert got["unknown"]["erreur"]["code"] == "destination_inconnue"
        # Found again later: a fresh domain, with nothing of the old one's.
        e2 = appear(s, "vm-e", count=2)
        a.send({"type": "notification", "source": "vm-a", "destination": "vm-e",
                "payload": {"categorie": "sentinelle", "evenement": "sentinelle"}})
        wait_until(lambda: (e2.pump(), len(e2.messages()) >= 1)[1], what="the sentinel")
        assert [m.payload["categorie"] for m in e2.messages()] == ["sentinelle"]
        assert s.broker.find("domain.returned", domain="vm-e") == []
        e2.close()
    finally:
        s.close()
