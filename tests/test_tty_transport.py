"""The broker's tty transport (messagerie.channel), in process on a pipe."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from messagerie.channel import _TtyTransport
from tests.support.waiting import async_wait_until


class Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.lost: list[Exception | None] = []

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)


async def test_what_a_failed_write_kept_counts_as_buffered_until_the_protocol_hears() -> None:
    # The broker takes written - get_write_buffer_size() as what left for the peer (the
    # spool's replay deletes the rows before it). A write that failed keeps its bytes in
    # `unwritten` until the protocol hears of the failure on a later loop turn; counted
    # as gone meanwhile, a replay step there deleted rows that were never written, and
    # they came back, re-spooled, after the rest (a domain killed during its replay).
    loop = asyncio.get_running_loop()
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    protocol = Recorder()
    transport: Any = _TtyTransport(loop, protocol, write_end, "pipe")
    os.close(read_end)  # the peer is gone: the next write fails (EPIPE)
    transport.write(b"one frame\n")
    assert transport.unwritten == b"one frame\n"
    assert transport.get_write_buffer_size() == len(b"one frame\n")
    transport.write(b"another\n")  # after the failure, before the protocol heard
    assert transport.get_write_buffer_size() == len(b"one frame\nanother\n")
    await async_wait_until(lambda: protocol.lost, 5, "the protocol to hear of the failure",
                           interval=0)
    assert transport.unwritten == b"one frame\nanother\n"
