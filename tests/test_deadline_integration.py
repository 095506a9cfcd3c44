"""Commands that carry their deadline, through the real broker (``messagerie-broker``)
on socat ptys: a command given up by its commander frees its slots at the broker and
in the client, its handler is cancelled, and a late answer is no security event.

Before deadlines travelled, one abandoned command held one of its commander's slots at
the broker for ``limites.duree_commande`` (300 s) while the client had freed its own:
100 concurrent commands right after it gave 63 ok and 37 ``limite``, and so did a new
process of the same domain.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from messagerie import Code
from messagerie.client import Client, CommandError, CommandTimeout
from messagerie.model import DOM0, Commande, Notification, Reponse
from tests.support.broker_process import BROKER, BrokerProcess, BrokerSystem, write_config
from tests.support.peers import is_sentinel, sentinel
from tests.support.ptys import PtyPair
from tests.support.waiting import async_wait_until, wait_until

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not BROKER.exists(), reason="messagerie-broker not installed")]


class World:
    """vm-a and vm-b on socat pty pairs, the broker with its default limits: 64 commands
    in flight per domain, all 64 of them may await one destination. vm-a uses that
    whole share (``max_in_flight_per_destination=64``), so that one slot held at the
    broker and free in the client shows as ``limite``."""

    def __init__(self, directory: Path) -> None:
        self.pairs = {name: PtyPair(directory, name) for name in ("vm-a", "vm-b")}
        self.config = write_config(directory / "broker.toml",
                                   {name: p.dom0 for name, p in self.pairs.items()},
                                   dom0_socket=directory / "dom0.sock")
        self.broker = BrokerProcess(self.config)
        self.broker.wait_ready()

    def domu(self, name: str, **kwargs: object) -> Client:
        return Client(name, path=self.pairs[name].domu, backoff_max=0.5, **kwargs)  # type: ignore[arg-type]

    def close(self) -> None:
        code = self.broker.stop()
        for pair in self.pairs.values():
            pair.stop()
        assert code == 0, self.broker.tail(20)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.close()


class Server:
    """vm-b's handlers: ``echo`` answers, ``jamais`` never does and records that it was
    cancelled."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.started: list[str] = []
        self.cancelled: list[str] = []

        @client.handler("echo")
        async def echo(cmd: Commande) -> object:
            await asyncio.sleep(float(cmd.arguments.get("pause", 0)))
            return cmd.arguments["n"]

        @client.handler("jamais")
        async def jamais(cmd: Commande) -> None:
            self.started.append(cmd.id)
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.append(cmd.id)
                raise


@pytest.fixture
async def vm_b(world: World) -> AsyncIterator[Server]:
    server = Server(world.domu("vm-b"))
    async with server.client:
        yield server


async def _abandon(a: Client, server: Server, patience: float = 0.5) -> str:
    """One command to a handler that never answers, given up after ``patience``."""
    cmd = Commande("vm-a", "vm-b", "jamais")
    with pytest.raises(CommandTimeout):
        await a.request(cmd, timeout=patience)
    # What was left of the timeout when it was written: at most the timeout.
    assert cmd.delai is not None and 0 < cmd.delai <= patience
    return cmd.id


async def _hundred(a: Client) -> tuple[list[int], list[str]]:
    results = await asyncio.gather(*(
        a.commande("vm-b", "echo", {"n": n, "pause": (n % 7) / 200}, timeout=30)
        for n in range(100)), return_exceptions=True)
    answers = [r.resultat for r in results if isinstance(r, Reponse)]
    failures = [r.code if isinstance(r, CommandError) else repr(r)
                for r in results if not isinstance(r, Reponse)]
    return answers, failures


_NEW_PROCESS = """
import asyncio, json, sys
from messagerie.client import Client, CommandError

async def main():
    async with Client("vm-a", path=sys.argv[1], reconnect=False,
                      max_in_flight_per_destination=64) as a:
        results = await asyncio.gather(*(
            a.commande("vm-b", "echo", {"n": n}, timeout=30) for n in range(100)),
            return_exceptions=True)
    print(json.dumps({"ok": sum(1 for r in results if not isinstance(r, BaseException)),
                      "failures": [getattr(r, "code", repr(r)) for r in results
                                   if isinstance(r, BaseException)]}))

asyncio.run(main())
"""


@pytest.mark.slow
async def test_an_abandoned_command_holds_no_slot_and_its_handler_is_cancelled(
        world: World, vm_b: Server) -> None:
    async with world.domu("vm-a", max_in_flight_per_destination=64) as a:
        first = await _abandon(a, vm_b)
        # Right after the client's own timeout: the broker freed the slot at the
        # command's deadline and the client keeps its own until the broker says so,
        # so none of these meets `limite`.
        answers, failures = await _hundred(a)
        assert failures == []
        assert sorted(answers) == list(range(100))
        # The broker told vm-b, whose client cancelled the handler.
        await async_wait_until(lambda: vm_b.cancelled == [first],
                               what="the abandoned command's handler cancelled")
        assert vm_b.started == [first]
        assert a._destination_slots == {} and a._pending == {}  # nothing left held
        # The same again, but the commander exits at once: a new process of the same
        # domain finds every slot free.
        second = await _abandon(a, vm_b)
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", _NEW_PROCESS, str(world.pairs["vm-a"].domu)],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {"ok": 100, "failures": []}
    await async_wait_until(lambda: vm_b.cancelled == [first, second],
                           what="the second abandoned command's handler cancelled")
    abandoned = world.broker.find("commande.abandoned")
    assert [(e["id"], e["why"]) for e in abandoned] == [(first, "deadline"),
                                                        (second, "deadline")]
    assert not world.broker.find("message.refused")  # no limite, no late answer


async def test_the_broker_answers_at_the_commands_own_deadline(world: World,
                                                               vm_b: Server) -> None:
    """A command whose delai is shorter than the client's patience: the broker answers
    delai_depasse at that deadline, not after duree_commande (300 s)."""
    async with world.domu("vm-a") as a:
        cmd = Commande("vm-a", "vm-b", "jamais", delai=0.3)
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(CommandTimeout) as info:
            await a.request(cmd, timeout=20)
        assert info.value.reponse is not None and info.value.reponse.source == DOM0
        assert info.value.reponse.erreur is not None
        assert info.value.reponse.erreur["code"] == Code.DELAI_DEPASSE
        assert loop.time() - start < 10  # its own deadline, nowhere near 20 s or 300 s
        await async_wait_until(lambda: vm_b.cancelled == [cmd.id],
                               what="the handler cancelled")


def test_a_late_answer_is_dropped_as_late_and_the_abandonment_cannot_be_forged(
        tmp_path: Path) -> None:
    """Raw DomU ends: vm-b gets the command, then the broker's abandonment; its answer
    after that is dropped (an info event, not a security one) and never reaches vm-a.
    vm-b cannot send an abandonment of its own (a security event)."""
    system = BrokerSystem(tmp_path, ("vm-a", "vm-b"), wait_connected=True)
    try:
        a, b = system.domus["vm-a"], system.domus["vm-b"]
        a.send({"type": "commande", "source": "vm-a", "destination": "vm-b",
                "payload": {"id": "c1", "commande": "lent", "delai": 0.2}})
        got = b.wait_messages(2, exclude_dom0=False, timeout=10)
        commands = [m for m in got if isinstance(m, Commande)]
        notices = [m for m in got if isinstance(m, Notification) and m.categorie == "commande"]
        assert [c.id for c in commands] == ["c1"] and commands[0].delai == 0.2
        assert [(n.source, n.destination, n.evenement, n.data) for n in notices] == [
            (DOM0, "vm-b", "abandonnee", {"source": "vm-a", "id": "c1", "commande": "lent"})]
        b.send(commands[0].reply("trop tard").to_dict())
        # A forged abandonment, to vm-a, of a command vm-a serves.
        b.send({"type": "notification", "source": "vm-b", "destination": "vm-a",
                "payload": {"categorie": "commande", "evenement": "abandonnee",
                            "data": {"source": "vm-a", "id": "c1", "commande": "lent"}}})
        b.send(sentinel("vm-b", "vm-a"))
        seen = a.until_sentinel(is_sentinel)
        assert [(m.source, m.payload["erreur"]["code"]) for m in seen
                if isinstance(m, Reponse)] == [(DOM0, Code.DELAI_DEPASSE)]
        assert not [m for m in seen if isinstance(m, Notification)
                    and m.categorie == "commande"]
        wait_until(lambda: len(system.broker.find("message.refused")) == 2,
                   what="the late answer and the forgery refused")
        late, forged = system.broker.find("message.refused")
        assert (late["why"], late["security"], late["level"], late["id"]) == (
            "late_reponse", False, "info", "c1")
        assert (forged["why"], forged["security"], forged["level"]) == (
            "reserved_category", True, "warning")
    finally:
        assert system.close() == 0
