# ruff: noqa: ASYNC109  (test helpers: explicit timeouts read best here)
"""Test helpers for the client and CLI tests: real socat pty pairs and fake peers.

A test plays the broker's side of a channel: it opens the other end of a socat pty
pair (or serves a unix socket) and reads and writes frames there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from messagerie.codec import FrameDecoder, FrameError, encode
from messagerie.model import Message

SOCAT = "/usr/bin/socat"


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0,
               what: str = "condition") -> None:
    """Poll ``predicate`` until true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


async def async_wait_until(predicate: Callable[[], bool], timeout: float = 5.0,
                           what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class SocatPair:
    """``socat pty,raw,echo=0,link=A pty,raw,echo=0,link=B``: the client opens ``a``
    (the DomU end), the test's peer opens ``b`` (the broker's end)."""

    def __init__(self, directory: Path, name: str = "chan") -> None:
        self.a = directory / f"{name}.domu"
        self.b = directory / f"{name}.dom0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SocatPair:
        self.proc = subprocess.Popen(
            [SOCAT, "-d", "-d", f"pty,raw,echo=0,link={self.a}",
             f"pty,raw,echo=0,link={self.b}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: self.a.exists() and self.b.exists(), what="socat pty links")
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        wait_until(lambda: not self.a.is_symlink() and not self.b.is_symlink(),
                   what="socat links removed")


class Peer:
    """The other end of a channel, driven by the test: a pty fd or a socket stream."""

    def __init__(self) -> None:
        self.decoder = FrameDecoder()
        self.inbox: asyncio.Queue[Message | FrameError] = asyncio.Queue()
        self.raw = bytearray()
        self.closed = asyncio.Event()

    def _feed(self, data: bytes) -> None:
        self.raw += data
        for item in self.decoder.feed(data):
            self.inbox.put_nowait(item)

    async def recv(self, timeout: float = 5.0) -> Message:
        item = await asyncio.wait_for(self.inbox.get(), timeout)
        assert isinstance(item, Message), item
        return item

    async def expect_nothing(self, within: float = 0.2) -> None:
        """Assert that no frame arrives for ``within`` seconds (a negative check)."""
        with contextlib.suppress(TimeoutError):
            item = await asyncio.wait_for(self.inbox.get(), within)
            raise AssertionError(f"unexpected frame {item!r}")

    def send(self, msg: Message) -> None:
        self.write(encode(msg))

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    async def serve(self, answer: Callable[[Message], Awaitable[Message | None]]) -> None:
        """Answer every incoming message with ``answer(msg)`` (when not None)."""
        while True:
            msg = await self.recv(timeout=3600)
            rep = await answer(msg)
            if rep is not None:
                self.send(rep)


class PtyPeer(Peer):
    """Reads and writes a tty path (the dom0 end of a socat pair) without blocking."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.loop.remove_reader(self.fd)
            self.closed.set()
            return
        self._feed(data)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + 5
        while view:
            try:
                n = os.write(self.fd, view)
            except BlockingIOError:
                n = 0
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.001)
            view = view[n:]

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1


class SocketPeer(Peer):
    """One accepted connection on a unix socket served by the test."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 reading: bool = True) -> None:
        super().__init__()
        self.writer = writer
        #: Cleared, the peer stops reading (to fill the client's buffers).
        self.reading = asyncio.Event()
        if reading:
            self.reading.set()
        self.task = asyncio.create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            await self.reading.wait()
            data = await reader.read(65536)
            if not data:
                break
            self._feed(data)
        self.closed.set()

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    def close(self) -> None:
        self.writer.close()
        self.task.cancel()


class SocketServer:
    """A unix socket listening like the broker's dom0 socket; each connection is a
    :class:`SocketPeer` put on ``peers``."""

    def __init__(self, path: Path, reading: bool = True) -> None:
        self.path = path
        self.reading = reading
        self.peers: asyncio.Queue[SocketPeer] = asyncio.Queue()
        self.server: asyncio.Server | None = None
        self.all: list[SocketPeer] = []

    async def start(self) -> SocketServer:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peer = SocketPeer(reader, writer, self.reading)
            self.all.append(peer)
            await self.peers.put(peer)

        self.server = await asyncio.start_unix_server(accept, str(self.path))
        return self

    async def accept(self, timeout: float = 5.0) -> SocketPeer:
        return await asyncio.wait_for(self.peers.get(), timeout)

    async def stop(self) -> None:
        for peer in self.all:
            peer.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
