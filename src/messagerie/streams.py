"""Message streams: the incoming messages a consumer asked for, as an async iterator.

A :class:`MessageStream` is a filter and a bounded queue; the client offers every
incoming message to every stream it holds (:meth:`Client.messages` makes them). It
knows nothing of the client: closing it calls back whoever registered it.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Final

from . import log as _events
from .model import Commande, Message, Notification, Reponse

log = _events.get_logger("messagerie.client")

DEFAULT_QUEUE_SIZE: Final = 1024


class MessageStream:
    """Incoming messages matching a filter, in order; an async iterator.

    Registered as soon as it is created, so nothing that arrives after
    :meth:`Client.messages` returns is missed. Its queue is bounded: when the consumer
    lags, the oldest message is dropped and counted in :attr:`dropped`. Ends when the
    client closes (after the queued messages) or when :meth:`close` is called.

    ``domain`` names the client's domain in the stream's log events; ``on_close`` is
    called once, with the stream, when it is closed (the client forgets it then).
    """

    def __init__(self, maxsize: int = DEFAULT_QUEUE_SIZE, *, type: str | None = None,
                 source: str | None = None, categorie: str | None = None,
                 commande: str | None = None, domain: str | None = None,
                 on_close: Callable[[MessageStream], None] | None = None) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be positive")
        self._queue: collections.deque[Message] = collections.deque()
        self._maxsize = maxsize
        self._waiter: asyncio.Future[None] | None = None
        self._overflowing = False
        self._domain = domain
        self._on_close = on_close
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
                log.warning("messages.dropped", domain=self._domain, dropped=self.dropped,
                            maxsize=self._maxsize)
        self._queue.append(msg)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def close(self) -> None:
        """Stop receiving; iteration ends once the queued messages are consumed."""
        if not self.closed:
            self.closed = True
            if self._on_close is not None:
                self._on_close(self)
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


__all__ = ["MessageStream"]
