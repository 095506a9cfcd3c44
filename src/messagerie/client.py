"""The asyncio messagerie client.

A DomU talks to the broker over its pv-channel (``/dev/hvc1``, or
``/dev/xen-channel/<name>``); a dom0 service talks to it over the broker's local unix
socket (``/run/messagerie/dom0.sock``), as ``dom0``. Both use the same ``Client``::

    async with Client("vm-ui") as c:
        await c.notify("tous", "domaine", "etat", {"pret": True})
        rep = await c.command("vm-sys-usb", "liste_disques", timeout=5.0)
        async for msg in c.messages(type="notification", categorie="disque"):
            ...

Serving commands::

    c = Client("vm-sys-usb")

    @c.handler("liste_disques")
    async def lister(cmd: Commande) -> list[str]:
        return ["sda"]

    async with c:
        await c.serve_forever()

The client reconnects by itself when the channel resets; commands in flight at that
moment fail with :class:`Disconnected`. See ``docs/api.md``.

The pieces live in modules of their own: the errors in :mod:`messagerie.errors`, the
own-name lookup in :mod:`messagerie.identity`, the channel's asyncio protocol in
:mod:`messagerie.connection`, message streams in :mod:`messagerie.streams`, the
blocking facade in :mod:`messagerie.blocking`. Their public names are importable from
here too, as they always were.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import math
import os
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, TypeVar

from . import log as _events
from .channel import ChannelError, channel_kind, domu_channel_path, open_channel
from .codec import MAX_FRAME, encode
from .connection import Connection
from .errors import CommandError, CommandTimeout, Disconnected, MessagerieError, NameUnknown
from .identity import DOMAINE_ENV, DOMAINE_FILE, resolve_domain_name
from .model import DOM0, Commande, Message, Notification, Reponse
from .streams import DEFAULT_QUEUE_SIZE, MessageStream
from .vocabulary import Categorie, Code, Evenement
from .wire import DELAI_MAX

if TYPE_CHECKING:
    from .blocking import BlockingClient

log = _events.get_logger("messagerie.client")

DOM0_SOCKET: Final = Path("/run/messagerie/dom0.sock")
"""Where the broker listens for dom0 services."""
REGISTER_COMMAND: Final = "enregistrer"
"""dom0 only: tell the broker which commands addressed to ``dom0`` this client serves."""
RELEASE_GRACE: Final = 5.0
"""Seconds past a timed-out command's deadline at the broker (our write plus its
``delai``) after which its slots are freed here even if the broker never said
``delai_depasse`` (see :meth:`Client._retire`)."""

Handler = Callable[[Commande], Awaitable[Any]]
H = TypeVar("H", bound=Callable[..., Any])


# ``timeout=`` parameters (ruff ASYNC109) are part of the API on purpose, as in httpx:
# they decide which error is raised (CommandTimeout, Disconnected), which an outer
# asyncio.timeout() cannot.


class ClientState(enum.Enum):
    """Where a :class:`Client` is in its life (``client.state``).

    It moves forward only: UNOPENED -> OPENING -> CONNECTED <-> RECONNECTING, and
    from any of the last three CLOSING -> CLOSED; except that an ``open()`` that cannot
    open the channel goes back to UNOPENED.
    """

    #: Built, not opened yet; or ``open()`` could not open the channel (retry it).
    UNOPENED = "unopened"
    #: ``open()`` is opening the channel and, in dom0, registering the handlers.
    OPENING = "opening"
    #: Open and the channel is up: messages flow both ways.
    CONNECTED = "connected"
    #: Open but the channel is down: it is being reopened (``reconnect=False``: the
    #: client closes itself); senders wait for it.
    RECONNECTING = "reconnecting"
    #: ``close()`` is running: handlers finish or are answered for; new commands refused.
    CLOSING = "closing"
    #: Closed for good: streams ended, sending raises ``Disconnected``. Not reopened.
    CLOSED = "closed"


_OPEN: Final = frozenset({ClientState.OPENING, ClientState.CONNECTED,
                          ClientState.RECONNECTING})
"""States in which the client holds (or is getting) a channel and serves on it."""


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
        max_in_flight_per_destination: int = 16,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        max_frame: int = MAX_FRAME,
        write_buffer_high: int = 256 * 1024,
    ) -> None:
        if path is not None and channel is not None:
            raise ValueError("give path or channel, not both")
        self.path = Path(path) if path is not None else domu_channel_path(channel)
        self.name = resolve_domain_name(name, self.path)
        #: Default timeout of :meth:`command`, in seconds (``None``: wait forever).
        #: Commands' own ``timeout=None`` means this one.
        self.timeout = timeout
        #: How long :meth:`send` waits for the channel to come back before failing.
        self.connect_timeout = connect_timeout
        self.reconnect = reconnect
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.max_handlers = max_handlers
        #: Commands sent and not yet answered, at most; more wait for a free slot.
        #: 64 is half the broker's default per-domain limit (``limites.commandes_en_vol``,
        #: 128), so that one process never holds all of its domain's slots.
        self.max_in_flight = max_in_flight
        self._slots = asyncio.Semaphore(max_in_flight)
        #: Of those, awaiting one destination's answer, at most: 16, a quarter of the
        #: broker's default ``limites.commandes_en_vol_destination`` (64), so that a
        #: destination that does not answer holds only its share of the slots.
        self.max_in_flight_per_destination = max_in_flight_per_destination
        self._destination_slots: dict[str, tuple[asyncio.Semaphore, list[int]]] = {}
        """Per destination: its semaphore and how many commands use it (the entry goes
        when none does, so that the table stays as small as the traffic)."""
        self.queue_size = queue_size
        self.max_frame = max_frame
        self.write_buffer_high = write_buffer_high
        self._handlers: dict[str, Handler] = {}
        self._pending: dict[str, asyncio.Future[Reponse]] = {}
        self._streams: weakref.WeakSet[MessageStream] = weakref.WeakSet()
        self._handler_tasks: set[asyncio.Task[None]] = set()
        self._handler_cmds: dict[asyncio.Task[None], Commande] = {}
        """The command each running handler answers (to answer it if it cannot)."""
        self._serving: dict[tuple[str, str], asyncio.Task[None]] = {}
        """The running handler of each command, by (its source, its id): the broker
        names it so when it abandons it."""
        self._tasks: set[asyncio.Task[Any]] = set()
        self._conn: Connection | None = None
        self._state = ClientState.UNOPENED
        self._changed = asyncio.Event()
        """Set (and replaced) on every change of state: what waiters wait on."""
        self._supervisor: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None
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
    def state(self) -> ClientState:
        """Where the client is in its life; see :class:`ClientState`."""
        return self._state

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.lost

    def _set_state(self, state: ClientState) -> None:
        self._state = state
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _until(self, *states: ClientState) -> None:
        """Wait until the client is in one of ``states``."""
        while self._state not in states:
            await self._changed.wait()

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
        :class:`CommandError` when the broker refuses the registration. A client that
        could not open its channel may be opened again; a closed one may not.
        """
        state = self._state  # (a local: mypy would keep self._state narrowed below)
        if state is not ClientState.UNOPENED:
            raise RuntimeError("client already open" if state in _OPEN
                               else "client closed: it cannot be reopened, make a new one")
        self._changed = asyncio.Event()  # bound to this loop when first waited on
        self._set_state(ClientState.OPENING)
        try:
            await self._connect()
        except BaseException as exc:
            if self._state is ClientState.OPENING:
                self._set_state(ClientState.UNOPENED)
                self._end_streams()
            if isinstance(exc, ChannelError):
                raise Disconnected(
                    f"cannot open channel {self.path}: {exc.strerror or exc}") from exc
            raise
        if self._state is not ClientState.OPENING:  # close() ran while the channel opened
            conn, self._conn = self._conn, None
            if conn is not None and conn.transport is not None:
                conn.transport.close()
            raise Disconnected("client closed while it opened")
        try:
            await self._register()
        except BaseException:
            await self.close()
            raise
        if self._state is not ClientState.OPENING:  # close() ran meanwhile
            raise Disconnected("client closed while it opened")
        self._set_state(ClientState.CONNECTED if self.connected else ClientState.RECONNECTING)
        self._supervisor = asyncio.create_task(self._supervise(), name="messagerie-reconnect")

    async def close(self, grace: float = 1.0) -> None:
        """Close the channel. Handlers still running get ``grace`` seconds to answer,
        then are cancelled and their commands answered ``destination_hors_ligne``, as
        are commands arriving meanwhile (every command gets an answer); our own
        commands in flight fail with :class:`Disconnected`; message streams end. What
        is still unsent gets ``grace`` seconds to go out; if the peer does not read it
        by then, it is dropped and the channel closed anyway.

        Idempotent: closing a closed (or never opened) client does nothing, and a
        second call while the first runs waits for it to finish."""
        if self._state is ClientState.CLOSING:
            await self._until(ClientState.CLOSED)
            return
        if self._state not in _OPEN:
            return
        self._set_state(ClientState.CLOSING)
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
            try:
                async with asyncio.timeout(grace):
                    await conn.closed.wait()
            except TimeoutError:
                # The peer reads nothing: drop what it never took, and close the fd
                # (close() alone would keep it open, waiting to write, forever).
                conn.transport.abort()
                await conn.closed.wait()
        self._end_streams()
        self._set_state(ClientState.CLOSED)  # wakes senders waiting for a channel: they fail
        self._log.info("client.closed")

    def _end_streams(self) -> None:
        for stream in list(self._streams):
            stream.close()

    async def serve_forever(self) -> None:
        """Wait until the client is closed (handlers run meanwhile)."""
        if self._state not in (ClientState.CONNECTED, ClientState.RECONNECTING,
                               ClientState.CLOSING):
            raise RuntimeError("client is not open")
        await self._until(ClientState.CLOSED)

    async def _connect(self) -> None:
        exclusive = channel_kind(self.path) == "tty"
        transport, conn = await open_channel(
            self.path, lambda: Connection(self._dispatch, self._connection_lost,
                                          max_frame=self.max_frame, domain=self.name),
            exclusive=exclusive)
        # The channel transport calls connection_made() on the next loop iteration.
        conn.transport = transport
        transport.set_write_buffer_limits(high=self.write_buffer_high)
        self._conn = conn
        self.connections += 1
        self._log.info("channel.connected", kind="tty" if exclusive else "socket",
                       connections=self.connections)

    def _connection_lost(self, conn: Connection, exc: Exception | None) -> None:
        if conn is not self._conn:
            return
        if self._state is ClientState.CONNECTED:
            self._set_state(ClientState.RECONNECTING)  # wakes the supervisor
        if self._state in _OPEN:
            self._log.warning("channel.lost", error=str(exc) if exc else None,
                              pending=len(self._pending))
            self._fail_pending(Disconnected(f"channel {self.path} reset"))

    def _fail_pending(self, error: Exception) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(error)

    async def _supervise(self) -> None:
        while True:
            await self._until(ClientState.RECONNECTING)
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
            if self._state is not ClientState.RECONNECTING:
                return  # closing: close() takes the new connection down with the rest
            self._set_state(ClientState.CONNECTED)
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

    async def _writer(self, timeout: float | None) -> Connection:  # noqa: ASYNC109
        """The open connection, waiting up to ``timeout`` for a reconnection."""
        if not self.connected:
            if self._state is not ClientState.RECONNECTING:
                # Nothing will reopen the channel: not open yet, reset while opening
                # (open() fails), closing or closed.
                raise Disconnected("client is not open" if self._state is not
                                   ClientState.CLOSING else "client closed")
            try:
                async with asyncio.timeout(timeout):
                    await self._until(ClientState.CONNECTED, ClientState.CLOSING,
                                      ClientState.CLOSED)
            except TimeoutError:
                raise Disconnected(f"channel {self.path} down for more than {timeout:g} s") \
                    from None
            if not self.connected:
                raise Disconnected("client closed")
        assert self._conn is not None
        return self._conn

    async def send(self, message: Message, *, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Send any message as it is. While the channel is down, wait up to ``timeout``
        (default ``connect_timeout``) for it to come back, then raise
        :class:`Disconnected`. Waits while the channel's write buffer is full."""
        data = encode(message)
        await self._send_bytes(data, self.connect_timeout if timeout is None else timeout)

    async def _send_bytes(self, data: bytes | Callable[[], bytes],
                          timeout: float | None,  # noqa: ASYNC109
                          abandon: asyncio.Future[Reponse] | None = None) -> None:
        """Write ``data`` (or what ``data()`` gives at the moment of writing) once the
        channel is up and not full. With ``abandon`` (a command's future): if it is
        settled meanwhile (the channel reset and the command was failed), do not write:
        the caller was told it failed, so it must not be executed behind its back."""
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
            conn.transport.write(data if type(data) is bytes else data())  # type: ignore[operator]
            return

    async def notify(self, destination: str, categorie: str, evenement: str,
                     data: Mapping[str, Any] | None = None) -> None:
        """Send a notification from this domain."""
        await self.send(Notification(self.name, destination, categorie, evenement, data))

    async def command(self, destination: str, commande: str,
                      arguments: Mapping[str, Any] | None = None, *,
                      timeout: float | None = None) -> Reponse:  # noqa: ASYNC109
        """Send command ``commande`` to ``destination`` and return its ``ok``
        :class:`Reponse`. Also available as ``commande()``.

        Raises :class:`CommandError` for an error reply (from the destination or the
        broker), :class:`CommandTimeout` without a reply within ``timeout`` seconds
        (``None``: the client's ``timeout``), :class:`Disconnected` when the channel
        resets meanwhile or stays down.

        The command carries what is left of ``timeout`` when it is written as its
        ``delai``: the broker answers ``delai_depasse`` past it and tells the
        destination, whose client cancels the handler. A command that timed out keeps
        its slots (``max_in_flight``, ``max_in_flight_per_destination``) until the
        broker frees its own (see :meth:`_retire`).
        """
        return await self.request(Commande(self.name, destination, commande, arguments),
                                  timeout=timeout)

    commande = command
    """French alias of :meth:`command`, kept for existing code."""

    async def request(self, cmd: Commande, *, timeout: float | None = None) -> Reponse:  # noqa: ASYNC109
        """Like :meth:`command`, for a :class:`Commande` built by the caller."""
        wait = self.timeout if timeout is None else timeout
        if cmd.id in self._pending:
            raise ValueError(f"a command with id {cmd.id!r} is already in flight")
        loop = asyncio.get_running_loop()
        start = loop.time()

        def remaining() -> float | None:
            return None if wait is None else max(0.0, wait - (loop.time() - start))

        # At most max_in_flight commands on the wire, max_in_flight_per_destination of
        # them to one destination (the broker refuses more with `limite`); the others
        # wait here, within their own timeout: first for the destination's slot, so
        # that one waiting for a slow destination holds none of the others'.
        entry = self._destination_slots.get(cmd.destination)
        if entry is None:
            entry = (asyncio.Semaphore(self.max_in_flight_per_destination), [0])
            self._destination_slots[cmd.destination] = entry
        destination_slots, users = entry
        users[0] += 1
        try:
            await self._acquire_slots(cmd, destination_slots, remaining(), wait)
        except BaseException:
            self._forget_destination(cmd.destination, users)
            raise
        fut: asyncio.Future[Reponse] = loop.create_future()
        self._pending[cmd.id] = fut
        written = 0.0  # when the command was written (loop time), once it was
        carried = cmd.delai

        def frame() -> bytes:
            # At the moment of writing: the broker's deadline then counts from its
            # receipt, after this, so it never falls before our own timeout.
            nonlocal written, carried
            written = loop.time()
            left = remaining()
            if carried is None and left is not None:
                # Rounded up to the millisecond, at least one, at most DELAI_MAX.
                carried = min(DELAI_MAX, max(0.001, math.ceil(left * 1000) / 1000))
                cmd.payload["delai"] = carried
            return encode(cmd)

        sent = False
        try:
            send_timeout = self.connect_timeout if wait is None else min(wait,
                                                                         self.connect_timeout)
            await self._send_bytes(frame, send_timeout, abandon=fut)
            sent = True
            try:
                async with asyncio.timeout(remaining()):
                    # Shielded: given up on (timeout, or the caller cancelled), the
                    # future stays, to be settled by the broker's answer (_retire).
                    rep = await asyncio.shield(fut)
            except TimeoutError:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    rep = fut.result()  # answered at the deadline: take it
                else:
                    self._log.info("commande.timeout", id=cmd.id, commande=cmd.commande,
                                   destination=cmd.destination, timeout=wait, sent=True)
                    raise CommandTimeout(cmd, wait or 0.0) from None
        finally:
            if sent and carried is not None and not fut.done():
                self._retire(cmd, fut, written + carried, destination_slots, users)
            else:
                self._release(cmd, fut, destination_slots, users)
        if not rep.ok:
            erreur = rep.erreur or {}
            code, message = str(erreur.get("code", "")), str(erreur.get("message", ""))
            if code == Code.DELAI_DEPASSE and rep.source == DOM0:
                # The broker ended the command at its deadline (the one it carried, our
                # own timeout when we sent it; or the broker's duree_commande, its
                # spool's age bound...): whichever fired first, a timeout. A
                # destination's own delai_depasse stays its answer (CommandError).
                raise CommandTimeout(cmd, carried if carried is not None else wait or 0.0,
                                     rep, message)
            raise CommandError(code, message, rep)
        return rep

    def _release(self, cmd: Commande, fut: asyncio.Future[Reponse],
                 destination_slots: asyncio.Semaphore, users: list[int]) -> None:
        self._slots.release()
        destination_slots.release()
        self._forget_destination(cmd.destination, users)
        if self._pending.get(cmd.id) is fut:
            del self._pending[cmd.id]

    def _retire(self, cmd: Commande, fut: asyncio.Future[Reponse], due: float,
                destination_slots: asyncio.Semaphore, users: list[int]) -> None:
        """A command we gave up on keeps its slots until the broker frees its own.

        The broker counts the command against our limits until its deadline, ``due``
        (our write plus the ``delai`` it carried) at the earliest: its clock starts at
        its receipt, after our write. Freeing our slot at our own timeout would let the
        next command go out while the broker still counts this one, and meet
        ``limite``. So the command stays in ``_pending`` and its slots are freed when
        its answer comes: the broker's ``delai_depasse`` (sent when the broker freed
        the slot, so a command sent after it is never refused for this one), or the
        real answer if it came just in time. A reset of the channel or ``close()``
        settles it too. If nothing comes (a broker that could not queue the answer, or
        one that does not know ``delai`` and holds the slot for its
        ``limites.duree_commande``), the slots are freed :data:`RELEASE_GRACE` seconds
        after ``due``, never before it."""
        loop = asyncio.get_running_loop()
        timer = loop.call_at(due + RELEASE_GRACE, fut.cancel)

        def settled(f: asyncio.Future[Reponse]) -> None:
            timer.cancel()
            if not f.cancelled():
                f.exception()  # retrieved: nobody awaits it any more
            self._release(cmd, f, destination_slots, users)
            self._log.debug("commande.released", id=cmd.id, commande=cmd.commande,
                            destination=cmd.destination, answered=not f.cancelled())

        fut.add_done_callback(settled)

    async def _acquire_slots(self, cmd: Commande, destination_slots: asyncio.Semaphore,
                             within: float | None, wait: float | None) -> None:
        """Take the command's destination slot, then a slot of the client's, within
        ``within`` seconds; :class:`CommandTimeout` (nothing sent) otherwise."""
        try:
            async with asyncio.timeout(within):
                await destination_slots.acquire()
                try:
                    await self._slots.acquire()
                except BaseException:
                    destination_slots.release()
                    raise
        except TimeoutError:
            self._log.info("commande.timeout", id=cmd.id, commande=cmd.commande,
                           destination=cmd.destination, timeout=wait, sent=False)
            raise CommandTimeout(cmd, wait or 0.0) from None

    def _forget_destination(self, destination: str, users: list[int]) -> None:
        users[0] -= 1
        if users[0] == 0:
            del self._destination_slots[destination]

    # -- receiving --

    def messages(self, *, type: str | None = None, source: str | None = None,
                 categorie: str | None = None, commande: str | None = None,
                 maxsize: int | None = None) -> MessageStream:
        """An async iterator over incoming messages matching every filter given.

        ``type`` is ``notification``, ``commande``, ``reponse`` or ``journal``;
        ``categorie`` matches notifications, ``commande`` commands and replies by name.
        Each stream has its own queue of ``maxsize`` (default ``queue_size``) messages.
        A stream asked for before ``open()`` (or after ``close()``) has already ended.
        """
        stream = MessageStream(maxsize or self.queue_size, type=type, source=source,
                               categorie=categorie, commande=commande, domain=self.name,
                               on_close=self._streams.discard)
        if self._state in _OPEN or self._state is ClientState.CLOSING:
            self._streams.add(stream)
        else:
            stream.close()
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
            self._on_command(msg)
        elif (msg.source == DOM0 and isinstance(msg, Notification)
              and msg.categorie == Categorie.COMMANDE and msg.evenement == Evenement.ABANDONNEE):
            # Only the broker sends this category (it refuses it from anyone else, dom0's
            # services included), and only the broker speaks as dom0 to a DomU.
            self._on_abandoned(msg)
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
        if new and self.is_dom0 and self.connected and self._state in (
                ClientState.OPENING, ClientState.CONNECTED):
            self._spawn(self._register_quietly())

    def remove_handler(self, name: str) -> None:
        self._handlers.pop(name, None)

    async def _register_quietly(self) -> None:
        """Register until the broker says yes: a dom0 service that silently stopped
        serving its commands after a broker restart would be worse than a loud one.
        Gives up only when the channel drops (the next connection registers again)."""
        delay = self.backoff_min
        conn = self._conn
        while self._state in _OPEN:
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

    def _on_command(self, cmd: Commande) -> None:
        if self._state not in _OPEN:
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
            self._serving[(cmd.source, cmd.id)] = task
            task.add_done_callback(self._handler_done)

    def _handler_done(self, task: asyncio.Task[None]) -> None:
        self._handler_tasks.discard(task)
        cmd = self._handler_cmds.pop(task, None)
        if cmd is not None and self._serving.get((cmd.source, cmd.id)) is task:
            del self._serving[(cmd.source, cmd.id)]

    def _on_abandoned(self, notice: Notification) -> None:
        """The broker gave up waiting for our answer to a command (its deadline passed,
        or its commander went away): cancel the handler serving it; it answers nothing."""
        data = notice.data
        source, id = data.get("source"), data.get("id")
        if type(source) is not str or type(id) is not str:
            self._log.warning("commande.bad_abandonment", data=str(data)[:200])
            return
        key = (source, id)
        task = self._serving.pop(key, None)
        self._log.info("commande.abandoned", id=key[1], source=key[0],
                       commande=data.get("commande"), running=task is not None)
        if task is not None:
            # Its slot is free now, not once the task has unwound: commands read in the
            # same chunk as this notice (a new burst from the same commander) must not
            # find it taken (they met `limite`).
            self._handler_tasks.discard(task)
            task.cancel()

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
        except CommandTimeout as exc:
            # A command the handler sent in turn was not answered in time: so is this
            # one (an answer, not a failure of the handler's code).
            rep = cmd.fail(Code.DELAI_DEPASSE, str(exc)[:1000], source=self.name)
        except Exception as exc:
            self._log.exception("handler.failed", id=cmd.id, commande=cmd.commande,
                                source=cmd.source)
            rep = cmd.fail(Code.ERREUR_INTERNE, f"{type(exc).__name__}: {exc}"[:1000],
                           source=self.name)
        if self._serving.get((cmd.source, cmd.id)) is not asyncio.current_task():
            # Abandoned, and the handler did not let itself be cancelled: nobody awaits
            # this answer (the broker would drop it as late).
            self._log.info("reponse.abandoned", id=cmd.id, commande=cmd.commande,
                           source=cmd.source)
            return
        # Sent by a task of its own: this handler's slot is free once its answer is on
        # its way, not once flow control let it out (meanwhile the commander may have
        # its answer, and its next command met `limite` here).
        self._answer(rep)


def __getattr__(name: str) -> Any:
    # BlockingClient was defined here; it lives in blocking.py, which imports this
    # module (so it cannot be imported back at the top).
    if name == "BlockingClient":
        from .blocking import BlockingClient
        return BlockingClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DOM0_SOCKET",
    "DOMAINE_ENV",
    "DOMAINE_FILE",
    "REGISTER_COMMAND",
    "BlockingClient",
    "Client",
    "ClientState",
    "CommandError",
    "CommandTimeout",
    "Disconnected",
    "MessageStream",
    "MessagerieError",
    "NameUnknown",
    "resolve_domain_name",
]
