"""End to end: clients and the CLI through the real broker (``messagerie-broker``).

Two DomUs (vm-a, vm-b) on socat pty pairs, a dom0 service on the broker's local
socket; the broker is started as users start it, from its console script.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from messagerie.client import Client, CommandError, CommandTimeout
from messagerie.model import DOM0, Commande, Notification
from tests.support.broker_process import BROKER, CLI, BrokerProcess, write_config
from tests.support.ptys import PtyPair
from tests.support.waiting import async_wait_until, wait_until

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not BROKER.exists(), reason="messagerie-broker not installed")]


class World:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.socket = directory / "dom0.sock"
        self.pairs = {name: PtyPair(directory, name, start=False) for name in ("vm-a", "vm-b")}
        # The broker's default limits: the client keeps to them on its own side (64
        # commands in flight, 16 of them to one destination).
        self.config = write_config(directory / "broker.toml",
                                   {name: p.dom0 for name, p in self.pairs.items()},
                                   dom0_socket=self.socket)
        self.broker: BrokerProcess | None = None

    def start_broker(self) -> None:
        self.broker = BrokerProcess(self.config)
        # Ready means the dom0 socket listens AND every channel is open: the socket
        # alone appears earlier, and bytes a DomU writes before the broker opens its
        # pty are flushed by that open.
        self.broker.wait_ready()
        assert self.socket.exists()

    def stop_broker(self) -> None:
        if self.broker is None:
            return
        code = self.broker.stop()
        assert code == 0, self.broker.tail(20)
        self.broker = None
        wait_until(lambda: not self.socket.exists(), what="dom0 socket removed")

    def domu(self, name: str, **kwargs: object) -> Client:
        return Client(name, path=self.pairs[name].domu, backoff_max=0.5, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    for pair in w.pairs.values():
        pair.start()
    w.start_broker()
    yield w
    w.stop_broker()
    for pair in w.pairs.values():
        pair.stop()


@pytest.fixture
async def vm_b(world: World) -> AsyncIterator[Client]:
    c = world.domu("vm-b")

    @c.handler("echo")
    async def echo(cmd: Commande) -> object:
        await asyncio.sleep(float(cmd.arguments.get("delai", 0)))
        return {"echo": cmd.arguments, "de": cmd.source}

    @c.handler("casse")
    async def casse(cmd: Commande) -> None:
        raise ValueError("disque illisible")

    async with c:
        yield c


async def test_domu_commands_another(world: World, vm_b: Client) -> None:
    async with world.domu("vm-a") as a:
        rep = await a.commande("vm-b", "echo", {"x": 1}, timeout=5)
    assert rep.source == "vm-b" and rep.resultat == {"echo": {"x": 1}, "de": "vm-a"}


async def test_hundred_concurrent_commands(world: World, vm_b: Client) -> None:
    async with world.domu("vm-a") as a:
        reps = await asyncio.gather(*(
            a.commande("vm-b", "echo", {"n": n, "delai": (n % 7) / 100}, timeout=20)
            for n in range(100)))
    assert [r.resultat["echo"]["n"] for r in reps] == list(range(100))


async def test_a_stalled_destination_holds_only_its_share(world: World) -> None:
    """Twenty commands to a destination that does not answer yet: sixteen go on the
    wire (the broker's per-destination share), four wait in the client, none is
    refused `limite`, and a command to another destination is answered meanwhile."""
    release = asyncio.Event()
    started: list[int] = []
    b = world.domu("vm-b")

    @b.handler("attends")
    async def attends(cmd: Commande) -> object:
        started.append(cmd.arguments["n"])
        await release.wait()
        return cmd.arguments["n"]

    async with b, world.domu("vm-a") as a:
        calls = [asyncio.create_task(a.commande("vm-b", "attends", {"n": n}, timeout=30))
                 for n in range(20)]
        await async_wait_until(lambda: len(started) == 16, what="16 commands at vm-b")
        assert a._destination_slots["vm-b"][0].locked()
        rep = await a.commande(DOM0, "ping", timeout=10)
        assert rep.ok and len(started) == 16
        release.set()
        reps = await asyncio.gather(*calls)
    assert sorted(r.resultat for r in reps) == list(range(20))
    assert a._destination_slots == {}  # nothing left once every command is answered


async def test_raising_handler_gives_error(world: World, vm_b: Client) -> None:
    async with world.domu("vm-a") as a:
        with pytest.raises(CommandError) as info:
            await a.commande("vm-b", "casse", timeout=5)
        assert info.value.code == "erreur_interne"
        assert "disque illisible" in info.value.message
        with pytest.raises(CommandError) as info:
            await a.commande("vm-b", "inconnue", timeout=5)
        assert info.value.code == "commande_inconnue"


async def test_timeout(world: World, vm_b: Client) -> None:
    async with world.domu("vm-a") as a:
        with pytest.raises(CommandTimeout):
            await a.commande("vm-b", "echo", {"delai": 2}, timeout=0.3)


async def test_broker_refusals(world: World) -> None:
    async with world.domu("vm-a") as a:
        with pytest.raises(CommandError) as info:
            await a.commande("vm-nulle-part", "x", timeout=5)
        assert info.value.code == "destination_inconnue"


async def test_notifications_and_dom0_services(world: World, vm_b: Client) -> None:
    service = Client.dom0(path=world.socket, backoff_max=0.5)

    @service.handler("stocker")
    async def stocker(cmd: Commande) -> str:
        return f"stocké {cmd.arguments['fichier']}"

    async with service, world.domu("vm-a") as a:
        seen_by_b = vm_b.messages(type="notification", categorie="fichier")
        seen_by_dom0 = service.messages(type="notification", categorie="fichier")
        await a.notify("tous", "fichier", "etat", {"fichier": "f", "etat": "disponible"})
        for stream in (seen_by_b, seen_by_dom0):
            msg = await stream.get(5)
            assert isinstance(msg, Notification) and msg.source == "vm-a"
        rep = await a.commande("dom0", "stocker", {"fichier": "f"}, timeout=5)
        assert rep.resultat == "stocké f"
        pong = await service.commande("dom0", "ping", timeout=5)
        assert pong.resultat["pong"] is True
        rep = await service.commande("vm-b", "echo", {"y": 2}, timeout=5)
        assert rep.resultat["de"] == "dom0"


async def test_clients_survive_broker_restart(world: World, vm_b: Client) -> None:
    service = Client.dom0(path=world.socket, backoff_min=0.05, backoff_max=0.2)

    @service.handler("stocker")
    async def stocker(cmd: Commande) -> str:
        return "ok"

    async with service, world.domu("vm-a") as a:
        assert (await a.commande("dom0", "stocker", timeout=5)).resultat == "ok"
        world.stop_broker()
        await async_wait_until(lambda: not service.connected, what="dom0 client sees the reset")
        world.start_broker()
        await async_wait_until(lambda: service.connections == 2, timeout=10,
                               what="dom0 client reconnected")

        async def works() -> bool:
            try:
                await a.commande("dom0", "stocker", timeout=1)
                await a.commande("vm-b", "echo", timeout=1)
            except (CommandError, CommandTimeout):
                return False  # the dom0 service may not have registered again yet
            return True

        for _ in range(50):
            if await works():
                break
        else:
            raise AssertionError("commands do not get through after the broker restarted")


async def _cli(*args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESSAGERIE_")}
    proc = await asyncio.create_subprocess_exec(
        str(CLI), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=env)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.slow
async def test_cli_round_trip(world: World, vm_b: Client) -> None:
    a_path = str(world.pairs["vm-a"].domu)
    code, out, err = await _cli("--path", a_path, "--as", "vm-a", "command", "vm-b", "echo",
                                "--set", "z=3")
    assert code == 0, err
    assert json.loads(out) == {"echo": {"z": 3}, "de": "vm-a"}
    code, out, err = await _cli("--path", a_path, "--as", "vm-a", "command", "vm-b", "casse")
    assert code == 1 and err.startswith("error: erreur_interne: ")
    code, _, err = await _cli("--path", a_path, "--as", "vm-a", "command", "vm-b", "echo",
                              "--set", "delai=3", "--timeout", "0.3")
    assert code == 3, err

    listening = vm_b.messages(categorie="cli")
    code, _, err = await _cli("--path", a_path, "--as", "vm-a", "notify", "tous", "cli", "essai")
    assert code == 0, err
    msg = await listening.get(5)
    assert isinstance(msg, Notification) and msg.source == "vm-a"

    sock = str(world.socket)
    code, out, err = await _cli("--path", sock, "ping")
    assert code == 0 and out.startswith("pong from dom0"), err
    code, out, err = await _cli("--path", sock, "status")
    assert code == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:] if line.strip()}
    assert rows["vm-a"][1] == "connecte" and rows["vm-b"][1] == "connecte"
    code, out, err = await _cli("--path", sock, "command", "vm-b", "echo")
    assert code == 0 and json.loads(out)["de"] == "dom0", err
