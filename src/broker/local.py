"""dom0's side of the broker: a unix socket where dom0 services connect as ``dom0``.

Access is by file permission (mode and group of the socket); the peer's pid, uid and
gid (SO_PEERCRED) are logged with every event of the connection.

Who receives what when several dom0 services are connected:

* a ``commande`` to ``dom0``: the broker answers its built-ins (``ping``, ``domaines``,
  ``statistiques``) itself; any other name goes to the one service that registered it
  with ``enregistrer`` (a name is served by one service at a time: a second
  registration is refused); nobody registered it: ``commande_inconnue``;
* a ``reponse`` to ``dom0``: to the service that sent the command with that ``id``
  (the broker remembers who asked; see ``Broker.receive``);
* a ``notification`` or ``journal`` to ``dom0`` or ``tous``: to every connected service
  (never back to the one that sent it); a ``journal`` is also written to the
  broker's log as a ``domain.journal`` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import socket
import stat
import struct
from typing import TYPE_CHECKING, Any

from messagerie import DOM0, Code, Commande, Reponse, encode
from messagerie.envelope import Envelope

from .endpoint import Peer
from .router import BUILTINS, Routable

if TYPE_CHECKING:
    from .core import Broker


class LocalConnection(Peer):
    """One dom0 service connected to the local socket."""

    kind = "dom0"

    def __init__(self, broker: Broker, hub: Dom0Hub) -> None:
        super().__init__(broker, DOM0)
        self.hub = hub
        self.serves: set[str] = set()
        self.creds: dict[str, int] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                      struct.calcsize("3i"))
                pid, uid, gid = struct.unpack("3i", raw)
                self.creds = {"pid": pid, "uid": uid, "gid": gid}
        self.log = self.log.bind(service_pid=self.creds.get("pid"),
                                 service_uid=self.creds.get("uid"))
        self.hub.clients.add(self)
        self.log.info("dom0.service_connected", **self.creds)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.hub.clients.discard(self)
        for name in self.serves:
            if self.hub.services.get(name) is self:
                del self.hub.services[name]
        self.log.info("dom0.service_disconnected", served=sorted(self.serves))
        self.broker.local_gone(self)


class Dom0Hub:
    """Delivery to dom0: built-ins, registered services, and local fan-out."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.clients: set[LocalConnection] = set()
        self.services: dict[str, LocalConnection] = {}
        self.server: asyncio.AbstractServer | None = None
        self.path: str | None = None
        self.received_journal = 0

    async def start(self, path: str, mode: int, group: str | None) -> None:
        _prepare_socket_path(path)
        loop = asyncio.get_running_loop()
        # Create it with no access for anyone, then open it up: no window where the
        # socket exists with looser permissions than configured.
        old = os.umask(0o177)
        try:
            self.server = await loop.create_unix_server(
                lambda: LocalConnection(self.broker, self), path)
        finally:
            os.umask(old)
        if group is not None:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise OSError(f"dom0.groupe: no group named {group!r}") from None
            os.chown(path, -1, gid)
        os.chmod(path, mode)
        self.path = path

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            # Abort, not close: close() waits for a service that may never read again,
            # and from Python 3.12 wait_closed() waits for every connection.
            for conn in list(self.clients):
                if conn.transport is not None:
                    conn.transport.abort()
            await self.server.wait_closed()
            self.server = None
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def deliver(self, msg: Envelope, data: bytes, origin: Peer) -> None:
        kind = msg.type
        if kind == "commande":
            name = msg.name
            if name in BUILTINS:
                # The broker reads this one itself: the whole message, arguments too.
                cmd = self.broker.complete(origin, msg)
                if cmd is not None:
                    origin.send(encode(self.broker.builtin(cmd, origin)))  # type: ignore[arg-type]
                return
            server = self.services.get(name)  # type: ignore[arg-type]
            if server is None:
                self.broker.answer(origin, msg, Code.COMMANDE_INCONNUE,
                                   f"no dom0 service serves {name!r}")
            elif not server.send(data, origin):
                self.broker._dropped(origin, server, msg)
            return
        if kind == "journal":
            self.received_journal += 1
            journal = self.broker.complete(origin, msg)
            if journal is None:
                return
            self.broker.journal(journal, origin)  # type: ignore[arg-type]
        self.broadcast_local(data, exclude=origin, msg=msg)

    def broadcast_local(self, data: bytes, exclude: Peer | None,
                        msg: Routable | None = None) -> None:
        """To every dom0 service but ``exclude`` (the sender, whose reading is held
        back while a service is full, as for a domain). Drops are counted and logged."""
        for conn in self.clients:
            if conn is not exclude and not conn.send(data, exclude) and msg is not None:
                self.broker._dropped(exclude or conn, conn, msg)

    def register(self, cmd: Commande, conn: LocalConnection) -> Reponse:
        names = cmd.arguments.get("commandes")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            return cmd.fail(Code.MESSAGE_INVALIDE, "arguments.commandes: expected a list of names")
        taken = [n for n in names if n in BUILTINS or
                 (n in self.services and self.services[n] is not conn)]
        if taken:
            return cmd.fail(Code.REFUSE, f"already served: {', '.join(sorted(taken))}")
        for name in names:
            self.services[name] = conn
            conn.serves.add(name)
        conn.log.info("dom0.service_registered", commands=sorted(names))
        return cmd.reply({"commandes": sorted(conn.serves)})

    def statistics(self) -> dict[str, Any]:
        return {"services": len(self.clients),
                "commandes": {n: c.creds.get("pid") for n, c in sorted(self.services.items())},
                "journal": self.received_journal}


def _prepare_socket_path(path: str) -> None:
    """Create the socket's directory; remove a stale socket from a previous run (but
    never another kind of file: that is a configuration mistake to report)."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: a stale socket from a previous run
        return
    finally:
        probe.close()
    raise FileExistsError(f"{path}: another broker is listening there")
