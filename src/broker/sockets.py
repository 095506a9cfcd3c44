"""The unix sockets the broker listens on (dom0's services, the traffic monitors).

:func:`listen` makes the socket's directory, removes a stale socket left by a previous
run (never another kind of file, nor a socket another broker listens on: those are
mistakes to report), creates the socket with no access for anyone and only then opens
it to its mode and group: there is no window in which it exists with looser
permissions than configured.
"""

from __future__ import annotations

import asyncio
import grp
import os
import socket
import stat
from collections.abc import Callable


async def listen(path: str, factory: Callable[[], asyncio.BaseProtocol], *, mode: int,
                 group: str | None, setting: str) -> asyncio.Server:
    """A unix server at ``path``, of ``mode`` and ``group`` (``setting`` names the
    configuration key in the error about an unknown group)."""
    gid = -1
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise OSError(f"{setting}: no group named {group!r}") from None
    prepare_path(path)
    old = os.umask(0o177)
    try:
        server = await asyncio.get_running_loop().create_unix_server(factory, path)
    finally:
        os.umask(old)
    if gid != -1:
        os.chown(path, -1, gid)
    os.chmod(path, mode)
    return server


def prepare_path(path: str) -> None:
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
