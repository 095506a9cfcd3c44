"""The commands in flight, kept across a restart or a crash of the broker.

:class:`InflightStore` mirrors the broker's table of commands in flight
(:class:`~broker.pending.PendingCommands`) in a table of an SQLite database (the
spool's), by group commit: :meth:`InflightStore.commit` is called every
``COMMIT_INTERVAL`` seconds and at shutdown, and writes the difference since the
previous one (the commands forwarded since, the ones answered since) in one
transaction. Nothing is written per command on the routing path: a command answered
within one interval is never written at all. The window this leaves: a command forwarded
less than ``COMMIT_INTERVAL`` before a crash (SIGKILL, power loss: see docs/broker.md,
"Delivery guarantees") is not remembered, and its late answer is refused after the
restart as an answer nobody awaits.

Endpoints are objects of one process: the table keeps names. A domain is its name (its
endpoint after the restart is the one with that name); a dom0 service that serves a
command is the name of that command (after a restart every dom0 service is a new
connection, and the one serving the name then is the one that may answer). Deadlines
are kept as wall-clock times (``PendingCommands`` counts on a monotonic clock, which
does not survive the process).

:class:`Recovery` loads at start what the previous process had in flight into the live
table (:attr:`~broker.pending.PendingCommands.restored`), where the router decides on
their late answers as on any other (``broker.router``, rules 4 and 7), and the hub
expires them (:meth:`~broker.pending.PendingCommands.expire_restored`): a late answer
from the domain (or the dom0 service) asked goes to the commander; a deadline passed,
while the broker was down or since, is answered ``delai_depasse`` to the commander once
it is connected. A command a dom0 service asked is not answered after a restart: the
service's connection reset with the broker, and its client failed the call then
(``Disconnected``); its late answer is dropped quietly, as an answer to a call that no
longer exists, not as a forgery.

This module knows the table and the file, not the broker.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable
from typing import Any, Final, Protocol

import structlog

from messagerie import DOM0

from .pending import DOMAIN, SERVICE, Key, Pending, PendingCommands, Restored
from .spool import Store, StoreError

__all__ = ["COMMIT_INTERVAL", "DOMAIN", "KEEP_UNREACHABLE", "SERVICE", "InflightStore",
           "Party", "Recovery", "Restored", "party", "restored_of"]

COMMIT_INTERVAL: Final = 0.05
"""Seconds between two group commits of the table of commands in flight: the window a
crash may forget (``daemon``'s task; the last commit is at shutdown)."""
KEEP_UNREACHABLE: Final = 3600.0
"""Seconds past its deadline a restored command waits for its commander to connect
and be told ``delai_depasse``; then it is forgotten (logged)."""

COMPONENT: Final = "commandes_en_vol"
SCHEMA_VERSION: Final = 1
SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS commandes_en_vol (
    commander TEXT NOT NULL,
    id TEXT NOT NULL,
    replier TEXT NOT NULL,
    command TEXT NOT NULL,
    asker_kind TEXT NOT NULL,
    asker TEXT NOT NULL,
    target_kind TEXT NOT NULL,
    target TEXT NOT NULL,
    deadline REAL NOT NULL,
    PRIMARY KEY (commander, id)
) WITHOUT ROWID
"""


class Party(Protocol):
    """What names an endpoint across a restart (the broker's endpoints have both)."""

    @property
    def kind(self) -> str:
        """``domain``, or a dom0 service's kind."""
        ...

    @property
    def name(self) -> str: ...


def party(endpoint: Party, command: str, *, asking: bool) -> tuple[str, str]:
    """What names ``endpoint`` across a restart: (kind, name)."""
    if endpoint.kind == "domain":
        return DOMAIN, endpoint.name
    return SERVICE, DOM0 if asking else command


def restored_of(pending: Pending[Any], wall_deadline: float) -> Restored:
    asker_kind, asker = party(pending.asker, pending.command, asking=True)
    target_kind, target = party(pending.target, pending.command, asking=False)
    return Restored(pending.commander, pending.id, pending.replier, pending.command,
                    asker_kind, asker, target_kind, target, wall_deadline)


class InflightStore:
    """The ``commandes_en_vol`` table of the broker's state file (the spool's
    :class:`~broker.spool.Store`), written by group commit.

    Errors of the database (disk full, read-only, corrupt file) come out as
    :class:`~broker.spool.StoreError` to the caller, which logs them and keeps routing:
    the table in memory is the truth, the file its copy, and the next commit writes
    the whole difference again."""

    def __init__(self, store: Store) -> None:
        self.store = store
        store.schema(COMPONENT, SCHEMA_VERSION, [SCHEMA])
        self.written: set[Key] = set()
        """The keys the file holds (after the last successful commit)."""
        self.commits = 0
        self.rows_written = 0

    def load(self) -> list[Restored]:
        """Every command the file holds (what was in flight at the last commit)."""
        try:
            rows = self.store.db.execute(
            "SELECT commander, id, replier, command, asker_kind, asker, target_kind, "
                "target, deadline FROM commandes_en_vol").fetchall()
        except sqlite3.Error as exc:
            raise StoreError(self.store.path, str(exc)) from None
        found = [Restored(*row) for row in rows]
        self.written = {r.key for r in found}
        return found

    def commit(self, keys: Iterable[Key], row_of: Callable[[Key], Restored]) -> int:
        """Make the file hold exactly ``keys``: write the ones it lacks (``row_of``
        gives each one's row), delete the ones no longer there. One transaction;
        nothing at all when nothing changed. Returns the rows written or deleted."""
        wanted = keys if isinstance(keys, set) else set(keys)
        new = wanted - self.written
        gone = self.written - wanted
        if not new and not gone:
            return 0
        with self.store.transaction() as db:
            if gone:
                db.executemany("DELETE FROM commandes_en_vol WHERE commander = ? "
                               "AND id = ?", gone)
            if new:
                db.executemany(
                    "INSERT OR REPLACE INTO commandes_en_vol VALUES (?, ?, ?, ?, ?, ?, ?, "
                    "?, ?)", [row_of(k).row() for k in new])
        self.written = wanted
        self.commits += 1
        self.rows_written += len(new) + len(gone)
        return len(new) + len(gone)


class Recovery:
    """Loads the previous process's commands into the live table, and mirrors the
    table in the file (group commit)."""

    def __init__(self, pending: PendingCommands[Any], store: InflightStore, *,
                 wall: Callable[[], float] = time.time) -> None:
        self.pending = pending
        self.store = store
        self.wall = wall
        self.log = structlog.get_logger("broker").bind()
        self.failing: str | None = None
        """The last error of the database, while commits fail (logged once)."""

    @property
    def restored(self) -> dict[Key, Restored]:
        """The restored commands still awaited (the live table's)."""
        return self.pending.restored

    def restore(self) -> int:
        """Load what the previous process had in flight; returns how many."""
        self.pending.restore(self.store.load())
        restored = self.pending.restored
        if restored:
            now = self.wall()
            self.log.info("inflight.restored", commands=len(restored),
                          expired=sum(1 for r in restored.values() if r.deadline <= now))
        return len(restored)

    def commit(self) -> None:
        """Write the table's difference since the last commit (the daemon's task, every
        ``COMMIT_INTERVAL``, and once at shutdown after the drain)."""
        pending = self.pending
        keys = set(pending.keys())
        restored = pending.restored
        if restored:
            keys.update(restored)
        offset = self.wall() - pending.clock()

        def row_of(key: Key) -> Restored:
            live = pending.get(*key)
            if live is not None:
                return restored_of(live, live.deadline + offset)
            return restored[key]

        try:
            self.store.commit(keys, row_of)
        except StoreError as exc:
            if str(exc) != self.failing:
                self.failing = str(exc)
                self.log.error("inflight.commit_failed", error=str(exc),
                               commands=len(keys),
                               detail="commands in flight are not kept across a restart "
                                      "until the state directory is writable again")
            return
        if self.failing is not None:
            self.failing = None
            self.log.info("inflight.commit_recovered", commands=len(keys))
