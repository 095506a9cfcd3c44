"""Channels under a hostile or careless peer: the fds a channel costs (a thousand
domains under the unit's LimitNOFILE), and the frames a peer sent just before it went
away (read, not lost, when the broker's write fails first)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import termios
from pathlib import Path

import pytest

from messagerie import Notification, decode, encode
from messagerie.channel import open_channel
from tests.support.socket_endpoints import broker_with_domains, connect_over_socketpair
from tests.support.waiting import async_wait_until


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Collect(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.lost: asyncio.Future[Exception | None] = (
            asyncio.get_running_loop().create_future())

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)


@pytest.mark.integration
async def test_a_pty_channel_takes_one_fd_and_gives_it_back() -> None:
    master, slave = os.openpty()
    path = os.ttyname(slave)
    os.close(slave)
    try:
        before = open_fds()
        transport, proto = await open_channel(path, Collect, exclusive=True)
        await asyncio.sleep(0)  # connection_made, reader registered
        assert open_fds() == before + 1  # the tty, no helper pipes
        # Still raw, still locked, still a channel: both ways.
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
        try:
            lflag = termios.tcgetattr(fd)[3]
            assert not lflag & (termios.ECHO | termios.ICANON | termios.ISIG)
        finally:
            os.close(fd)
        os.write(master, b"x" * 5000 + b"\n")
        await async_wait_until(lambda: len(proto.data) == 5001, what="the line")
        transport.write(b"hello\n")
        assert os.read(master, 100) == b"hello\n"
        transport.close()
        assert await asyncio.wait_for(proto.lost, 5) is None
        assert open_fds() == before
    finally:
        os.close(master)


@pytest.mark.integration
async def test_a_busy_pty_is_refused_without_leaking_fds() -> None:
    master, slave = os.openpty()
    path = os.ttyname(slave)
    try:
        transport, _ = await open_channel(path, Collect, exclusive=True)
        before = open_fds()
        with pytest.raises(OSError, match="busy"):
            await open_channel(path, Collect, exclusive=True)
        assert open_fds() == before
        transport.abort()
        await asyncio.sleep(0.01)
    finally:
        os.close(master)
        os.close(slave)


@pytest.mark.integration
async def test_the_last_frames_of_a_closed_socket_peer_are_read_when_a_write_fails(
        tmp_path: Path) -> None:
    """The peer writes its frames and closes; the broker writes to it before it has
    read them (EPIPE). What the peer sent is still routed, not lost with the socket."""
    broker = broker_with_domains(("vm-a", "vm-b"))
    eps = {}
    eps["vm-a"], theirs = await connect_over_socketpair(broker, "vm-a")
    eps["vm-b"], receiver = await connect_over_socketpair(broker, "vm-b")
    frames = [Notification("vm-a", "vm-b", "fichier", "etat", {"n": i}) for i in range(20)]
    theirs.sendall(b"".join(encode(f) for f in frames))
    theirs.close()
    # Before the loop reads vm-a's socket: the broker writes to vm-a, which fails.
    assert eps["vm-a"].transport is not None
    eps["vm-a"].transport.write(b"anything\n")
    receiver.setblocking(False)
    got = bytearray()

    def arrived() -> bool:
        with contextlib.suppress(BlockingIOError):
            got.extend(receiver.recv(65536))
        return got.count(b"\n") >= len(frames)
    await async_wait_until(arrived, what=f"{len(frames)} frames")
    assert [decode(line) for line in bytes(got).splitlines()] == frames
    assert eps["vm-a"].transport is None  # and the channel is closed
    for ep in eps.values():
        ep.detach()
    receiver.close()
