"""The uplink buffer: what must go up to MQTT, bounded in count, bytes and age.

Pure (the clock is passed in). Messages wait here while the uplink is down or slow;
the oldest go first when a bound is reached (the newest state is the most useful to a
supervisor), and every drop is counted by cause. The bridge logs one event per
overflow episode, not one per message.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Item:
    topic: str
    payload: bytes
    qos: int
    correlation: bytes | None
    since: float


@dataclass
class Dropped:
    """Messages dropped, by the bound that dropped them."""

    count: int = 0
    bytes: int = 0
    age: int = 0

    @property
    def total(self) -> int:
        return self.count + self.bytes + self.age


@dataclass
class UplinkBuffer:
    max_messages: int
    max_bytes: int
    max_age: float
    items: deque[Item] = field(default_factory=deque)
    size: int = 0
    dropped: Dropped = field(default_factory=Dropped)

    def __len__(self) -> int:
        return len(self.items)

    def put(self, item: Item) -> int:
        """Queue ``item``, dropping the oldest to make room; return how many went."""
        before = self.dropped.total
        if len(item.payload) > self.max_bytes:
            self.dropped.bytes += 1  # could never fit: the newest itself goes
            return 1
        self.items.append(item)
        self.size += len(item.payload)
        while len(self.items) > self.max_messages:
            self._pop()
            self.dropped.count += 1
        while self.size > self.max_bytes:
            self._pop()
            self.dropped.bytes += 1
        return self.dropped.total - before

    def expire(self, now: float) -> int:
        """Drop what waited longer than ``max_age``; return how many."""
        n = 0
        while self.items and now - self.items[0].since > self.max_age:
            self._pop()
            n += 1
        self.dropped.age += n
        return n

    def take(self, n: int) -> list[Item]:
        """The ``n`` oldest items, out of the buffer (being sent)."""
        return [self._pop() for _ in range(min(n, len(self.items)))]

    def requeue(self, items: list[Item]) -> int:
        """Put back, at the head and in their order, items whose sending failed; the
        bounds still hold (the oldest go first). Return how many were dropped."""
        for item in reversed(items):
            self.items.appendleft(item)
            self.size += len(item.payload)
        n = 0
        while len(self.items) > self.max_messages:
            self._pop()
            self.dropped.count += 1
            n += 1
        while self.size > self.max_bytes:
            self._pop()
            self.dropped.bytes += 1
            n += 1
        return n

    def _pop(self) -> Item:
        item = self.items.popleft()
        self.size -= len(item.payload)
        return item
