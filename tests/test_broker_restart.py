"""The broker restarted (SIGTERM) or crashed (SIGKILL) and started again as users start
it, on the same channels and state directory: what was in flight is not lost.

Domains on socat ptys; the state directory is what systemd's ``StateDirectory=`` gives
(``$STATE_DIRECTORY``), a real SQLite file read by the tests as an operator would.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from messagerie import Commande, Reponse
from messagerie.client import Client
from tests.support.broker_process import BROKER, BrokerProcess, BrokerSystem
from tests.support.peers import Domu, is_sentinel, sentinel
from tests.support.ptys import PtyPair
from tests.support.spool_system import RECONNECT
from tests.support.waiting import async_wait_until, wait_until

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not BROKER.exists(), reason="messagerie-broker not installed")]


def commande(src: str, dst: str, id: str, name: str) -> dict[str, Any]:
    return {"type": "commande", "source": src, "destination": dst,
            "payload": {"id": id, "commande": name, "arguments": {"n": 1}}}


def in_flight(state: Path) -> list[tuple[Any, ...]]:
    """The commands the state directory's database holds (as ``sqlite3`` shows them)."""
    db = state / "spool.sqlite3"
    if not db.exists():
        return []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        try:
            return conn.execute("SELECT commander, id, replier, command, deadline "
                                "FROM commandes_en_vol").fetchall()
        except sqlite3.OperationalError:  # not created yet
            return []


def security_events(system: BrokerSystem) -> list[dict[str, Any]]:
    brokers = [*system.previous, system.broker]
    return [e for b in brokers for e in b.events if e.get("security") is True]


def started(tmp_path: Path, ttl: float) -> BrokerSystem:
    return BrokerSystem(tmp_path, ("vm-a", "vm-b"), wait_connected=True,
                        extra=f"[limites]\nduree_commande = {ttl}\n",
                        env={"STATE_DIRECTORY": str(tmp_path / "state")})


@pytest.fixture
def system(tmp_path: Path) -> Iterator[BrokerSystem]:
    s = started(tmp_path, 30)
    yield s
    s.close()


@pytest.fixture
def short(tmp_path: Path) -> Iterator[BrokerSystem]:
    """Commands time out after 1 s."""
    s = started(tmp_path, 1)
    yield s
    s.close()


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_a_late_answer_after_a_restart_reaches_its_commander(system: BrokerSystem,
                                                            tmp_path: Path, how: int) -> None:
    """A command forwarded, the broker killed (or stopped), started again; the handler
    answers after that: the commander gets the real answer, byte for byte, and no
    security event is logged (before: ``unsolicited_reponse security=true``, dropped)."""
    a, b = system.domus["vm-a"], system.domus["vm-b"]
    a.send(commande("vm-a", "vm-b", "lent-1", "lent"))
    (cmd,) = b.wait_messages(1)
    assert cmd.id == "lent-1"
    # Group commit: the command is in the file within a commit interval (SIGTERM would
    # write it at shutdown anyway; SIGKILL needs it written before).
    wait_until(lambda: in_flight(tmp_path / "state"), what="the command in the database")
    code = system.restart(how)
    assert code == (0 if how == signal.SIGTERM else -signal.SIGKILL)
    system.broker.wait_event("inflight.restored", commands=1)
    reply = {"type": "reponse", "source": "vm-b", "destination": "vm-a",
             "payload": {"id": "lent-1", "commande": "lent", "statut": "ok",
                         "resultat": {"apres": "redemarrage"}}}
    b.send(reply)
    b.send(sentinel("vm-b", "vm-a"))
    got = a.until_sentinel(is_sentinel)
    answers = [m for m in got if isinstance(m, Reponse)]
    assert len(answers) == 1, got
    assert answers[0].id == "lent-1" and answers[0].statut == "ok"
    assert answers[0].resultat == {"apres": "redemarrage"}
    assert not security_events(system)
    system.broker.wait_event("reponse.after_restart", id="lent-1")
    # Answered: the table is empty again, in memory and in the file.
    wait_until(lambda: not in_flight(tmp_path / "state"), what="the table emptied")
    # A second answer is a real unsolicited one again (answered once, at most).
    b.send(reply)
    b.send(sentinel("vm-b", "vm-a"))
    a.inbox.clear()
    assert not [m for m in a.until_sentinel(is_sentinel) if isinstance(m, Reponse)]
    system.broker.wait_event("message.refused", why="unsolicited_reponse")


@pytest.mark.slow
def test_a_deadline_passed_while_the_broker_was_down_is_answered(short: BrokerSystem,
                                                                 tmp_path: Path) -> None:
    """The broker killed with a command in flight; its deadline passes before the
    broker is back: the commander is answered ``delai_depasse`` once reconnected."""
    system = short
    a, b = system.domus["vm-a"], system.domus["vm-b"]
    a.send(commande("vm-a", "vm-b", "oublie-1", "oublie"))
    b.wait_messages(1)
    rows = wait_until(lambda: in_flight(tmp_path / "state"), what="the command in the database")
    deadline = rows[0][4]
    assert abs(deadline - (time.time() + 1)) < 1.0  # wall clock, one duree_commande ahead
    system.broker.signal(signal.SIGKILL)
    system.broker.proc.wait(10)
    # Down past the deadline: nobody could have answered it meanwhile.
    wait_until(lambda: time.time() > deadline + 0.1, what="the deadline passed")
    system.previous.append(system.broker)
    system.broker = type(system.broker)(system.config, env=system.env)
    system.broker.wait_ready()
    a.inbox.clear()
    (rep,) = [m for m in a.wait_messages(1) if isinstance(m, Reponse)]
    assert rep.id == "oublie-1" and rep.statut == "erreur" and rep.source == "dom0"
    assert rep.erreur is not None and rep.erreur["code"] == "delai_depasse"
    # The domain serving it is told, as for a live command (its client cancels the
    # handler); its answer, if it comes anyway, is late, not a forgery.
    b.inbox.clear()
    wait_until(lambda: (b.pump(), [m for m in b.messages(exclude_dom0=False)
                                   if m.payload.get("evenement") == "abandonnee"])[1],
               what="the abandonment notice at vm-b")
    (notice,) = [m for m in b.messages(exclude_dom0=False)
                 if m.payload.get("evenement") == "abandonnee"]
    assert notice.type == "notification" and notice.payload["evenement"] == "abandonnee"
    assert notice.payload["data"]["id"] == "oublie-1"
    b.send({"type": "reponse", "source": "vm-b", "destination": "vm-a",
            "payload": {"id": "oublie-1", "commande": "oublie", "statut": "ok",
                        "resultat": None}})
    b.send(sentinel("vm-b", "vm-a"))
    a.inbox.clear()
    assert not [m for m in a.until_sentinel(is_sentinel) if isinstance(m, Reponse)]
    # Late, as a live command's answer: the router's refusal, not a security event.
    system.broker.wait_event("message.refused", why="late_reponse", id="oublie-1",
                             security=False)
    assert not security_events(system)
    wait_until(lambda: not in_flight(tmp_path / "state"), what="the table emptied")


async def test_a_dom0_service_answers_through_its_new_connection(system: BrokerSystem,
                                                                tmp_path: Path) -> None:
    """A command served by a dom0 service, the broker killed: the service reconnects
    (a new connection, registered again) and its handler's answer, sent after that,
    reaches the domain that asked: the service is known by the command it serves."""
    release = asyncio.Event()
    started = asyncio.Event()
    service = Client.dom0(path=system.dom0_socket, backoff_min=0.05, backoff_max=0.2)

    @service.handler("stocker")
    async def stocker(cmd: Commande) -> str:
        started.set()
        await release.wait()
        return f"stocké {cmd.arguments['n']}"

    a = system.domus["vm-a"]
    async with service:
        a.send(commande("vm-a", "dom0", "svc-1", "stocker"))
        await asyncio.wait_for(started.wait(), 10)
        await async_wait_until(lambda: in_flight(tmp_path / "state"),
                               what="the command in the database")
        await asyncio.to_thread(system.restart, signal.SIGKILL)
        await async_wait_until(lambda: service.connections == 2, what="service reconnected")
        release.set()
        answers = await asyncio.to_thread(a.wait_messages, 1)
    (rep,) = [m for m in answers if isinstance(m, Reponse)]
    assert rep.id == "svc-1" and rep.source == "dom0" and rep.resultat == "stocké 1"
    system.broker.wait_event("reponse.after_restart", id="svc-1")
    assert not security_events(system)


def spooled_numbers(state: Path, destination: str) -> list[int]:
    """The ``n`` of every notification the state file's spool holds for ``destination``,
    in spool order: what the broker accepted into the spool (committed)."""
    db = state / "spool.sqlite3"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        try:
            frames = conn.execute("SELECT frame FROM spool WHERE destination = ? AND "
                                  "kind = 'notification' ORDER BY seq",
                                  (destination,)).fetchall()
        except sqlite3.OperationalError:
            return []
    return [json.loads(f)["payload"]["data"]["n"] for (f,) in frames]


def numbered(n: int) -> dict[str, Any]:
    return {"type": "notification", "source": "vm-a", "destination": "vm-c",
            "payload": {"categorie": "flux", "evenement": "n", "data": {"n": n}}}


@pytest.mark.slow
def test_sigkill_mid_flow_loses_nothing_accepted(tmp_path: Path) -> None:
    """The broker killed while a flow of notifications to an offline domain is being
    spooled and a command waits on a domain whose handler answers after the restart;
    the broker started again, the offline domain back: every notification the spool
    had accepted (committed, read from the file after the kill) arrives, in order;
    the command gets its real answer; no security event. The messages sent while the
    broker was down were never accepted: they are counted apart."""
    vm_c = PtyPair(tmp_path, "vm-c", start=False)
    system = BrokerSystem(tmp_path, ("vm-a", "vm-b"), wait_connected=True,
                          paths={"vm-c": vm_c.dom0},
                          extra=RECONNECT,
                          env={"STATE_DIRECTORY": str(tmp_path / "state")})
    state = tmp_path / "state"
    try:
        a, b = system.domus["vm-a"], system.domus["vm-b"]
        a.send(commande("vm-a", "vm-b", "pendant-1", "lent"))
        b.wait_messages(1)
        a.send(commande("vm-a", "vm-c", "au-retour", "inventaire"))  # spooled for vm-c
        stop = threading.Event()
        sent: list[int] = []

        def flow() -> None:
            n = 0
            while not stop.is_set() and n < 5000:
                a.send(numbered(n))
                sent.append(n)
                n += 1
                if n % 50 == 0:
                    time.sleep(0.005)  # a steady flow, not one burst

        sender = threading.Thread(target=flow)
        sender.start()
        try:
            wait_until(lambda: len(spooled_numbers(state, "vm-c")) >= 300,
                       what="300 notifications in the spool")
            wait_until(lambda: len(in_flight(state)) == 2, what="the commands in the database")
            system.broker.signal(signal.SIGKILL)  # mid-flow: the sender is still going
            system.broker.proc.wait(10)
        finally:
            stop.set()
            sender.join(10)
        accepted = spooled_numbers(state, "vm-c")
        assert len(accepted) >= 300 and accepted == sorted(accepted)
        system.previous.append(system.broker)
        system.broker = BrokerProcess(system.config, env=system.env)
        system.broker.wait_ready()
        # After the restart: more of the flow, still spooled behind what is there.
        later = list(range(10_000, 10_100))
        for n in later:
            a.send(numbered(n))
        b.send({"type": "reponse", "source": "vm-b", "destination": "vm-a",
                "payload": {"id": "pendant-1", "commande": "lent", "statut": "ok",
                            "resultat": "fini"}})
        (rep,) = [m for m in a.wait_messages(1) if isinstance(m, Reponse)]
        assert rep.id == "pendant-1" and rep.resultat == "fini"
        wait_until(lambda: spooled_numbers(state, "vm-c")[-1:] == [later[-1]],
                   what="the later flow spooled")
        # The domain comes back: the spool is replayed, then live traffic.
        vm_c.start()
        c = Domu(vm_c.domu)
        try:
            a.send(sentinel("vm-a", "vm-c"))
            arrived = c.until_sentinel(is_sentinel, timeout=60)
            # The command spooled before the crash is replayed first, and its answer
            # reaches its commander.
            assert isinstance(arrived[0], Commande) and arrived[0].id == "au-retour"
            c.send({"type": "reponse", "source": "vm-c", "destination": "vm-a",
                    "payload": {"id": "au-retour", "commande": "inventaire",
                                "statut": "ok", "resultat": ["disque"]}})
            a.inbox.clear()
            (late,) = [m for m in a.wait_messages(1) if isinstance(m, Reponse)]
            assert late.id == "au-retour" and late.resultat == ["disque"]
            got = [m.payload["data"]["n"] for m in arrived[1:] if not is_sentinel(m)]
        finally:
            c.close()
        lost = sorted(set(accepted) - set(got))
        duplicates = len(got) - len(set(got))
        never_accepted = sorted(set(sent) - set(accepted) - set(got))
        print(f"sigkill mid-flow: sent {len(sent) + len(later)}, accepted before the kill "
              f"{len(accepted)}, delivered {len(got)}, lost {len(lost)}, duplicates "
              f"{duplicates}, sent while down and never accepted {len(never_accepted)}")
        assert lost == [], f"{len(lost)} accepted notifications lost: {lost[:10]}"
        assert [n for n in got if n in set(accepted)] == accepted  # in order, no repeat
        assert got[-len(later):] == later
        assert not security_events(system)
    finally:
        system.close()
        vm_c.kill()


def test_sigterm_spools_what_a_domain_that_does_not_read_left(tmp_path: Path) -> None:
    """SIGTERM with notifications queued for a domain that does not read: the broker
    drains what it can, spools the rest instead of aborting it, and exits 0; started
    again, it delivers it when the domain reads: all of them, in order, once."""
    system = BrokerSystem(tmp_path, ("vm-a", "vm-c"), wait_connected=True,
                          extra="[limites]\ndelai_blocage = 0.2\n",
                          env={"STATE_DIRECTORY": str(tmp_path / "state")})
    try:
        a, c = system.domus["vm-a"], system.domus["vm-c"]  # vm-c reads nothing yet
        total = 2000
        for n in range(total):
            a.send(numbered(n) | {"destination": "vm-c"})
        # A ping after them: answered once the broker routed every one before it.
        a.send({"type": "commande", "source": "vm-a", "destination": "dom0",
                "payload": {"id": "apres", "commande": "ping", "arguments": {}}})
        wait_until(lambda: [m for m in a.wait_messages(0) if m.id == "apres"],
                   what="the ping after the flow answered")
        assert system.restart(signal.SIGTERM) == 0
        (stopped,) = system.previous[-1].find("broker.stopped")
        assert stopped["undelivered_bytes"] > 0  # the drain did not get it all out
        # vm-c reads now (the sentinel is queued behind the spool's replay).
        a.send(sentinel("vm-a", "vm-c"))
        got = [m.payload["data"]["n"] for m in c.until_sentinel(is_sentinel, timeout=60)
               if not is_sentinel(m)]
        assert got == list(range(total)), (len(got), got[:3], got[-3:])
        assert not security_events(system)
    finally:
        system.close()


def test_the_table_is_kept_with_the_spool_disabled(tmp_path: Path) -> None:
    """``spool.actif = false``: nothing is spooled, but the commands in flight are still
    kept in the state directory's file, and a late answer after a crash is routed."""
    system = BrokerSystem(tmp_path, ("vm-a", "vm-b"), wait_connected=True,
                          extra="[spool]\nactif = false\n",
                          env={"STATE_DIRECTORY": str(tmp_path / "state")})
    try:
        a, b = system.domus["vm-a"], system.domus["vm-b"]
        a.send(commande("vm-a", "vm-b", "sans-spool", "lent"))
        b.wait_messages(1)
        wait_until(lambda: in_flight(tmp_path / "state"), what="the command in the database")
        system.restart(signal.SIGKILL)
        b.send({"type": "reponse", "source": "vm-b", "destination": "vm-a",
                "payload": {"id": "sans-spool", "commande": "lent", "statut": "ok",
                            "resultat": 1}})
        (rep,) = [m for m in a.wait_messages(1) if isinstance(m, Reponse)]
        assert rep.id == "sans-spool" and rep.resultat == 1
        assert not security_events(system)
    finally:
        system.close()


def test_sigterm_spools_a_reponse_queued_for_a_commander_that_does_not_read(
        tmp_path: Path) -> None:
    """SIGTERM with a reponse and a broadcast copy queued for a commander that does not
    read (behind a flow of notifications): they are spooled with them and, after the
    restart, the commander gets every notification, the broadcast and its answer, once."""
    system = BrokerSystem(tmp_path, ("vm-a", "vm-b", "vm-c"), wait_connected=True,
                          extra="[limites]\ndelai_blocage = 0.2\n",
                          env={"STATE_DIRECTORY": str(tmp_path / "state")})
    try:
        a, b, c = system.domus["vm-a"], system.domus["vm-b"], system.domus["vm-c"]
        a.send(commande("vm-a", "vm-b", "c1", "lire"))
        wait_until(lambda: [m for m in b.wait_messages(0) if m.id == "c1"],
                   what="vm-b got the command")
        total = 2000  # vm-a reads nothing from here on
        for n in range(total):
            c.send(numbered(n) | {"source": "vm-c", "destination": "vm-a"})
        c.send({"type": "notification", "source": "vm-c", "destination": "tous",
                "payload": {"categorie": "flux", "evenement": "tous", "data": {}}})
        b.send({"type": "reponse", "source": "vm-b", "destination": "vm-a",
                "payload": {"id": "c1", "commande": "lire", "statut": "ok",
                            "resultat": 42}})
        # Pings after them: answered once the broker routed everything before them.
        for peer, name in ((c, "vm-c"), (b, "vm-b")):
            peer.send({"type": "commande", "source": name, "destination": "dom0",
                       "payload": {"id": "apres", "commande": "ping", "arguments": {}}})
            wait_until(lambda p=peer: [m for m in p.wait_messages(0) if m.id == "apres"],
                       what=f"{name}'s ping answered")
        assert system.restart(signal.SIGTERM) == 0
        (stopped,) = system.previous[-1].find("broker.stopped")
        assert stopped["undelivered_bytes"] > 0  # the drain did not get it all out
        c.send(sentinel("vm-c", "vm-a"))
        got = a.until_sentinel(is_sentinel, timeout=60)
        numbers = [m.payload["data"]["n"] for m in got if m.type == "notification"
                   and not is_sentinel(m) and m.destination == "vm-a"]
        broadcasts = [m for m in got if m.type == "notification" and m.destination == "tous"]
        assert len(broadcasts) == 1  # its copy for vm-a, spooled with the rest
        reponses = [m for m in got if isinstance(m, Reponse)]
        assert numbers == list(range(total)), (len(numbers), numbers[:3], numbers[-3:])
        assert [(r.id, r.resultat) for r in reponses] == [("c1", 42)]
        assert not security_events(system)
    finally:
        system.close()
