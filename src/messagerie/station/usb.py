"""vm-sys-usb's reference service: the USB disks.

Disks are the mount points under a configured directory (``est_disque`` decides; by
default :func:`os.path.ismount`). The directory is watched (every ``intervalle`` s); a
disk that appears gets its file list built at once and cached, and DISQUE ``connecte``
is announced; one that goes is announced ``connecte: false``. LISTE_FICHIERS answers
from the cache.

LIT_FICHIER is answered as soon as the file is open (a missing file, a path through a
symbolic link, a file too large are error replies); the bytes then go to dom0's store in
``depot_ecrit`` chunks with their SHA-256, and the store announces FICHIER
``disponible`` or ``erreur``. COPIE_FICHIER fetches the stored file with ``depot_lit``,
writes it, reads the copy back, compares its digest with the original's and writes it
beside the copy as ``<name>.hash`` (``sha256sum`` format); a mismatch deletes the copy.
Every path is opened beneath its disk without following links (:mod:`.fs`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import log as _events
from .. import socle
from ..client import Client
from ..errors import CommandError, MessagerieError
from ..model import Commande
from ..vocabulary import Code
from . import fs
from .depot import (
    DEPOT_COMPTE_RENDU,
    DEPOT_ECRIT,
    DEPOT_LIT,
    DepotCompteRendu,
    DepotEcrit,
    DepotLit,
)

log = _events.get_logger("messagerie.station.usb")
_CHEMIN = re.compile(socle.CHEMIN_PATTERN[1:-1])
_NOM_DISQUE = re.compile(socle.NOM_DISQUE_PATTERN[1:-1])


class UsbService:
    """Serve the disks mounted under ``montages`` on vm-sys-usb's ``client`` (build it
    before opening the client; then run :meth:`watch`)."""

    def __init__(self, client: Client, montages: Path, *,
                 est_disque: Callable[[Path], bool] = os.path.ismount,
                 intervalle: float = 1.0, max_size: int = fs.MAX_FILE) -> None:
        self.client = client
        self.montages = montages
        self.est_disque = est_disque
        self.intervalle = intervalle
        self.max_size = max_size
        #: Connected disks and their cached file lists.
        self.disques: dict[str, list[str]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        socle.sert(socle.LISTE_DISQUES, client)(self.liste_disques)
        socle.sert(socle.LISTE_FICHIERS, client)(self.liste_fichiers)
        socle.sert(socle.LIT_FICHIER, client)(self.lit_fichier)
        socle.sert(socle.COPIE_FICHIER, client)(self.copie_fichier)
        socle.sert(socle.SUPPRIME_FICHIER, client)(self.supprime_fichier)

    # -- disks --

    def _present(self) -> set[str]:
        try:
            entries = list(self.montages.iterdir())
        except OSError:
            return set()
        return {p.name for p in entries
                if _NOM_DISQUE.fullmatch(p.name) and p.name != socle.DEPOT_LOCAL
                and self.est_disque(p)}

    def _scan(self, name: str) -> list[str]:
        return [f for f in fs.list_files(self.montages / name) if _CHEMIN.fullmatch(f)]

    async def rescan(self) -> None:
        """Compare the disks present with the known ones; announce what changed."""
        present = await asyncio.to_thread(self._present)
        for name in sorted(present - self.disques.keys()):
            self.disques[name] = await asyncio.to_thread(self._scan, name)
            log.info("disk.connected", disque=name, fichiers=len(self.disques[name]))
            await self.client.send(socle.DISQUE.build(self.client.name,
                                                      socle.Disque(name, True)))
        for name in sorted(self.disques.keys() - present):
            del self.disques[name]
            log.info("disk.disconnected", disque=name)
            await self.client.send(socle.DISQUE.build(self.client.name,
                                                      socle.Disque(name, False)))

    async def watch(self) -> None:
        """Rescan every ``intervalle`` seconds, until cancelled."""
        while True:
            await self.rescan()
            await asyncio.sleep(self.intervalle)

    async def idle(self) -> None:
        """Wait for the transfers in progress."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    def _root(self, nom_disque: str) -> Path:
        if nom_disque == socle.DEPOT_LOCAL:
            raise CommandError(Code.MESSAGE_INVALIDE,
                               f"arguments: {socle.DEPOT_LOCAL!r} is dom0's store, not a "
                               "disk of vm-sys-usb")
        if nom_disque not in self.disques:
            raise CommandError(socle.ERREUR_DISQUE_ABSENT, f"no disk named {nom_disque!r}")
        return self.montages / nom_disque

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _report(self, report: DepotCompteRendu) -> None:
        try:
            await socle.call(self.client, DEPOT_COMPTE_RENDU, report)
        except MessagerieError as exc:
            log.warning("store.report_failed", fichier=report.nom_fichier, error=str(exc))

    # -- the socle's commands --

    async def liste_disques(self, args: socle.ListeDisques, cmd: Commande) -> list[str]:
        return sorted(self.disques)

    async def liste_fichiers(self, args: socle.ListeFichiers, cmd: Commande) -> list[str]:
        self._root(args.nom_disque)
        return list(self.disques[args.nom_disque])

    def _open(self, root: Path, name: str) -> int:
        try:
            fd = fs.open_file(root, name)
        except FileNotFoundError:
            raise CommandError(socle.ERREUR_FICHIER_ABSENT, f"no file {name!r}") from None
        except (fs.UnsafePath, NotADirectoryError) as exc:
            raise CommandError(socle.ERREUR_CHEMIN_REFUSE, str(exc)) from None
        size = os.fstat(fd).st_size
        if size > self.max_size:
            os.close(fd)
            raise CommandError(socle.ERREUR_TROP_GRAND,
                               f"{name!r} has {size} bytes, more than {self.max_size}")
        return fd

    async def lit_fichier(self, args: socle.LitFichier, cmd: Commande) -> None:
        root = self._root(args.nom_disque)
        fd = self._open(root, args.nom_fichier)
        self._spawn(self._send_to_store(fd, args.nom_fichier))

    async def _send_to_store(self, fd: int, name: str) -> None:
        h = hashlib.sha256()
        offset = 0
        try:
            with os.fdopen(fd, "rb") as f:
                while True:
                    block = await asyncio.to_thread(f.read, fs.CHUNK)
                    if offset + len(block) > self.max_size:
                        raise CommandError(socle.ERREUR_TROP_GRAND,
                                           f"{name!r} grew past {self.max_size} bytes")
                    if block or offset == 0:
                        await socle.call(self.client, DEPOT_ECRIT, DepotEcrit(
                            name, offset, base64.b64encode(block).decode()))
                    h.update(block)
                    offset += len(block)
                    if not block:
                        break
        except (OSError, MessagerieError) as exc:
            await self._report(DepotCompteRendu(name, "lecture", erreur=str(exc)[:500]))
            return
        await self._report(DepotCompteRendu(name, "lecture", empreinte=h.hexdigest()))

    async def copie_fichier(self, args: socle.CopieFichier, cmd: Commande) -> None:
        root = self._root(args.nom_disque_destination)
        first = await socle.call(self.client, DEPOT_LIT, DepotLit(args.nom_fichier, 0))
        try:
            fd = fs.open_file(root, args.nom_fichier, write=True, create_dirs=True)
        except (fs.UnsafePath, NotADirectoryError) as exc:
            raise CommandError(socle.ERREUR_CHEMIN_REFUSE, str(exc)) from None
        self._spawn(self._copy_from_store(fd, root, args, first))

    async def _copy_from_store(self, fd: int, root: Path, args: socle.CopieFichier,
                               chunk: Any) -> None:
        name, disk = args.nom_fichier, args.nom_disque_destination
        try:
            with os.fdopen(fd, "wb") as f:
                offset = 0
                while True:
                    data = base64.b64decode(chunk.donnees, validate=True)
                    await asyncio.to_thread(f.write, data)
                    offset += len(data)
                    if chunk.fin or not data:
                        break
                    chunk = await socle.call(self.client, DEPOT_LIT, DepotLit(name, offset))
            copied, _ = await asyncio.to_thread(fs.digest, root, name, self.max_size)
            if copied != chunk.empreinte:
                with contextlib.suppress(OSError, fs.UnsafePath):
                    fs.remove(root, name)
                await self._report(DepotCompteRendu(
                    name, "copie", empreinte=copied, nom_disque=disk,
                    erreur=f"digest mismatch: the copy is {copied}, the original "
                           f"{chunk.empreinte}; copy deleted"))
                return
            # Inside the try: a .hash that cannot be written (a link on the stick, a
            # full stick) fails the copy with a report, not the task in silence.
            hash_name = f"{name}.hash"
            await asyncio.to_thread(fs.write_file, root, hash_name,
                                    f"{copied}  {name.rsplit('/', 1)[-1]}\n".encode())
        except (OSError, ValueError, MessagerieError) as exc:
            with contextlib.suppress(OSError, fs.UnsafePath):
                fs.remove(root, name)
            await self._report(DepotCompteRendu(name, "copie", nom_disque=disk,
                                                erreur=f"copy failed: {exc}"[:500]))
            return
        files = self.disques.get(disk)
        if files is not None:
            self.disques[disk] = sorted({*files, name, hash_name})
        await self._report(DepotCompteRendu(name, "copie", empreinte=copied, nom_disque=disk))

    async def supprime_fichier(self, args: socle.SupprimeFichier, cmd: Commande) -> None:
        root = self._root(args.nom_disque)
        try:
            await asyncio.to_thread(fs.remove, root, args.nom_fichier)
        except FileNotFoundError:
            raise CommandError(socle.ERREUR_FICHIER_ABSENT,
                               f"no file {args.nom_fichier!r} on {args.nom_disque}") from None
        except (fs.UnsafePath, NotADirectoryError) as exc:
            raise CommandError(socle.ERREUR_CHEMIN_REFUSE, str(exc)) from None
        files = self.disques.get(args.nom_disque)
        if files is not None:
            self.disques[args.nom_disque] = [f for f in files if f != args.nom_fichier]
        await self._report(DepotCompteRendu(args.nom_fichier, "suppression",
                                            nom_disque=args.nom_disque))
