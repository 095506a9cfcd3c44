"""The dom0 store service (the "dépôt local"): it keeps the files vm-sys-usb reads from
disks, with their SHA-256 digests, and announces every file state (FICHIER comes from
dom0 only).

vm-sys-usb cannot write into dom0's file system: the bytes travel as messages, like
everything else between domains. Three commands of the station's own, served here and
allowed by the policy from vm-sys-usb only, carry them:

* ``depot_ecrit`` ``{nom_fichier, decalage, donnees}``: a chunk (base64) of a file being
  read from a disk; offset 0 starts it over;
* ``depot_lit`` ``{nom_fichier, decalage}``: a chunk of a stored file, with its size and
  the digest recorded when it was read (for COPIE_FICHIER);
* ``depot_compte_rendu`` ``{nom_fichier, operation, empreinte?, nom_disque?, erreur?}``:
  what vm-sys-usb did (``lecture``: the read is complete, its digest is this: the store
  compares it with its own digest of what arrived; ``copie``: the copy on disk has this
  digest: the store compares it with the original's; ``suppression``: deleted from a
  disk). The store then announces FICHIER ``disponible``, ``copié``, ``supprimé`` or
  ``erreur`` with the reason.

It also serves SUPPRIME_FICHIER and LISTE_FICHIERS for the disk ``local``.

Layout under the store's root: ``fichiers/<path>`` the files, ``empreintes/<path>`` their
digests (hex), ``entrant/`` files being received.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Final, Literal

import msgspec

from .. import socle
from ..client import Client
from ..errors import CommandError
from ..model import DOM0, Commande
from ..vocabulary import Code
from . import fs

Empreinte = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]
Decalage = Annotated[int, msgspec.Meta(ge=0)]
Donnees = Annotated[str, msgspec.Meta(max_length=4 * (fs.CHUNK // 3 + 1))]


class DepotEcrit(msgspec.Struct):
    nom_fichier: socle.Chemin
    decalage: Decalage
    donnees: Donnees


class DepotLit(msgspec.Struct):
    nom_fichier: socle.Chemin
    decalage: Decalage


class Morceau(msgspec.Struct):
    """A chunk of a stored file: ``donnees`` (base64), ``fin`` when it is the last, the
    file's ``taille`` and the ``empreinte`` recorded when it was read."""

    donnees: str
    fin: bool
    taille: int
    empreinte: Empreinte


class DepotCompteRendu(msgspec.Struct, omit_defaults=True):
    nom_fichier: socle.Chemin
    operation: Literal["lecture", "copie", "suppression"]
    empreinte: Empreinte | None = None
    nom_disque: socle.NomDisque | None = None
    erreur: Annotated[str, msgspec.Meta(max_length=500)] | None = None


DEPOT_ECRIT: Final = socle.CommandSpec[DepotEcrit, None](
    "DEPOT_ECRIT", "depot_ecrit", DepotEcrit, None, DOM0,
    "The station's: a chunk of a file read from a disk, into the store.")
DEPOT_LIT: Final = socle.CommandSpec[DepotLit, Morceau](
    "DEPOT_LIT", "depot_lit", DepotLit, Morceau, DOM0,
    "The station's: a chunk of a stored file, to copy it to a disk.")
DEPOT_COMPTE_RENDU: Final = socle.CommandSpec[DepotCompteRendu, None](
    "DEPOT_COMPTE_RENDU", "depot_compte_rendu", DepotCompteRendu, None, DOM0,
    "The station's: what vm-sys-usb did (lecture, copie, suppression); dom0 announces it.")
TRANSFER_COMMANDS: Final = (DEPOT_ECRIT, DEPOT_LIT, DEPOT_COMPTE_RENDU)


@dataclass
class _Incoming:
    path: Path
    file: object
    hasher: hashlib._Hash
    size: int = 0


class DepotService:
    """Serve the store at ``racine`` on a dom0 ``client`` (register before opening it).

    Only ``usb`` (vm-sys-usb) may feed it; files over ``max_size`` bytes are refused;
    at most ``max_incoming`` files are received at once."""

    def __init__(self, client: Client, racine: Path, *, usb: str = socle.VM_SYS_USB,
                 max_size: int = fs.MAX_FILE, max_incoming: int = 8) -> None:
        self.client = client
        self.racine = racine
        self.fichiers = racine / "fichiers"
        self.empreintes = racine / "empreintes"
        self.entrant = racine / "entrant"
        for d in (self.fichiers, self.empreintes, self.entrant):
            d.mkdir(parents=True, exist_ok=True)
        self.usb = usb
        self.max_size = max_size
        self.max_incoming = max_incoming
        self._incoming: dict[str, _Incoming] = {}
        socle.sert(DEPOT_ECRIT, client)(self.depot_ecrit)
        socle.sert(DEPOT_LIT, client)(self.depot_lit)
        socle.sert(DEPOT_COMPTE_RENDU, client)(self.depot_compte_rendu)
        socle.sert(socle.SUPPRIME_FICHIER, client)(self.supprime_fichier)
        socle.sert(socle.LISTE_FICHIERS, client)(self.liste_fichiers)

    # -- announcing --

    async def announce(self, fichier: str, etat: Literal["disponible", "erreur", "copié",
                                                          "supprimé"],
                       message: str | None = None) -> None:
        await self.client.send(socle.FICHIER.build(DOM0, socle.Fichier(fichier, etat, message)))

    def _from_usb(self, cmd: Commande) -> None:
        if cmd.source != self.usb:
            raise CommandError(Code.REFUSE, f"only {self.usb} feeds the store")

    # -- the transfer commands --

    def _drop(self, name: str) -> None:
        inc = self._incoming.pop(name, None)
        if inc is not None:
            inc.file.close()  # type: ignore[attr-defined]
            inc.path.unlink(missing_ok=True)

    async def depot_ecrit(self, args: DepotEcrit, cmd: Commande) -> None:
        self._from_usb(cmd)
        try:
            data = base64.b64decode(args.donnees, validate=True)
        except (binascii.Error, ValueError):
            raise CommandError(Code.MESSAGE_INVALIDE, "arguments.donnees: not base64") from None
        if args.decalage == 0:
            self._drop(args.nom_fichier)
            if len(self._incoming) >= self.max_incoming:
                raise CommandError(Code.LIMITE, f"{self.max_incoming} files already arriving")
            fd, tmp = tempfile.mkstemp(dir=self.entrant)
            self._incoming[args.nom_fichier] = _Incoming(Path(tmp), os.fdopen(fd, "wb"),
                                                         hashlib.sha256())
        inc = self._incoming.get(args.nom_fichier)
        if inc is None or args.decalage != inc.size:
            expected = 0 if inc is None else inc.size
            raise CommandError(Code.MESSAGE_INVALIDE,
                               f"arguments.decalage: expected {expected}, got {args.decalage}")
        if inc.size + len(data) > self.max_size:
            self._drop(args.nom_fichier)
            raise CommandError(socle.ERREUR_TROP_GRAND,
                               f"{args.nom_fichier} is larger than {self.max_size} bytes")
        inc.file.write(data)  # type: ignore[attr-defined]
        inc.hasher.update(data)
        inc.size += len(data)

    async def depot_lit(self, args: DepotLit, cmd: Commande) -> Morceau:
        self._from_usb(cmd)
        try:
            fd = fs.open_file(self.fichiers, args.nom_fichier)
            try:
                empreinte = self._recorded(args.nom_fichier)
            except BaseException:
                os.close(fd)  # a file whose digest is missing or unsafe: not kept open
                raise
        except FileNotFoundError:
            raise CommandError(socle.ERREUR_FICHIER_ABSENT,
                               f"{args.nom_fichier} is not in the store") from None
        except fs.UnsafePath as exc:
            raise CommandError(socle.ERREUR_CHEMIN_REFUSE, str(exc)) from None
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(args.decalage)
            data = f.read(fs.CHUNK)
        return Morceau(base64.b64encode(data).decode(), args.decalage + len(data) >= size,
                       size, empreinte)

    def _recorded(self, name: str) -> str:
        fd = fs.open_file(self.empreintes, name)
        with os.fdopen(fd) as f:
            return f.read(64)

    async def depot_compte_rendu(self, args: DepotCompteRendu, cmd: Commande) -> None:
        self._from_usb(cmd)
        name = args.nom_fichier
        if args.operation == "lecture":
            inc = self._incoming.pop(name, None)
            if args.erreur is not None or inc is None:
                if inc is not None:
                    inc.file.close()  # type: ignore[attr-defined]
                    inc.path.unlink(missing_ok=True)
                await self.announce(name, "erreur", args.erreur or "nothing was received")
                return
            inc.file.close()  # type: ignore[attr-defined]
            received = inc.hasher.hexdigest()
            if received != args.empreinte:
                inc.path.unlink(missing_ok=True)
                await self.announce(name, "erreur", f"digest mismatch: the store received "
                                    f"{received}, vm-sys-usb read {args.empreinte}")
                return
            try:
                await asyncio.to_thread(self._commit, inc.path, name, received)
            except (OSError, fs.UnsafePath) as exc:
                inc.path.unlink(missing_ok=True)
                await self.announce(name, "erreur", f"cannot store it: {exc}")
                return
            await self.announce(name, "disponible")
        elif args.operation == "copie":
            if args.erreur is not None:
                await self.announce(name, "erreur", args.erreur)
                return
            try:
                original = self._recorded(name)
            except (OSError, fs.UnsafePath):
                await self.announce(name, "erreur", "no digest recorded in the store")
                return
            if original != args.empreinte:
                await self.announce(name, "erreur", f"digest mismatch: the copy on "
                                    f"{args.nom_disque} is {args.empreinte}, the original "
                                    f"{original}")
                return
            await self.announce(name, "copié")
        else:
            await self.announce(name, "erreur" if args.erreur else "supprimé", args.erreur)

    def _commit(self, tmp: Path, name: str, empreinte: str) -> None:
        fs.rename_into(tmp, self.fichiers, name)
        fs.write_file(self.empreintes, name, empreinte.encode() + b"\n")

    # -- the socle's commands on "local" --

    async def supprime_fichier(self, args: socle.SupprimeFichier, cmd: Commande) -> None:
        if args.nom_disque != socle.DEPOT_LOCAL:
            raise CommandError(Code.MESSAGE_INVALIDE,
                               f"arguments.nom_disque: dom0 deletes from "
                               f"{socle.DEPOT_LOCAL!r} only; {args.nom_disque!r} is "
                               f"{self.usb}'s")
        try:
            fs.remove(self.fichiers, args.nom_fichier)
        except FileNotFoundError:
            raise CommandError(socle.ERREUR_FICHIER_ABSENT,
                               f"{args.nom_fichier} is not in the store") from None
        except (fs.UnsafePath, NotADirectoryError) as exc:
            raise CommandError(socle.ERREUR_CHEMIN_REFUSE, str(exc)) from None
        with contextlib.suppress(OSError, fs.UnsafePath):
            fs.remove(self.empreintes, args.nom_fichier)
        await self.announce(args.nom_fichier, "supprimé")

    async def liste_fichiers(self, args: socle.ListeFichiers, cmd: Commande) -> list[str]:
        if args.nom_disque != socle.DEPOT_LOCAL:
            raise CommandError(Code.MESSAGE_INVALIDE,
                               f"arguments.nom_disque: dom0 lists {socle.DEPOT_LOCAL!r} only")
        return await asyncio.to_thread(fs.list_files, self.fichiers)
