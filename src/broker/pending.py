"""Commands in flight, pure: who asked what of whom, until when.

:class:`PendingCommands` is the one owner of the table of commands the broker forwarded
and that await their ``reponse``, and of each commander's count of them. The router
reads it (is this answer awaited? is this id already in flight? is this commander at
its limit?); the broker changes it only through :meth:`~PendingCommands.add`,
:meth:`~PendingCommands.close`, :meth:`~PendingCommands.fail` and
:meth:`~PendingCommands.expire`, so a count can never drift from the table.

Endpoints are opaque here (``E``: the broker's endpoint objects, plain strings in
tests and fuzzing), compared by identity: a domain re-added under the same name, or
another dom0 service (they all speak as ``dom0``), is another endpoint (objects compare
by identity unless they say otherwise; ``Endpoint`` does not). Time comes
from an injectable ``clock``. No asyncio, no I/O.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

E = TypeVar("E")
"""An endpoint, compared by identity."""

Key = tuple[str, str]
"""(commander, id): a command's identity on the wire."""


@dataclass(slots=True, eq=False)
class Pending(Generic[E]):
    """A command on its way: who answers it, until when, and who asked."""

    commander: str
    """The command's ``source`` (the domain, or ``dom0``)."""
    id: str
    replier: str
    """The command's ``destination``: the only name its ``reponse`` may come from."""
    command: str
    """The command's name, echoed by the answers the broker gives on its behalf."""
    asker: E
    """The endpoint the command came in by; its answer goes back there."""
    target: E
    """The endpoint the command went to (a domain's, or the dom0 service serving it):
    only this one may answer."""
    deadline: float
    spooled: bool = False
    """In its destination's spool, not yet written to it (the domain is offline): it
    survives the domain going down, and is delivered when it is back."""

    @property
    def key(self) -> Key:
        return (self.commander, self.id)


class PendingCommands(Generic[E]):
    """The commands in flight and, per asking endpoint, how many it has, in all and
    towards each endpoint it asked.

    ``limit`` is how many one endpoint may have (``limites.commandes_en_vol``),
    ``per_target`` how many of those may wait on one endpoint
    (``limites.commandes_en_vol_destination``: a destination that never answers holds
    at most that many of its commander's slots, the others stay free for the rest),
    ``ttl`` how long one waits before it is answered ``delai_depasse`` on its
    destination's behalf (``limites.duree_commande``); a reload changes them at once.
    """

    __slots__ = ("_counts", "_pairs", "_table", "clock", "limit", "limit_of", "per_target",
                 "per_target_of", "ttl", "ttl_of")

    def __init__(self, *, limit: int, ttl: float, per_target: int | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 limit_of: Callable[[E], int] | None = None,
                 ttl_of: Callable[[E], float] | None = None,
                 per_target_of: Callable[[E], int] | None = None) -> None:
        self.limit = limit
        self.per_target = limit if per_target is None else per_target
        self.ttl = ttl
        self.limit_of = limit_of
        self.ttl_of = ttl_of
        self.per_target_of = per_target_of
        """Per-asker ``limit``, ``ttl`` and ``per_target`` (a domain's
        ``[domaines.NAME]``), if given."""
        self.clock = clock
        self._table: dict[Key, Pending[E]] = {}
        self._counts: dict[E, int] = {}
        self._pairs: dict[tuple[E, E], int] = {}

    # -- reading ------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._table)

    def __contains__(self, key: object) -> bool:
        return key in self._table

    def __iter__(self) -> Iterator[Pending[E]]:
        return iter(list(self._table.values()))

    def __repr__(self) -> str:
        return f"PendingCommands({sorted(self._table)!r})"

    def get(self, commander: str, id: str) -> Pending[E] | None:
        return self._table.get((commander, id))

    def expects(self, commander: str, id: str, replier: str, command: str | None) -> bool:
        """Does ``commander`` await a reponse with this ``id`` from ``replier``, to the
        command named ``command``? (An answer echoing another command's name would make
        its asker act on a result it never asked for.)"""
        pending = self._table.get((commander, id))
        return (pending is not None and pending.replier == replier
                and pending.command == command)

    def in_flight(self, asker: E) -> int:
        """Commands ``asker`` sent that await an answer."""
        return self._counts.get(asker, 0)

    def limit_for(self, asker: E) -> int:
        return self.limit if self.limit_of is None else self.limit_of(asker)

    def ttl_for(self, asker: E) -> float:
        return self.ttl if self.ttl_of is None else self.ttl_of(asker)

    def at_limit(self, asker: E) -> bool:
        return self._counts.get(asker, 0) >= self.limit_for(asker)

    def in_flight_to(self, asker: E, target: E) -> int:
        """Commands ``asker`` sent to ``target`` that await an answer."""
        return self._pairs.get((asker, target), 0)

    def per_target_for(self, asker: E) -> int:
        return self.per_target if self.per_target_of is None else self.per_target_of(asker)

    def at_target_limit(self, asker: E, target: E) -> bool:
        return self._pairs.get((asker, target), 0) >= self.per_target_for(asker)

    # -- changing -----------------------------------------------------------------
    def add(self, commander: str, id: str, replier: str, command: str, *, asker: E,
            target: E) -> Pending[E]:
        """Track a command forwarded to ``target``. The router refused duplicates and
        commanders at their limit before: this is not a decision, it is bookkeeping."""
        key = (commander, id)
        assert key not in self._table, f"{key} is already in flight"
        pending = Pending(commander, id, replier, command, asker, target,
                          self.clock() + self.ttl_for(asker))
        self._table[key] = pending
        self._counts[asker] = self._counts.get(asker, 0) + 1
        pair = (asker, target)
        self._pairs[pair] = self._pairs.get(pair, 0) + 1
        return pending

    def close(self, commander: str, id: str) -> Pending[E] | None:
        """Forget a command (answered, or dropped before its destination saw it)."""
        pending = self._table.pop((commander, id), None)
        if pending is not None:
            self._release(pending)
        return pending

    def fail(self, gone: E, *, keep_spooled: bool = False) -> list[Pending[E]]:
        """An endpoint went away: forget the commands it asked, and return the ones
        that waited on it (for the caller to answer on their asker's behalf); with
        ``keep_spooled``, those still in its spool wait on (its channel went down, the
        domain is still declared)."""
        orphans = []
        for key, pending in list(self._table.items()):
            if pending.asker == gone:
                del self._table[key]
                self._release(pending)
            elif pending.target == gone and not (keep_spooled and pending.spooled):
                del self._table[key]
                self._release(pending)
                orphans.append(pending)
        return orphans

    def expire(self) -> list[Pending[E]]:
        """Forget and return the commands whose deadline has passed."""
        now = self.clock()
        expired = []
        for key, pending in list(self._table.items()):
            if pending.deadline <= now:
                del self._table[key]
                self._release(pending)
                expired.append(pending)
        return expired

    def _release(self, pending: Pending[E]) -> None:
        # Endpoints come and go: no entry per dead one.
        asker = pending.asker
        n = self._counts[asker] - 1
        if n:
            self._counts[asker] = n
        else:
            del self._counts[asker]
        pair = (asker, pending.target)
        n = self._pairs[pair] - 1
        if n:
            self._pairs[pair] = n
        else:
            del self._pairs[pair]
