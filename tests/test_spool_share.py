"""Each source's share of an offline destination's spool, and of the spool's total:
in process (the arithmetic, what survives a restart) and with real processes (a
flooder and an honest sender to the same offline domain)."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.config import ConfigError, parse_config
from broker.spool import BYTES, COUNT, SPOOL_FILE, TOTAL, Bounds, Entry, Held, Spool
from tests.support.broker_process import BrokerSystem
from tests.support.waiting import wait_until
from tests.test_spool_integration import RECONNECT, down, frame, reconnect, status


def entry(src: str, dest: str, n: int, size: int = 0) -> Entry:
    return Entry(dest, src, "notification", "x", None, 1000.0, None,
                 b'{"n":%d%s}\n' % (n, b" " * size))


def test_a_lone_sender_fills_the_bound_and_a_newcomer_keeps_its_share(
        tmp_path: Path) -> None:
    spool = Spool(lambda _: Bounds(messages=10))
    spool.open(str(tmp_path / SPOOL_FILE))
    assert [spool.add(entry("vm-a", "vm-c", i)) for i in range(11)] == [None] * 10 + [COUNT]
    # Past the bound: vm-b holds nothing (taken), then up to its share, 10 / 2.
    assert [spool.add(entry("vm-b", "vm-c", i)) for i in range(6)] == [None] * 5 + [COUNT]
    assert spool.add(entry("vm-a", "vm-c", 99)) == COUNT  # the flooder, past its share
    assert spool.add(entry("dom0", "vm-c", 0)) is None    # another newcomer
    assert spool.commit() == []
    lane = spool.lanes["vm-c"]
    assert lane.depth.count == 16
    assert {s: h.count for s, h in lane.sources.items()} == {"vm-a": 10, "vm-b": 5, "dom0": 1}
    spool.close()
    # The shares are read back from the rows' sources at the next start.
    again = Spool(lambda _: Bounds(messages=10))
    again.open(str(tmp_path / SPOOL_FILE))
    lane = again.lanes["vm-c"]
    assert {s: h.count for s, h in lane.sources.items()} == {"vm-a": 10, "vm-b": 5, "dom0": 1}
    assert again.add(entry("vm-a", "vm-c", 100)) == COUNT
    assert again.add(entry("vm-d", "vm-c", 0)) is None
    assert again.commit() == []
    # The replay gives the shares back, row by row.
    for row in again.rows("vm-c", 100):
        again.written("vm-c", row.seq, len(row.frame))
    assert again.commit() == []
    assert lane.depth.count == 0 and lane.sources == {} and again.by_source == {}
    assert again.bytes == 0
    assert [again.add(entry("vm-a", "vm-c", i)) for i in range(10)] == [None] * 10
    again.close()


def test_the_byte_bound_is_shared_the_same_way(tmp_path: Path) -> None:
    big = len(entry("vm-a", "vm-c", 0, 90).frame)
    spool = Spool(lambda _: Bounds(bytes=10 * big))
    spool.open(str(tmp_path / SPOOL_FILE))
    assert [spool.add(entry("vm-a", "vm-c", 0, 90)) for _ in range(11)] == [None] * 10 + [BYTES]
    assert [spool.add(entry("vm-b", "vm-c", 0, 90)) for _ in range(6)] == [None] * 5 + [BYTES]
    assert spool.lanes["vm-c"].sources["vm-b"] == Held(5, 5 * big)
    assert spool.add(entry("vm-b", "vm-c", 0, 2000)) == BYTES  # larger than the bound
    spool.close()


def test_the_total_is_shared_among_sources_across_destinations(tmp_path: Path) -> None:
    big = len(entry("vm-a", "vm-c", 0, 90).frame)
    spool = Spool(lambda _: Bounds(), total_bytes=10 * big)
    spool.open(str(tmp_path / SPOOL_FILE))
    # One source fills the total across several offline domains.
    results = [spool.add(entry("vm-a", f"vm-{d}", 0, 90)) for d in "cdefg" for _ in range(3)]
    assert results == [None] * 10 + [TOTAL] * 5
    assert spool.bytes == 10 * big
    # Another source keeps its share of it, to those domains and to others.
    assert [spool.add(entry("vm-b", d, 0, 90)) for d in ("vm-c", "vm-z") * 3] == (
        [None] * 5 + [TOTAL])
    assert spool.add(entry("vm-a", "vm-z", 0, 90)) == TOTAL
    assert spool.by_source["vm-b"].count == 5
    # A failed commit gives the shares back with the batch.
    assert spool.store is not None
    spool.store.db.close()
    assert len(spool.commit()) == 15
    assert spool.bytes == 0 and spool.by_source == {}
    spool.close()


def test_the_total_is_a_spool_key_with_a_default() -> None:
    one = {"domaines": {"vm-a": {"chemin": "/dev/null"}}}
    assert parse_config(one).spool_total_bytes == 64 * 1024 * 1024
    assert parse_config({**one, "spool": {"octets_total": 4096}}).spool_total_bytes == 4096
    with pytest.raises(ConfigError, match="octets_total"):
        parse_config({**one, "spool": {"octets_total": 0}})


@pytest.mark.integration
def test_a_flooder_fills_its_share_and_an_honest_sender_loses_nothing(
        tmp_path: Path) -> None:
    s = BrokerSystem(tmp_path, ("vm-a", "vm-b", "vm-c"), wait_connected=True, extra=(
        RECONNECT + f'[spool]\nchemin = "{tmp_path / "spool.sqlite3"}"\nmessages = 50\n'))
    try:
        hostile, honest = s.domus["vm-a"], s.domus["vm-b"]
        down(s, "vm-c")

        def depth() -> int:
            held: int = status(s)["domaines"]["vm-c"]["spool"]["messages"]
            return held

        hostile.write(b"".join(frame("vm-a", "vm-c", i) for i in range(50)))
        wait_until(lambda: depth() == 50, what="the flooder's 50 spooled")
        mine = [frame("vm-b", "vm-c", 1000 + i) for i in range(20)]
        honest.write(b"".join(mine[:10]))
        wait_until(lambda: depth() == 60, what="the honest sender's first 10 spooled")
        hostile.write(b"".join(frame("vm-a", "vm-c", 50 + i) for i in range(100)))
        honest.write(b"".join(mine[10:]))
        wait_until(lambda: depth() == 70, what="the honest sender's 20 (its share: 50 / 2)")
        wait_until(lambda: status(s)["domaines"]["vm-c"]["spool"]["refuses"] == 100,
                   what="the flooder's 100 more refused")
        full = s.broker.find("spool.full", domain="vm-c")
        assert full and full[0]["bound"] == "messages"
        c = reconnect(s, "vm-c")
        wait_until(lambda: (c.pump(), len(c.lines_from("vm-a")) + len(c.lines_from("vm-b"))
                            >= 70)[1], interval=0, what="the replay")
        # Every message of the honest sender, in order; the flooder's first 50.
        assert c.lines_from("vm-b") == mine
        assert c.lines_from("vm-a") == [frame("vm-a", "vm-c", i) for i in range(50)]
    finally:
        s.close()
