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

:class:`Recovery` holds what was loaded at start (:class:`Restored` commands) and
applies it: a late answer from the domain (or the dom0 service) asked goes to the
commander; a deadline passed, while the broker was down or since, is answered
``delai_depasse`` to the commander once it is connected. A command a dom0 service asked
is not answered after a restart: the service's connection reset with the broker, and
its client failed the call then (``Disconnected``); its late answer is dropped
quietly, as an answer to a call that no longer exists, not as a forgery.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import structlog

from messagerie import DOM0, Code, Notification, Reponse, encode

from .pending import ABANDONED_PER_SLOT, AbandonedMemo
from .router import ABANDON_CATEGORY, ABANDON_EVENT
from .spool import Store, StoreError

if TYPE_CHECKING:
    from messagerie.envelope import Envelope

    from .endpoint import Endpoint
    from .hub import Broker
    from .pending import Key, Pending

COMMIT_INTERVAL: Final = 0.05
"""Seconds between two group commits of the table of commands in flight: the window a
crash may forget (``daemon``'s task; the last commit is at shutdown)."""
KEEP_UNREACHABLE: Final = 3600.0
"""Seconds past its deadline a restored command waits for its commander to connect
and be told ``delai_depasse``; then it is forgotten (logged)."""

DOMAIN: Final = "domaine"
"""Kind of a party that is a domain, named by its name."""
SERVICE: Final = "service"
"""Kind of a party that is a dom0 service: a commander is named ``dom0``, a server by
the command it serves."""

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


@dataclass(frozen=True, slots=True)
class Restored:
    """A command that was in flight when the broker stopped, as the table keeps it."""

    commander: str
    id: str
    replier: str
    command: str
    asker_kind: str
    asker: str
    target_kind: str
    target: str
    deadline: float
    """Wall-clock time (``time.time()``) at which it is answered ``delai_depasse``."""

    @property
    def key(self) -> Key:
        return (self.commander, self.id)

    def row(self) -> tuple[str, str, str, str, str, str, str, str, float]:
        return (self.commander, self.id, self.replier, self.command, self.asker_kind,
                self.asker, self.target_kind, self.target, self.deadline)


def party(endpoint: Endpoint, command: str, *, asking: bool) -> tuple[str, str]:
    """What names ``endpoint`` across a restart: (kind, name)."""
    if endpoint.kind == "domain":
        return DOMAIN, endpoint.name
    return SERVICE, DOM0 if asking else command


def restored_of(pending: Pending[Endpoint], wall_deadline: float) -> Restored:
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
    """The commands restored at start, and the group commit of the live table.

    Restored commands do not count against their commander's ``commandes_en_vol``
    (those slots were the old process's); they are kept until answered, or until
    their deadline is answered."""

    def __init__(self, broker: Broker, store: InflightStore, *,
                 wall: Callable[[], float] = time.time) -> None:
        self.broker = broker
        self.store = store
        self.wall = wall
        self.restored: dict[Key, Restored] = {}
        self.log = structlog.get_logger("broker").bind()
        self.failing: str | None = None
        """The last error of the database, while commits fail (logged once)."""
        self.late_answers = 0
        self.expired = 0
        self.given_up = AbandonedMemo()
        """Restored commands answered ``delai_depasse``: (replier, when), for
        ``ABANDONED_TTL`` seconds and bounded per commander, so that a late answer is
        dropped as late (info), as the live table's are."""

    def restore(self) -> int:
        """Load what the previous process had in flight; returns how many."""
        self.restored = {r.key: r for r in self.store.load()}
        if self.restored:
            now = self.wall()
            self.log.info("inflight.restored", commands=len(self.restored),
                          expired=sum(1 for r in self.restored.values() if r.deadline <= now))
        return len(self.restored)

    # -- group commit ---------------------------------------------------------------
    def commit(self) -> None:
        """Write the table's difference since the last commit (the daemon's task, every
        ``COMMIT_INTERVAL``, and once at shutdown after the drain)."""
        pending = self.broker.pending
        keys = set(pending.keys())
        if self.restored:
            keys.update(self.restored)
        offset = self.wall() - pending.clock()

        def row_of(key: Key) -> Restored:
            live = pending.get(*key)
            if live is not None:
                return restored_of(live, live.deadline + offset)
            return self.restored[key]

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

    # -- after a restart --------------------------------------------------------------
    def late_answer(self, peer: Endpoint, msg: Envelope) -> bool:
        """A ``reponse`` nobody in this process awaits: if it answers a restored
        command, from the party asked, deliver it (or drop it quietly when its asker
        was a dom0 service) and return True; else False (a real unsolicited answer)."""
        if not (self.restored or self.given_up) or msg.id is None:
            return False
        key = (msg.destination, msg.id)
        restored = self.restored.get(key)
        late = self.given_up.get(key)
        if restored is None and late is not None and late[0] == msg.source:
            peer.log.info("reponse.late", id=msg.id, command=msg.name,
                          detail="answers a command restored after a restart and answered "
                                 "delai_depasse since")
            return True
        if (restored is None or restored.replier != msg.source
                or restored.command != msg.name or not self._asked(peer, restored)):
            return False
        del self.restored[key]
        self.late_answers += 1
        if restored.asker_kind != DOMAIN:
            peer.log.info("reponse.asker_gone", id=msg.id, command=msg.name,
                          detail="a dom0 service asked before the broker restarted: its "
                                 "call failed when its connection reset")
            return True
        asker = self.broker.domains.get(restored.asker)
        if asker is None or not asker.send(msg.raw + b"\n", peer):
            peer.log.warning("reponse.undelivered", id=msg.id, command=msg.name,
                             destination=restored.asker, why="offline or full")
            return True
        peer.log.info("reponse.after_restart", id=msg.id, command=msg.name,
                      destination=restored.asker)
        return True

    def awaits(self, commander: str, id: str, replier: str) -> bool:
        """Does a restored command ``(commander, id)`` to the domain ``replier`` still
        await its answer (a command spooled before the restart, being replayed)?"""
        restored = self.restored.get((commander, id))
        return (restored is not None and restored.target_kind == DOMAIN
                and restored.target == replier)

    def _give_up(self, r: Restored, now: float) -> None:
        """Remember ``r`` as answered on its destination's behalf, and tell the domain
        serving it that nobody awaits its answer (as for a live command: its client
        cancels the handler)."""
        limit = self.broker.config.limits_for(r.commander).commands_in_flight
        self.given_up.remember(r.key, r.replier, now, ABANDONED_PER_SLOT * limit)
        target = self.broker.domains.get(r.target) if r.target_kind == DOMAIN else None
        if target is not None and target.transport is not None:
            target.send(encode(Notification(DOM0, r.replier, ABANDON_CATEGORY, ABANDON_EVENT,
                                            {"source": r.commander, "id": r.id,
                                             "commande": r.command})))

    def _asked(self, peer: Endpoint, restored: Restored) -> bool:
        """Is ``peer`` the party the restored command was sent to?"""
        if restored.target_kind == DOMAIN:
            return self.broker.domains.get(restored.target) is peer
        if peer.kind == "domain":
            return False
        # A dom0 service: the one serving the command now, or any while none does
        # yet (its client answers through its new connection, maybe before it
        # registered again: dom0's socket admits only dom0's own services).
        server = self.broker.dom0.services.get(restored.command)
        return server is None or server is peer

    def expire(self) -> None:
        """Answer ``delai_depasse`` for the restored commands whose deadline passed,
        to each commander that is connected (the others wait for it, up to
        ``KEEP_UNREACHABLE``). Called with the live table's expiry."""
        if not self.restored:
            return
        now = self.wall()
        broker = self.broker
        for key, r in list(self.restored.items()):
            if r.deadline > now:
                continue
            if r.asker_kind != DOMAIN:
                del self.restored[key]  # its caller is gone (see the module's docstring)
                self._give_up(r, now)
                continue
            if broker.is_connected(r.asker):
                del self.restored[key]
                self.expired += 1
                reply = Reponse(DOM0, r.commander, r.id, r.command, "erreur",
                                erreur={"code": Code.DELAI_DEPASSE,
                                        "message": f"{r.replier} did not answer in time "
                                                   "(the broker restarted meanwhile)"})
                broker.domains[r.asker].send(encode(reply))
                self._give_up(r, now)
            elif now - r.deadline > KEEP_UNREACHABLE:
                self._give_up(r, now)
                del self.restored[key]
                self.log.warning("inflight.forgotten", commander=r.commander, id=r.id,
                                 command=r.command, replier=r.replier,
                                 detail="its commander did not connect after its deadline")
