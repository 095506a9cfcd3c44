"""``python -m messagerie.station usb|depot|ui``: run one of the station's services."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path

from ..client import DOM0_SOCKET, Client
from ..errors import MessagerieError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m messagerie.station",
                                description="The clean station's reference services.")
    sub = p.add_subparsers(dest="service", required=True)
    usb = sub.add_parser("usb", help="vm-sys-usb: the disks mounted under a directory")
    usb.add_argument("--montages", type=Path, required=True, help="the USB mount directory")
    usb.add_argument("--dossiers", action="store_true",
                     help="every directory is a disk, not only mount points (tests, demos)")
    usb.add_argument("--intervalle", type=float, default=1.0, help="rescan period (s)")
    depot = sub.add_parser("depot", help="dom0: the store (depot local)")
    depot.add_argument("--racine", type=Path, required=True, help="the store's directory")
    depot.add_argument("--socket", type=Path, default=DOM0_SOCKET,
                       help=f"the broker's dom0 socket (default {DOM0_SOCKET})")
    ui = sub.add_parser("ui", help="a UI domain: list, read, copy, delete")
    ui.add_argument("--copie-vers", metavar="DISK", help="copy the file read to this disk")
    ui.add_argument("--attendre", metavar="N", type=int, default=0,
                    help="first wait until N disks are connected")
    for q in (usb, ui):
        q.add_argument("--nom", help="this domain's name (default: /etc/messagerie/domaine)")
        q.add_argument("--chemin", type=Path, help="the channel (default /dev/hvc1)")
    return p


async def _run(args: argparse.Namespace) -> int:
    if args.service == "depot":
        from .depot import DepotService
        client = Client.dom0(args.socket)
        DepotService(client, args.racine)
        async with client:
            await client.serve_forever()
        return 0
    client = Client(args.nom, path=args.chemin)
    if args.service == "ui":
        from .ui import tour
        async with client:
            try:
                return await tour(client, copie_vers=args.copie_vers, attendre=args.attendre)
            except (MessagerieError, TimeoutError) as exc:
                print(f"station ui: {exc}", file=sys.stderr)
                return 1
    from .usb import UsbService
    service = UsbService(client, args.montages, intervalle=args.intervalle)
    if args.dossiers:
        service.est_disque = Path.is_dir
    async with client:
        await service.watch()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_run(args))
    return 130


if __name__ == "__main__":
    sys.exit(main())
