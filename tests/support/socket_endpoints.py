"""The broker in the test's own event loop, its domains on real unix sockets: each
domain's :class:`~broker.endpoint.DomainEndpoint` reads and writes one end of a
``socketpair``, as it does a ``connection=socket`` channel, and the test holds the
other end, the DomU's. For what a real socket does that a fake transport does not
(a write failing with EPIPE, a peer's last frames after it closed)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterable

from broker.config import Config, DomainConfig, Limits
from broker.endpoint import DomainEndpoint
from broker.hub import Broker


def broker_with_domains(names: Iterable[str], limits: Limits | None = None) -> Broker:
    """A broker that knows ``names`` (channel paths it never opens) and has no dom0
    socket."""
    return Broker(Config(domains={n: DomainConfig(n, f"/dev/null/{n}") for n in names},
                         dom0_socket=None, limits=limits or Limits()))


async def connect_over_socketpair(broker: Broker, name: str, *, buffer: int | None = None
                                  ) -> tuple[DomainEndpoint, socket.socket]:
    """Connect domain ``name`` to ``broker`` over a new unix socketpair: its endpoint
    is registered and connected, as a channel that has just been opened. Returns the
    endpoint and the DomU's end of the pair (blocking; the caller closes it).

    ``buffer``: SO_SNDBUF and SO_RCVBUF of both ends (Linux doubles it for its
    overhead), for a test whose counts depend on what the kernel takes: else the
    host's defaults (``net.core.wmem_default``) decide."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    if buffer is not None:
        for sock in (ours, theirs):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
    ep = DomainEndpoint(broker, name, f"/dev/null/{name}")
    broker.domains[name] = ep
    await asyncio.get_running_loop().create_unix_connection(lambda: ep, sock=ours)
    ep.connected_since = time.time()
    return ep, theirs
