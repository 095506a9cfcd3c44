"""Shared resources under a hostile sender, in process (fake transports): a full
destination's queue is shared among its senders, the rate budget counts deliveries,
and all the queues together stay within one memory budget."""

from __future__ import annotations

from pathlib import Path

from broker.memory import MemoryBudget, cgroup_memory_max, default_budget
from messagerie import TOUS, Notification
from tests.test_broker_core import Setup, wait_for


def move(source: str, dest: str, i: int = 0) -> Notification:
    return Notification(source, dest, "entree", "souris", {"x": i, "pad": "p" * 100})


async def test_a_flooder_is_held_and_honest_senders_are_not() -> None:
    s = Setup("vm-usb", "vm-ui", "vm-diag", queue_bytes=64 * 1024, stall_timeout=60)
    usb, ui, diag = s.eps["vm-usb"], s.eps["vm-ui"], s.eps["vm-diag"]
    ui.pause_writing()  # vm-ui reads slowly: its transport is past its high-water mark
    s.send(usb, *[move("vm-usb", "vm-ui", i) for i in range(100)])  # 20 KiB
    assert s.t["vm-usb"].calls == ["pause"]  # the one filling the queue is held
    s.send(diag, move("vm-diag", "vm-ui"))
    assert s.t["vm-diag"].calls == []  # an honest sender of one message is not
    assert len(s.out("vm-ui")) == 101 and ui.stats.dropped == 0


async def test_a_stalled_queue_drops_the_flooders_messages_not_the_honest_ones() -> None:
    s = Setup("vm-usb", "vm-ui", "vm-diag", queue_bytes=8 * 1024, stall_timeout=0.02)
    usb, ui, diag = s.eps["vm-usb"], s.eps["vm-ui"], s.eps["vm-diag"]
    ui.pause_writing()
    s.send(usb, *[move("vm-usb", "vm-ui", i) for i in range(20)])
    await wait_for(lambda: ui.stalled)
    s.t["vm-ui"].buffered = 8 * 1024  # full to its bound, and not reading
    s.t["vm-ui"].take()
    s.send(usb, *[move("vm-usb", "vm-ui", i) for i in range(20)])
    s.send(diag, *[move("vm-diag", "vm-ui", i) for i in range(5)])
    s.send(usb, *[move("vm-usb", "vm-ui", i) for i in range(20)])
    got = s.out("vm-ui")
    assert [m.source for m in got] == ["vm-diag"] * 5  # all of the honest ones
    assert ui.stats.dropped == 40  # and none of the flood past the bound


async def test_a_broadcast_costs_one_token_per_recipient() -> None:
    s = Setup("vm-a", "vm-b", "vm-c", "vm-d", rate=0.001)  # no refill to speak of
    a = s.eps["vm-a"]
    before = a.bucket.refill()
    s.send(a, Notification("vm-a", TOUS, "domaine", "etat", {"pret": True}))
    # vm-b, vm-c, vm-d and dom0: four deliveries, four tokens.
    assert 3.99 < before - a.bucket.tokens <= 4.0
    s.send(a, move("vm-a", "vm-b"))  # one
    assert 4.99 < before - a.bucket.tokens <= 5.0


async def test_over_the_memory_budget_a_queue_past_its_share_takes_no_more() -> None:
    s = Setup("vm-a", "vm-b", "vm-c", "vm-d", queues_memory=64 * 1024, queue_bytes=1 << 20,
              stall_timeout=60)
    s.broker.memory.resize(4)  # 16 KiB each
    b, c = s.eps["vm-b"], s.eps["vm-c"]
    for ep, name in ((b, "vm-b"), (c, "vm-c")):
        ep.pause_writing()
        s.t[name].buffered = 40 * 1024  # two queues not draining, 80 KiB together
    s.send(s.eps["vm-a"], move("vm-a", "vm-b"), move("vm-a", "vm-d"))
    assert b.stats.dropped == 1  # over budget, and past its share
    assert len(s.out("vm-d")) == 1  # a queue that drains is not touched
    s.t["vm-c"].buffered = 0  # vm-c drained: the total is recounted, back under budget
    await wait_for(lambda: s.broker.memory.total() < 64 * 1024)
    s.send(s.eps["vm-a"], move("vm-a", "vm-b"))
    assert b.stats.dropped == 1 and len(s.out("vm-b")) == 1


def test_the_budget_recounts_what_the_queues_hold() -> None:
    now = [0.0]
    queues = [type("Q", (), {"queued": lambda self, n=n: n})() for n in (10, 20, 30)]
    budget = MemoryBudget(100, lambda: queues, clock=lambda: now[0])
    assert budget.total() == 60 and not budget.over(40) and budget.over(41)
    budget.add(30)
    assert budget.total() == 90  # counted up until the next recount
    now[0] += 1
    assert budget.total() == 60


def test_default_budget_follows_the_cgroup_memory_max(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    proc.write_text("0::/system.slice/messagerie-broker.service\n")
    unit = tmp_path / "fs" / "system.slice" / "messagerie-broker.service"
    unit.mkdir(parents=True)
    (unit / "memory.max").write_text("268435456\n")
    assert cgroup_memory_max(proc, tmp_path / "fs") == 256 * 1024 * 1024
    assert default_budget(256 * 1024 * 1024) == int(256 * 1024 * 1024 * 0.3)
    (unit / "memory.max").write_text("max\n")  # unlimited here: the parent's limit
    (unit.parent / "memory.max").write_text("1073741824\n")
    assert cgroup_memory_max(proc, tmp_path / "fs") == 1 << 30
    (unit.parent / "memory.max").write_text("max\n")
    assert cgroup_memory_max(proc, tmp_path / "fs") is None
    assert default_budget(None) == 256 * 1024 * 1024
