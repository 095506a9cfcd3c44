"""A small UI-domain client of the socle: list the disks and their files, read one file
into dom0's store, copy it to another disk, delete it from the store. Each step is a
typed call of :mod:`messagerie.socle`; ``say`` is told what happens."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .. import socle
from ..client import Client


async def wait_for_disks(client: Client, count: int, timeout: float) -> list[str]:  # noqa: ASYNC109
    """The connected disks once there are at least ``count`` (asked again on every
    DISQUE notification, so none is missed); ``TimeoutError`` after ``timeout`` s."""
    stream = client.messages(type="notification", categorie=socle.DISQUE.categorie)
    try:
        async with asyncio.timeout(timeout):
            while len(disques := await socle.liste_disques(client)) < count:
                await anext(stream)
            return disques
    finally:
        stream.close()


async def tour(client: Client, *, copie_vers: str | None = None, attendre: int = 0,
               timeout: float = 30.0, say: Callable[[str], None] = print) -> int:  # noqa: ASYNC109
    """List (after waiting for ``attendre`` disks), read the first file of the first
    disk into the store, copy it to ``copie_vers`` (when given), delete it from the
    store. Returns 0, or 1 when there is nothing to read."""
    disques = await wait_for_disks(client, attendre, timeout)
    say(f"disks: {disques}")
    for disque in disques:
        say(f"{disque}: {await socle.liste_fichiers(client, disque)}")
    source = next((d for d in disques if d != copie_vers), None)
    fichiers = await socle.liste_fichiers(client, source) if source else []
    if source is None or not fichiers:
        say("nothing to read")
        return 1
    lu = await socle.lit_fichier(client, source, fichiers[0], timeout=timeout)
    say(f"read {source}:{lu.fichier} into the store: {lu.etat}")
    if copie_vers is not None:
        copie = await socle.copie_fichier(client, fichiers[0], copie_vers, timeout=timeout)
        say(f"copied {copie.fichier} to {copie_vers}: {copie.etat}")
    supprime = await socle.supprime_fichier(client, fichiers[0], timeout=timeout)
    say(f"deleted {supprime.fichier} from the store: {supprime.etat}")
    return 0
