"""Rate limits, pure: a token bucket per channel, a warnings budget per peer.

No asyncio and no I/O: each takes a ``clock`` (``time.monotonic`` unless a test gives
its own), so refills and windows are testable without sleeping. What to do when a
budget is spent (stop reading a channel, drop a warning) is the caller's.
"""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; one token per frame read.

    The balance may go negative: a read's frames are all processed, then the channel
    is not read again until the bucket is back to zero (:attr:`deficit` seconds).
    """

    __slots__ = ("burst", "clock", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: float, clock: Clock = time.monotonic) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self.tokens = self.burst
        self.last = clock()

    def configure(self, rate: float, burst: float) -> None:
        """Take new limits (a reload); the balance stays (the next refill caps it)."""
        self.rate = rate
        self.burst = float(burst)

    def refill(self) -> float:
        """Add what the time since the last refill earned; return the balance."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        return self.tokens

    def spend(self, n: int) -> int:
        """Spend ``n`` tokens; return how many of those ``n`` frames were over budget
        (counted as throttled: they are read late)."""
        self.tokens -= n
        if self.tokens < 0:
            return min(n, int(-self.tokens) + 1)
        return 0

    @property
    def deficit(self) -> float:
        """Seconds until the balance is back to zero (0 when it is not negative)."""
        return -self.tokens / self.rate if self.tokens < 0 else 0.0


class LogBudget:
    """At most ``per_second`` warnings a second from one peer; the rest are counted
    and reported with the next one, so a hostile domain cannot flood the journal."""

    __slots__ = ("_clock", "_count", "_per_second", "_window", "suppressed")

    def __init__(self, per_second: int = 20, clock: Clock = time.monotonic) -> None:
        self._per_second = per_second
        self._clock = clock
        self._window = 0.0
        self._count = 0
        self.suppressed = 0

    def allow(self) -> bool:
        now = self._clock()
        if now - self._window >= 1.0:
            self._window = now
            self._count = 0
        self._count += 1
        if self._count <= self._per_second:
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int:
        n, self.suppressed = self.suppressed, 0
        return n
