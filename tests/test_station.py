"""The station's reference services end to end: the broker started as users start it,
on the socle's policy (config/socle-policy.toml), domains on socat ptys, vm-sys-usb's
and dom0's services and a UI client speaking the socle's typed calls."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from messagerie import BlockingClient, Client, CommandError, socle
from messagerie.model import Commande
from messagerie.station.depot import DepotLit, DepotService
from messagerie.station.usb import UsbService
from messagerie.streams import MessageStream
from tests.support.broker_process import BrokerProcess, write_config
from tests.support.ptys import PtyPair

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent
MAX_SIZE = 100_000


@dataclass
class Station:
    tmp: Path
    usb_dir: Path
    store: Path
    ui: Client
    usb: Client
    dom0: Client
    service: UsbService
    disques: MessageStream
    fichiers: MessageStream
    broker: BrokerProcess

    async def stick(self, name: str, files: dict[str, bytes],
                    links: dict[str, str] | None = None) -> None:
        """A stick appears (made aside, then moved in); wait for its DISQUE at vm-ui."""
        staging = self.tmp / f"staging-{name}"
        staging.mkdir()
        for rel, data in files.items():
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_bytes(data)
        for rel, target in (links or {}).items():
            (staging / rel).symlink_to(target)
        staging.rename(self.usb_dir / name)
        assert await self.disk_event(name) is True

    async def disk_event(self, name: str) -> bool:
        async with asyncio.timeout(10):
            async for msg in self.disques:
                disque = socle.DISQUE.parse(msg)  # type: ignore[arg-type]
                if disque.nom == name:
                    return disque.connecte
        raise AssertionError("stream ended")

    async def next_fichier(self) -> socle.Fichier:
        async with asyncio.timeout(10):
            msg = await anext(self.fichiers)
        fichier: socle.Fichier = socle.FICHIER.parse(msg)  # type: ignore[arg-type]
        return fichier


def station_broker(tmp_path: Path) -> tuple[dict[str, PtyPair], Path, BrokerProcess]:
    """vm-sys-usb and vm-ui on socat ptys and the broker on them, on the socle's policy,
    ready: the pairs, the dom0 socket and the broker."""
    pairs = {n: PtyPair(tmp_path, n) for n in ("vm-sys-usb", "vm-ui")}
    socket = tmp_path / "dom0.sock"
    config = write_config(tmp_path / "broker.toml", {n: p.dom0 for n, p in pairs.items()},
                          dom0_socket=socket,
                          extra=f'[broker]\npolitique = "{ROOT / "config/socle-policy.toml"}"\n')
    broker = BrokerProcess(config)
    broker.wait_ready()
    return pairs, socket, broker


@pytest.fixture
async def station(tmp_path: Path) -> AsyncIterator[Station]:
    pairs, socket, broker = station_broker(tmp_path)
    usb_dir, store = tmp_path / "usb", tmp_path / "depot"
    usb_dir.mkdir()
    usb = Client("vm-sys-usb", path=pairs["vm-sys-usb"].domu)
    ui = Client("vm-ui", path=pairs["vm-ui"].domu)
    dom0 = Client.dom0(socket)
    service = UsbService(usb, usb_dir, est_disque=Path.is_dir, intervalle=0.05,
                         max_size=MAX_SIZE)
    DepotService(dom0, store, max_size=MAX_SIZE)
    async with dom0, usb, ui:
        watcher = asyncio.create_task(service.watch())
        s = Station(tmp_path, usb_dir, store, ui, usb, dom0, service,
                    ui.messages(type="notification", categorie="disque"),
                    ui.messages(type="notification", source="dom0", categorie="fichier"),
                    broker)
        try:
            yield s
        finally:
            watcher.cancel()
            await service.idle()
    assert broker.stop() == 0, broker.tail(20)
    for pair in pairs.values():
        pair.stop()


async def test_disks_and_their_cached_file_lists(station: Station) -> None:
    ui = station.ui
    assert await socle.liste_disques(ui, timeout=10) == []
    await station.stick("cle-1", {"a.txt": b"a", "docs/b.pdf": b"b", "docs/sub/c": b"c"},
                        links={"fuite.txt": "/etc/passwd", "lien": "/etc"})
    assert await socle.liste_disques(ui, timeout=10) == ["cle-1"]
    # Regular files only: the links are not listed (nor followed).
    assert await socle.liste_fichiers(ui, "cle-1", timeout=10) == [
        "a.txt", "docs/b.pdf", "docs/sub/c"]
    # The list is the one cached at connect.
    (station.usb_dir / "cle-1" / "late.txt").write_bytes(b"x")
    assert "late.txt" not in await socle.liste_fichiers(ui, "cle-1", timeout=10)
    with pytest.raises(CommandError) as err:
        await socle.liste_fichiers(ui, "cle-9", timeout=10)
    assert err.value.code == "disque_absent"
    (station.usb_dir / "cle-1").rename(station.tmp / "gone")
    assert await station.disk_event("cle-1") is False
    assert await socle.liste_disques(ui, timeout=10) == []


async def test_read_copy_delete_end_to_end(station: Station) -> None:
    ui, store = station.ui, station.store
    data = os.urandom(3 * 32 * 1024 + 100)  # four chunks
    digest = hashlib.sha256(data).hexdigest()
    await station.stick("cle-1", {"docs/rapport.pdf": data})

    lu = await socle.lit_fichier(ui, "cle-1", "docs/rapport.pdf", timeout=10)
    assert (lu.fichier, lu.etat) == ("docs/rapport.pdf", "disponible")
    assert (store / "fichiers/docs/rapport.pdf").read_bytes() == data
    assert (store / "empreintes/docs/rapport.pdf").read_text().strip() == digest
    assert await socle.liste_fichiers(ui, "local", timeout=10) == ["docs/rapport.pdf"]

    await station.stick("cle-2", {})
    copie = await socle.copie_fichier(ui, "docs/rapport.pdf", "cle-2", timeout=10)
    assert copie.etat == "copié"
    assert (station.usb_dir / "cle-2/docs/rapport.pdf").read_bytes() == data
    assert (station.usb_dir / "cle-2/docs/rapport.pdf.hash").read_text() == \
        f"{digest}  rapport.pdf\n"
    assert await socle.liste_fichiers(ui, "cle-2", timeout=10) == [
        "docs/rapport.pdf", "docs/rapport.pdf.hash"]

    assert (await socle.supprime_fichier(ui, "docs/rapport.pdf", timeout=10)).etat == "supprimé"
    assert not (store / "fichiers/docs/rapport.pdf").exists()
    assert await socle.liste_fichiers(ui, "local", timeout=10) == []
    gone = await socle.supprime_fichier(ui, "docs/rapport.pdf.hash", "cle-2", timeout=10)
    assert gone.etat == "supprimé"
    assert not (station.usb_dir / "cle-2/docs/rapport.pdf.hash").exists()
    assert await socle.liste_fichiers(ui, "cle-2", timeout=10) == ["docs/rapport.pdf"]


async def test_typed_calls_on_a_blocking_client(station: Station, tmp_path: Path) -> None:
    await station.stick("cle-1", {"a.txt": b"hello"})
    # A second UI domain would need its own channel; the blocking facade runs the same
    # typed calls on vm-ui's once the async client let go of it.
    await station.ui.close()

    def blocking() -> tuple[list[str], socle.Fichier]:
        with BlockingClient("vm-ui", path=station.ui.path) as c:
            return socle.liste_disques(c, timeout=10), socle.lit_fichier(c, "cle-1", "a.txt",
                                                                          timeout=10)

    disques, lu = await asyncio.to_thread(blocking)
    assert disques == ["cle-1"] and lu == socle.Fichier("a.txt", "disponible")


async def test_input_and_domu_state_notifications(station: Station) -> None:
    entrees = station.ui.messages(type="notification", categorie=socle.INPUT.categorie)
    etats = station.usb.messages(type="notification", categorie=socle.ETAT_DOMU.categorie)
    tap = [socle.Tactile(socle.Position(12, 34), 1), socle.Tactile(socle.Position(12, 34), 0)]
    sent = [*tap, socle.Clavier("q"),
            socle.Souris(socle.Position(5, 6), socle.Boutons(gauche=1, milieu=0, droit=0))]
    for entree in sent:
        await station.usb.send(socle.INPUT.build("vm-sys-usb", entree))
    async with asyncio.timeout(10):
        got = [socle.INPUT.parse(await anext(entrees)) for _ in sent]  # type: ignore[arg-type]
    assert got == sent
    await station.ui.send(socle.ETAT_DOMU.build("vm-ui", socle.EtatDomu(True)))
    async with asyncio.timeout(10):
        msg = await anext(etats)
    assert (msg.source, socle.ETAT_DOMU.parse(msg)) == ("vm-ui", socle.EtatDomu(True))  # type: ignore[arg-type]


async def test_refusals(station: Station) -> None:
    ui, usb = station.ui, station.usb
    await station.stick("cle-1", {"a.txt": b"a", "gros.bin": b"x" * (MAX_SIZE + 1)},
                        links={"fuite.txt": "/etc/passwd", "lien": "/etc"})

    async def refused(coro: object) -> CommandError:
        with pytest.raises(CommandError) as err:
            await coro  # type: ignore[misc]
        return err.value

    # A bad argument, answered by the typed handler naming the field.
    err = await refused(ui.command("vm-sys-usb", "lit_fichier", {"nom_disque": "cle-1"},
                                   timeout=10))
    assert err.code == "message_invalide" and "arguments.nom_fichier" in err.message
    err = await refused(ui.command("vm-sys-usb", "copie_fichier",
                                   {"nom_fichier": "a.txt", "nom_disque_destination": 7},
                                   timeout=10))
    assert err.code == "message_invalide" and "arguments.nom_disque_destination" in err.message
    # Path escapes: by name, and through symbolic links.
    err = await refused(socle.lit_fichier(ui, "cle-1", "../../etc/passwd", timeout=10))
    assert err.code == "message_invalide" and "'..'" in err.message
    for escape in ("fuite.txt", "lien/passwd"):
        err = await refused(socle.lit_fichier(ui, "cle-1", escape, timeout=10))
        assert err.code == "chemin_refuse", escape
    # Missing files, missing disks, a file over the size cap.
    assert (await refused(socle.lit_fichier(ui, "cle-1", "absent.txt", timeout=10))).code \
        == "fichier_absent"
    assert (await refused(socle.lit_fichier(ui, "cle-9", "a.txt", timeout=10))).code \
        == "disque_absent"
    assert (await refused(socle.copie_fichier(ui, "a.txt", "cle-1", timeout=10))).code \
        == "fichier_absent"  # not read into the store first
    assert (await refused(socle.supprime_fichier(ui, "a.txt", timeout=10))).code \
        == "fichier_absent"
    assert (await refused(socle.lit_fichier(ui, "cle-1", "gros.bin", timeout=10))).code \
        == "trop_grand"
    # Policy denials: the former name, a DomU feeding the store, vm-sys-usb commanding.
    for coro in (ui.command("vm-sys-usb", "lister_disques", timeout=10),
                 ui.command("dom0", "depot_ecrit", {}, timeout=10),
                 usb.command("vm-ui", "liste_disques", timeout=10)):
        assert (await refused(coro)).code == "refuse"
    # Nothing was announced meanwhile: the next FICHIER is the one of this read.
    assert (await socle.lit_fichier(ui, "cle-1", "a.txt", timeout=10)).etat == "disponible"
    assert (await station.next_fichier()).etat == "disponible"


async def test_digest_mismatch_on_copy_is_a_fichier_erreur(station: Station) -> None:
    ui = station.ui
    await station.stick("cle-1", {"a.txt": b"original"})
    await station.stick("cle-2", {})
    await socle.lit_fichier(ui, "cle-1", "a.txt", timeout=10)
    (station.store / "fichiers/a.txt").write_bytes(b"tampered")  # altered in the store
    with pytest.raises(socle.FichierErreur) as err:
        await socle.copie_fichier(ui, "a.txt", "cle-2", timeout=10)
    assert err.value.fichier.etat == "erreur"
    assert "digest mismatch" in (err.value.fichier.message or "")
    assert not (station.usb_dir / "cle-2/a.txt").exists()       # the bad copy is deleted
    assert not (station.usb_dir / "cle-2/a.txt.hash").exists()


async def test_a_hash_file_that_cannot_be_written_fails_the_copy(station: Station) -> None:
    # The destination stick has a link where the .hash goes: the copy fails with a
    # report naming the problem (not a task dying in silence, the caller timing out),
    # the copy is deleted and the link's target is untouched.
    victim = station.tmp / "victim"
    victim.write_bytes(b"keep")
    await station.stick("cle-1", {"a.txt": b"original"})
    await station.stick("cle-2", {}, links={"a.txt.hash": str(victim)})
    await socle.lit_fichier(station.ui, "cle-1", "a.txt", timeout=10)
    with pytest.raises(socle.FichierErreur) as err:
        await socle.copie_fichier(station.ui, "a.txt", "cle-2", timeout=10)
    assert err.value.fichier.etat == "erreur"
    assert "copy failed" in (err.value.fichier.message or "")
    assert "a.txt.hash" in (err.value.fichier.message or "")
    assert not (station.usb_dir / "cle-2/a.txt").exists()
    assert victim.read_bytes() == b"keep"


async def test_reading_a_stored_file_without_its_digest_leaks_no_fd(tmp_path: Path) -> None:
    class NoClient:
        def add_handler(self, *args: object) -> None:
            pass

    depot = DepotService(NoClient(), tmp_path)  # type: ignore[arg-type]
    (depot.fichiers / "f.txt").write_bytes(b"hello")            # its digest is missing
    (depot.fichiers / "g.txt").write_bytes(b"hello")
    (depot.empreintes / "g.txt").symlink_to(tmp_path / "elsewhere")   # an unsafe digest
    cmd = Commande("vm-sys-usb", "dom0", "depot_lit", {})

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = fds()
    for _ in range(50):
        for name, code in (("f.txt", "fichier_absent"), ("g.txt", "chemin_refuse")):
            with pytest.raises(CommandError) as err:
                await depot.depot_lit(DepotLit(name, 0), cmd)
            assert err.value.code == code
    assert fds() == before


async def test_digest_mismatch_on_read_is_a_fichier_erreur(station: Station) -> None:
    # vm-sys-usb says it read other bytes than the store received: the store refuses
    # to keep them and says why.
    usb = station.usb
    await usb.command("dom0", "depot_ecrit", {"nom_fichier": "x.txt", "decalage": 0,
                                              "donnees": "aGVsbG8="}, timeout=10)
    await usb.command("dom0", "depot_compte_rendu", {
        "nom_fichier": "x.txt", "operation": "lecture", "empreinte": "0" * 64}, timeout=10)
    fichier = await station.next_fichier()
    assert (fichier.fichier, fichier.etat) == ("x.txt", "erreur")
    assert fichier.message is not None and "digest mismatch" in fichier.message
    assert not (station.store / "fichiers/x.txt").exists()
    # A chunk out of order is refused, naming the field.
    with pytest.raises(CommandError) as err:
        await usb.command("dom0", "depot_ecrit", {"nom_fichier": "y.txt", "decalage": 5,
                                                  "donnees": ""}, timeout=10)
    assert err.value.code == "message_invalide" and "arguments.decalage" in err.value.message


def test_station_services_as_users_start_them(tmp_path: Path) -> None:
    """``python -m messagerie.station depot|usb|ui``, each its own process, as on a
    station: the UI's tour reads a stick's file, copies it to the other, deletes it."""
    pairs, socket, broker = station_broker(tmp_path)
    usb_dir = tmp_path / "usb"
    (usb_dir / "cle-1").mkdir(parents=True)
    (usb_dir / "cle-1" / "a.txt").write_bytes(b"from the first stick")
    (usb_dir / "cle-2").mkdir()
    station = [sys.executable, "-m", "messagerie.station"]
    services: list[subprocess.Popen[bytes]] = []
    try:
        services.append(subprocess.Popen([*station, "depot", "--racine", str(tmp_path / "depot"),
                                          "--socket", str(socket)]))
        broker.wait_event("dom0.service_registered", timeout=30)
        services.append(subprocess.Popen([*station, "usb", "--montages", str(usb_dir),
                                          "--dossiers", "--intervalle", "0.1", "--nom",
                                          "vm-sys-usb", "--chemin", str(pairs["vm-sys-usb"].domu)]))
        ui = subprocess.run([*station, "ui", "--copie-vers", "cle-2", "--attendre", "2",
                             "--nom", "vm-ui", "--chemin", str(pairs["vm-ui"].domu)],
                            capture_output=True, text=True, timeout=90, check=False)
        assert ui.returncode == 0, ui.stdout + ui.stderr
        assert ui.stdout.splitlines() == [
            "disks: ['cle-1', 'cle-2']", "cle-1: ['a.txt']", "cle-2: []",
            "read cle-1:a.txt into the store: disponible", "copied a.txt to cle-2: copié",
            "deleted a.txt from the store: supprimé"]
        assert (usb_dir / "cle-2/a.txt").read_bytes() == b"from the first stick"
        assert (usb_dir / "cle-2/a.txt.hash").read_text().startswith(
            hashlib.sha256(b"from the first stick").hexdigest())
        assert not (tmp_path / "depot/fichiers/a.txt").exists()
    finally:
        for proc in services:
            proc.send_signal(signal.SIGINT)
        for proc in services:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        assert broker.stop() == 0, broker.tail(20)
        for pair in pairs.values():
            pair.stop()
