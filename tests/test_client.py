"""The asyncio client and its blocking facade, over real socat ptys and unix sockets.

The test plays the broker: it holds the other end of the channel and reads and writes
frames there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import random
import socket
import termios
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

import messagerie
from messagerie import client as client_module
from messagerie import identity
from messagerie.client import (
    BlockingClient,
    Client,
    ClientState,
    CommandError,
    CommandTimeout,
    Disconnected,
    MessagerieError,
    NameUnknown,
    resolve_domain_name,
)
from messagerie.codec import encode
from messagerie.model import Commande, Journal, Message, Notification, Reponse, Statut
from messagerie.vocabulary import Code
from tests.support.peers import PtyPeer, SocketPeer, SocketServer
from tests.support.ptys import PtyPair
from tests.support.waiting import async_wait_until


def new_client(pair: PtyPair, name: str = "vm-a", **kwargs: Any) -> Client:
    kwargs.setdefault("backoff_max", 0.3)
    return Client(name, path=pair.domu, **kwargs)


async def test_notify_bytes_on_the_wire(pair: PtyPair, peer: PtyPeer) -> None:
    async with new_client(pair) as c:
        await c.notify("tous", "domaine", "etat", {"pret": True})
        msg = await peer.recv()
    expected = encode(Notification("vm-a", "tous", "domaine", "etat", {"pret": True}))
    assert bytes(peer.raw) == expected
    assert msg == Notification("vm-a", "tous", "domaine", "etat", {"pret": True})


async def test_send_any_message(pair: PtyPair, peer: PtyPeer) -> None:
    journal = Journal("vm-a", "dom0", "info", "bonjour", "test")
    async with new_client(pair) as c:
        await c.send(journal)
        assert await peer.recv() == journal


async def test_command_reply_matched(pair: PtyPair, peer: PtyPeer) -> None:
    async with new_client(pair) as c:
        task = asyncio.create_task(c.commande("vm-b", "liste_disques", {"x": 1}, timeout=5))
        cmd = await peer.recv()
        assert isinstance(cmd, Commande)
        assert (cmd.source, cmd.destination, cmd.commande, cmd.arguments) == (
            "vm-a", "vm-b", "liste_disques", {"x": 1})
        peer.send(cmd.reply(["sda", "sdb"]))
        rep = await task
    assert rep.ok and rep.resultat == ["sda", "sdb"] and rep.id == cmd.id


async def test_hundred_concurrent_commands_answered_out_of_order(
        pair: PtyPair, peer: PtyPeer) -> None:
    async with new_client(pair, max_in_flight=100,
                          max_in_flight_per_destination=100) as c:
        tasks = [asyncio.create_task(c.commande("vm-b", "echo", {"n": n}, timeout=10))
                 for n in range(100)]
        cmds = [await peer.recv() for _ in range(100)]
        random.Random(4).shuffle(cmds)
        for cmd in cmds:
            assert isinstance(cmd, Commande)
            peer.send(cmd.reply({"n": cmd.arguments["n"]}))
        reps = await asyncio.gather(*tasks)
    assert [r.resultat["n"] for r in reps] == list(range(100))
    assert not c._pending


async def test_commands_in_flight_are_bounded(pair: PtyPair, peer: PtyPeer) -> None:
    async with new_client(pair, max_in_flight=2) as c:
        tasks = [asyncio.create_task(c.commande("vm-b", "echo", {"n": n}, timeout=10))
                 for n in range(3)]
        first = [await peer.recv() for _ in range(2)]
        # The third waits for a free slot: a notification sent after it (same channel)
        # arrives first.
        sentinel = Notification("vm-a", "vm-b", "sentinelle", "apres")
        await c.send(sentinel)
        assert await peer.until_sentinel(lambda m: m == sentinel) == [sentinel]
        assert isinstance(first[1], Commande)
        peer.send(first[1].reply(1))
        third = await peer.recv()
        assert isinstance(third, Commande) and third.arguments == {"n": 2}
        for cmd in (first[0], third):
            assert isinstance(cmd, Commande)
            peer.send(cmd.reply(cmd.arguments["n"]))
        assert [r.resultat for r in await asyncio.gather(*tasks)] == [0, 1, 2]
        # Waiting for a slot counts against the command's timeout.
        blockers = [asyncio.create_task(c.commande("vm-b", "x", timeout=10))
                    for _ in range(2)]
        await peer.recv()
        await peer.recv()
        with pytest.raises(CommandTimeout):
            await c.commande("vm-b", "y", timeout=0.1)
        for task in blockers:
            task.cancel()


async def test_error_reply_raises_command_error(pair: PtyPair, peer: PtyPeer) -> None:
    async with new_client(pair) as c:
        task = asyncio.create_task(c.commande("vm-x", "liste_disques", timeout=5))
        cmd = await peer.recv()
        assert isinstance(cmd, Commande)
        # A broker refusal comes from dom0, not from the destination.
        peer.send(cmd.fail(Code.DESTINATION_INCONNUE, "no such domain", source="dom0"))
        with pytest.raises(CommandError) as info:
            await task
    assert info.value.code == "destination_inconnue"
    assert info.value.message == "no such domain"
    assert info.value.reponse is not None and info.value.reponse.source == "dom0"
    assert isinstance(info.value, MessagerieError)


async def test_timeout_raises_command_timeout(pair: PtyPair, peer: PtyPeer) -> None:
    async with new_client(pair) as c:
        with pytest.raises(CommandTimeout) as info:
            await c.commande("vm-b", "lent", timeout=0.2)
        assert isinstance(info.value, TimeoutError)
        cmd = await peer.recv()
        assert isinstance(cmd, Commande)
        # Given up on, but its slots are held until the broker frees its own: its
        # answer (the broker's delai_depasse, or a late one) settles it, quietly.
        assert c._pending.keys() == {cmd.id}
        with capture_logs() as logs:
            peer.send(cmd.reply(1))
            task = asyncio.create_task(c.commande("vm-b", "rapide", timeout=5))
            cmd2 = await peer.recv()
            assert isinstance(cmd2, Commande)
            peer.send(cmd2.reply(2))
            assert (await task).resultat == 2
            assert not c._pending
            # An answer nobody waits for any more is logged and dropped.
            peer.send(cmd.reply(1))
            await async_wait_until(
                lambda: any(e["event"] == "reponse.unmatched" for e in logs),
                what="the second answer logged as unmatched")
    assert not any(e["event"] == "reponse.unmatched" and e["id"] == cmd2.id for e in logs)


async def test_client_default_timeout(pair: PtyPair, peer: PtyPeer) -> None:
    async with new_client(pair, timeout=0.1) as c:
        with pytest.raises(CommandTimeout):
            await c.commande("vm-b", "lent")


async def test_invalid_frames_are_logged_and_skipped(pair: PtyPair, peer: PtyPeer) -> None:
    async with new_client(pair) as c:
        stream = c.messages()
        with capture_logs() as logs:
            peer.write(b'{"type":"notification"\n')
            peer.write(b"not json at all\n")
            peer.send(Notification("vm-b", "vm-a", "disque", "etat", {"nom": "sda"}))
            msg = await asyncio.wait_for(stream.__anext__(), 5)
    assert isinstance(msg, Notification) and msg.data == {"nom": "sda"}
    invalid = [e for e in logs if e["event"] == "frame.invalid"]
    assert [e["reason"] for e in invalid] == ["invalid_json", "invalid_json"]


async def test_handler_result_becomes_ok_reply(pair: PtyPair, peer: PtyPeer) -> None:
    c = new_client(pair, name="vm-sys-usb")

    @c.handler("liste_disques")
    async def lister(cmd: Commande) -> list[str]:
        return ["sda", cmd.arguments["extra"]]

    async with c:
        cmd = Commande("vm-ui", "vm-sys-usb", "liste_disques", {"extra": "sdb"})
        peer.send(cmd)
        rep = await peer.recv()
    assert rep == cmd.reply(["sda", "sdb"])


async def test_plain_function_handler(pair: PtyPair, peer: PtyPeer) -> None:
    c = new_client(pair, name="vm-sys-usb")
    c.add_handler("plain", lambda cmd: {"ok": True})
    async with c:
        cmd = Commande("vm-ui", "vm-sys-usb", "plain")
        peer.send(cmd)
        assert await peer.recv() == cmd.reply({"ok": True})


async def test_raising_handler_gives_error_reply(pair: PtyPair, peer: PtyPeer) -> None:
    c = new_client(pair, name="vm-sys-usb")

    @c.handler("casse")
    async def casse(cmd: Commande) -> None:
        raise RuntimeError("boom")

    @c.handler("refuse")
    async def refuse(cmd: Commande) -> None:
        raise CommandError("disque_absent", "no disk sdz")

    @c.handler("pas_json")
    async def pas_json(cmd: Commande) -> object:
        return object()

    async with c:
        with capture_logs() as logs:
            for name in ("casse", "refuse", "pas_json"):
                peer.send(Commande("vm-ui", "vm-sys-usb", name, id=name))
            reps = {}
            for _ in range(3):
                rep = await peer.recv()
                assert isinstance(rep, Reponse)
                reps[rep.id] = rep
    assert reps["casse"].statut == Statut.ERREUR
    assert reps["casse"].erreur == {"code": "erreur_interne", "message": "RuntimeError: boom"}
    assert reps["refuse"].erreur == {"code": "disque_absent", "message": "no disk sdz"}
    assert reps["pas_json"].erreur is not None
    assert reps["pas_json"].erreur["code"] == "erreur_interne"
    assert all(r.destination == "vm-ui" and r.source == "vm-sys-usb" for r in reps.values())
    assert any(e["event"] == "handler.failed" and e["commande"] == "casse" for e in logs)


async def test_no_handler_gives_commande_inconnue(pair: PtyPair, peer: PtyPeer) -> None:
    async with new_client(pair) as c:
        stream = c.messages(type="commande")
        cmd = Commande("vm-ui", "vm-a", "inconnue")
        peer.send(cmd)
        rep = await peer.recv()
        # Listeners still see the command.
        assert await stream.get(5) == cmd
    assert isinstance(rep, Reponse) and rep.id == cmd.id
    assert rep.erreur is not None and rep.erreur["code"] == "commande_inconnue"


def held_lent(c: Client) -> asyncio.Event:
    """Give ``c`` a ``lent`` handler that answers ``"fini"`` once the event returned is
    set, and not before."""
    release = asyncio.Event()

    @c.handler("lent")
    async def lent(cmd: Commande) -> str:
        await release.wait()
        return "fini"
    return release


async def test_slow_handler_does_not_block_the_reader(pair: PtyPair, peer: PtyPeer) -> None:
    c = new_client(pair)
    release = held_lent(c)
    async with c:
        peer.send(Commande("vm-ui", "vm-a", "lent", id="slow"))
        # While the handler waits, a command of ours is still answered.
        task = asyncio.create_task(c.commande("vm-b", "rapide", timeout=5))
        cmd = await peer.recv()
        assert isinstance(cmd, Commande) and cmd.commande == "rapide"
        peer.send(cmd.reply("vite"))
        assert (await task).resultat == "vite"
        release.set()
        rep = await peer.recv()
        assert isinstance(rep, Reponse) and rep.id == "slow" and rep.resultat == "fini"


async def test_close_answers_the_commands_it_cannot_finish(pair: PtyPair,
                                                           peer: PtyPeer) -> None:
    # Every command gets an answer: a handler still running when the grace period ends,
    # and a command arriving while the client closes, are answered destination_hors_ligne.
    c = new_client(pair)
    started = asyncio.Event()
    finished: list[str] = []

    @c.handler("lent")
    async def lent(cmd: Commande) -> str:
        started.set()
        await asyncio.sleep(30)
        finished.append(cmd.id)
        return "fini"

    @c.handler("rapide")
    def rapide(cmd: Commande) -> str:
        finished.append(cmd.id)
        return "vite"

    await c.open()
    peer.send(Commande("vm-ui", "vm-a", "lent", id="slow"))
    await asyncio.wait_for(started.wait(), 5)
    closing = asyncio.create_task(c.close(grace=0.5))
    await async_wait_until(lambda: c.state is ClientState.CLOSING, 5, "close started")
    peer.send(Commande("vm-ui", "vm-a", "rapide", id="late"))
    replies = {}
    for _ in range(2):
        rep = await peer.recv()
        assert isinstance(rep, Reponse)
        replies[rep.id] = rep
    await asyncio.wait_for(closing, 5)
    assert set(replies) == {"slow", "late"}
    for rep in replies.values():
        assert (rep.source, rep.destination, rep.statut) == ("vm-a", "vm-ui", Statut.ERREUR)
        assert rep.erreur is not None and rep.erreur["code"] == Code.DESTINATION_HORS_LIGNE
    assert finished == [], "a command answered as not done must not have run"


async def test_handler_concurrency_is_bounded(pair: PtyPair, peer: PtyPeer) -> None:
    c = new_client(pair, max_handlers=2)
    release = held_lent(c)
    async with c:
        for n in range(3):
            peer.send(Commande("vm-ui", "vm-a", "lent", id=f"c{n}"))
        rep = await peer.recv()
        assert isinstance(rep, Reponse) and rep.id == "c2"
        assert rep.erreur is not None and rep.erreur["code"] == "limite"
        release.set()
        ids = {(await peer.recv()).payload["id"] for _ in range(2)}
        assert ids == {"c0", "c1"}


async def test_message_filters(pair: PtyPair, peer: PtyPeer) -> None:
    async with new_client(pair) as c:
        everything = c.messages()
        usb = c.messages(type="notification", categorie="usb_device", source="vm-sys-usb")
        cmds = c.messages(commande="lister")
        sent: list[Message] = [
            Notification("vm-sys-usb", "tous", "usb_device", "usb_connect"),
            Notification("vm-ui", "tous", "usb_device", "usb_connect"),
            Notification("vm-sys-usb", "tous", "disque", "etat"),
            Commande("vm-ui", "vm-a", "lister", id="l1"),
            Reponse("vm-b", "vm-a", "zz", "lister", resultat=[]),
            Journal("vm-b", "vm-a", "info", "x", "y"),
            Notification("vm-sys-usb", "vm-a", "usb_device", "usb_disconnect"),
        ]
        for msg in sent:
            peer.send(msg)
        got = [await asyncio.wait_for(everything.__anext__(), 5) for _ in sent]
        assert got == sent
        assert [m.payload["evenement"] async for m in _take(usb, 2)] == [
            "usb_connect", "usb_disconnect"]
        assert [m.type async for m in _take(cmds, 2)] == ["commande", "reponse"]
        assert len(usb) == 0 and len(cmds) == 0
        await peer.recv()  # the automatic commande_inconnue answer to "lister"
    # Streams end when the client closes.
    assert [m async for m in everything] == []


async def _take(stream: client_module.MessageStream, n: int) -> AsyncIterator[Message]:
    for _ in range(n):
        yield await asyncio.wait_for(stream.__anext__(), 5)


async def test_stream_overflow_drops_oldest(pair: PtyPair, peer: PtyPeer) -> None:
    async with new_client(pair) as c:
        stream = c.messages(maxsize=3)
        last = c.messages()
        with capture_logs() as logs:
            for n in range(10):
                peer.send(Notification("vm-b", "vm-a", "entree", "souris", {"n": n}))
            await async_wait_until(lambda: len(last) == 10, what="10 messages")
        assert stream.dropped == 7
        assert [m.payload["data"]["n"] for m in [await stream.__anext__() for _ in range(3)]] \
            == [7, 8, 9]
    assert [e["event"] for e in logs].count("messages.dropped") == 1


async def test_streams_created_before_open_are_closed(pair: PtyPair) -> None:
    c = new_client(pair)
    assert [m async for m in c.messages()] == []


async def test_reconnects_when_the_channel_resets(pair: PtyPair, peer: PtyPeer) -> None:
    async with new_client(pair, backoff_min=0.05, backoff_max=0.2) as c:
        task = asyncio.create_task(c.commande("vm-b", "lent", timeout=10))
        await peer.recv()
        peer.close()
        pair.stop()  # the dom0 side goes away: the client's tty hangs up
        with pytest.raises(Disconnected):
            await asyncio.wait_for(task, 5)
        assert not c.connected
        # A send while down waits for the channel to come back.
        sender = asyncio.create_task(c.notify("tous", "domaine", "etat", {"pret": True}))
        pair.start()
        peer2 = PtyPeer(pair.dom0)
        try:
            await asyncio.wait_for(sender, 5)
            assert isinstance(await peer2.recv(), Notification)
            task = asyncio.create_task(c.commande("vm-b", "apres", timeout=5))
            cmd = await peer2.recv()
            assert isinstance(cmd, Commande)
            peer2.send(cmd.reply("ok"))
            assert (await task).resultat == "ok"
            assert c.connections == 2
        finally:
            peer2.close()


async def test_send_while_down_times_out(pair: PtyPair, peer: PtyPeer) -> None:
    async with new_client(pair, connect_timeout=0.2, backoff_min=0.05) as c:
        peer.close()
        pair.stop()
        await async_wait_until(lambda: not c.connected, what="disconnection")
        with pytest.raises(Disconnected):
            await c.notify("tous", "domaine", "etat")
        with pytest.raises(Disconnected):
            await c.commande("vm-b", "x", timeout=5)


async def test_open_fails_cleanly_without_channel(tmp_path: Path) -> None:
    with pytest.raises(Disconnected, match="cannot open channel"):
        async with Client("vm-a", path=tmp_path / "absent"):
            pass


@pytest.mark.integration
async def test_tty_is_put_in_raw_mode(tmp_path: Path) -> None:
    # An hvc or pty starts cooked: it echoes and buffers lines. Check from the other
    # side that the client turned that off.
    master, slave = os.openpty()
    try:
        path = os.ttyname(slave)
        lflag = termios.tcgetattr(slave)[3]
        assert lflag & termios.ECHO and lflag & termios.ICANON  # cooked to begin with
        async with Client("vm-a", path=path) as c:
            attrs = termios.tcgetattr(slave)
            assert not attrs[3] & (termios.ECHO | termios.ICANON | termios.ISIG)
            assert not attrs[1] & termios.OPOST  # no \n -> \r\n
            assert not attrs[0] & (termios.ICRNL | termios.IXON)
            # Functional check: a line longer than the canonical limit (4096) arrives
            # whole, and nothing is echoed back.
            stream = c.messages()
            big = Notification("vm-b", "vm-a", "fichier", "etat", {"x": "a" * 10000})
            os.write(master, encode(big))
            assert await stream.get(5) == big
            os.set_blocking(master, False)
            with pytest.raises(BlockingIOError):
                os.read(master, 100)
    finally:
        os.close(master)
        os.close(slave)


async def test_tty_is_opened_exclusively(pair: PtyPair, peer: PtyPeer) -> None:
    async with new_client(pair):
        with pytest.raises(Disconnected):
            async with new_client(pair):
                pass


@pytest.mark.integration
async def test_flow_control_bounds_the_write_buffer(tmp_path: Path) -> None:
    async with (SocketServer(tmp_path / "s.sock", reading=False) as server,
                Client("vm-a", path=server.path, write_buffer_high=64 * 1024) as c):
        peer = await server.accept()
        data = {"x": "b" * 32000}

        async def flood() -> None:
            for _ in range(200):
                await c.notify("vm-b", "fichier", "etat", data)

        task = asyncio.create_task(flood())
        assert c._conn is not None
        conn = c._conn
        await async_wait_until(lambda: not conn._can_write.is_set(), what="paused")
        assert conn.transport is not None
        assert conn.transport.get_write_buffer_size() <= 64 * 1024 + 33000
        assert not task.done()
        peer.reading.set()
        await asyncio.wait_for(task, 10)
        await async_wait_until(lambda: peer.inbox.qsize() == 200, timeout=10,
                               what="all 200 delivered")


@pytest.mark.integration
async def test_dom0_registers_its_handlers(tmp_path: Path) -> None:
    async with SocketServer(tmp_path / "dom0.sock") as server:
        c = Client.dom0(path=server.path)
        assert c.name == "dom0"

        @c.handler("stocker")
        async def stocker(cmd: Commande) -> str:
            return "stocké"

        opening = asyncio.create_task(c.open())
        peer = await server.accept()
        reg = await peer.recv()
        assert isinstance(reg, Commande)
        assert (reg.source, reg.destination, reg.commande, reg.arguments) == (
            "dom0", "dom0", "enregistrer", {"commandes": ["stocker"]})
        peer.send(reg.reply({"commandes": ["stocker"]}))
        await asyncio.wait_for(opening, 5)
        cmd = Commande("vm-ui", "dom0", "stocker")
        peer.send(cmd)
        assert await peer.recv() == cmd.reply("stocké")
        # After a reset, the handlers are registered again; a broker that is not
        # ready yet (or refuses for now) is asked again, not given up on.
        peer.close()
        peer = await server.accept()
        reg = await peer.recv()
        assert isinstance(reg, Commande) and reg.commande == "enregistrer"
        peer.send(reg.fail(Code.REFUSE, "already served: stocker"))
        again = await peer.recv()
        assert isinstance(again, Commande) and again.commande == "enregistrer"
        assert again.id != reg.id
        peer.send(again.reply(None))
        cmd = Commande("vm-ui", "dom0", "stocker")
        peer.send(cmd)
        assert await peer.recv() == cmd.reply("stocké")
        await c.close()


async def dom0_registering(server: SocketServer) -> tuple[Client, asyncio.Task[None],
                                                          SocketPeer, Commande]:
    """A dom0 client with one handler, opening on ``server``: the client, its ``open()``
    under way, the connection the server accepted and the ``enregistrer`` command the
    client sent on it first."""
    c = Client.dom0(path=server.path)
    c.add_handler("x", lambda cmd: None)
    opening = asyncio.create_task(c.open())
    peer = await server.accept()
    reg = await peer.recv()
    assert isinstance(reg, Commande) and reg.commande == "enregistrer"
    return c, opening, peer, reg


@pytest.mark.integration
async def test_dom0_registration_refused(tmp_path: Path) -> None:
    async with SocketServer(tmp_path / "dom0.sock") as server:
        c, opening, peer, reg = await dom0_registering(server)
        peer.send(reg.fail(Code.REFUSE, "not allowed"))
        with pytest.raises(CommandError) as info:
            await asyncio.wait_for(opening, 5)
        assert info.value.code == "refuse"
        assert not c.connected


@pytest.mark.integration
async def test_dom0_without_handlers_does_not_register(tmp_path: Path) -> None:
    # A unix socket: dom0.
    async with SocketServer(tmp_path / "dom0.sock") as server, Client(path=server.path) as c:
        assert c.name == "dom0"
        peer = await server.accept()
        await c.notify("tous", "fichier", "etat", {"fichier": "a", "etat": "disponible"})
        msg = await peer.recv()
        assert msg.source == "dom0" and msg.type == "notification"


@pytest.mark.integration
def test_name_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sock = tmp_path / "s.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock))
    try:
        monkeypatch.setattr(identity, "DOMAINE_FILE", tmp_path / "domaine")
        monkeypatch.setattr(identity.shutil, "which", lambda name: None)
        monkeypatch.delenv("MESSAGERIE_DOMAINE", raising=False)
        with pytest.raises(NameUnknown, match="MESSAGERIE_DOMAINE"):
            resolve_domain_name(None, tmp_path / "absent")
        (tmp_path / "domaine").write_text("vm-fichier\n")
        assert resolve_domain_name(None, tmp_path / "absent") == "vm-fichier"
        assert resolve_domain_name(None, sock) == "dom0"
        monkeypatch.setenv("MESSAGERIE_DOMAINE", "vm-env")
        assert resolve_domain_name(None, sock) == "vm-env"
        assert resolve_domain_name("vm-arg", sock) == "vm-arg"
        with pytest.raises(NameUnknown, match="invalid"):
            resolve_domain_name("tous")
    finally:
        s.close()


@pytest.mark.integration
def test_name_from_xenstore(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "xenstore-read"
    script.write_text("#!/bin/sh\n[ \"$1\" = name ] && echo vm-xen\n")
    script.chmod(0o755)
    monkeypatch.setattr(identity, "DOMAINE_FILE", tmp_path / "absent")
    monkeypatch.delenv("MESSAGERIE_DOMAINE", raising=False)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert resolve_domain_name() == "vm-xen"


def test_exports() -> None:
    for name in ("Client", "BlockingClient", "MessagerieError", "CommandError",
                 "CommandTimeout", "Disconnected"):
        assert getattr(messagerie, name) is getattr(client_module, name)
        assert name in messagerie.__all__


def test_blocking_client(pair: PtyPair) -> None:
    # The peer runs on its own loop in a thread; the blocking client on another.
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, Any] = {}
    replies: queue.Queue[Message] = queue.Queue()

    async def answer(msg: Message) -> Message | None:
        if isinstance(msg, Commande):
            return None if msg.commande == "silence" else msg.reply({"echo": msg.arguments})
        if isinstance(msg, Notification):
            return Notification("vm-b", "vm-a", "echo", msg.evenement)
        replies.put(msg)
        return None

    async def serve() -> None:
        holder["peer"] = PtyPeer(pair.dom0)
        ready.set()
        try:
            await holder["peer"].serve(answer)
        finally:
            holder["peer"].close()

    def run_peer() -> None:
        holder["task"] = loop.create_task(serve())
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(holder["task"])
        loop.close()

    thread = threading.Thread(target=run_peer, daemon=True)
    thread.start()
    assert ready.wait(5)
    peer: PtyPeer = holder["peer"]
    try:
        c = BlockingClient("vm-a", path=pair.domu)

        @c.handler("addition")
        def addition(cmd: Commande) -> int:
            return int(cmd.arguments["a"]) + int(cmd.arguments["b"])

        with c:
            assert c.name == "vm-a"
            # A filtered iterator, registered before the traffic: only the echo.
            echoes = c.messages(type="notification", categorie="echo", timeout=0.3)
            rep = c.commande("vm-b", "echo", {"k": 1}, timeout=5)
            assert rep.resultat == {"echo": {"k": 1}}
            c.notify("vm-b", "domaine", "etat", {"pret": True})
            # Ends 0.3 s after the last matching message; the command's reply and
            # anything else went by it (receive() below still sees them).
            assert list(echoes) == [Notification("vm-b", "vm-a", "echo", "etat")]
            msg = c.receive(timeout=5)
            # The command's reply went to the inbox too: skip it.
            while isinstance(msg, Reponse):
                msg = c.receive(timeout=5)
            assert isinstance(msg, Notification) and msg.categorie == "echo"
            assert c.receive(timeout=0.05) is None
            # A command to us, served by the plain-function handler.
            loop.call_soon_threadsafe(peer.send, Commande("vm-b", "vm-a", "addition",
                                                          {"a": 2, "b": 3}, id="add"))
            msg = c.receive(timeout=5)
            assert isinstance(msg, Commande) and msg.commande == "addition"
            assert replies.get(timeout=5) == Commande(
                "vm-b", "vm-a", "addition", id="add").reply(5)
            with pytest.raises(CommandTimeout):
                c.commande("vm-b", "silence", timeout=0.1)
        with pytest.raises(Disconnected):
            c.notify("vm-b", "x", "y")
    finally:
        loop.call_soon_threadsafe(holder["task"].cancel)
        thread.join(5)


async def test_close_releases_a_channel_whose_peer_does_not_read(pair: PtyPair) -> None:
    # Nobody reads the broker's end: the channel fills. After the grace period close()
    # drops what is unsent and closes the tty (close() alone would wait for ever).
    def open_on_tty() -> list[str]:
        tty, fds = os.path.realpath(pair.domu), []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{fd}") == tty:
                    fds.append(fd)
        return fds

    c = new_client(pair, write_buffer_high=4096)
    await c.open()
    assert len(open_on_tty()) == 1
    for _ in range(100_000):
        try:
            await asyncio.wait_for(c.notify("vm-b", "entree", "souris", {"pad": "x" * 200}),
                                   0.05)
        except TimeoutError:
            break  # full
    else:
        raise AssertionError("the channel never filled")
    async with asyncio.timeout(5):
        await c.close(grace=0.3)
    assert c.state is ClientState.CLOSED
    assert open_on_tty() == []


async def test_close_is_idempotent_and_fails_pending(pair: PtyPair, peer: PtyPeer) -> None:
    c = new_client(pair)
    await c.open()
    task = asyncio.create_task(c.commande("vm-b", "x", timeout=10))
    await peer.recv()
    await c.close()
    await c.close()
    with pytest.raises(Disconnected):
        await task
    with pytest.raises(Disconnected):
        await c.notify("tous", "a", "b")



@pytest.mark.integration
async def test_a_command_failed_by_a_reset_is_never_sent_afterwards(tmp_path: Path) -> None:
    # The caller was told Disconnected (so it may retry): the command must not then be
    # written on the next channel behind its back (a retried delete would run twice).
    path = tmp_path / "channel.sock"
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    got: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conns.append((reader, writer))
        if len(conns) == 2:  # the first connection is never read: its buffer fills
            while line := await reader.readline():
                got.append(line)

    server = await asyncio.start_unix_server(handle, str(path))
    client = Client("vm-ui", path=path, write_buffer_high=16 * 1024, backoff_min=0.05)
    try:
        async with client:
            await async_wait_until(lambda: len(conns) == 1, what="first connection")
            big = {"x": "y" * 4000}

            async def fill() -> None:
                while True:
                    await client.send(Notification("vm-ui", "tous", "c", "e", big), timeout=30)

            filler = asyncio.create_task(fill())
            conn = client._conn
            assert conn is not None
            await async_wait_until(lambda: not conn._can_write.is_set(), what="buffer full")
            command = asyncio.create_task(client.commande("vm-x", "supprimer", timeout=5))
            await async_wait_until(lambda: bool(client._pending), what="command pending")
            filler.cancel()
            conns[0][1].transport.abort()  # the channel resets
            with pytest.raises(Disconnected):
                await command
            await async_wait_until(lambda: len(conns) == 2, what="reconnection")
            await client.notify("tous", "c", "marker")
            await async_wait_until(lambda: any(b"marker" in line for line in got),
                                   what="marker on the new channel")
            assert not any(b"supprimer" in line for line in got)
    finally:
        server.close()


# -- lifecycle states, English names ---------------------------------------------------

@pytest.mark.integration
async def test_state_follows_the_lifecycle(tmp_path: Path) -> None:
    async with SocketServer(tmp_path / "s.sock") as server:
        c = Client("vm-a", path=server.path, backoff_min=0.05, backoff_max=0.2)
        assert c.state is ClientState.UNOPENED
        opening = asyncio.create_task(c.open())
        await asyncio.sleep(0)
        assert c.state is ClientState.OPENING
        await asyncio.wait_for(opening, 5)
        assert c.state is ClientState.CONNECTED and c.connected
        peer = await server.accept()
        peer.close()  # the channel resets
        await async_wait_until(lambda: c.state is ClientState.RECONNECTING, what="down")
        assert not c.connected
        await server.accept()
        await async_wait_until(lambda: c.state is ClientState.CONNECTED, what="back up")
        assert c.connected and c.connections == 2
        await c.close()
        assert c.state is ClientState.CLOSED and not c.connected
        with pytest.raises(RuntimeError, match="cannot be reopened"):
            await c.open()


async def test_open_twice_is_refused(pair: PtyPair, peer: PtyPeer) -> None:
    async with new_client(pair) as c:
        with pytest.raises(RuntimeError, match="already open"):
            await c.open()
        assert c.state is ClientState.CONNECTED


@pytest.mark.integration
async def test_an_open_that_failed_may_be_retried(tmp_path: Path) -> None:
    c = Client("vm-a", path=tmp_path / "s.sock")
    stream = c.messages()
    with pytest.raises(Disconnected, match="cannot open channel"):
        await c.open()
    assert c.state is ClientState.UNOPENED
    assert [m async for m in stream] == []
    async with SocketServer(tmp_path / "s.sock") as server, c:
        assert c.state is ClientState.CONNECTED
        peer = await server.accept()
        await c.notify("vm-b", "domaine", "etat")
        assert isinstance(await peer.recv(), Notification)


@pytest.mark.integration
async def test_close_while_registering_fails_the_open(tmp_path: Path) -> None:
    async with SocketServer(tmp_path / "dom0.sock") as server:
        c, opening, _, _ = await dom0_registering(server)
        assert c.state is ClientState.OPENING
        await c.close()
        with pytest.raises(Disconnected):
            await asyncio.wait_for(opening, 5)
        assert c.state is ClientState.CLOSED and not c.connected


async def test_a_second_close_waits_for_the_first(pair: PtyPair, peer: PtyPeer) -> None:
    c = new_client(pair)
    started = asyncio.Event()

    @c.handler("lent")
    async def lent(cmd: Commande) -> str:
        started.set()
        await asyncio.sleep(0.3)
        return "fini"

    await c.open()
    peer.send(Commande("vm-ui", "vm-a", "lent", id="slow"))
    await asyncio.wait_for(started.wait(), 5)
    first = asyncio.create_task(c.close(grace=2))
    await async_wait_until(lambda: c.state is ClientState.CLOSING, what="closing")
    await asyncio.wait_for(c.close(), 5)
    assert c.state is ClientState.CLOSED
    assert first.done()
    assert await peer.recv() == Commande("vm-ui", "vm-a", "lent", id="slow").reply("fini")


async def test_command_is_the_name_and_commande_its_alias(
        pair: PtyPair, peer: PtyPeer) -> None:
    assert Client.commande is Client.command
    assert BlockingClient.commande is BlockingClient.command
    async with new_client(pair) as c:
        task = asyncio.create_task(c.command("vm-b", "liste_disques", {"x": 1}, timeout=5))
        cmd = await peer.recv()
        assert isinstance(cmd, Commande) and cmd.commande == "liste_disques"
        peer.send(cmd.reply(["sda"]))
        assert (await task).resultat == ["sda"]


def test_a_blocking_call_from_the_clients_own_loop_is_refused() -> None:
    # It would wait for the loop it blocks: refuse it instead of hanging.
    from messagerie.blocking import _Portal

    portal = _Portal("test-portal")
    try:
        async def inside() -> str:
            with pytest.raises(RuntimeError, match="own event loop"):
                portal.call(asyncio.sleep(0))
            return "ok"

        assert portal.call(inside()) == "ok"
    finally:
        portal.stop()
    assert not portal.running
