"""One open channel, as an asyncio protocol: frames in, flow control out.

The bytes are cut and decoded by the sans-IO :class:`~messagerie.codec.FrameDecoder`;
this module only binds it to a transport. Decoded messages and the end of the
connection are handed to callbacks (the client's), so it knows nothing of the client.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from . import log as _events
from .codec import FrameDecoder, FrameError
from .errors import Disconnected
from .model import Message

log = _events.get_logger("messagerie.client")


class Connection(asyncio.Protocol):
    """One open channel: decodes frames for ``on_message``, tracks write flow control,
    and calls ``on_lost`` once when the channel goes away."""

    def __init__(self, on_message: Callable[[Message], None],
                 on_lost: Callable[[Connection, Exception | None], None], *,
                 max_frame: int, domain: str | None = None) -> None:
        self._on_message = on_message
        self._on_lost = on_lost
        self._domain = domain
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
                log.warning("frame.invalid", domain=self._domain, reason=str(item.reason),
                            field=item.field, detail=item.detail, size=item.size,
                            excerpt=item.excerpt)
            else:
                self._on_message(item)

    def eof_received(self) -> bool | None:
        return None  # close the transport: the peer went away

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.closed.set()
        self._can_write.set()
        self._on_lost(self, exc)

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    async def drain(self) -> None:
        """Wait while the transport's write buffer is above its high-water mark."""
        await self._can_write.wait()
        if self.lost:
            raise Disconnected("channel closed")


__all__ = ["Connection"]
