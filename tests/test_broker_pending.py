"""The pure bookkeeping under the router: commands in flight and rate limits, with
injected clocks (no sleeping, no loop)."""

from __future__ import annotations

import pytest

from broker.pending import PendingCommands
from broker.ratelimit import LogBudget, TokenBucket


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def table(limit: int = 2, ttl: float = 10.0) -> tuple[PendingCommands[str], Clock]:
    clock = Clock()
    return PendingCommands[str](limit=limit, ttl=ttl, clock=clock), clock


def test_add_counts_per_asking_endpoint_and_close_frees_it() -> None:
    pending, _ = table()
    first = pending.add("vm-a", "c1", "vm-b", "lister", asker="ep-a", target="ep-b")
    pending.add("dom0", "d1", "vm-b", "etat", asker="svc-1", target="ep-b")
    pending.add("dom0", "d2", "vm-b", "etat", asker="svc-2", target="ep-b")
    assert len(pending) == 3 and ("vm-a", "c1") in pending
    # Counted per endpoint, not per name: two dom0 services each have their own.
    assert (pending.in_flight("ep-a"), pending.in_flight("svc-1"),
            pending.in_flight("svc-2")) == (1, 1, 1)
    assert pending.expects("vm-a", "c1", "vm-b", "lister")
    assert not pending.expects("vm-a", "c1", "vm-c", "lister")
    assert not pending.expects("vm-a", "c2", "vm-b", "lister")
    assert not pending.expects("vm-a", "c1", "vm-b", "supprimer_tout")  # another command's name
    assert pending.close("vm-a", "c1") is first
    assert pending.close("vm-a", "c1") is None  # at most once
    assert pending.in_flight("ep-a") == 0 and len(pending) == 2


def test_at_limit_follows_the_limit_and_a_reload() -> None:
    pending, _ = table(limit=2)
    pending.add("vm-a", "1", "vm-b", "x", asker="ep-a", target="ep-b")
    assert not pending.at_limit("ep-a")
    pending.add("vm-a", "2", "vm-b", "x", asker="ep-a", target="ep-b")
    assert pending.at_limit("ep-a") and not pending.at_limit("ep-b")
    pending.limit = 3  # a reload
    assert not pending.at_limit("ep-a")


def test_a_duplicate_add_is_a_bug_not_a_decision() -> None:
    pending, _ = table()
    pending.add("vm-a", "1", "vm-b", "x", asker="ep-a", target="ep-b")
    with pytest.raises(AssertionError):
        pending.add("vm-a", "1", "vm-c", "x", asker="ep-a", target="ep-c")
    assert pending.in_flight("ep-a") == 1


def test_fail_forgets_what_the_gone_asked_and_returns_what_waited_on_it() -> None:
    pending, _ = table(limit=5)
    pending.add("vm-a", "1", "vm-b", "x", asker="ep-a", target="ep-b")
    pending.add("vm-a", "2", "vm-b", "x", asker="ep-a", target="ep-b")
    pending.add("vm-b", "3", "vm-a", "y", asker="ep-b", target="ep-a")
    pending.add("vm-b", "4", "vm-b", "z", asker="ep-b", target="ep-b")  # to itself
    orphans = pending.fail("ep-b")
    assert sorted(p.id for p in orphans) == ["1", "2"]  # to be answered to ep-a
    assert len(pending) == 0 and pending.in_flight("ep-a") == 0
    # The endpoint is reused when its domain comes back: nothing counted for it.
    assert pending.in_flight("ep-b") == 0


def test_expire_uses_the_clock_and_the_ttl_at_add_time() -> None:
    pending, clock = table(ttl=10.0)
    pending.add("vm-a", "old", "vm-b", "x", asker="ep-a", target="ep-b")
    clock.now += 5
    pending.ttl = 100.0  # a reload: commands already in flight keep their deadline
    pending.add("vm-a", "new", "vm-b", "x", asker="ep-a", target="ep-b")
    assert pending.expire() == []
    clock.now += 5  # "old" is exactly at its deadline
    assert [p.id for p in pending.expire()] == ["old"]
    assert pending.in_flight("ep-a") == 1 and ("vm-a", "new") in pending
    clock.now += 1000
    assert [p.id for p in pending.expire()] == ["new"]
    assert pending.in_flight("ep-a") == 0 and len(pending) == 0


def test_token_bucket_spends_refills_and_reports_its_deficit() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=100.0, burst=3, clock=clock)
    assert bucket.refill() == 3.0
    assert bucket.spend(2) == 0 and bucket.spend(1) == 0 and bucket.deficit == 0.0
    assert bucket.spend(1) == 1  # one frame over budget
    assert bucket.spend(4) == 4
    assert bucket.tokens == -5.0 and bucket.deficit == pytest.approx(0.05)
    clock.now += 0.02
    assert bucket.refill() == pytest.approx(-3.0)
    clock.now += 10
    assert bucket.refill() == 3.0  # never more than the burst
    bucket.configure(rate=1.0, burst=1)
    assert bucket.refill() == 1.0


def test_log_budget_window_follows_the_clock() -> None:
    clock = Clock()
    budget = LogBudget(per_second=2, clock=clock)
    assert budget.allow() and budget.allow() and not budget.allow()
    clock.now += 0.999
    assert not budget.allow() and budget.suppressed == 2
    clock.now += 0.001
    assert budget.allow() and budget.take_suppressed() == 2


def test_counts_per_asker_and_target_follow_the_table() -> None:
    pending, _ = table()
    pending.per_target = 2
    pending.add("vm-a", "1", "vm-b", "x", asker="ep-a", target="ep-b")
    pending.add("vm-a", "2", "vm-b", "x", asker="ep-a", target="ep-b")
    pending.add("vm-a", "3", "vm-c", "x", asker="ep-a", target="ep-c")
    assert pending.at_target_limit("ep-a", "ep-b") and not pending.at_target_limit("ep-a", "ep-c")
    assert (pending.in_flight_to("ep-a", "ep-b"), pending.in_flight_to("ep-a", "ep-c")) == (2, 1)
    pending.close("vm-a", "1")
    assert not pending.at_target_limit("ep-a", "ep-b")
    assert [p.id for p in pending.fail("ep-b")] == ["2"]  # its target went away
    assert pending.in_flight_to("ep-a", "ep-b") == 0 and pending.in_flight("ep-a") == 1
    pending.fail("ep-a")
    assert pending._pairs == {} and pending._counts == {}


def test_a_domain_going_down_keeps_the_commands_still_in_its_spool() -> None:
    pending, _ = table(limit=5)
    sent = pending.add("vm-a", "c1", "vm-b", "x", asker="ep-a", target="ep-b")
    spooled = pending.add("vm-a", "c2", "vm-b", "x", asker="ep-a", target="ep-b")
    spooled.spooled = True
    assert pending.fail("ep-b", keep_spooled=True) == [sent]
    assert ("vm-a", "c2") in pending and pending.in_flight("ep-a") == 1
    # Removed from the configuration: those in its spool are answered too.
    assert pending.fail("ep-b") == [spooled] and len(pending) == 0
