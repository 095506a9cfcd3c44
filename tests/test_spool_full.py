"""A spool that cannot be written, in process: the retry's probe, and a failed batch's
messages to a connected domain (spooled behind its replay) delivered, not dropped, or
dropped once each when its queue is full."""

from __future__ import annotations

from pathlib import Path

from broker.endpoint import HARD_LIMIT_FACTOR
from broker.spool import SPOOL_FILE, Bounds, Spool
from messagerie import Notification, encode
from tests.support.waiting import async_wait_until
from tests.test_departed import Setup


def full(spool: Spool) -> None:
    """SQLite's own "disk full": the file may not grow past its current pages."""
    assert spool.store is not None
    db = spool.store.db
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages}")


def test_the_probe_tells_a_full_file(tmp_path: Path) -> None:
    spool = Spool(lambda _: Bounds())
    spool.open(str(tmp_path / SPOOL_FILE))
    full(spool)
    assert not spool.probe()
    assert spool.store is not None
    spool.store.db.execute("PRAGMA max_page_count = 1000000")
    assert spool.probe()
    assert spool.store.db.execute("SELECT count(*) FROM spool").fetchone()[0] == 0
    spool.close()


async def test_a_failed_batch_to_a_connected_domain_is_delivered(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    try:
        d = s.discover("vm-d", "/run/vm-d-msg.sock")
        lane = s.broker.spool.lane("vm-d")
        lane.replaying = True  # its replay under way: live traffic goes to the spool
        s.broker.invalidate_routes()
        full(s.broker.spool)
        s.a.data_received(b"".join(
            encode(Notification("vm-a", "vm-d", "test", "seq", {"i": i, "pad": "x" * 3000}))
            for i in range(5)))
        await async_wait_until(lambda: len(s.out(d)) == 5, what="5 delivered live")
        assert [m.data["i"] for m in s.out(d)] == list(range(5))  # type: ignore[attr-defined]
        assert s.broker.spool.failed_commits == 1
        assert s.broker.statistics()["domaines"]["vm-d"]["perdus"] == 0
    finally:
        s.broker.close_spool()


async def test_a_failed_batch_to_a_full_domain_counts_each_drop_once(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    try:
        d = s.discover("vm-d", "/run/vm-d-msg.sock")
        lane = s.broker.spool.lane("vm-d")
        lane.replaying = True
        s.broker.invalidate_routes()
        # Its queue past the hard bound: the failed batch's messages are refused.
        s.t[d].buffered = d.queue_bytes * HARD_LIMIT_FACTOR + 1
        d.pause_writing()
        full(s.broker.spool)
        s.a.data_received(b"".join(
            encode(Notification("vm-a", "vm-d", "test", "seq", {"i": i, "pad": "x" * 3000}))
            for i in range(5)))
        await async_wait_until(lambda: s.broker.spool.failed_commits == 1,
                               what="the batch failed")
        assert s.out(d) == []
        assert s.broker.statistics()["domaines"]["vm-d"]["perdus"] == 5
    finally:
        s.broker.close_spool()
