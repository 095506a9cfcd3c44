"""Each source's share of an offline destination's spool, and of the spool's total:
in process (the arithmetic, what survives a restart) and with real processes (a
flooder and an honest sender to the same offline domain), and the broker's total
bound in process."""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs

from broker.config import Config, ConfigError, DomainConfig, Limits, parse_config
from broker.spool import BYTES, COUNT, SPOOL_FILE, TOTAL, Bounds, Entry, Held, Spool
from messagerie import Code, Commande, Notification, Reponse, encode
from tests.support.spool_system import down, frame, reconnect, spool_system, status
from tests.support.waiting import async_wait_until, wait_until
from tests.test_departed import Setup


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
    s = spool_system(tmp_path, spool_keys="messages = 50\n")
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


async def test_the_broker_shares_the_total_among_sources_and_logs_it_once(
        tmp_path: Path) -> None:
    """In process (the broker, fake transports, a real SQLite file): vm-a fills the
    total across two offline domains; vm-b's messages to them are still spooled,
    vm-a's further ones refused (a command answered at once), logged once per burst
    and domain."""
    s = Setup(tmp_path)
    s.broker.reconfigure(Config(domains={"vm-a": DomainConfig("vm-a", "/dev/null/vm-a")},
                                dom0_socket=None, limits=Limits(),
                                spool_path=str(tmp_path / "spool.db"),
                                spool_total_bytes=20_000))
    try:
        b = s.discover("vm-b", "/run/vm-b-msg.sock")
        for name in ("vm-c", "vm-d"):
            s.discover(name, f"/run/{name}-msg.sock")
            s.broker.depart_domain(name, "test")

        def note(src: str, dst: str, i: int) -> bytes:
            return encode(Notification(src, dst, "test", "seq", {"i": i, "pad": "x" * 150}))

        def held() -> int:
            return sum(s.broker.lane_statistics(d)["octets"] for d in ("vm-c", "vm-d"))

        flood = [note("vm-a", d, i) for i in range(80) for d in ("vm-c", "vm-d")]
        with capture_logs() as logs:
            s.a.data_received(b"".join(flood))
            await async_wait_until(lambda: s.broker.spool.bytes > 19_000)
            kept = held()
            assert kept <= 20_000 and s.broker.spool.by_source.keys() == {"vm-a"}
            mine = [note("vm-b", d, 1000 + i) for i in range(10) for d in ("vm-c", "vm-d")]
            b.data_received(b"".join(mine))
            await async_wait_until(lambda: held() == kept + sum(map(len, mine)))
            s.a.data_received(note("vm-a", "vm-c", 999)
                              + encode(Commande("vm-a", "vm-d", "liste", {}, id="c9")))
            await async_wait_until(lambda: any(
                isinstance(m, Reponse) and m.id == "c9" for m in s.out(s.a)))
        (answer,) = [m for m in s.out(s.a) if isinstance(m, Reponse)]
        assert answer.erreur is not None
        assert answer.erreur["code"] == Code.DESTINATION_HORS_LIGNE
        assert "octets_total" in answer.erreur["message"]
        full = [e for e in logs if e["event"] == "spool.full"]
        assert sorted(e["domain"] for e in full) == ["vm-c", "vm-d"]
        assert {(e["bound"], e["limit"]) for e in full} == {("octets_total", 20_000)}
        assert held() == kept + sum(map(len, mine))
        # (no sweep in process: the refusals are one burst per domain)
    finally:
        s.broker.close_spool()
