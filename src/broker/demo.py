"""``messagerie-broker --demo``: the clean station of usage-reel.md, on one machine.

Three simulated domains (vm-sys-usb, vm-ui, vm-diag), each on a socat pty pair as a
stand-in for its Xen pv-channel, and a dom0 service on the broker's socket; the broker
runs on an embedded configuration and the socle's policy (config/socle-policy.toml, of
which the package carries a copy) after one rule of its own for the spec's example.
vm-sys-usb announces a USB stick to ``tous`` (the spec's example). Then the station
(:mod:`messagerie.station`) works: a stick (a temporary directory) appears, vm-ui lists
the disks and the stick's files, reads one into dom0's store, a second stick appears,
vm-ui copies the file there (with its ``.hash``) and deletes it from the store. Then the
broker shows what it refuses: a path escape, a forged source, a command the policy
denies, a command to a domain that does not exist. Every message is printed; it exits
cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

from messagerie import Message, decode, encode, socle
from messagerie.client import Client, CommandError
from messagerie.station.depot import DepotService
from messagerie.station.usb import UsbService

from . import logs
from .config import parse_config
from .daemon import Daemon
from .policy import parse_policy

DOMAINS = ("vm-sys-usb", "vm-ui", "vm-diag")
SPEC_EXAMPLE = (b'{"type":"notification","source":"vm-sys-usb","destination":"tous",'
                b'"payload":{"categorie":"device","evenement":"connect",'
                b'"chemin":"/mnt/usb_in"}}')
SOCLE_POLICY = resources.files(__package__).joinpath("socle-policy.toml").read_text()
"""The socle's flows: this package's copy of config/socle-policy.toml (a test keeps the
two identical), so that an installed broker runs the demo too."""
SHOWCASE = """\
[[regle]]  # the demo's first message: the spec's example, from vm-sys-usb
source = "vm-sys-usb"
destination = "tous"
type = "notification"
nom = "device"
action = "allow"

"""
POLICY = SHOWCASE + SOCLE_POLICY
"""The demo's policy: the spec's example, then exactly the socle's flows."""
USB_FILES = {"rapport.pdf": b"%PDF-1.4 a report scanned by the clean station\n",
             "photos/plage.jpg": b"\xff\xd8\xff\xe0 not really a JPEG\n"}


def _say(who: str, text: str) -> None:
    print(f"demo | {who:<10} {text}", flush=True)


def _show(msg: Message) -> str:
    return encode(msg).decode().rstrip()


async def _wait_for(predicate: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def _printer(who: str, client: Client) -> None:
    """Show every message ``who`` receives."""
    async for msg in client.messages():
        _say(who, f"<- {_show(msg)}")


def _new_stick(usb: Path, name: str, files: dict[str, bytes]) -> None:
    """A stick appears: its files are made beside the mount directory, then moved in
    at once (a real mount is atomic too)."""
    staging = usb.parent / f".{name}"
    staging.mkdir()
    for rel, data in files.items():
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        (staging / rel).write_bytes(data)
    staging.rename(usb / name)


async def _station(tmp: Path, usb_client: Client, ui: Client, dom0: Client,
                   service: UsbService) -> None:
    usb = service.montages
    disques = ui.messages(type="notification", categorie=socle.DISQUE.categorie)

    async def disk_appears(name: str, files: dict[str, bytes]) -> None:
        _say("demo", f"a stick appears: {name} ({', '.join(files) or 'empty'})")
        _new_stick(usb, name, files)
        async with asyncio.timeout(10):
            async for msg in disques:
                if socle.DISQUE.parse(msg).nom == name:  # type: ignore[arg-type]
                    return

    _say("vm-ui", "-> ETAT_DOMU: ready")
    await ui.send(socle.ETAT_DOMU.build(ui.name, socle.EtatDomu(True)))
    await disk_appears("cle-1", USB_FILES)
    _say("vm-ui", f"= liste_disques: {await socle.liste_disques(ui, timeout=5)}")
    fichiers = await socle.liste_fichiers(ui, "cle-1", timeout=5)
    _say("vm-ui", f"= liste_fichiers cle-1: {fichiers}")
    lu = await socle.lit_fichier(ui, "cle-1", "rapport.pdf", timeout=10)
    _say("vm-ui", f"= lit_fichier cle-1 rapport.pdf: FICHIER {lu.etat}")
    await disk_appears("cle-2", {})
    copie = await socle.copie_fichier(ui, "rapport.pdf", "cle-2", timeout=10)
    hash_text = (usb / "cle-2" / "rapport.pdf.hash").read_text().strip()
    _say("vm-ui", f"= copie_fichier rapport.pdf cle-2: FICHIER {copie.etat}; "
                  f"cle-2/rapport.pdf.hash: {hash_text}")
    supprime = await socle.supprime_fichier(ui, "rapport.pdf", timeout=10)
    _say("vm-ui", f"= supprime_fichier rapport.pdf (local): FICHIER {supprime.etat}")
    _say("vm-ui", "-> lit_fichier cle-1 ../../etc/passwd (a path escape)")
    try:
        await socle.lit_fichier(ui, "cle-1", "../../etc/passwd", timeout=5)
    except CommandError as exc:
        _say("vm-ui", f"<- error {exc.code}: {exc.message}")
    await service.idle()


async def _demo(tmp: Path, log_level: str) -> int:
    socats: list[asyncio.subprocess.Process] = []
    try:
        for name in DOMAINS:
            socats.append(await asyncio.create_subprocess_exec(
                "socat", f"pty,raw,echo=0,link={tmp / name}.dom0",
                f"pty,raw,echo=0,link={tmp / name}.domu", stderr=subprocess.DEVNULL))
        await _wait_for(lambda: all((tmp / f"{n}.domu").exists() and (tmp / f"{n}.dom0").exists()
                                    for n in DOMAINS), 10, "socat ptys")
        config = parse_config({
            "dom0": {"socket": str(tmp / "dom0.sock")},
            "domaines": {n: {"chemin": str(tmp / f"{n}.dom0")} for n in DOMAINS},
        }, "<embedded demo configuration>")
        logs.configure(log_level, force_json=False)  # readable, even through a pipe
        daemon = Daemon(config, parse_policy(POLICY, origin="<embedded demo policy>"), None)
        broker_task = asyncio.get_running_loop().create_task(daemon.run())
        await asyncio.wait_for(daemon.ready.wait(), 10)
        _say("broker", f"ready: {len(DOMAINS)} domains on socat ptys in {tmp}")

        usb = Client("vm-sys-usb", path=tmp / "vm-sys-usb.domu")
        ui = Client("vm-ui", path=tmp / "vm-ui.domu")
        diag = Client("vm-diag", path=tmp / "vm-diag.domu")
        dom0 = Client.dom0(tmp / "dom0.sock")
        (tmp / "usb").mkdir()
        # The station: vm-sys-usb serves the sticks under tmp/usb (plain directories
        # stand for mount points), dom0 serves the store.
        service = UsbService(usb, tmp / "usb", est_disque=Path.is_dir, intervalle=0.05)
        DepotService(dom0, tmp / "depot")

        async with usb, ui, diag, dom0:
            ui_stream = ui.messages(categorie="device")
            diag_stream = diag.messages(categorie="device")

            _say("vm-sys-usb", f"-> {SPEC_EXAMPLE.decode()}")
            await usb.send(decode(SPEC_EXAMPLE))
            for who, stream in (("vm-ui", ui_stream), ("vm-diag", diag_stream)):
                got = await asyncio.wait_for(stream.__anext__(), 5)
                _say(who, f"<- {_show(got)}")

            _say("demo", "the station: every message each domain receives is shown")
            printers = [asyncio.create_task(_printer(who, client)) for who, client in
                        (("vm-sys-usb", usb), ("vm-ui", ui), ("dom0", dom0))]
            watcher = asyncio.create_task(service.watch())
            try:
                await _station(tmp, usb, ui, dom0, service)
            finally:
                watcher.cancel()
                await asyncio.sleep(0.05)  # let the printers show the last messages
                for task in printers:
                    task.cancel()

            _say("vm-sys-usb", "-> forged: a notification claiming to come from vm-ui")
            fd = os.open(tmp / "vm-sys-usb.domu", os.O_WRONLY | os.O_NOCTTY)
            try:
                os.write(fd, b'{"type":"notification","source":"vm-ui","destination":"tous",'
                             b'"payload":{"categorie":"device","evenement":"connect"}}\n')
            finally:
                os.close(fd)

            for who, client, dest, name in (
                    ("vm-diag", diag, "vm-ui", "lire_ecran"),
                    ("vm-ui", ui, "vm-absent", "liste_disques")):
                _say(who, f"-> commande {name} to {dest}")
                try:
                    await client.commande(dest, name, timeout=5)
                except CommandError as exc:
                    _say(who, f"<- error {exc.code}: {exc.message}")

            stats = (await dom0.commande("dom0", "statistiques", timeout=5)).resultat
            for name, counters in stats["domaines"].items():
                _say("dom0", f"{name}: " + ", ".join(f"{k}={v}" for k, v in counters.items()))

        daemon.stop_event.set()
        code: int = await asyncio.wait_for(broker_task, 10)
        _say("broker", f"stopped, exit status {code}")
        return code
    finally:
        for proc in socats:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        for proc in socats:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 5)


def run_demo(log_level: str = "info") -> int:
    if shutil.which("socat") is None:
        print("messagerie-broker: the demo needs socat (apt-get install -y socat)",
              file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="messagerie-demo-"))
    try:
        return asyncio.run(_demo(tmp, log_level))
    except (TimeoutError, CommandError, OSError) as exc:
        print(f"messagerie-broker: demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
