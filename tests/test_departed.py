"""Departed discovered domains, in process: Broker + endpoints over fake transports,
a real SQLite spool in a temporary directory."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker import hub
from broker.config import Config, DomainConfig, Limits
from broker.endpoint import DomainEndpoint
from broker.hub import Broker
from broker.policy import parse_policy
from broker.router import PolicyLike
from messagerie import Code, Commande, Notification, Reponse, decode, encode
from messagerie.cli import format_status
from tests.support.waiting import async_wait_until
from tests.test_broker_core import FakeTransport


class Setup:
    """vm-a declared and connected; discovered domains added with :meth:`discover`."""

    def __init__(self, tmp: Path, policy: PolicyLike | None = None) -> None:
        cfg = Config(domains={"vm-a": DomainConfig("vm-a", "/dev/null/vm-a")},
                     dom0_socket=None, limits=Limits(), spool_path=str(tmp / "spool.db"))
        self.broker = Broker(cfg, policy)
        self.broker.open_spool()
        self.t: dict[DomainEndpoint, FakeTransport] = {}
        self.a = self.plug(DomainEndpoint(self.broker, "vm-a", "/dev/null/vm-a"))

    def plug(self, ep: DomainEndpoint) -> DomainEndpoint:
        """Connect ``ep`` over a fake transport, as its supervisor does."""
        ep.detach()  # no supervisor trying the path: this test connects it
        ep._stopping = False
        self.broker.domains[ep.name] = ep
        transport = FakeTransport()
        ep.connection_made(transport)  # type: ignore[arg-type]
        ep.connected_since = time.time()
        self.t[ep] = transport
        self.broker.domain_up(ep)
        return ep

    def discover(self, name: str, path: str) -> DomainEndpoint:
        return self.plug(self.broker.add_domain(name, path, discovered=True))

    def out(self, ep: DomainEndpoint) -> list[object]:
        ep.flush()
        return [decode(line + b"\n") for line in bytes(self.t[ep].written).splitlines()
                if b'"source":"dom0","destination":"tous"' not in line]


@pytest.fixture
async def s(tmp_path: Path) -> AsyncIterator[Setup]:
    setup = Setup(tmp_path)
    yield setup
    setup.broker.close_spool()


def cmd(dst: str, id: str) -> Commande:
    return Commande("vm-a", dst, "liste_disques", {}, id=id)


def errors(s: Setup) -> dict[str, str]:
    return {m.id: m.erreur["code"] for m in s.out(s.a)
            if isinstance(m, Reponse) and m.erreur is not None}


async def test_a_departed_domain_is_spooled_for_and_its_next_incarnation_replayed(
        s: Setup) -> None:
    old = s.discover("vm-d", "/run/vm-d-msg.sock")
    s.broker.depart_domain("vm-d", "test")
    assert s.broker.is_known("vm-d") and not s.broker.is_connected("vm-d")
    s.a.data_received(b"".join(encode(Notification("vm-a", "vm-d", "test", "seq", {"i": i}))
                               for i in range(5)) + encode(cmd("vm-d", "c1")))
    await async_wait_until(lambda: s.broker.lane_statistics("vm-d")["messages"] == 6)
    assert errors(s) == {}
    (listed,) = [d for d in s.broker.domain_list() if d["nom"] == "vm-d"]
    assert listed["parti"] is True and listed["etat"] == "deconnecte"
    assert s.broker.statistics()["domaines"]["vm-d"]["parti"] is True
    # The domain of that name found next (another path) takes its place and spool.
    new = s.discover("vm-d", "/run/elsewhere/vm-d-msg.sock")
    pending = s.broker.pending.get("vm-a", "c1")
    assert pending is not None and pending.target is new and pending.target is not old
    assert s.broker.pending.in_flight_to(s.a, new) == 1
    assert s.broker.pending.in_flight_to(s.a, old) == 0
    await async_wait_until(lambda: len(s.out(new)) == 6)
    got = s.out(new)
    assert [m.data["i"] for m in got[:5]] == list(range(5))  # type: ignore[attr-defined]
    assert isinstance(got[5], Commande) and got[5].id == "c1"
    assert "parti" not in s.broker.statistics()["domaines"]["vm-d"]
    # Its answer reaches the commander as for any command.
    new.data_received(encode(Reponse("vm-d", "vm-a", "c1", "liste_disques",
                                     resultat=["xvda"])))
    s.a.flush()
    assert [m.resultat for m in s.out(s.a) if isinstance(m, Reponse)] == [["xvda"]]


async def test_past_its_bound_a_departed_domain_is_forgotten(s: Setup) -> None:
    s.discover("vm-d", "/run/vm-d-msg.sock")
    s.broker.depart_domain("vm-d", "test")
    s.a.data_received(encode(cmd("vm-d", "c1")))
    await async_wait_until(lambda: s.broker.lane_statistics("vm-d")["messages"] == 1)
    s.broker.sweep_departed()
    assert s.broker.is_known("vm-d")  # its bound (an hour) has not passed
    s.broker.departed["vm-d"] = time.monotonic() - 1  # now it has
    s.broker.sweep_departed()
    assert not s.broker.is_known("vm-d") and "vm-d" not in s.broker.spool.lanes
    assert errors(s) == {"c1": Code.DELAI_DEPASSE}  # as the spool's age bound answers
    s.a.data_received(encode(cmd("vm-d", "c2")))
    assert errors(s) == {"c1": Code.DELAI_DEPASSE, "c2": Code.DESTINATION_INCONNUE}


async def test_a_flurry_of_departures_remembers_at_most_the_cap(
        s: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub, "DEPARTED_MAX", 3)
    for i in range(10):
        s.discover(f"vm-{i}", f"/run/vm-{i}-msg.sock")
        s.broker.depart_domain(f"vm-{i}", "test")
        s.a.data_received(encode(cmd(f"vm-{i}", f"c{i}")))
        await async_wait_until(
            lambda i=i: s.broker.lane_statistics(f"vm-{i}")["messages"] == 1)  # type: ignore[misc]
    assert list(s.broker.departed) == ["vm-7", "vm-8", "vm-9"]
    assert sorted(n for n in s.broker.domains if n != "vm-a") == ["vm-7", "vm-8", "vm-9"]
    assert len(s.broker.spool.lanes) == 3
    # Departed endpoints queue nothing: the live one keeps the whole queues' budget.
    assert s.broker.memory.share == s.broker.memory.limit
    # The first seven were forgotten, their spooled commands answered.
    assert errors(s) == {f"c{i}": Code.DESTINATION_HORS_LIGNE for i in range(7)}


async def test_without_a_spool_or_declared_a_domain_is_removed_at_once(s: Setup) -> None:
    s.discover("vm-d", "/run/vm-d-msg.sock")
    s.broker.depart_domain("vm-a", "test")  # declared: never departs by discovery
    assert not s.broker.is_known("vm-a")
    s.broker.spool.disable()
    s.broker.depart_domain("vm-d", "test")
    assert not s.broker.is_known("vm-d") and not s.broker.departed


async def test_status_shows_a_departed_domain_and_its_spool(s: Setup) -> None:
    s.discover("vm-d", "/run/vm-d-msg.sock")
    s.broker.depart_domain("vm-d", "test")
    s.a.data_received(encode(cmd("vm-d", "c1")))
    await async_wait_until(lambda: s.broker.lane_statistics("vm-d")["messages"] == 1)
    table = format_status(s.broker.domain_list(), s.broker.statistics())
    (row,) = [line.split() for line in table.splitlines() if line.startswith("vm-d ")]
    assert row[1] == "parti" and row[8] == "1"  # STATE, SPOOLED


async def test_the_policy_decides_before_a_departed_domains_spool(tmp_path: Path) -> None:
    policy = parse_policy('[[regle]]\nsource = "vm-a"\ndestination = "vm-d"\n'
                          'type = "notification"\naction = "allow"\n', origin="p.toml")
    s = Setup(tmp_path, policy)
    try:
        s.discover("vm-d", "/run/vm-d-msg.sock")
        s.broker.depart_domain("vm-d", "test")
        s.a.data_received(encode(cmd("vm-d", "denied"))
                          + encode(Notification("vm-a", "vm-d", "test", "allowed")))
        assert errors(s) == {"denied": Code.REFUSE}
        await async_wait_until(lambda: s.broker.lane_statistics("vm-d")["messages"] == 1)
    finally:
        s.broker.close_spool()
