"""What a domain or a dom0 service gets back from the broker itself, under abuse:
pipelined built-ins are all answered, registrations of names no command can carry are
refused, and a domain is never told of its own arrival."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from broker.config import Limits
from broker.endpoint import DomainEndpoint
from messagerie import DOM0, Code, Commande, Evenement, Notification, Reponse, decode, encode
from tests.support.socket_endpoints import broker_with_domains, connect_over_socketpair
from tests.support.waiting import async_wait_until
from tests.test_broker_core import FakeTransport, Setup, error_of


@pytest.mark.integration
async def test_pipelined_statistiques_are_all_answered() -> None:
    """200 ``statistiques`` at once, each answer ~20 KiB (120 domains), the asker
    reading slowly: it is held back while its own queue is full, nothing is dropped."""
    names = [f"vm-{i:03d}" for i in range(120)]
    broker = broker_with_domains(names, Limits(queue_bytes=256 * 1024))
    for name in names[1:]:
        ep = DomainEndpoint(broker, name, f"/dev/null/{name}")
        broker.domains[name] = ep
        ep.connection_made(FakeTransport())  # type: ignore[arg-type]
        ep.connected_since = time.time()
    asker, theirs = await connect_over_socketpair(broker, names[0])
    n = 200
    theirs.sendall(b"".join(encode(Commande(names[0], DOM0, "statistiques", id=f"s{i}"))
                            for i in range(n)))
    theirs.setblocking(False)
    received = bytearray()

    def read_some() -> bool:
        with contextlib.suppress(BlockingIOError):
            received.extend(theirs.recv(16 * 1024))  # a slow reader: one bite per poll
        return received.count(b"\n") >= n

    await async_wait_until(read_some, timeout=30, interval=0.002, what="200 answers")
    answers = [decode(line) for line in bytes(received).splitlines()]
    assert [a.id for a in answers if isinstance(a, Reponse) and a.statut == "ok"] == [
        f"s{i}" for i in range(n)]
    assert asker.stats.dropped == 0
    assert broker._deferred == {}  # nothing left waiting
    asker.detach()
    theirs.close()


async def test_enregistrer_refuses_names_no_command_can_carry() -> None:
    s = Setup()
    conn, t = s.service()
    for names in (["supprime_fichier "], ["ok", "a b"], ["\x1b[2J"], [""], ["-x"]):
        s.send(conn, Commande(DOM0, DOM0, "enregistrer", {"commandes": names}, id="r"))
        (answer,) = t.messages()
        assert error_of(answer) == ("r", Code.MESSAGE_INVALIDE), names
        assert "cannot name a command" in answer.erreur["message"]  # type: ignore[index]
    assert s.hub.services == {}  # none of them, not even "ok", was registered
    s.send(conn, Commande(DOM0, DOM0, "enregistrer", {"commandes": ["etat", "a.b:c/d-e"]},
                          id="r2"))
    (answer,) = t.messages()
    assert isinstance(answer, Reponse) and answer.statut == "ok"
    assert set(s.hub.services) == {"etat", "a.b:c/d-e"}


async def test_a_domain_is_not_told_of_its_own_arrival() -> None:
    s = Setup("vm-a", "vm-b")
    s.broker.domain_up(s.eps["vm-a"])
    s.broker.domain_down(s.eps["vm-b"])  # and its own departure it cannot hear anyway
    await async_wait_until(lambda: len(s.t["vm-b"].written) > 0, what="vm-b told")
    await asyncio.sleep(0)  # the same flush
    told_b = s.out("vm-b")
    told_a = s.out("vm-a")
    assert [(m.evenement, m.data) for m in told_b if isinstance(m, Notification)] == [
        (Evenement.CONNECTE, {"domaine": "vm-a"})]
    assert [(m.evenement, m.data) for m in told_a if isinstance(m, Notification)] == [
        (Evenement.DECONNECTE, {"domaine": "vm-b"})]


async def test_an_asker_held_by_its_own_full_queue_is_read_again_when_it_drains() -> None:
    """The asker's queue is full but its transport never paused (the kernel took the
    bytes): the deferred answer goes out on the broker's retry, and reading resumes."""
    s = Setup("vm-a", "vm-b")
    ep, t = s.eps["vm-a"], s.t["vm-a"]
    t.buffered = ep.queue_bytes  # full, without a pause_writing
    s.send(ep, Commande("vm-a", DOM0, "statistiques", id="s1"))
    assert s.out("vm-a") == [] and t.calls[-1] == "pause"  # held back, not dropped
    t.buffered = 0
    await async_wait_until(lambda: t.written, timeout=5, what="the deferred answer")
    (answer,) = s.out("vm-a")
    assert isinstance(answer, Reponse) and answer.id == "s1" and answer.statut == "ok"
    assert t.calls[-1] == "resume"  # read again
    assert s.broker._deferred == {}
