"""A dom0 service for the xen tier, run in dom0 on the broker's local socket:

    xen_peer.py SOCKET ping
    xen_peer.py SOCKET listen CATEGORIE COUNT [SENTINEL_EVENT]   one JSON line when done
    xen_peer.py SOCKET send DESTINATION CATEGORIE COUNT
    xen_peer.py SOCKET command DESTINATION COMMANDE

``listen`` prints when COUNT notifications of CATEGORIE arrived, or (with a sentinel)
when one with that ``evenement`` arrived: the ``seq`` numbers received, in order, and
the time from the first to the last.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from messagerie import Client, CommandError


async def main(socket: str, mode: str, *args: str) -> dict[str, Any]:
    async with Client.dom0(socket, timeout=120, connect_timeout=120) as svc:
        if mode == "ping":
            rep = await svc.commande("dom0", "ping")
            return {"resultat": rep.resultat}
        if mode == "listen":
            categorie, count = args[0], int(args[1])
            sentinel = args[2] if len(args) > 2 else None
            stream = svc.messages(categorie=categorie)
            print(json.dumps({"listening": True}), flush=True)
            seqs: list[int] = []
            first = last = 0.0
            while True:
                msg = await stream.get(timeout=600)
                if msg is None:
                    break
                last = time.monotonic()
                first = first or last
                if sentinel and msg.evenement == sentinel:
                    break
                seqs.append(msg.data["seq"])
                if not sentinel and len(seqs) >= count:
                    break
            return {"seqs": seqs, "seconds": round(last - first, 3), "source": msg.source}
        if mode == "send":
            destination, categorie, count = args[0], args[1], int(args[2])
            started = time.monotonic()
            for seq in range(count):
                await svc.notify(destination, categorie, "seq", {"seq": seq})
            return {"seconds": round(time.monotonic() - started, 3)}
        if mode == "command":
            try:
                rep = await svc.commande(args[0], args[1], {"q": "dom0"}, timeout=120)
            except CommandError as exc:
                return {"erreur": exc.code}
            return {"resultat": rep.resultat, "source": rep.source}
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(*sys.argv[1:]))), flush=True)
