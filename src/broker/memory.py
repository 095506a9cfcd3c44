"""One memory budget for every outbound queue together.

Each destination's queue is bounded (``limites.file_octets``), but a thousand of them
are not: with half the domains not reading and one DomU broadcasting, their bounds add
up past the unit's ``MemoryMax`` and the kernel kills the broker. The budget
(``limites.memoire_files``; by default 30 % of the cgroup's ``memory.max``, the
unit's ``MemoryMax=``) is checked only where a queue is already full (the slow path of
``Endpoint.send``). It cuts in order, so that memory goes to the queues of the
destinations that read: past three quarters of it, a destination holding more than
its share (the budget over the number of endpoints) takes no more when it makes no
progress (took none of its bytes lately: it stopped reading) or holds more than twice
its share; past the whole budget, any destination past its share takes no more. A
slow reader that keeps reading is cut last.

The total is the sum of every endpoint's queued bytes, recomputed at most every
:data:`RECOUNT_INTERVAL` seconds and counted up in between (an over-estimate: queues
only shrink behind our back). No I/O but reading the cgroup's limit once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Final, Protocol

RECOUNT_INTERVAL: Final = 0.05
"""Seconds between two exact counts of the queued bytes (each costs ~1 us a queue)."""
SHARE_OF_MEMORY_MAX: Final = 0.3
"""Of the cgroup's memory.max, for the queues: the rest is the process itself (38 MiB
with 1 000 domains connected), the allocator's slack around what the queues hold, and
the kernel's socket and tty buffers, which count too."""
UNLIMITED_DEFAULT: Final = 256 * 1024 * 1024
"""The budget when the broker runs without a memory limit (outside its unit)."""
MIN_BUDGET: Final = 4 * 1024 * 1024


class Queued(Protocol):
    def queued(self) -> int: ...


def cgroup_memory_max(proc: Path = Path("/proc/self/cgroup"),
                      root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The ``memory.max`` of our cgroup (v2), or of the nearest ancestor that has one;
    ``None`` when unlimited or unknown."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, _, path = line.partition("::")
        if hierarchy != "0":
            continue
        here = root / path.lstrip("/")
        while True:
            try:
                text = (here / "memory.max").read_text().strip()
            except OSError:
                text = "max"
            if text != "max":
                try:
                    return int(text)
                except ValueError:
                    return None
            if here == root or root not in here.parents:
                return None
            here = here.parent
    return None


def default_budget(memory_max: int | None) -> int:
    """What ``limites.memoire_files`` is when not set."""
    if memory_max is None:
        return UNLIMITED_DEFAULT
    return max(MIN_BUDGET, int(memory_max * SHARE_OF_MEMORY_MAX))


class MemoryBudget:
    """The queues' budget: :meth:`over` on a full queue's path, :attr:`share` the bytes
    one destination may hold once the budget is spent."""

    __slots__ = ("_checked_at", "_clock", "_endpoints", "_total", "limit", "share")

    def __init__(self, limit: int, endpoints: Callable[[], Iterable[Queued]], *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.share = limit
        self._endpoints = endpoints
        self._clock = clock
        self._total = 0
        self._checked_at = float("-inf")

    def resize(self, count: int) -> None:
        """``count`` endpoints now share the budget."""
        self.share = self.limit // max(1, count)

    def total(self) -> int:
        """The queued bytes, as last counted plus what was added since."""
        now = self._clock()
        if now - self._checked_at >= RECOUNT_INTERVAL:
            self._checked_at = now
            self._total = sum(ep.queued() for ep in self._endpoints())
        return self._total

    def over(self, n: int, fraction: float = 1.0) -> bool:
        """Would ``n`` more bytes pass the budget (or this fraction of it)?"""
        return self.total() + n > self.limit * fraction

    def add(self, n: int) -> None:
        """``n`` bytes were queued on a full queue's path."""
        self._total += n
