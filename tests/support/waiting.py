# ruff: noqa: ASYNC109  (explicit timeouts read best here)
"""Waiting on conditions with deadlines. Nothing here sleeps a fixed time to wait for
something: a condition is polled until it holds or its deadline passes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: How long a positive wait lasts before it fails: generous, the machine may be loaded
#: (a wait that succeeds returns as soon as its condition holds).
DEFAULT_TIMEOUT = 10.0

Description = str | Callable[[], str]


def _timed_out(timeout: float, what: Description) -> AssertionError:
    return AssertionError(f"timed out after {timeout:g} s waiting for "
                          f"{what() if callable(what) else what}")


def wait_until(predicate: Callable[[], T], timeout: float = DEFAULT_TIMEOUT,
               what: Description = "condition", interval: float = 0.01) -> T:
    """Call ``predicate`` until it returns something true and return that; raise
    ``AssertionError`` naming ``what`` (a string, or a function giving one at failure
    time) after ``timeout`` seconds. ``predicate`` may itself block briefly (read with
    a short timeout): then ``interval`` can be 0."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise _timed_out(timeout, what)
        if interval:
            time.sleep(interval)


async def async_wait_until(predicate: Callable[[], T], timeout: float = DEFAULT_TIMEOUT,
                           what: Description = "condition", interval: float = 0.01) -> T:
    """:func:`wait_until` for a coroutine: the event loop runs between two calls."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise _timed_out(timeout, what)
        await asyncio.sleep(interval)
