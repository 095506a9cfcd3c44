"""dom0's side of the broker: a unix socket where dom0 services connect as ``dom0``.

Access is by file permission (mode and group of the socket); the peer's pid, uid and
gid (SO_PEERCRED) are logged with every event of the connection.

This module holds the socket (:class:`Dom0Socket`), its connections
(:class:`Dom0Connection`) and the registry of who is connected and who serves which
command (:class:`Dom0Services`). Who receives what is decided by the router
(``broker.router``, rules 2, 3, 6 to 8) and applied by the broker:

* a ``commande`` to ``dom0``: the broker answers its built-ins (``ping``, ``domaines``,
  ``statistiques``, ``enregistrer``) itself; any other name goes to the one service
  that registered it with ``enregistrer`` (a name is served by one service at a time:
  a second registration is refused); nobody registered it: ``commande_inconnue``;
* a ``reponse`` to ``dom0``: to the service that sent the command with that ``id``;
* a ``notification`` or ``journal`` to ``dom0`` or ``tous``: to every connected service
  (never back to the one that sent it); a ``journal`` is also written to the
  broker's log as a ``domain.journal`` event.

Nothing here imports the broker: a connection knows it as a :class:`Dom0Sink`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import struct
from typing import Any, Protocol

from messagerie import DOM0, Code, Commande, Reponse
from messagerie.model import TOKEN_PATTERN

from .endpoint import Endpoint, Sink, Stats
from .router import BUILTINS
from .sockets import listen

_COMMAND_NAME = re.compile(TOKEN_PATTERN[1:-1])
"""What a ``commande``'s name may be (the wire's token pattern)."""


class Dom0Sink(Sink, Protocol):
    """What a dom0 connection knows of the broker: an endpoint's :class:`Sink`, told
    also when a service goes (its commands in flight are answered)."""

    def service_gone(self, conn: Dom0Connection) -> None: ...


class Dom0Services:
    """Who is connected to dom0's socket, and which service serves which command."""

    def __init__(self) -> None:
        self.clients: set[Dom0Connection] = set()
        self.services: dict[str, Dom0Connection] = {}
        self.received_journal = 0
        """``journal`` messages to dom0, for ``statistiques``."""

    def register(self, cmd: Commande, conn: Dom0Connection) -> Reponse:
        """The ``enregistrer`` command: ``conn`` serves these names from now on, unless
        one is a built-in or already served by another connection."""
        names = cmd.arguments.get("commandes")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            return cmd.fail(Code.MESSAGE_INVALIDE, "arguments.commandes: expected a list of names")
        # A name no commande can carry would be served by nobody, forever.
        bad = [n for n in names if _COMMAND_NAME.fullmatch(n) is None]
        if bad:
            shown = ", ".join(repr(n[:80]) for n in bad[:5])
            return cmd.fail(Code.MESSAGE_INVALIDE, f"arguments.commandes: {shown} cannot "
                            f"name a command (names match {TOKEN_PATTERN})")
        taken = [n for n in names if n in BUILTINS or
                 (n in self.services and self.services[n] is not conn)]
        if taken:
            return cmd.fail(Code.REFUSE, f"already served: {', '.join(sorted(taken))}")
        for name in names:
            self.services[name] = conn
            conn.serves.add(name)
        conn.log.info("dom0.service_registered", commands=sorted(names))
        return cmd.reply({"commandes": sorted(conn.serves)})

    def remove(self, conn: Dom0Connection) -> None:
        self.clients.discard(conn)
        for name in conn.serves:
            if self.services.get(name) is conn:
                del self.services[name]

    def statistics(self) -> dict[str, Any]:
        """The services, what they serve, and the counters of the connected ones
        together (``recus``, ``perdus``, ...: a domain's, plus ``file``)."""
        counters = {**Stats().as_dict(), "file": 0}
        for conn in self.clients:
            for key, value in conn.stats.as_dict().items():
                counters[key] += value
            counters["file"] += conn.queued()
        return {"services": len(self.clients),
                "commandes": {n: c.creds.get("pid") for n, c in sorted(self.services.items())},
                "journal": self.received_journal, **counters}


class Dom0Connection(Endpoint):
    """One dom0 service connected to the local socket."""

    kind = "dom0"

    def __init__(self, sink: Dom0Sink, services: Dom0Services) -> None:
        super().__init__(sink, DOM0)
        self.dom0_sink = sink
        self.registry = services
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
        self.registry.clients.add(self)
        self.log.info("dom0.service_connected", **self.creds)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.registry.remove(self)
        self.log.info("dom0.service_disconnected", served=sorted(self.serves))
        self.dom0_sink.service_gone(self)


class Dom0Socket:
    """The listening socket: one :class:`Dom0Connection` per dom0 service."""

    def __init__(self, sink: Dom0Sink, services: Dom0Services) -> None:
        self.sink = sink
        self.services = services
        self.server: asyncio.AbstractServer | None = None
        self.path: str | None = None

    async def start(self, path: str, mode: int, group: str | None) -> None:
        self.server = await listen(path, lambda: Dom0Connection(self.sink, self.services),
                                   mode=mode, group=group, setting="dom0.groupe")
        self.path = path

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            # Abort, not close: close() waits for a service that may never read again,
            # and from Python 3.12 wait_closed() waits for every connection.
            for conn in list(self.services.clients):
                if conn.transport is not None:
                    conn.transport.abort()
            await self.server.wait_closed()
            self.server = None
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
