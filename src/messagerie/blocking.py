"""The blocking facade: the asyncio :class:`Client` for scripts without asyncio.

Not a second implementation: a :class:`Client` runs on a private event loop in a
background thread, and every blocking call is a coroutine handed to that loop through
a small portal (the idea of anyio's ``start_blocking_portal``), whose result or
exception comes back to the calling thread.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from concurrent.futures import Future as ConcurrentFuture
from typing import Any, TypeVar

from .client import Client
from .errors import Disconnected
from .model import Commande, Message, Reponse
from .streams import MessageStream

H = TypeVar("H", bound=Callable[..., Any])
T = TypeVar("T")


class _Portal:
    """An event loop running in a daemon thread, and the way in from other threads."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.call_soon(ready.set)
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name=name, daemon=True)
        self._thread.start()
        ready.wait()

    @property
    def running(self) -> bool:
        return not self._loop.is_closed()

    def call(self, awaitable: Awaitable[T], timeout: float | None = None) -> T:
        """Run ``awaitable`` on the loop; block until it is done, and return its result
        or raise its exception. Interrupted (Ctrl-C, ``timeout``), it is cancelled."""
        if threading.current_thread() is self._thread:
            if inspect.iscoroutine(awaitable):
                awaitable.close()
            raise RuntimeError("a blocking call from the client's own event loop would "
                               "wait for itself: await the async Client (.client) there")
        future: ConcurrentFuture[T] = asyncio.run_coroutine_threadsafe(
            _as_coroutine(awaitable), self._loop)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    def call_soon(self, fn: Callable[..., object], *args: object) -> None:
        """Run ``fn(*args)`` on the loop, without waiting for it."""
        self._loop.call_soon_threadsafe(fn, *args)

    def stop(self) -> None:
        """Stop the loop, join its thread, close the loop."""
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


async def _as_coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable


class BlockingClient:
    """The :class:`Client` for simple scripts: blocking calls, no asyncio.

    The asyncio client runs on a private event loop in a background thread::

        with BlockingClient("vm-ui", path="/dev/hvc1") as c:
            c.notify("tous", "domaine", "etat", {"pret": True})
            rep = c.command("vm-sys-usb", "liste_disques")
            msg = c.receive(timeout=1.0)   # None on timeout

    Handlers are plain functions, run in a worker thread::

        c = BlockingClient("vm-sys-usb")
        @c.handler("liste_disques")
        def lister(cmd): return ["sda"]
        with c: c.serve_forever()
    """

    def __init__(self, name: str | None = None, **kwargs: Any) -> None:
        self._client = Client(name, **kwargs)
        self._portal: _Portal | None = None
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
        if self._portal is not None:
            raise RuntimeError("client already open")
        self._portal = _Portal("messagerie-client")

        async def start() -> MessageStream:
            await self._client.open()
            return self._client.messages()

        try:
            self._inbox = self._run(start())
        except BaseException:
            self._stop_portal()
            raise

    def close(self) -> None:
        if self._portal is None:
            return
        try:
            self._run(self._client.close())
        finally:
            self._stop_portal()

    def _stop_portal(self) -> None:
        portal, self._portal = self._portal, None
        if portal is not None:
            portal.stop()

    def _run(self, coro: Awaitable[T]) -> T:
        if self._portal is None:
            if inspect.iscoroutine(coro):
                coro.close()
            raise Disconnected("client is not open")
        return self._portal.call(coro)

    def run(self, awaitable: Awaitable[T]) -> T:
        """Run ``awaitable`` (a coroutine using :attr:`client`) on the client's loop and
        return its result: how blocking wrappers of async helpers (``messagerie.socle``'s
        typed calls) are written without a second implementation."""
        return self._run(awaitable)

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
        if self._portal is None:
            self._client.add_handler(name, target)
        else:
            self._portal.call_soon(self._client.add_handler, name, target)

    def send(self, message: Message, *, timeout: float | None = None) -> None:
        self._run(self._client.send(message, timeout=timeout))

    def notify(self, destination: str, categorie: str, evenement: str,
               data: Mapping[str, Any] | None = None) -> None:
        self._run(self._client.notify(destination, categorie, evenement, data))

    def command(self, destination: str, commande: str,
                arguments: Mapping[str, Any] | None = None, *,
                timeout: float | None = None) -> Reponse:
        """As :meth:`Client.command`. Also available as ``commande()``."""
        return self._run(self._client.command(destination, commande, arguments,
                                              timeout=timeout))

    commande = command
    """French alias of :meth:`command`, kept for existing code."""

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
            portal = self._portal
            if portal is not None and portal.running:
                portal.call_soon(stream.close)

    def serve_forever(self) -> None:
        """Block until the client is closed (or Ctrl-C); handlers run meanwhile."""
        self._run(self._client.serve_forever())


__all__ = ["BlockingClient"]
