"""The messagerie client: an asyncio ``Client`` and a blocking ``BlockingClient``.

Its errors live in :mod:`messagerie.errors` (re-exported here).

A DomU talks to the broker over its pv-channel (``/dev/hvc1``, or
``/dev/xen-channel/<name>``); a dom0 service talks to it over the broker's local unix
socket (``/run/messagerie/dom0.sock``), as ``dom0``. Both use the same ``Client``::

    async with Client("vm-ui") as c:
        await c.notify("tous", "domaine", "etat", {"pret": True})
        rep = await c.commande("vm-sys-usb", "lister_disques", timeout=5.0)
        async for msg in c.messages(type="notification", categorie="disque"):
            ...

Serving commands::

    c = Client("vm-sys-usb")

    @c.handler("lister_disques")
    async def lister(cmd: Commande) -> list[str]:
        return ["sda"]

    async with c:
        await c.serve_forever()

The client reconnects by itself when the channel resets; commands in flight at that
moment fail with :class:`Disconnected`. See ``docs/api.md``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import os
import shutil
import subprocess
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping
from concurrent.futures import Future as ConcurrentFuture
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TypeVar

import structlog

from .channel import ChannelError, channel_kind, domu_channel_path, open_channel
from .codec import MAX_FRAME, FrameDecoder, FrameError, encode
from .errors import CommandError, CommandTimeout, Disconnected, MessagerieError, NameUnknown
from .model import (
    DOM0,
    Code,
    Commande,
    Message,
    Notification,
    Reponse,
    is_valid_name,
)

log = structlog.get_logger("messagerie.client")

DOM0_SOCKET: Final = Path("/run/messagerie/dom0.sock")
"""Where the broker listens for dom0 services."""
DOMAINE_FILE: Final = Path("/etc/messagerie/domaine")
"""A file holding this domain's name (one line), read when no name is given."""
DOMAINE_ENV: Final = "MESSAGERIE_DOMAINE"
"""Environment variable naming this domain, read when no name is given."""
REGISTER_COMMAND: Final = "enregistrer"
"""dom0 only: tell the broker which commands addressed to ``dom0`` this client serves."""

Handler = Callable[[Commande], Awaitable[Any]]
H = TypeVar("H", bound=Callable[..., Any])
T = TypeVar("T")


# ``timeout=`` parameters (ruff ASYNC109) are part of the API on purpose, as in httpx:
# they decide which error is raised (CommandTimeout, Disconnected), which an outer
# asyncio.timeout() cannot.

# -- own name -----------------------------------------------------------------------

def resolve_domain_name(name: str | None = None, path: str | os.PathLike[str] | None = None,
                        ) -> str:
    """This domain's name, from the first source that gives one:

    1. ``name``, when given;
    2. the environment variable ``MESSAGERIE_DOMAINE``;
    3. ``dom0`` when ``path`` is a unix socket (only dom0 services connect to one: the
       broker's local socket);
    4. the first line of ``/etc/messagerie/domaine``;
    5. ``xenstore-read name``, when that program exists (a DomU with xenstore access).

    Raises :class:`NameUnknown` when none does, and for an invalid name.
    """
    origin = "argument"
    if not name:
        name, origin = os.environ.get(DOMAINE_ENV, "").strip() or None, DOMAINE_ENV
    if not name and path is not None:
        with contextlib.suppress(OSError):
            if channel_kind(path) == "socket":
                name, origin = DOM0, "unix socket"
    if not name:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            lines = DOMAINE_FILE.read_text().splitlines()
            name, origin = (lines[0].strip() if lines else None), str(DOMAINE_FILE)
    if not name:
        xenstore_read = shutil.which("xenstore-read")
        if xenstore_read:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                out = subprocess.run([xenstore_read, "name"], capture_output=True, text=True,
                                     timeout=5, check=True)
                name, origin = out.stdout.strip() or None, "xenstore-read name"
    if not name:
        raise NameUnknown(
            f"cannot tell this domain's name: pass it, set {DOMAINE_ENV}, "
            f"or write it to {DOMAINE_FILE}")
    if not is_valid_name(name):
        raise NameUnknown(f"invalid domain name {name[:80]!r} (from {origin})")
    return name


# -- the protocol bound to one connection --------------------------------------------

class _Connection(asyncio.Protocol):
    """One open channel: decodes frames into the client, tracks write flow control."""

    def __init__(self, client: Client, max_frame: int) -> None:
        self._client = client
        self._decoder = FrameDecoder(max_frame)
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.closed = asyncio.Event()
        self._can_write = asyncio.Event()
        self._can_write.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        for item in self._decoder.feed(data):
            if isinstance(item, FrameError):
                log.warning("frame.invalid", domain=self._client.name, reason=str(item.reason),
                            field=item.field, detail=item.detail, size=item.size,
                            excerpt=item.excerpt)
            else:
                self._client._dispatch(item)

    def eof_received(self) -> bool | None:
        return None  # close the transport: the peer went away

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.closed.set()
        self._can_write.set()
        self._client._connection_lost(self, exc)

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    async def drain(self) -> None:
        """Wait while the transport's write buffer is above its high-water mark."""
        await self._can_write.wait()
        if self.lost:
            raise Disconnected("channel closed")


# -- message streams ----------------------------------------------------------------

class MessageStream:
    """Incoming messages matching a filter, in order; an async iterator.

    Registered as soon as it is created, so nothing that arrives after
    :meth:`Client.messages` returns is missed. Its queue is bounded: when the consumer
    lags, the oldest message is dropped and counted in :attr:`dropped`. Ends when the
    client closes (after the queued messages) or when :meth:`close` is called.
    """

    def __init__(self, client: Client, maxsize: int, *, type: str | None,
                 source: str | None, categorie: str | None, commande: str | None) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be positive")
        self._client = client
        self._queue: collections.deque[Message] = collections.deque()
        self._maxsize = maxsize
        self._waiter: asyncio.Future[None] | None = None
        self._overflowing = False
        self.closed = False
        #: Messages dropped because the queue was full.
        self.dropped = 0
        self.type = type
        self.source = source
        self.categorie = categorie
        self.commande = commande

    def matches(self, msg: Message) -> bool:
        if self.type is not None and msg.type != self.type:
            return False
        if self.source is not None and msg.source != self.source:
            return False
        if self.categorie is not None and (
                not isinstance(msg, Notification) or msg.categorie != self.categorie):
            return False
        return not (self.commande is not None and (
            not isinstance(msg, Commande | Reponse) or msg.commande != self.commande))

    def _put(self, msg: Message) -> None:
        if len(self._queue) >= self._maxsize:
            self._queue.popleft()
            self.dropped += 1
            if not self._overflowing:  # one event per overflow episode, not per message
                self._overflowing = True
                log.warning("messages.dropped", domain=self._client.name, dropped=self.dropped,
                            maxsize=self._maxsize)
        self._queue.append(msg)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def close(self) -> None:
        """Stop receiving; iteration ends once the queued messages are consumed."""
        self.closed = True
        self._client._streams.discard(self)
        self._wake()

    def __len__(self) -> int:
        return len(self._queue)

    def __aiter__(self) -> MessageStream:
        return self

    async def __anext__(self) -> Message:
        while not self._queue:
            if self.closed:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        self._overflowing = False
        return self._queue.popleft()

    async def get(self, timeout: float | None = None) -> Message | None:  # noqa: ASYNC109
        """The next message, or ``None`` on timeout or when the stream has ended."""
        try:
            async with asyncio.timeout(timeout):
                return await self.__anext__()
        except (TimeoutError, StopAsyncIteration):
            return None

    async def __aenter__(self) -> MessageStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


# -- the client ---------------------------------------------------------------------

class Client:
    """An asyncio messagerie client. See the module docstring and ``docs/api.md``.

    ``name`` is this domain's name (see :func:`resolve_domain_name`). ``path`` is the
    channel (a tty or a unix socket); ``channel`` names ``/dev/xen-channel/<channel>``;
    by default ``/dev/hvc1``.
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        path: str | os.PathLike[str] | None = None,
        channel: str | None = None,
        timeout: float | None = 10.0,
        connect_timeout: float = 10.0,
        reconnect: bool = True,
        backoff_min: float = 0.1,
        backoff_max: float = 5.0,
        max_handlers: int = 64,
        max_in_flight: int = 64,
        queue_size: int = 1024,
        max_frame: int = MAX_FRAME,
        write_buffer_high: int = 256 * 1024,
    ) -> None:
        if path is not None and channel is not None:
            raise ValueError("give path or channel, not both")
        self.path = Path(path) if path is not None else domu_channel_path(channel)
        self.name = resolve_domain_name(name, self.path)
        #: Default timeout of :meth:`commande`, in seconds (``None``: wait forever).
        #: Commands' own ``timeout=None`` means this one.
        self.timeout = timeout
        #: How long :meth:`send` waits for the channel to come back before failing.
        self.connect_timeout = connect_timeout
        self.reconnect = reconnect
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.max_handlers = max_handlers
        #: Commands sent and not yet answered, at most; more wait for a free slot.
        #: 64 is the broker's default per-domain limit (``limites.commandes_en_vol``).
        self.max_in_flight = max_in_flight
        self._slots = asyncio.Semaphore(max_in_flight)
        self.queue_size = queue_size
        self.max_frame = max_frame
        self.write_buffer_high = write_buffer_high
        self._handlers: dict[str, Handler] = {}
        self._pending: dict[str, asyncio.Future[Reponse]] = {}
        self._streams: weakref.WeakSet[MessageStream] = weakref.WeakSet()
        self._handler_tasks: set[asyncio.Task[None]] = set()
        self._handler_cmds: dict[asyncio.Task[None], Commande] = {}
        """The command each running handler answers (to answer it if it cannot)."""
        self._tasks: set[asyncio.Task[Any]] = set()
        self._conn: _Connection | None = None
        self._connected: asyncio.Event | None = None
        self._lost: asyncio.Event | None = None
        self._closed: asyncio.Event | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None
        self._open = False
        self._closing = False
        #: Times the channel was (re)opened.
        self.connections = 0
        self._log = log.bind(domain=self.name, path=str(self.path))

    @classmethod
    def dom0(cls, path: str | os.PathLike[str] = DOM0_SOCKET, **kwargs: Any) -> Client:
        """A dom0 service's client, on the broker's local unix socket."""
        return cls(DOM0, path=path, **kwargs)

    @property
    def is_dom0(self) -> bool:
        return self.name == DOM0

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.lost

    # -- lifecycle --

    async def __aenter__(self) -> Client:
        await self.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def open(self) -> None:
        """Open the channel (and, in dom0, register the handlers with the broker).

        Raises :class:`Disconnected` when the channel cannot be opened, or
        :class:`CommandError` when the broker refuses the registration.
        """
        if self._open:
            raise RuntimeError("client already open")
        self._connected = asyncio.Event()
        self._lost = asyncio.Event()
        self._closed = asyncio.Event()
        self._closing = False
        try:
            await self._connect()
        except ChannelError as exc:
            raise Disconnected(f"cannot open channel {self.path}: {exc.strerror or exc}") \
                from exc
        self._open = True
        try:
            await self._register()
        except BaseException:
            await self.close()
            raise
        self._supervisor = asyncio.create_task(self._supervise(), name="messagerie-reconnect")

    async def close(self, grace: float = 1.0) -> None:
        """Close the channel. Handlers still running get ``grace`` seconds to answer,
        then are cancelled and their commands answered ``destination_hors_ligne``, as
        are commands arriving meanwhile (every command gets an answer); our own
        commands in flight fail with :class:`Disconnected`; message streams end."""
        if not self._open or self._closing:
            return
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        busy = self._handler_tasks | self._tasks
        if busy and self.connected:
            await asyncio.wait(busy, timeout=grace)
        for task in list(self._handler_tasks):
            # Every command gets an answer: one its handler did not give in time is
            # answered now, before the channel closes.
            cmd = self._handler_cmds.get(task)
            if cmd is not None and not task.done():
                self._answer_now(cmd.fail(Code.DESTINATION_HORS_LIGNE,
                                          f"{self.name} closed before answering",
                                          source=self.name))
        for task in self._handler_tasks | self._tasks:
            task.cancel()
        if self._handler_tasks | self._tasks:
            await asyncio.wait(self._handler_tasks | self._tasks)
        self._fail_pending(Disconnected("client closed"))
        conn, self._conn = self._conn, None
        if conn is not None and conn.transport is not None and not conn.lost:
            # close() flushes the write buffer first: wait for it, so that a short
            # script's last message is not lost when its event loop ends.
            conn.transport.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await conn.closed.wait()
        for stream in list(self._streams):
            stream.close()
        self._open = False
        assert self._closed is not None and self._connected is not None
        self._connected.set()  # wake senders waiting for a reconnection: they fail
        self._closed.set()
        self._log.info("client.closed")

    async def serve_forever(self) -> None:
        """Wait until the client is closed (handlers run meanwhile)."""
        if not self._open or self._closed is None:
            raise RuntimeError("client is not open")
        await self._closed.wait()

    async def _connect(self) -> None:
        exclusive = channel_kind(self.path) == "tty"
        transport, conn = await open_channel(
            self.path, lambda: _Connection(self, self.max_frame), exclusive=exclusive)
        # pyserial-asyncio calls connection_made() on the next loop iteration.
        conn.transport = transport
        transport.set_write_buffer_limits(high=self.write_buffer_high)
        self._conn = conn
        self.connections += 1
        assert self._connected is not None and self._lost is not None
        self._lost.clear()
        self._connected.set()
        self._log.info("channel.connected", kind="tty" if exclusive else "socket",
                       connections=self.connections)

    def _connection_lost(self, conn: _Connection, exc: Exception | None) -> None:
        if conn is not self._conn:
            return
        assert self._connected is not None and self._lost is not None
        self._connected.clear()
        self._lost.set()
        if not self._closing:
            self._log.warning("channel.lost", error=str(exc) if exc else None,
                              pending=len(self._pending))
            self._fail_pending(Disconnected(f"channel {self.path} reset"))

    def _fail_pending(self, error: Exception) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(error)

    async def _supervise(self) -> None:
        assert self._lost is not None
        while True:
            await self._lost.wait()
            if not self.reconnect:
                self._log.info("channel.closed_by_peer")
                # close() cancels and awaits this task: run it on its own.
                self._closer = asyncio.create_task(self.close())
                return
            delay = self.backoff_min
            attempts = 0
            while True:
                await asyncio.sleep(delay)
                attempts += 1
                try:
                    await self._connect()
                except OSError as exc:  # ChannelError, or anything else the OS says
                    self._log.debug("channel.reconnect_failed", attempt=attempts,
                                    error=exc.strerror or str(exc), retry_in=delay)
                    delay = min(delay * 2, self.backoff_max)
                    continue
                break
            self._log.info("channel.reconnected", attempts=attempts)
            self._spawn(self._register_quietly())

    async def _register(self) -> None:
        """dom0 only: tell the broker which commands this client serves."""
        if not self.is_dom0 or not self._handlers:
            return
        names = sorted(self._handlers)
        cmd = Commande(DOM0, DOM0, REGISTER_COMMAND, {"commandes": names})
        await self.request(cmd, timeout=self.timeout)
        self._log.info("dom0.registered", commandes=names)

    # -- sending --

    async def _writer(self, timeout: float | None) -> _Connection:  # noqa: ASYNC109
        """The open connection, waiting up to ``timeout`` for a reconnection."""
        if not self._open or self._connected is None:
            raise Disconnected("client is not open")
        if not self.connected:
            try:
                async with asyncio.timeout(timeout):
                    await self._connected.wait()
            except TimeoutError:
                raise Disconnected(f"channel {self.path} down for more than {timeout:g} s") \
                    from None
            if not self.connected or self._closing:
                raise Disconnected("client closed")
        assert self._conn is not None
        return self._conn

    async def send(self, message: Message, *, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Send any message as it is. While the channel is down, wait up to ``timeout``
        (default ``connect_timeout``) for it to come back, then raise
        :class:`Disconnected`. Waits while the channel's write buffer is full."""
        data = encode(message)
        await self._send_bytes(data, self.connect_timeout if timeout is None else timeout)

    async def _send_bytes(self, data: bytes, timeout: float | None,  # noqa: ASYNC109
                          abandon: asyncio.Future[Reponse] | None = None) -> None:
        """Write ``data`` once the channel is up and not full. With ``abandon`` (a
        command's future): if it is settled meanwhile (the channel reset and the
        command was failed), do not write: the caller was told it failed, so it must
        not be executed behind its back."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if abandon is not None and abandon.done():
                raise Disconnected(f"channel {self.path} reset before the command was sent")
            conn = await self._writer(None if deadline is None
                                      else max(0.0, deadline - time.monotonic()))
            try:
                # Flow control: never grow the write buffer past its high-water mark
                # (plus one message per concurrent sender).
                async with asyncio.timeout(None if deadline is None
                                           else max(0.0, deadline - time.monotonic())):
                    await conn.drain()
            except TimeoutError:
                raise Disconnected(f"channel {self.path} blocked for more than "
                                   f"{timeout:g} s") from None
            except Disconnected:
                continue  # the channel reset while we waited: wait for the next one
            if abandon is not None and abandon.done():
                raise Disconnected(f"channel {self.path} reset before the command was sent")
            assert conn.transport is not None
            conn.transport.write(data)
            return

    async def notify(self, destination: str, categorie: str, evenement: str,
                     data: Mapping[str, Any] | None = None) -> None:
        """Send a notification from this domain."""
        await self.send(Notification(self.name, destination, categorie, evenement, data))

    async def commande(self, destination: str, commande: str,
                       arguments: Mapping[str, Any] | None = None, *,
                       timeout: float | None = None) -> Reponse:  # noqa: ASYNC109
        """Send a command and return its ``ok`` :class:`Reponse`.

        Raises :class:`CommandError` for an error reply (from the destination or the
        broker), :class:`CommandTimeout` without a reply within ``timeout`` seconds
        (``None``: the client's ``timeout``), :class:`Disconnected` when the channel
        resets meanwhile or stays down.
        """
        return await self.request(Commande(self.name, destination, commande, arguments),
                                  timeout=timeout)

    async def request(self, cmd: Commande, *, timeout: float | None = None) -> Reponse:  # noqa: ASYNC109
        """Like :meth:`commande`, for a :class:`Commande` built by the caller."""
        wait = self.timeout if timeout is None else timeout
        if cmd.id in self._pending:
            raise ValueError(f"a command with id {cmd.id!r} is already in flight")
        loop = asyncio.get_running_loop()
        start = loop.time()

        def remaining() -> float | None:
            return None if wait is None else max(0.0, wait - (loop.time() - start))

        # At most max_in_flight commands on the wire (the broker refuses more with
        # `limite`); the others wait here, within their own timeout.
        try:
            async with asyncio.timeout(remaining()):
                await self._slots.acquire()
        except TimeoutError:
            self._log.info("commande.timeout", id=cmd.id, commande=cmd.commande,
                           destination=cmd.destination, timeout=wait, sent=False)
            raise CommandTimeout(cmd, wait or 0.0) from None
        fut: asyncio.Future[Reponse] = loop.create_future()
        self._pending[cmd.id] = fut
        try:
            send_timeout = self.connect_timeout if wait is None else min(wait,
                                                                         self.connect_timeout)
            await self._send_bytes(encode(cmd), send_timeout, abandon=fut)
            try:
                async with asyncio.timeout(remaining()):
                    rep = await fut
            except TimeoutError:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    rep = fut.result()  # answered at the deadline: take it
                else:
                    self._log.info("commande.timeout", id=cmd.id, commande=cmd.commande,
                                   destination=cmd.destination, timeout=wait, sent=True)
                    raise CommandTimeout(cmd, wait or 0.0) from None
        finally:
            self._slots.release()
            if self._pending.get(cmd.id) is fut:
                del self._pending[cmd.id]
        if not rep.ok:
            erreur = rep.erreur or {}
            raise CommandError(str(erreur.get("code", "")), str(erreur.get("message", "")), rep)
        return rep

    # -- receiving --

    def messages(self, *, type: str | None = None, source: str | None = None,
                 categorie: str | None = None, commande: str | None = None,
                 maxsize: int | None = None) -> MessageStream:
        """An async iterator over incoming messages matching every filter given.

        ``type`` is ``notification``, ``commande``, ``reponse`` or ``journal``;
        ``categorie`` matches notifications, ``commande`` commands and replies by name.
        Each stream has its own queue of ``maxsize`` (default ``queue_size``) messages.
        """
        stream = MessageStream(self, maxsize or self.queue_size, type=type, source=source,
                               categorie=categorie, commande=commande)
        if not self._open:
            stream.closed = True
        else:
            self._streams.add(stream)
        return stream

    def _dispatch(self, msg: Message) -> None:
        if isinstance(msg, Reponse):
            fut = self._pending.get(msg.id)
            if fut is None or fut.done():
                self._log.info("reponse.unmatched", id=msg.id, source=msg.source,
                               commande=msg.commande)
            else:
                fut.set_result(msg)
        elif isinstance(msg, Commande):
            self._on_commande(msg)
        for stream in list(self._streams):
            if stream.matches(msg):
                stream._put(msg)

    # -- serving --

    def handler(self, name: str) -> Callable[[H], H]:
        """Decorator: serve command ``name`` with an async function of a :class:`Commande`.

        Its return value (JSON-serialisable) is the ``resultat`` of an ``ok`` reply; a
        :class:`CommandError` it raises gives an error reply with that code; any other
        exception an error reply with code ``erreur_interne``.
        """
        def register(fn: H) -> H:
            self.add_handler(name, fn)
            return fn
        return register

    def add_handler(self, name: str, fn: Callable[[Commande], Any]) -> None:
        """Serve command ``name`` with ``fn`` (see :meth:`handler`). ``fn`` may be a
        plain function; its result is awaited when it is awaitable."""
        Commande(DOM0, DOM0, name)  # validates the name
        new = name not in self._handlers
        self._handlers[name] = fn
        if new and self._open and self.is_dom0 and self.connected:
            self._spawn(self._register_quietly())

    def remove_handler(self, name: str) -> None:
        self._handlers.pop(name, None)

    async def _register_quietly(self) -> None:
        """Register until the broker says yes: a dom0 service that silently stopped
        serving its commands after a broker restart would be worse than a loud one.
        Gives up only when the channel drops (the next connection registers again)."""
        delay = self.backoff_min
        conn = self._conn
        while self._open and not self._closing:
            try:
                await self._register()
                return
            except MessagerieError as exc:  # MessageInvalide included
                self._log.error("dom0.register_failed", error=str(exc), retry_in=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max)
            if self._conn is not conn:
                return

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_commande(self, cmd: Commande) -> None:
        if self._closing:
            self._log.info("commande.refused_closing", id=cmd.id, commande=cmd.commande,
                           source=cmd.source)
            self._answer_now(cmd.fail(Code.DESTINATION_HORS_LIGNE, f"{self.name} is closing",
                                      source=self.name))
            return
        fn = self._handlers.get(cmd.commande)
        if fn is None:
            self._log.info("commande.unknown", id=cmd.id, commande=cmd.commande,
                           source=cmd.source)
            self._answer(cmd.fail(Code.COMMANDE_INCONNUE,
                                  f"{self.name} does not serve {cmd.commande!r}",
                                  source=self.name))
        elif len(self._handler_tasks) >= self.max_handlers:
            self._log.warning("commande.limit", id=cmd.id, commande=cmd.commande,
                              source=cmd.source, running=len(self._handler_tasks))
            self._answer(cmd.fail(Code.LIMITE,
                                  f"{self.name} is busy ({self.max_handlers} commands running)",
                                  source=self.name))
        else:
            task = asyncio.ensure_future(self._run_handler(cmd, fn))
            self._handler_tasks.add(task)
            self._handler_cmds[task] = cmd
            task.add_done_callback(self._handler_done)

    def _handler_done(self, task: asyncio.Task[None]) -> None:
        self._handler_tasks.discard(task)
        self._handler_cmds.pop(task, None)

    def _answer(self, rep: Reponse) -> None:
        self._spawn(self._send_reply(rep))

    def _answer_now(self, rep: Reponse) -> None:
        """Write ``rep`` at once, past flow control (closing: nothing waits any more)."""
        conn = self._conn
        if conn is not None and conn.transport is not None and not conn.lost:
            conn.transport.write(encode(rep))
        else:
            self._log.warning("reponse.lost", id=rep.id, commande=rep.commande,
                              destination=rep.destination, error="channel down while closing")

    async def _send_reply(self, rep: Reponse) -> None:
        try:
            await self.send(rep)
        except Disconnected as exc:
            # The caller saw the reset too (its command failed with Disconnected).
            self._log.warning("reponse.lost", id=rep.id, commande=rep.commande,
                              destination=rep.destination, error=str(exc))

    async def _run_handler(self, cmd: Commande, fn: Callable[[Commande], Any]) -> None:
        try:
            result = fn(cmd)
            if inspect.isawaitable(result):
                result = await result
            rep = cmd.reply(result, source=self.name)
            encode(rep)  # a result that is not JSON is the handler's error
        except CommandError as exc:
            rep = cmd.fail(exc.code, exc.message, source=self.name)
        except Exception as exc:
            self._log.exception("handler.failed", id=cmd.id, commande=cmd.commande,
                                source=cmd.source)
            rep = cmd.fail(Code.ERREUR_INTERNE, f"{type(exc).__name__}: {exc}"[:1000],
                           source=self.name)
        await self._send_reply(rep)


# -- blocking facade ----------------------------------------------------------------

class BlockingClient:
    """The :class:`Client` for simple scripts: blocking calls, no asyncio.

    The asyncio client runs on a private event loop in a background thread::

        with BlockingClient("vm-ui", path="/dev/hvc1") as c:
            c.notify("tous", "domaine", "etat", {"pret": True})
            rep = c.commande("vm-sys-usb", "lister_disques")
            msg = c.receive(timeout=1.0)   # None on timeout

    Handlers are plain functions, run in a worker thread::

        c = BlockingClient("vm-sys-usb")
        @c.handler("lister_disques")
        def lister(cmd): return ["sda"]
        with c: c.serve_forever()
    """

    def __init__(self, name: str | None = None, **kwargs: Any) -> None:
        self._client = Client(name, **kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._inbox: MessageStream | None = None

    @property
    def client(self) -> Client:
        """The underlying asyncio client (use it only from its own loop)."""
        return self._client

    @property
    def name(self) -> str:
        return self._client.name

    def __enter__(self) -> BlockingClient:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="messagerie-client", daemon=True)
        self._thread.start()
        ready.wait()

        async def start() -> MessageStream:
            await self._client.open()
            return self._client.messages()

        try:
            self._inbox = self._run(start())
        except BaseException:
            self._stop_loop()
            raise

    def close(self) -> None:
        if self._loop is None:
            return
        try:
            self._run(self._client.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()

    def _run(self, coro: Awaitable[T], timeout: float | None = None) -> T:
        if self._loop is None:
            if inspect.iscoroutine(coro):
                coro.close()
            raise Disconnected("client is not open")
        future: ConcurrentFuture[T] = asyncio.run_coroutine_threadsafe(
            _as_coroutine(coro), self._loop)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    def handler(self, name: str) -> Callable[[H], H]:
        """Decorator: serve ``name`` with a plain function (run in a worker thread) or an
        async function (run on the client's loop). Same semantics as
        :meth:`Client.handler`."""
        def register(fn: H) -> H:
            self.add_handler(name, fn)
            return fn
        return register

    def add_handler(self, name: str, fn: Callable[[Commande], Any]) -> None:
        if inspect.iscoroutinefunction(fn):
            target: Callable[[Commande], Any] = fn
        else:
            async def target(cmd: Commande) -> Any:
                return await asyncio.to_thread(fn, cmd)
        if self._loop is None:
            self._client.add_handler(name, target)
        else:
            self._loop.call_soon_threadsafe(self._client.add_handler, name, target)

    def send(self, message: Message, *, timeout: float | None = None) -> None:
        self._run(self._client.send(message, timeout=timeout))

    def notify(self, destination: str, categorie: str, evenement: str,
               data: Mapping[str, Any] | None = None) -> None:
        self._run(self._client.notify(destination, categorie, evenement, data))

    def commande(self, destination: str, commande: str,
                 arguments: Mapping[str, Any] | None = None, *,
                 timeout: float | None = None) -> Reponse:
        return self._run(self._client.commande(destination, commande, arguments,
                                               timeout=timeout))

    def request(self, cmd: Commande, *, timeout: float | None = None) -> Reponse:
        return self._run(self._client.request(cmd, timeout=timeout))

    def receive(self, timeout: float | None = None) -> Message | None:
        """The next incoming message (any kind), or ``None`` after ``timeout`` seconds
        or once the client is closed. Up to ``queue_size`` messages are kept."""
        if self._inbox is None:
            raise Disconnected("client is not open")
        return self._run(self._inbox.get(timeout))

    def messages(self, *, type: str | None = None, source: str | None = None,
                 categorie: str | None = None, commande: str | None = None,
                 timeout: float | None = None,
                 maxsize: int | None = None) -> Iterator[Message]:
        """Incoming messages matching every filter given (as :meth:`Client.messages`),
        as a blocking iterator with its own queue, registered now: nothing that arrives
        after this call returns is missed. It ends when the client closes, or after
        ``timeout`` seconds without a matching message. ``receive()`` still sees
        every message."""
        if self._inbox is None:
            raise Disconnected("client is not open")

        async def make() -> MessageStream:
            return self._client.messages(type=type, source=source, categorie=categorie,
                                         commande=commande, maxsize=maxsize)

        return self._iterate(self._run(make()), timeout)

    def _iterate(self, stream: MessageStream, timeout: float | None) -> Iterator[Message]:
        try:
            while (msg := self._run(stream.get(timeout))) is not None:
                yield msg
        finally:
            loop = self._loop
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(stream.close)

    def serve_forever(self) -> None:
        """Block until the client is closed (or Ctrl-C); handlers run meanwhile."""
        self._run(self._client.serve_forever())


async def _as_coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable


__all__ = [
    "DOM0_SOCKET",
    "BlockingClient",
    "Client",
    "CommandError",
    "CommandTimeout",
    "Disconnected",
    "MessageStream",
    "MessagerieError",
    "NameUnknown",
    "resolve_domain_name",
]
