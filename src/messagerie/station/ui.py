"""A small UI-domain client of the socle: list the disks and their files, read one file
into dom0's store, copy it to another disk, delete it from the store. Each step is a
typed call of :mod:`messagerie.socle`; ``say`` is told what happens."""

from __future__ import annotations

from collections.abc import Callable

from .. import socle
from ..client import Client


async def tour(client: Client, *, copie_vers: str | None = None,
               say: Callable[[str], None] = print) -> int:
    """List, read the first file of the first disk, copy it to ``copie_vers`` (when
    given), delete it from the store. Returns 0, or 1 when there is nothing to read."""
    disques = await socle.liste_disques(client)
    say(f"disks: {disques}")
    for disque in disques:
        say(f"{disque}: {await socle.liste_fichiers(client, disque)}")
    source = next((d for d in disques if d != copie_vers), None)
    fichiers = await socle.liste_fichiers(client, source) if source else []
    if not fichiers:
        say("nothing to read")
        return 1
    lu = await socle.lit_fichier(client, source, fichiers[0])  # type: ignore[arg-type]
    say(f"read {lu.fichier}: {lu.etat}")
    if copie_vers is not None:
        copie = await socle.copie_fichier(client, fichiers[0], copie_vers)
        say(f"copied {copie.fichier} to {copie_vers}: {copie.etat}")
    supprime = await socle.supprime_fichier(client, fichiers[0])
    say(f"deleted {supprime.fichier} from the store: {supprime.etat}")
    return 0
