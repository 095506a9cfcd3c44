"""``messagerie-broker --demo``: the clean station of usage-reel.md, on one machine.

Three simulated domains (vm-sys-usb, vm-ui, vm-diag), each on a socat pty pair as a
stand-in for its Xen pv-channel; the broker runs on an embedded configuration and
policy. vm-sys-usb announces a USB stick to ``tous`` (the spec's example), vm-ui
receives it and asks vm-sys-usb for its disks, vm-sys-usb answers. Then the broker
shows what it refuses: a forged source, a command the policy denies, a command to a
domain that does not exist. Every message that flows is printed; it exits cleanly.
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
from pathlib import Path
from typing import Any

from messagerie import Commande, Message, decode, encode
from messagerie.client import Client, CommandError

from . import logs
from .config import parse_config
from .daemon import Daemon
from .policy import parse_policy

DOMAINS = ("vm-sys-usb", "vm-ui", "vm-diag")
SPEC_EXAMPLE = (b'{"type":"notification","source":"vm-sys-usb","destination":"tous",'
                b'"payload":{"categorie":"device","evenement":"connect",'
                b'"chemin":"/mnt/usb_in"}}')
POLICY = """
[groupes]
metier = ["vm-ui", "vm-diag"]

[[regle]]  # the broker itself (domain state) and dom0 services: anything
source = "dom0"
destination = "*"
type = "*"
action = "allow"

[[regle]]  # dom0 is matched only when named: dom0 services may ask the broker
source = "dom0"
destination = "dom0"
type = "*"
action = "allow"

[[regle]]  # vm-sys-usb announces devices, disks and its state to everyone
source = "vm-sys-usb"
destination = "tous"
type = "notification"
action = "allow"

[[regle]]  # business domains may ask vm-sys-usb about disks and files
source = "@metier"
destination = "vm-sys-usb"
type = "commande"
nom = ["lister_disques", "lister_fichiers"]
action = "allow"

[[regle]]  # and ask dom0's broker how things are
source = "*"
destination = "dom0"
type = "commande"
nom = ["ping", "domaines", "statistiques"]
action = "allow"

[[regle]]  # state notifications from anyone
source = "*"
destination = "tous"
type = "notification"
nom = "domaine"
action = "allow"
"""


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

        @usb.handler("lister_disques")
        async def lister_disques(cmd: Commande) -> list[str]:
            _say("vm-sys-usb", f"<- {_show(cmd)}")
            return ["sda1"]

        async with usb, ui, diag:
            ui_stream = ui.messages(categorie="device")
            diag_stream = diag.messages(categorie="device")

            _say("vm-sys-usb", f"-> {SPEC_EXAMPLE.decode()}")
            await usb.send(decode(SPEC_EXAMPLE))
            for who, stream in (("vm-ui", ui_stream), ("vm-diag", diag_stream)):
                got = await asyncio.wait_for(stream.__anext__(), 5)
                _say(who, f"<- {_show(got)}")

            _say("vm-ui", "-> commande lister_disques to vm-sys-usb")
            rep = await ui.commande("vm-sys-usb", "lister_disques", timeout=5)
            _say("vm-ui", f"<- {_show(rep)}")

            _say("vm-sys-usb", "-> forged: a notification claiming to come from vm-ui")
            fd = os.open(tmp / "vm-sys-usb.domu", os.O_WRONLY | os.O_NOCTTY)
            try:
                os.write(fd, b'{"type":"notification","source":"vm-ui","destination":"tous",'
                             b'"payload":{"categorie":"device","evenement":"connect"}}\n')
            finally:
                os.close(fd)

            for who, client, dest, name in (
                    ("vm-diag", diag, "vm-ui", "lire_ecran"),
                    ("vm-ui", ui, "vm-absent", "lister_disques")):
                _say(who, f"-> commande {name} to {dest}")
                try:
                    await client.commande(dest, name, timeout=5)
                except CommandError as exc:
                    _say(who, f"<- error {exc.code}: {exc.message}")

            async with Client.dom0(tmp / "dom0.sock") as dom0:
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
