"""The spool: messages kept for declared domains whose channel is down.

Three layers, the way the rest of the broker is built:

* :class:`Store` is the SQLite file (stdlib ``sqlite3``, WAL journal,
  ``synchronous=NORMAL``) and nothing else: open it, give it tables
  (:meth:`Store.schema`), change them in one transaction (:meth:`Store.transaction`),
  and the spool table's own queries. The broker's other durable state (the commands in
  flight) lives in the same file, in tables of its own.
* :class:`Bounds` and :class:`Depth` are arithmetic, no I/O: how much one destination
  may keep (messages, bytes, age) and whether one more message fits.
* :class:`Spool` is what the broker talks to: per destination a :class:`Lane` (its depth,
  its replay cursor, the rows written but not yet known to be out of the broker), one
  batch of rows to insert and delete that is committed once per loop turn (group
  commit: one transaction whatever the number of messages), and the unavailable state
  (an unwritable or full state directory) that makes the broker route as if there were
  no spool.

Durability. A row is *in the spool* once its transaction committed. WAL with
``synchronous=NORMAL`` keeps every committed transaction across a crash of the process
(SIGKILL, an exception, the OOM killer): the WAL is in the file system's page cache.
It does not keep the last transactions across a crash of the machine or a power cut
(the WAL is fsynced at checkpoints, not at every commit): those may roll back, never
corrupt the file. That is the price of keeping ``fsync`` off the message path.

A row is deleted once its bytes left the broker (handed to the kernel by the channel's
``write``): what a domain had not read when its channel dropped again is not known to
the broker, so a row can be delivered twice (at-least-once), never silently lost
within the bounds.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, NamedTuple

SPOOL_FILE: Final = "spool.sqlite3"
"""The database's name in the state directory."""
SCHEMA: Final = "spool"
SCHEMA_VERSION: Final = 1
PROBE_BYTES: Final = 64 * 1024
"""What :meth:`Spool.probe` writes (and deletes) to tell whether the file can be written
again: more than a small batch needs."""
SPOOL_TABLES: Final = (
    # seq: the rowid, so an insert is an append to the table's b-tree. AUTOINCREMENT:
    # never a number used before, even once every row was deleted (plain rowids give
    # max(rowid)+1, which reuses the numbers of a replayed spool: a lane's replay
    # cursor and its confirmed position only grow, so a second outage's rows would sit
    # below them, never replayed, then deleted unsent).
    """CREATE TABLE IF NOT EXISTS spool (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        destination TEXT NOT NULL,
        source TEXT NOT NULL,
        kind TEXT NOT NULL,
        name TEXT,
        msg_id TEXT,
        queued_at REAL NOT NULL,
        deadline REAL,
        frame BLOB NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS spool_by_destination ON spool (destination, seq)",
)
"""The spool's table: one row per message (``frame``: its bytes, newline included, as
they would have been written), in arrival order per destination. ``queued_at`` and
``deadline`` are Unix times (they outlive the process); ``msg_id`` and ``deadline``
are set for a ``commande`` (its commander is ``source``)."""


class StoreError(Exception):
    """The state file cannot be opened, read or written: names the path and the
    operating system's (or SQLite's) reason."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class Row(NamedTuple):
    """One spooled message, as read back (:meth:`Store.rows`)."""

    seq: int
    source: str
    kind: str
    name: str | None
    msg_id: str | None
    queued_at: float
    deadline: float | None
    frame: bytes


@dataclass(slots=True)
class Entry:
    """One message to spool: a :class:`Row` without its ``seq`` (given at commit)."""

    destination: str
    source: str
    kind: str
    name: str | None
    msg_id: str | None
    queued_at: float
    deadline: float | None
    frame: bytes

    def values(self) -> tuple[object, ...]:
        return (self.destination, self.source, self.kind, self.name, self.msg_id,
                self.queued_at, self.deadline, self.frame)


class Store:
    """The broker's state file: one SQLite database.

    The API other modules build on::

        store = Store.open(path)                       # StoreError if it cannot
        store.schema("pending", 1, ["CREATE TABLE IF NOT EXISTS pending (...)"])
        with store.transaction() as db:                 # BEGIN IMMEDIATE ... COMMIT
            db.execute("INSERT INTO pending ...")
        rows = store.db.execute("SELECT ...").fetchall()   # reads need no transaction
        store.close()

    Every ``sqlite3.Error`` and ``OSError`` comes out as :class:`StoreError`
    from :meth:`open`, :meth:`schema` and :meth:`transaction`. One connection, used from
    the event loop's thread only; ``check_same_thread`` stays on.
    """

    def __init__(self, path: str, db: sqlite3.Connection) -> None:
        self.path = path
        self.db = db

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Store:
        """Open (or create) the database at ``path``, in WAL mode, with the spool's
        tables. Its directory is created if missing (mode 0700)."""
        where = str(path)
        try:
            Path(where).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # First as a plain file: a read-only or full file system is reported with
            # the system's own words (SQLite would say "unable to open database file").
            os.close(os.open(where, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
            # isolation_level=None: no implicit transactions; ``transaction`` begins them.
            db = sqlite3.connect(where, isolation_level=None, timeout=0.0)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(where, _reason(exc)) from None
        store = cls(where, db)
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(where, f"cannot use a write-ahead log (journal_mode={mode})")
            db.execute("PRAGMA synchronous=NORMAL")
            store.schema(SCHEMA, SCHEMA_VERSION, SPOOL_TABLES)
        except sqlite3.Error as exc:
            db.close()
            raise StoreError(where, _reason(exc)) from None
        except StoreError:
            db.close()
            raise
        return store

    def close(self) -> None:
        """Close the connection (a checkpoint folds the WAL into the database)."""
        with contextlib.suppress(sqlite3.Error):
            self.db.close()

    def schema(self, component: str, version: int, statements: Sequence[str]) -> int:
        """Create ``component``'s tables (idempotent statements: ``CREATE ... IF NOT
        EXISTS``) and record its version; return the version the file had (0: none).

        A file written by a newer version of ``component`` is refused (StoreError): an
        older broker does not guess at a layout it does not know. Upgrades from an
        older version are the caller's (compare the returned version)."""
        with self.transaction() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_versions ("
                       "component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
            found = db.execute("SELECT version FROM schema_versions WHERE component = ?",
                               (component,)).fetchone()
            before = int(found[0]) if found else 0
            if before > version:
                raise StoreError(self.path, f"{component} tables are version {before}, "
                                 f"this broker knows up to {version}")
            for statement in statements:
                db.execute(statement)
            db.execute("INSERT OR REPLACE INTO schema_versions VALUES (?, ?)",
                       (component, version))
        return before

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed when the block ends, rolled back if it
        raises. ``BEGIN IMMEDIATE`` takes the write lock at once (another process
        holding the file fails here, not halfway through)."""
        db = self.db
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(self.path, _reason(exc)) from None
        try:
            yield db
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StoreError(self.path, _reason(exc)) from None
            raise
        try:
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise StoreError(self.path, _reason(exc)) from None

    # -- the spool table ---------------------------------------------------------------
    @staticmethod
    def insert(db: sqlite3.Connection, entries: Iterable[Entry]) -> None:
        """Append ``entries`` (inside a transaction), in order."""
        db.executemany("INSERT INTO spool (destination, source, kind, name, msg_id, "
                       "queued_at, deadline, frame) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (e.values() for e in entries))

    @staticmethod
    def delete_through(db: sqlite3.Connection, destination: str, seq: int) -> int:
        """Delete ``destination``'s rows up to ``seq`` included (they were written)."""
        return db.execute("DELETE FROM spool WHERE destination = ? AND seq <= ?",
                          (destination, seq)).rowcount

    @staticmethod
    def delete_rows(db: sqlite3.Connection, seqs: Iterable[int]) -> None:
        db.executemany("DELETE FROM spool WHERE seq = ?", ((s,) for s in seqs))

    def rows(self, destination: str, after: int, limit: int) -> list[Row]:
        """Up to ``limit`` of ``destination``'s rows after ``seq`` ``after``, in order."""
        try:
            found = self.db.execute(
                "SELECT seq, source, kind, name, msg_id, queued_at, deadline, frame "
                "FROM spool WHERE destination = ? AND seq > ? ORDER BY seq LIMIT ?",
                (destination, after, limit)).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(self.path, _reason(exc)) from None
        return [Row(*r) for r in found]

    def older_than(self, destination: str, before: float) -> list[Row]:
        """``destination``'s rows queued before ``before`` (Unix time), in order."""
        try:
            found = self.db.execute(
                "SELECT seq, source, kind, name, msg_id, queued_at, deadline, frame "
                "FROM spool WHERE destination = ? AND queued_at < ? ORDER BY seq",
                (destination, before)).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(self.path, _reason(exc)) from None
        return [Row(*r) for r in found]

    def oldest(self, destination: str, since: float) -> float | None:
        """When ``destination``'s oldest row queued at ``since`` or later was queued."""
        try:
            found = self.db.execute(
                "SELECT min(queued_at) FROM spool WHERE destination = ? AND queued_at >= ?",
                (destination, since)).fetchone()
        except sqlite3.Error as exc:
            raise StoreError(self.path, _reason(exc)) from None
        return None if found is None or found[0] is None else float(found[0])

    def depths(self) -> dict[str, tuple[Depth, dict[str, Held]]]:
        """Every destination's depth and what each source holds of it, as the file
        holds them (at startup)."""
        try:
            found = self.db.execute(
                "SELECT destination, source, count(*), sum(length(frame)), min(queued_at) "
                "FROM spool GROUP BY destination, source").fetchall()
        except sqlite3.Error as exc:
            raise StoreError(self.path, _reason(exc)) from None
        out: dict[str, tuple[Depth, dict[str, Held]]] = {}
        for destination, source, n, size, oldest in found:
            depth, sources = out.setdefault(destination, (Depth(), {}))
            depth.count += int(n)
            depth.bytes += int(size or 0)
            if depth.oldest is None or (oldest is not None and oldest < depth.oldest):
                depth.oldest = oldest
            sources[source] = Held(int(n), int(size or 0))
        return out


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


# -- bounds: arithmetic only ------------------------------------------------------------
DEFAULT_MESSAGES: Final = 10_000
"""Messages one destination's spool keeps (``spool.messages``)."""
DEFAULT_BYTES: Final = 8 * 1024 * 1024
"""Bytes one destination's spool keeps (``spool.octets``)."""
DEFAULT_AGE: Final = 3600.0
"""Seconds a message waits in the spool at most (``spool.age``)."""
DEFAULT_TOTAL_BYTES: Final = 64 * 1024 * 1024
"""Bytes the spool keeps for all destinations together (``spool.octets_total``)."""
HARD_FACTOR: Final = 2
"""How far past a bound the sources within their share may still fill it (see
:func:`share_admits`): a bound that one source filled alone still takes the others'
shares, up to this many times the bound."""

COUNT: Final = "messages"
BYTES: Final = "octets"
AGE: Final = "age"
TOTAL: Final = "octets_total"
"""The bounds, by the names of their keys (for logs and counters)."""


@dataclass(slots=True)
class Held:
    """What one source holds of a bound: messages and bytes."""

    count: int = 0
    bytes: int = 0


def share_admits(size: int, mine: Held | None, holders: int, *, count: int,
                 size_held: int, messages: int, nbytes: int) -> bool:
    """Does a bound of ``messages`` and ``nbytes``, holding ``count`` messages and
    ``size_held`` bytes from ``holders`` sources, take one more message of ``size``
    bytes from a source that holds ``mine`` of it?

    The live queues' rule (``broker.endpoint``), for the spool: within the bound,
    anyone (a lone sender may use all of it). Past it, only a source within its equal
    share (the bound divided among the sources holding some of it, this one included),
    up to :data:`HARD_FACTOR` times the bound: a flooder past its share is refused, the
    others keep theirs, and a source that holds nothing yet is always taken."""
    if count < messages and size_held + size <= nbytes:
        return True
    if count >= messages * HARD_FACTOR or size_held + size > nbytes * HARD_FACTOR:
        return False
    if mine is None or mine.count == 0:
        return True
    senders = holders + (mine is None)
    return (mine.count + 1 <= messages // senders
            and mine.bytes + size <= nbytes // senders)


@dataclass(frozen=True, slots=True)
class Bounds:
    """How much one destination's spool may keep."""

    messages: int = DEFAULT_MESSAGES
    bytes: int = DEFAULT_BYTES
    age: float = DEFAULT_AGE


@dataclass(slots=True)
class Depth:
    """What one destination's spool holds: messages, bytes and the oldest's time."""

    count: int = 0
    bytes: int = 0
    oldest: float | None = None
    """Unix time the oldest message was spooled; None when empty."""

    def add(self, size: int, at: float) -> None:
        self.count += 1
        self.bytes += size
        if self.oldest is None:
            self.oldest = at

    def remove(self, size: int) -> None:
        self.count -= 1
        self.bytes -= size
        if self.count <= 0:
            self.count = self.bytes = 0
            self.oldest = None

    def age(self, now: float) -> float | None:
        """Seconds the oldest message has waited; None when empty."""
        return None if self.oldest is None else max(0.0, now - self.oldest)

    def expired_before(self, now: float, bounds: Bounds) -> float | None:
        """The Unix time before which messages are past the age bound, if the oldest
        is; None if nothing is."""
        limit = now - bounds.age
        return limit if self.oldest is not None and self.oldest < limit else None


@dataclass(slots=True)
class Overflow:
    """Messages refused by one destination's bounds, told once per burst: the first
    refusal starts a burst (logged), the next admitted message or a quiet second ends
    it (logged with the count)."""

    bound: str | None = None
    """The bound of the burst under way; None: no burst."""
    count: int = 0
    total: int = 0
    """Refused since the broker started (``statistiques``)."""

    def refuse(self, bound: str) -> bool:
        """Count one refusal; True if it starts a burst (log it)."""
        self.total += 1
        self.count += 1
        if self.bound is None:
            self.bound = bound
            return True
        return False

    def end(self) -> tuple[str, int] | None:
        """End the burst under way: its bound and count, or None if there was none."""
        if self.bound is None:
            return None
        ended = (self.bound, self.count)
        self.bound, self.count = None, 0
        return ended


# -- the broker's side ----------------------------------------------------------------
@dataclass(slots=True)
class Lane:
    """One destination's spool, in memory: its depth and its replay."""

    depth: Depth = field(default_factory=Depth)
    sources: dict[str, Held] = field(default_factory=dict)
    """What each source holds of :attr:`depth` (its share of the bounds)."""
    handed: dict[int, str] = field(default_factory=dict)
    """The source of each row read for the replay and not yet deleted, by seq."""
    overflow: Overflow = field(default_factory=Overflow)
    cursor: int = 0
    """The last ``seq`` handed to the channel by the replay under way."""
    written: list[tuple[int, int, int, float]] = field(default_factory=list)
    """Rows handed to the channel and not yet out of the broker: (seq, size, stream
    position just after their last byte, queued_at), in order."""
    replay_started: float = 0.0
    """Monotonic time the replay under way began."""
    replaying: bool = False
    """Its channel is up and the spool is being replayed: new messages still go to the
    spool, behind what it holds."""
    expired: int = 0
    """Messages dropped for their age or their command's deadline (``statistiques``)."""
    spooled: int = 0
    """Messages committed into the spool since the broker started."""
    replayed: int = 0
    """Messages delivered from the spool since the broker started."""


def default_path(environ: dict[str, str] | None = None) -> tuple[str, bool]:
    """Where the spool goes when ``spool.chemin`` is not set, and whether it is a
    temporary one: systemd's ``$STATE_DIRECTORY`` (``StateDirectory=messagerie``:
    /var/lib/messagerie), else a new temporary directory (the demo, tests and a broker
    run by hand: the spool lasts as long as the process, and domain reboots are still
    covered)."""
    env = os.environ if environ is None else environ
    state = env.get("STATE_DIRECTORY", "").split(":")[0]
    if state:
        return str(Path(state) / SPOOL_FILE), False
    return str(Path(tempfile.mkdtemp(prefix="messagerie-spool-")) / SPOOL_FILE), True


def now() -> float:
    """Unix time (rows outlive the process: not the loop's monotonic clock)."""
    return time.time()


CLOSED: Final = "ferme"
AVAILABLE: Final = "disponible"
UNAVAILABLE: Final = "indisponible"
DISABLED: Final = "desactive"
"""The spool's states, as ``statistiques`` reports them."""


class Spool:
    """The spool as the broker uses it: lanes, one batch per loop turn, the store.

    No asyncio: the broker calls :meth:`commit` once per loop turn when :attr:`dirty`
    (it schedules that), and :meth:`rows`/:meth:`written` when it replays. A failure of
    the store (:class:`StoreError`) makes the spool :data:`UNAVAILABLE`: it takes no
    more messages (the broker routes as if there were no spool) until it is opened
    again."""

    def __init__(self, bounds_of: Callable[[str], Bounds], clock: Callable[[], float] = now,
                 total_bytes: int = DEFAULT_TOTAL_BYTES) -> None:
        self.bounds_of = bounds_of
        """One destination's bounds (``[spool]`` under its ``[domaines.NAME]`` keys)."""
        self.total_bytes = total_bytes
        """Bytes all destinations' rows together may take (``spool.octets_total``),
        shared among the sources as each destination's bounds are."""
        self.bytes = 0
        """Bytes all destinations' rows take (committed or in the batch)."""
        self.by_source: dict[str, Held] = {}
        """What each source holds of :attr:`bytes`, all destinations together."""
        self.clock = clock
        self.store: Store | None = None
        self.state = CLOSED
        self.path: str | None = None
        self.temporary = False
        """The file is in a temporary directory of this process (removed at close)."""
        self.error: str | None = None
        """Why it is unavailable (the path and the OS's reason)."""
        self.lanes: dict[str, Lane] = {}
        self._inserts: list[Entry] = []
        self._through: dict[str, int] = {}
        """Per destination: delete every row up to this seq (written out)."""
        self._rows: list[int] = []
        """Single rows to delete (expired commands)."""
        self.failed_commits = 0

    # -- lifecycle ----------------------------------------------------------------------
    def open(self, path: str, *, temporary: bool = False) -> None:
        """Open the store at ``path`` and load the depths it holds; on failure the spool
        is :data:`UNAVAILABLE` and StoreError is raised (the caller logs it)."""
        self.path, self.temporary = path, temporary
        try:
            store = Store.open(path)
            depths = store.depths()
        except StoreError as exc:
            self.state, self.error = UNAVAILABLE, exc.reason
            raise
        self.store, self.state, self.error = store, AVAILABLE, None
        self.bytes = 0
        self.by_source = {}
        for destination, (depth, sources) in depths.items():
            lane = self.lane(destination)
            lane.depth, lane.sources = depth, sources
            self.bytes += depth.bytes
            for source, held in sources.items():
                total = self.by_source.setdefault(source, Held())
                total.count += held.count
                total.bytes += held.bytes

    def disable(self) -> None:
        self.state = DISABLED

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None
        if self.temporary and self.path is not None:
            directory = Path(self.path).parent
            for leftover in directory.glob(SPOOL_FILE + "*"):
                with contextlib.suppress(OSError):
                    leftover.unlink()
            with contextlib.suppress(OSError):
                directory.rmdir()
        if self.state == AVAILABLE:
            self.state = CLOSED

    @property
    def available(self) -> bool:
        return self.state == AVAILABLE

    @property
    def dirty(self) -> bool:
        return bool(self._inserts or self._through or self._rows)

    def probe(self) -> bool:
        """Can the file be written again? One transaction that writes a page's worth
        and deletes it (a full or read-only file system fails it). Does not change the
        state."""
        if self.store is None:
            return False
        try:
            with self.store.transaction() as db:
                db.execute("INSERT INTO spool (destination, source, kind, queued_at, frame)"
                           " VALUES ('', '', 'probe', 0, ?)", (bytes(PROBE_BYTES),))
                db.execute("DELETE FROM spool WHERE destination = '' AND kind = 'probe'")
        except StoreError:
            return False
        return True

    # -- spooling -----------------------------------------------------------------------
    def lane(self, destination: str) -> Lane:
        lane = self.lanes.get(destination)
        if lane is None:
            lane = self.lanes[destination] = Lane()
        return lane

    def holds(self, destination: str) -> bool:
        """Does ``destination`` have messages spooled (committed or in the batch)?"""
        lane = self.lanes.get(destination)
        return lane is not None and (lane.depth.count > 0 or lane.replaying)

    def add(self, entry: Entry) -> str | None:
        """Spool ``entry`` in the next commit: None, or the bound it passes (it is not
        spooled; the refusal is counted in the lane's :class:`Overflow`).

        Each source has its share of the destination's bounds and of the total
        (:func:`share_admits`): one that filled them alone is refused once others
        send, and those keep their share."""
        lane = self.lane(entry.destination)
        size = len(entry.frame)
        bounds = self.bounds_of(entry.destination)
        depth, source = lane.depth, entry.source
        if size > bounds.bytes:
            return BYTES
        if not share_admits(size, lane.sources.get(source), len(lane.sources),
                            count=depth.count, size_held=depth.bytes,
                            messages=bounds.messages, nbytes=bounds.bytes):
            return COUNT if depth.count >= bounds.messages else BYTES
        if not share_admits(size, self.by_source.get(source), len(self.by_source),
                            count=0, size_held=self.bytes, messages=1 << 62,
                            nbytes=self.total_bytes):
            return TOTAL
        depth.add(size, entry.queued_at)
        self._held(lane, source, 1, size)
        self._inserts.append(entry)
        return None

    def _held(self, lane: Lane, source: str, n: int, size: int) -> None:
        """Count ``n`` messages of ``size`` bytes in (n = 1) or out (n = -1) of
        ``source``'s shares."""
        self.bytes = max(0, self.bytes + n * size)
        for shares in (lane.sources, self.by_source):
            held = shares.get(source)
            if held is None:
                if n < 0:
                    continue
                held = shares[source] = Held()
            held.count += n
            held.bytes += n * size
            if held.count <= 0:
                del shares[source]

    def commit(self) -> list[Entry]:
        """Write the batch in one transaction. Returns the entries that are *not* in
        the spool (the commit failed: the spool is now unavailable), for the broker to
        count and answer as dropped; [] when all is well."""
        if not self.dirty:
            return []
        inserts, through, rows = self._inserts, self._through, self._rows
        self._inserts, self._through, self._rows = [], {}, []
        store = self.store
        try:
            if store is None:
                raise StoreError(self.path or "?", "the spool is not open")
            with store.transaction() as db:
                for destination, seq in through.items():
                    Store.delete_through(db, destination, seq)
                if rows:
                    Store.delete_rows(db, rows)
                if inserts:
                    Store.insert(db, inserts)
        except StoreError as exc:
            self.failed_commits += 1
            self.state, self.error = UNAVAILABLE, exc.reason
            for entry in inserts:
                lane = self.lane(entry.destination)
                lane.depth.remove(len(entry.frame))
                self._held(lane, entry.source, -1, len(entry.frame))
            # Deletes that did not happen: the rows stay and are replayed again
            # (at-least-once), or expire by age.
            return inserts
        for entry in inserts:
            self.lane(entry.destination).spooled += 1
        return []

    # -- replay -------------------------------------------------------------------------
    def rows(self, destination: str, limit: int) -> list[Row]:
        """The next committed rows to replay to ``destination`` (after its cursor)."""
        if self.store is None:
            return []
        lane = self.lane(destination)
        found = self.store.rows(destination, lane.cursor, limit)
        if found:
            lane.cursor = found[-1].seq
            for row in found:
                lane.handed[row.seq] = row.source
        return found

    def written(self, destination: str, seq: int, size: int) -> None:
        """Row ``seq`` (``size`` bytes) of ``destination`` left the broker, or was
        dropped (expired): deleted in the next commit."""
        self._through[destination] = max(seq, self._through.get(destination, 0))
        lane = self.lane(destination)
        lane.depth.remove(size)
        source = lane.handed.pop(seq, None)
        if source is not None:
            self._held(lane, source, -1, size)

    def cut(self, seq: int, kind: str, tail: bytes) -> bool:
        """Row ``seq`` left the broker up to its last ``len(tail)`` bytes: it becomes
        those bytes, of ``kind``, in its place
        (written at once, for a broker that stops: the depths in memory are left as
        they are; the next process reads them from the file). False when the spool
        cannot be written (the row stays whole)."""
        if self.store is None or self.state != AVAILABLE:
            return False
        try:
            with self.store.transaction() as db:
                db.execute("UPDATE spool SET kind = ?, frame = ? WHERE seq = ?",
                           (kind, tail, seq))
        except StoreError:
            return False
        return True

    def forget(self, destination: str, seq: int, size: int, source: str) -> None:
        """Delete one row (of ``source``) out of order (a command that expired in the
        spool, a row past the age bound)."""
        self._rows.append(seq)
        lane = self.lane(destination)
        lane.depth.remove(size)
        lane.handed.pop(seq, None)
        self._held(lane, source, -1, size)

    def rewind(self, destination: str) -> None:
        """The channel went down during a replay: what was handed to it and not known
        to be out is replayed again, from the first such row."""
        lane = self.lane(destination)
        lane.replaying = False
        if lane.written:
            lane.cursor = lane.written[0][0] - 1
        lane.written.clear()
