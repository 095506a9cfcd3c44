"""The spool's store and bounds: a real SQLite file, and the arithmetic without one."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.spool import (
    AVAILABLE,
    BYTES,
    COUNT,
    SPOOL_FILE,
    UNAVAILABLE,
    Bounds,
    Depth,
    Entry,
    Held,
    Overflow,
    Spool,
    Store,
    StoreError,
    default_path,
)


def entry(dest: str, n: int, *, at: float = 1000.0, size: int = 0) -> Entry:
    frame = b'{"n":%d%s}\n' % (n, b" " * size)
    return Entry(dest, "vm-a", "notification", "x", None, at, None, frame)


def test_store_is_a_wal_file_with_the_spool_table(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "state" / SPOOL_FILE)
    try:
        assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        # NORMAL is 1: durable against a process crash, no fsync per commit.
        assert store.db.execute("PRAGMA synchronous").fetchone()[0] == 1
        with store.transaction() as db:
            Store.insert(db, [entry("vm-b", i) for i in range(3)])
            Store.insert(db, [entry("vm-c", 9)])
        rows = store.rows("vm-b", 0, 10)
        assert [r.frame for r in rows] == [b'{"n":%d}\n' % i for i in range(3)]
        assert [r.seq for r in rows] == sorted(r.seq for r in rows)
        assert store.rows("vm-b", rows[0].seq, 1) == [rows[1]]
        depth, sources = store.depths()["vm-b"]
        assert depth == Depth(3, 3 * len(b'{"n":0}\n'), 1000.0)
        assert sources == {"vm-a": Held(3, 3 * len(b'{"n":0}\n'))}  # the shares, kept
    finally:
        store.close()
    # Another process (here: another connection) sees what was committed.
    again = Store.open(tmp_path / "state" / SPOOL_FILE)
    assert len(again.rows("vm-b", 0, 10)) == 3
    again.close()


def test_a_failed_transaction_leaves_nothing(tmp_path: Path) -> None:
    store = Store.open(tmp_path / SPOOL_FILE)
    with pytest.raises(RuntimeError), store.transaction() as db:
        Store.insert(db, [entry("vm-b", 1)])
        raise RuntimeError("halfway")
    with pytest.raises(StoreError, match="no such table"), store.transaction() as db:
        db.execute("INSERT INTO nowhere VALUES (1)")
    assert store.rows("vm-b", 0, 10) == []
    store.close()


def test_other_components_add_tables_with_versions(tmp_path: Path) -> None:
    path = tmp_path / SPOOL_FILE
    store = Store.open(path)
    ddl = ["CREATE TABLE IF NOT EXISTS pending (k TEXT PRIMARY KEY, v REAL)"]
    assert store.schema("pending", 1, ddl) == 0
    assert store.schema("pending", 2, ddl) == 1  # the caller upgrades from 1
    with store.transaction() as db:
        db.execute("INSERT INTO pending VALUES ('a', 1.5)")
    store.close()
    store = Store.open(path)
    assert store.db.execute("SELECT v FROM pending").fetchall() == [(1.5,)]
    with pytest.raises(StoreError, match="pending tables are version 2, this broker "
                       "knows up to 1"):
        store.schema("pending", 1, ddl)
    store.close()


def test_unwritable_directory_names_the_path_and_the_reason(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError) as info:
        Store.open(blocker / "state" / SPOOL_FILE)
    assert info.value.path == str(blocker / "state" / SPOOL_FILE)
    assert "Not a directory" in info.value.reason


def test_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / SPOOL_FILE
    path.write_bytes(b"x" * 4096)
    with pytest.raises(StoreError, match="not a database"):
        Store.open(path)


def test_depth_counts_and_ages() -> None:
    # What the bounds are checked against (Spool.add: test_spool_share.py).
    bounds = Bounds(messages=2, bytes=100, age=10.0)
    depth = Depth()
    depth.add(60, 5.0)
    depth.add(40, 6.0)
    assert (depth.count, depth.bytes, depth.oldest) == (2, 100, 5.0)
    assert depth.age(8.0) == 3.0
    assert depth.expired_before(14.0, bounds) is None
    assert depth.expired_before(15.5, bounds) == 5.5
    depth.remove(60)
    depth.remove(40)
    assert depth == Depth() and depth.age(8.0) is None


def test_overflow_is_told_once_per_burst() -> None:
    overflow = Overflow()
    assert overflow.end() is None
    assert [overflow.refuse(COUNT) for _ in range(3)] == [True, False, False]
    assert overflow.end() == (COUNT, 3)
    assert overflow.refuse(BYTES) is True
    assert overflow.end() == (BYTES, 1) and overflow.total == 4


def test_spool_batches_commits_and_replays_in_order(tmp_path: Path) -> None:
    spool = Spool(lambda _: Bounds(messages=3))
    spool.open(str(tmp_path / SPOOL_FILE))
    assert spool.state == AVAILABLE and not spool.dirty
    assert [spool.add(entry("vm-b", i)) for i in range(4)] == [None, None, None, COUNT]
    assert spool.holds("vm-b") and spool.dirty
    # Nothing is in the file before the commit.
    assert spool.rows("vm-b", 10) == []
    assert spool.commit() == []
    lane = spool.lanes["vm-b"]
    assert lane.spooled == 3 and lane.depth.count == 3
    first = spool.rows("vm-b", 2)
    assert [r.frame for r in first] == [b'{"n":0}\n', b'{"n":1}\n']
    for row in first:
        spool.written("vm-b", row.seq, len(row.frame))
    rest = spool.rows("vm-b", 10)
    assert [r.frame for r in rest] == [b'{"n":2}\n']
    assert spool.commit() == []
    assert lane.depth.count == 1
    spool.close()
    # What was written out is gone from the file; the rest is there at the next start.
    again = Spool(lambda _: Bounds())
    again.open(str(tmp_path / SPOOL_FILE))
    assert again.lanes["vm-b"].depth.count == 1
    assert [r.frame for r in again.rows("vm-b", 10)] == [b'{"n":2}\n']
    again.close()


def test_every_outage_is_replayed_whole_after_an_emptied_spool(tmp_path: Path) -> None:
    # Found by review: with plain rowids SQLite numbered a second outage's rows from
    # max(rowid)+1 of what was left, reusing the numbers of the replayed (deleted)
    # rows, below the lane's replay cursor: they were never replayed, then deleted
    # unsent by the next confirmation, and counted on in the depths.
    spool = Spool(lambda _: Bounds())
    spool.open(str(tmp_path / SPOOL_FILE))
    lane = spool.lane("vm-b")

    def replay() -> list[bytes]:
        got = []
        while rows := spool.rows("vm-b", 4):
            for row in rows:
                got.append(row.frame)
                spool.written("vm-b", row.seq, len(row.frame))
            assert spool.commit() == []
        return got

    sent = 0
    for outage in (10, 5, 7):
        for i in range(sent, sent + outage):
            assert spool.add(entry("vm-b", i)) is None
        assert spool.commit() == []
        assert replay() == [b'{"n":%d}\n' % i for i in range(sent, sent + outage)], outage
        sent += outage
        assert lane.depth.count == 0 and dict(lane.sources) == {}
    assert spool.store is not None
    assert spool.store.db.execute("SELECT count(*) FROM spool").fetchone() == (0,)
    spool.close()


def test_a_failed_commit_gives_the_batch_back_and_makes_it_unavailable(
        tmp_path: Path) -> None:
    spool = Spool(lambda _: Bounds())
    spool.open(str(tmp_path / SPOOL_FILE))
    assert spool.store is not None
    spool.store.db.execute("PRAGMA max_page_count = 1")  # SQLite's own "disk full"
    spool.add(entry("vm-b", 1, size=8000))
    lost = spool.commit()
    assert [e.frame[:7] for e in lost] == [b'{"n":1 ']
    assert spool.state == UNAVAILABLE and spool.error is not None
    assert spool.error == "database or disk is full"
    assert spool.lanes["vm-b"].depth.count == 0
    spool.close()


def test_default_path_is_systemds_state_directory_or_a_temporary_one() -> None:
    assert default_path({"STATE_DIRECTORY": "/var/lib/messagerie"}) == (
        f"/var/lib/messagerie/{SPOOL_FILE}", False)
    path, temporary = default_path({})
    assert temporary and path.endswith(SPOOL_FILE) and Path(path).parent.is_dir()
    Path(path).parent.rmdir()


def test_temporary_spool_is_removed_at_close() -> None:
    path, temporary = default_path({})
    spool = Spool(lambda _: Bounds())
    spool.open(path, temporary=temporary)
    spool.add(entry("vm-b", 1))
    assert spool.commit() == []
    spool.close()
    assert not Path(path).parent.exists()

