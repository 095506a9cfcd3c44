# ruff: noqa: ASYNC109  (test helpers: explicit timeouts read best here)
"""The ends of a channel a test plays.

Blocking, for broker tests (the broker is another process): :class:`Domu`, the DomU
end of a pty pair, and :class:`QemuSocket`, a unix socket listening as QEMU's
``connection=socket`` chardev does.

Asyncio, for client and CLI tests (the test plays the broker): :class:`PtyPeer` on the
dom0 end of a pty pair, :class:`SocketServer` serving a unix socket as the broker's
dom0 socket does, each connection a :class:`SocketPeer`.

Negative checks ("X never arrives") end on a sentinel: something sent *after* X on a
path that keeps order (one sender's channel, one destination's FIFO queue). Once the
sentinel is there, X would have been there before it: ``until_sentinel`` returns what
arrived up to the sentinel, and the test asserts X is not in it. No "nothing within N
seconds", which passes when X is merely slow.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import socket
import termios
import time
import tty
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from messagerie import FrameDecoder, FrameError, Message, encode

from .waiting import wait_until

#: How long a sentinel may take: generous, it only delays a test that fails.
SENTINEL_TIMEOUT = 30.0

Sentinel = Callable[[Message], bool]


def sentinel(source: str, destination: str, categorie: str = "sentinelle") -> dict[str, Any]:
    """A notification to send after what must not arrive (a dict for :meth:`Domu.send`)."""
    return {"type": "notification", "source": source, "destination": destination,
            "payload": {"categorie": categorie, "evenement": "sentinelle"}}


def is_sentinel(m: Message) -> bool:
    """Whether ``m`` is a :func:`sentinel` (of any ``categorie``)."""
    return m.type == "notification" and m.payload.get("evenement") == "sentinelle"


def _frame(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


def _is_state_notification(m: Message) -> bool:
    """The broker's own domain-state notifications (from dom0), which come whenever a
    domain connects or goes: most checks leave them out."""
    return m.source == "dom0" and m.type == "notification"


class _KeepsBytes:
    """The exact bytes a raw peer read, in order (``raw``), to compare frames byte for
    byte."""

    raw: bytearray

    def lines_from(self, source: str) -> list[bytes]:
        """Every complete line read that comes from ``source``, as read."""
        marker = b'"source":"%s"' % source.encode()
        return [line + b"\n" for line in bytes(self.raw).split(b"\n")[:-1] if marker in line]


class Domu(_KeepsBytes):
    """The DomU side of a channel, raw bytes in and out, with a frame decoder."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        if os.isatty(self.fd):
            tty.setraw(self.fd, termios.TCSANOW)
        self.decoder = FrameDecoder(1 << 24)
        self.inbox: list[Message | FrameError] = []
        self.raw = bytearray()

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except BlockingIOError:
                select.select([], [self.fd], [], 1.0)
                continue
            view = view[n:]

    def send(self, msg: dict[str, Any]) -> None:
        self.write(_frame(msg))

    def pump(self, timeout: float = 0.05) -> None:
        """Read what has arrived, waiting up to ``timeout`` for something."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return
        try:
            data = os.read(self.fd, 1 << 16)
        except (BlockingIOError, OSError):
            return
        self.raw += data
        self.inbox.extend(self.decoder.feed(data))

    def messages(self, *, exclude_dom0: bool = True) -> list[Message]:
        """The messages read so far (without the broker's domain-state notifications,
        unless ``exclude_dom0=False``)."""
        return [m for m in self.inbox if isinstance(m, Message)
                and not (exclude_dom0 and _is_state_notification(m))]

    def wait_messages(self, n: int, timeout: float = 10.0, **kw: Any) -> list[Message]:
        """Read until at least ``n`` messages are in; return all of them."""
        wait_until(lambda: (self.pump(), len(self.messages(**kw)) >= n)[1], timeout,
                   lambda: f"{n} messages, got {len(self.messages(**kw))}: "
                           f"{self.messages(**kw)[-3:]}", interval=0)
        return self.messages(**kw)

    def until_sentinel(self, is_sentinel: Sentinel, timeout: float = SENTINEL_TIMEOUT,
                       **kw: Any) -> list[Message]:
        """Read until a message for which ``is_sentinel`` holds has arrived; return the
        messages read so far up to and including the first such one (see the module's
        docstring for why that proves an absence)."""
        def upto() -> list[Message] | None:
            msgs = self.messages(**kw)
            for i, m in enumerate(msgs):
                if is_sentinel(m):
                    return msgs[:i + 1]
            self.pump()
            return None
        return wait_until(upto, timeout,
                          lambda: f"the sentinel (got: {self.messages(**kw)[-3:]})", interval=0)

    def close(self) -> None:
        os.close(self.fd)


class QemuSocket(_KeepsBytes):
    """A unix socket listener, as QEMU's ``connection=socket`` chardev: the broker
    connects to it. Accepts one connection at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.conn: socket.socket | None = None
        self.decoder = FrameDecoder(1 << 24)
        self.inbox: list[Message | FrameError] = []
        self.raw = bytearray()

    def accept(self, timeout: float = 10.0) -> None:
        self.server.settimeout(timeout)
        self.conn, _ = self.server.accept()
        self.conn.setblocking(False)

    def send(self, msg: dict[str, Any]) -> None:
        assert self.conn is not None
        self.conn.setblocking(True)
        self.conn.sendall(_frame(msg))
        self.conn.setblocking(False)

    def messages(self) -> list[Message]:
        return [m for m in self.inbox if isinstance(m, Message)
                and not _is_state_notification(m)]

    def pump(self, timeout: float = 0.05) -> None:
        assert self.conn is not None
        ready, _, _ = select.select([self.conn], [], [], timeout)
        if ready:
            data = self.conn.recv(1 << 16)
            if not data:
                raise AssertionError("broker closed the socket")
            self.raw += data
            self.inbox.extend(self.decoder.feed(data))

    def wait_messages(self, n: int, timeout: float = 10.0) -> list[Message]:
        wait_until(lambda: (self.pump(), len(self.messages()) >= n)[1], timeout,
                   lambda: f"{n} messages, got {self.messages()}", interval=0)
        return self.messages()

    def drop(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def close(self) -> None:
        self.drop()
        self.server.close()
        self.path.unlink(missing_ok=True)


class Peer:
    """The other end of a channel, driven by an asyncio test: a pty fd or a socket
    stream. Frames read are queued on ``inbox``; ``raw`` keeps every byte."""

    def __init__(self) -> None:
        self.decoder = FrameDecoder()
        self.inbox: asyncio.Queue[Message | FrameError] = asyncio.Queue()
        self.raw = bytearray()
        self.closed = asyncio.Event()

    def _feed(self, data: bytes) -> None:
        self.raw += data
        for item in self.decoder.feed(data):
            self.inbox.put_nowait(item)

    async def recv(self, timeout: float = 15.0) -> Message:
        item = await asyncio.wait_for(self.inbox.get(), timeout)
        assert isinstance(item, Message), item
        return item

    async def until_sentinel(self, is_sentinel: Sentinel,
                             timeout: float = SENTINEL_TIMEOUT) -> list[Message]:
        """Receive until a message for which ``is_sentinel`` holds; return everything
        received meanwhile, that message last (see the module's docstring)."""
        got: list[Message] = []
        try:
            async with asyncio.timeout(timeout):
                while not got or not is_sentinel(got[-1]):
                    got.append(await self.recv(timeout=timeout))
        except TimeoutError:
            raise AssertionError(f"no sentinel within {timeout:g} s (got: {got[-3:]})") from None
        return got

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
    """Reads and writes a tty path (the dom0 end of a pty pair) without blocking."""

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
                if time.monotonic() > deadline:
                    raise
                select.select([], [self.fd], [], 0.1)  # until writable again
                continue
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
    :class:`SocketPeer` put on ``peers``. ``async with SocketServer(path) as server``
    starts it and stops it on the way out (or :meth:`start` and :meth:`stop`)."""

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

    async def __aenter__(self) -> SocketServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

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
