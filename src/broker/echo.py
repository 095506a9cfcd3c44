"""Recognising the broker's own bytes echoed back on a domain's channel.

A DomU's channel is a tty that starts in echo mode and returns to it on its last
close. What dom0 wrote while no DomU program held the device raw comes back, line by
line (``\\r\\n`` for ``\\n``), as soon as something opens it: the broker then reads its
own ``connecte`` notification, or another domain's message, from a domain that did
not send it. Routed like anything else that would be a forged source
(``message.refused why=spoofed_source``, a security event), which it is not.

:class:`EchoWindow` remembers the last :data:`WINDOW` bytes written to one channel
(a DomU's tty input holds 4 KiB, so an echo never replays more than that) and answers
whether a refused frame is one of the lines in it, byte for byte. Only a frame already
refused is looked up, so the common case pays one append per write. A domain that
wants its forgery to pass for an echo has to send back exactly what the broker sent
it, which is harmless: it is dropped all the same.

Sans-IO: no asyncio, no logging; the broker decides what to log.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

WINDOW: Final = 8 * 1024
"""Bytes of recent output kept per channel (at most twice that between trims): twice
the tty's 4 KiB input buffer, so that 1 000 domains cost at most 16 MiB."""


class EchoWindow:
    """The recent output of one channel, newline-delimited."""

    __slots__ = ("_tail", "echoed")

    def __init__(self) -> None:
        self._tail = bytearray(b"\n")
        """What was written lately, preceded by a newline so that every whole line in
        it is ``\\n<line>\\n``."""
        self.echoed = 0
        """Frames recognised as echoes."""

    def sent(self, chunks: Iterable[bytes]) -> None:
        """Bytes written to the channel (frames, each ending with a newline)."""
        tail = self._tail
        for chunk in chunks:
            tail += chunk
        if len(tail) > 2 * WINDOW:
            # Keep the last WINDOW bytes, from a line's start.
            cut = tail.find(b"\n", len(tail) - WINDOW)
            del tail[:cut if cut >= 0 else len(tail)]
            if not tail:
                tail += b"\n"

    def is_echo(self, frame: bytes) -> bool:
        """Whether ``frame`` (without its newline; a trailing ``\\r`` is allowed) is a
        whole line the broker wrote to this channel recently. Counted when it is."""
        line = frame.rstrip(b"\r")
        if not line:
            return False
        found = b"\n" + line + b"\n" in self._tail
        if found:
            self.echoed += 1
        return found

    def echoes(self, data: bytes) -> int:
        """How many lines of ``data`` (several frames, newlines included) are echoes,
        each looked up on its own: one echo in front of forgeries covers only itself.
        Counted."""
        tail = self._tail
        found = 0
        for ln in data.split(b"\n"):
            line = ln.rstrip(b"\r")
            if line and b"\n" + line + b"\n" in tail:
                found += 1
        self.echoed += found
        return found
