"""Fixtures shared by the client and CLI tests (a socat pty pair and the test's end of
it), and the guard that keeps the ``integration`` marker honest."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

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


#: Fixtures that are real ptys: a test using one is an integration test.
PTY_FIXTURES = frozenset({"pair", "peer"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if PTY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _unit_tests_stay_in_process(request: pytest.FixtureRequest,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A test not marked ``integration`` may not start a process, open a pty or bind or
    connect a socket: ``pytest -m "not integration"`` is then really the in-process
    suite. (The event loop's own socket pair is left alone.)"""
    if request.node.get_closest_marker("integration"):
        return

    def refuse(what: str) -> Any:
        def refused(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"{request.node.nodeid} uses {what}: mark it "
                                 "@pytest.mark.integration")
        return refused

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse("a subprocess"))
    monkeypatch.setattr(os, "openpty", refuse("a pty"))
    monkeypatch.setattr(socket.socket, "bind", refuse("a socket"))
    monkeypatch.setattr(socket.socket, "connect", refuse("a socket"))
