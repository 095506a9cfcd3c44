"""Fixtures shared by the client and CLI tests: a socat pty pair and the test's end."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from helpers_client import PtyPeer, SocatPair


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[SocatPair]:
    """A socat pty pair: the client opens ``pair.a``, the test plays the peer on ``b``."""
    p = SocatPair(tmp_path).start()
    yield p
    p.stop()


@pytest.fixture
async def peer(pair: SocatPair) -> AsyncIterator[PtyPeer]:
    p = PtyPeer(pair.b)
    yield p
    p.close()
