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


class _Deadline:
    """When a wait gives up: :meth:`check` raises ``AssertionError`` naming ``what`` (a
    string, or a function giving one at failure time) once ``timeout`` has passed."""

    def __init__(self, timeout: float, what: Description) -> None:
        self.timeout, self.what = timeout, what
        self.at = time.monotonic() + timeout

    def check(self) -> None:
        if time.monotonic() > self.at:
            what = self.what() if callable(self.what) else self.what
            raise AssertionError(f"timed out after {self.timeout:g} s waiting for {what}")


def wait_until(predicate: Callable[[], T], timeout: float = DEFAULT_TIMEOUT,
               what: Description = "condition", interval: float = 0.01) -> T:
    """Call ``predicate`` until it returns something true and return that; raise
    ``AssertionError`` naming ``what`` (a string, or a function giving one at failure
    time) after ``timeout`` seconds. ``predicate`` may itself block briefly (read with
    a short timeout): then ``interval`` can be 0."""
    deadline = _Deadline(timeout, what)
    while not (value := predicate()):
        deadline.check()
        if interval:
            time.sleep(interval)
    return value


async def async_wait_until(predicate: Callable[[], T], timeout: float = DEFAULT_TIMEOUT,
                           what: Description = "condition", interval: float = 0.01) -> T:
    """:func:`wait_until` for a coroutine: the event loop runs between two calls."""
    deadline = _Deadline(timeout, what)
    while not (value := predicate()):
        deadline.check()
        await asyncio.sleep(interval)
    return value
