"""Fixtures shared by the client and CLI tests: a socat pty pair and the test's end."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support.peers import PtyPeer
from tests.support.ptys import PtyPair


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[PtyPair]:
    """A socat pty pair: the client opens ``pair.domu``, the test plays the broker on
    ``pair.dom0``."""
    p = PtyPair(tmp_path)
    yield p
    p.stop()


@pytest.fixture
async def peer(pair: PtyPair) -> AsyncIterator[PtyPeer]:
    p = PtyPeer(pair.dom0)
    yield p
    p.close()
