"""Commands in flight, pure: who asked what of whom, until when.

:class:`PendingCommands` is the one owner of the table of commands the broker forwarded
and that await their ``reponse``, and of each commander's count of them. The router
reads it (is this answer awaited? is this id already in flight? is this commander at
its limit? is this a late answer to a command given up?); the broker changes it only
through :meth:`~PendingCommands.add`, :meth:`~PendingCommands.close`,
:meth:`~PendingCommands.fail` and :meth:`~PendingCommands.expire`, so a count can never
drift from the table.

A command's deadline is ``min(delai, ttl)`` from its receipt (``delai`` is what the
``commande`` carries, ``ttl`` the broker's ``limites.duree_commande``). Commands that
expired, or whose commander went away, are *abandoned*: remembered (their commander, id
and replier) for :data:`ABANDONED_TTL` seconds, at most :data:`ABANDONED_PER_SLOT` times
its commander's ``limit`` per commander (one that lets its own commands expire forgets
only its own) and :data:`ABANDONED_MAX` in all, so that a late answer is told from a
forged one (:class:`AbandonedMemo`).

Endpoints are opaque here (``E``: the broker's endpoint objects, plain strings in
tests and fuzzing), compared by identity: a domain re-added under the same name, or
another dom0 service (they all speak as ``dom0``), is another endpoint (objects compare
by identity unless they say otherwise; ``Endpoint`` does not). Time comes
from an injectable ``clock``. No asyncio, no I/O.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, KeysView
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

E = TypeVar("E")
"""An endpoint, compared by identity."""

Key = tuple[str, str]
"""(commander, id): a command's identity on the wire."""

ABANDONED_TTL: Final = 600.0
"""Seconds an abandoned command is remembered: its late answer, within that time, is
dropped as late (an info event), not refused as unsolicited (a security event)."""
ABANDONED_PER_SLOT: Final = 8
"""Abandoned commands remembered per commander, per command it may have in flight (its
oldest are forgotten first)."""
ABANDONED_MAX: Final = 65536
"""Abandoned commands remembered at most in all, a last resort (the oldest of anyone's
are forgotten first)."""

DOMAIN: Final = "domaine"
"""Kind of a restored command's party that is a domain, named by its name."""
SERVICE: Final = "service"
"""Kind of a restored command's party that is a dom0 service: a commander is named
``dom0``, a server by the command it serves."""

ANSWER: Final = "answer"
""":meth:`PendingCommands.expire_restored`: tell its commander ``delai_depasse``."""
SILENT: Final = "silent"
"""... forget it without a word: its asker was a dom0 service, whose call failed when
its connection reset with the previous process."""
FORGOTTEN: Final = "forgotten"
"""... forget it: its commander did not connect within ``keep`` seconds past its
deadline."""


class AbandonedMemo:
    """Commands given up lately: (commander, id) -> (replier, when), oldest first, for
    :data:`ABANDONED_TTL` seconds; each commander's bounded on its own, so that one
    commander's flood of expired commands evicts only its own entries."""

    __slots__ = ("_all", "_of")

    def __init__(self) -> None:
        self._all: OrderedDict[Key, tuple[str, float]] = OrderedDict()
        self._of: dict[str, OrderedDict[str, None]] = {}
        """Per commander, its ids in the memo, oldest first."""

    def __len__(self) -> int:
        return len(self._all)

    def get(self, key: Key) -> tuple[str, float] | None:
        return self._all.get(key)

    def remember(self, key: Key, replier: str, now: float, bound: int) -> None:
        """Remember ``key`` as given up at ``now``; its commander keeps at most
        ``bound`` entries (its oldest go first)."""
        commander, id = key
        memo = self._all
        mine = self._of.setdefault(commander, OrderedDict())
        memo.pop(key, None)
        mine.pop(id, None)
        memo[key] = (replier, now)
        mine[id] = None
        while len(mine) > max(1, bound):
            del memo[(commander, mine.popitem(last=False)[0])]
        self.forget(now)

    def forget(self, now: float) -> None:
        """Forget what is older than :data:`ABANDONED_TTL`, and the oldest past
        :data:`ABANDONED_MAX`."""
        memo = self._all
        while memo and (len(memo) > ABANDONED_MAX
                        or next(iter(memo.values()))[1] <= now - ABANDONED_TTL):
            (commander, id), _ = memo.popitem(last=False)
            mine = self._of[commander]
            del mine[id]
            if not mine:
                del self._of[commander]


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
    """When it is answered ``delai_depasse`` (the table's clock): its receipt plus
    ``min(delai, ttl)``."""
    delai: float | None = None
    """The deadline the command carried (seconds from its receipt), if any."""
    spooled: bool = False
    """In its destination's spool, not yet written to it (the domain is offline): it
    survives the domain going down, and is delivered when it is back."""

    @property
    def key(self) -> Key:
        return (self.commander, self.id)


@dataclass(frozen=True, slots=True)
class Restored:
    """A command that was in flight when the previous broker process stopped, as the
    state file keeps it (``broker.inflight``): endpoints were objects of that process,
    so its parties are names. A domain is its name; a dom0 service that asked is
    ``dom0``, one that serves is the name of the command it serves."""

    commander: str
    id: str
    replier: str
    command: str
    asker_kind: str
    """:data:`DOMAIN` or :data:`SERVICE`."""
    asker: str
    target_kind: str
    target: str
    deadline: float
    """Wall-clock time (``time.time()``) at which it is answered ``delai_depasse``: the
    table's clock does not survive its process."""

    @property
    def key(self) -> Key:
        return (self.commander, self.id)

    def row(self) -> tuple[str, str, str, str, str, str, str, str, float]:
        return (self.commander, self.id, self.replier, self.command, self.asker_kind,
                self.asker, self.target_kind, self.target, self.deadline)


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

    __slots__ = ("_abandoned", "_counts", "_deadlines", "_pairs", "_sequence", "_table",
                 "clock", "limit", "limit_of", "per_target", "per_target_of", "restored",
                 "ttl", "ttl_of")

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
        self._deadlines: list[tuple[float, int, Pending[E]]] = []
        """A heap of (deadline, sequence, command), the commands answered or failed
        included until they reach the top or the heap is rebuilt (at twice the table's
        size): :meth:`expire` and :meth:`next_deadline` look at its top only."""
        self._sequence = itertools.count()
        self._abandoned = AbandonedMemo()
        """Abandoned commands, oldest first: (commander, id) -> (replier, when)."""
        self.restored: dict[Key, Restored] = {}
        """The commands the previous process had in flight (:meth:`restore`), until
        answered or expired. They count against no endpoint's limits (those slots were
        the old process's), and a new command may reuse their id."""

    # -- reading ------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._table)

    def __contains__(self, key: object) -> bool:
        return key in self._table

    def __iter__(self) -> Iterator[Pending[E]]:
        return iter(list(self._table.values()))

    def __repr__(self) -> str:
        return f"PendingCommands({sorted(self._table)!r})"

    def keys(self) -> KeysView[Key]:
        """The keys in flight, a live view (the group commit of ``broker.inflight``)."""
        return self._table.keys()

    def get(self, commander: str, id: str) -> Pending[E] | None:
        return self._table.get((commander, id))

    def expects(self, commander: str, id: str, replier: str, command: str | None) -> bool:
        """Does ``commander`` await a reponse with this ``id`` from ``replier``, to the
        command named ``command``? (An answer echoing another command's name would make
        its asker act on a result it never asked for.)"""
        return self.awaited(commander, id, replier, command) is not None

    def awaited(self, commander: str, id: str, replier: str, command: str | None
                ) -> Pending[E] | Restored | None:
        """The command such a reponse answers: one of this process's, else one the
        previous process had in flight (:attr:`restored`), else None."""
        key = (commander, id)
        pending = self._table.get(key)
        if pending is not None and pending.replier == replier and pending.command == command:
            return pending
        if self.restored:
            restored = self.restored.get(key)
            if (restored is not None and restored.replier == replier
                    and restored.command == command):
                return restored
        return None

    def abandoned(self, commander: str, id: str, replier: str) -> bool:
        """Was the command ``id`` of ``commander`` to ``replier`` abandoned lately (it
        expired, or its commander went away)? Its answer, if it comes, is late."""
        found = self._abandoned.get((commander, id))
        return found is not None and found[0] == replier

    def next_deadline(self) -> float | None:
        """The earliest deadline of a command in flight (the table's clock), if any."""
        heap = self._deadlines
        while heap and self._table.get(heap[0][2].key) is not heap[0][2]:
            heapq.heappop(heap)  # answered or failed meanwhile
        return heap[0][0] if heap else None

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

    def awaits_restored(self, commander: str, id: str, replier: str) -> bool:
        """Does a restored command ``(commander, id)`` to the domain ``replier`` still
        await its answer (a command spooled before the restart, being replayed)?"""
        restored = self.restored.get((commander, id))
        return (restored is not None and restored.target_kind == DOMAIN
                and restored.target == replier)

    # -- changing -----------------------------------------------------------------
    def add(self, commander: str, id: str, replier: str, command: str, *, asker: E,
            target: E, delai: float | None = None) -> Pending[E]:
        """Track a command forwarded to ``target``, due ``min(delai, ttl)`` seconds from
        now. The router refused duplicates and commanders at their limit before: this is
        not a decision, it is bookkeeping."""
        key = (commander, id)
        assert key not in self._table, f"{key} is already in flight"
        ttl = self.ttl_for(asker)
        pending = Pending(commander, id, replier, command, asker, target,
                          self.clock() + (ttl if delai is None else min(delai, ttl)), delai)
        self._table[key] = pending
        self._counts[asker] = self._counts.get(asker, 0) + 1
        pair = (asker, target)
        self._pairs[pair] = self._pairs.get(pair, 0) + 1
        heap = self._deadlines
        if len(heap) > 2 * len(self._table) + 64:
            # Bounded by the table, not by the commands answered within a ttl.
            heap[:] = [entry for entry in heap if self._table.get(entry[2].key) is entry[2]]
            heapq.heapify(heap)
        # The sequence number orders equal deadlines: commands are never compared.
        heapq.heappush(heap, (pending.deadline, next(self._sequence), pending))
        return pending

    def close(self, commander: str, id: str) -> Pending[E] | None:
        """Forget a command (answered, or dropped before its destination saw it)."""
        pending = self._table.pop((commander, id), None)
        if pending is not None:
            self._release(pending)
        return pending

    def fail(self, gone: E, abandoned: list[Pending[E]] | None = None, *,
             keep_spooled: bool = False) -> list[Pending[E]]:
        """An endpoint went away: forget the commands it asked (abandoned: added to
        ``abandoned``, if given, for the caller to tell their destinations), and return
        the ones that waited on it (for the caller to answer on their asker's behalf);
        with ``keep_spooled``, those still in its spool wait on (its channel went down,
        the domain is still declared)."""
        orphans = []
        for key, pending in list(self._table.items()):
            if pending.asker == gone:
                del self._table[key]
                self._release(pending)
                self._abandon(pending)
                if abandoned is not None:
                    abandoned.append(pending)
            elif pending.target == gone and not (keep_spooled and pending.spooled):
                del self._table[key]
                self._release(pending)
                orphans.append(pending)
        return orphans

    def retarget(self, old: E, new: E) -> int:
        """The commands waiting on ``old`` wait on ``new`` from now on (a departed
        discovered domain found again: its spooled commands go to its new endpoint).
        Returns how many moved."""
        moved = 0
        for pending in self._table.values():
            if pending.target == old:
                asker = pending.asker
                n = self._pairs[(asker, old)] - 1
                if n:
                    self._pairs[(asker, old)] = n
                else:
                    del self._pairs[(asker, old)]
                self._pairs[(asker, new)] = self._pairs.get((asker, new), 0) + 1
                pending.target = new
                moved += 1
        return moved

    def expire(self) -> list[Pending[E]]:
        """Forget and return the commands whose deadline has passed, earliest first
        (abandoned: their late answers are remembered as such)."""
        now = self.clock()
        expired = []
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            pending = heapq.heappop(heap)[2]
            if self._table.get(pending.key) is not pending:
                continue  # answered or failed meanwhile
            del self._table[pending.key]
            self._release(pending)
            self._abandon(pending)
            expired.append(pending)
        self._abandoned.forget(now)
        return expired

    # -- the previous process's commands ---------------------------------------------
    def restore(self, rows: Iterable[Restored]) -> None:
        """Await the answers to the commands the previous process had in flight."""
        self.restored = {r.key: r for r in rows}

    def close_restored(self, key: Key) -> Restored | None:
        """Forget a restored command (answered)."""
        return self.restored.pop(key, None)

    def expire_restored(self, now: float, reachable: Callable[[str], bool],
                        keep: float) -> list[tuple[Restored, str]]:
        """Forget and return the restored commands whose deadline passed at the
        wall-clock time ``now``, each with what is due: :data:`ANSWER` when its
        commander, a domain, is ``reachable`` (connected); :data:`SILENT` when a dom0
        service asked; :data:`FORGOTTEN` when its commander stayed unreachable ``keep``
        seconds past its deadline. The others wait for their commander. Those returned
        are abandoned (their late answers are remembered as such)."""
        due: list[tuple[Restored, str]] = []
        for key, r in list(self.restored.items()):
            if r.deadline > now:
                continue
            if r.asker_kind != DOMAIN:
                outcome = SILENT
            elif reachable(r.asker):
                outcome = ANSWER
            elif now - r.deadline > keep:
                outcome = FORGOTTEN
            else:
                continue
            del self.restored[key]
            self._abandoned.remember(key, r.replier, self.clock(),
                                     ABANDONED_PER_SLOT * self.limit)
            due.append((r, outcome))
        return due

    def _abandon(self, pending: Pending[E]) -> None:
        limit = self.limit if self.limit_of is None else self.limit_of(pending.asker)
        self._abandoned.remember(pending.key, pending.replier, self.clock(),
                                 ABANDONED_PER_SLOT * limit)

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
