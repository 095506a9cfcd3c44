"""The table of commands in flight mirrored in the state file (``broker.inflight``): the
group commit writes differences only, deadlines become wall-clock times, a failing
file is said once and the table in memory goes on. A real SQLite file in tmp_path."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import structlog

from broker.inflight import DOMAIN, SERVICE, InflightStore, Recovery, Restored
from broker.pending import PendingCommands
from broker.spool import Store


class Ep:
    """An endpoint as the table sees it: a kind and a name."""

    def __init__(self, kind: str, name: str) -> None:
        self.kind, self.name = kind, name


def recovery(path: Path, pending: PendingCommands[Ep], wall: float = 1000.0) -> Recovery:
    return Recovery(pending, InflightStore(Store.open(path)), wall=lambda: wall)


def test_group_commit_writes_differences_and_a_new_process_reads_them(tmp_path: Path) -> None:
    clock = [50.0]
    pending = PendingCommands[Ep](limit=8, ttl=30.0, clock=lambda: clock[0])
    a, b, svc = Ep("domain", "vm-a"), Ep("domain", "vm-b"), Ep("dom0", "dom0")
    rec = recovery(tmp_path / "state.sqlite3", pending, wall=1000.0)
    pending.add("vm-a", "c1", "vm-b", "lister", asker=a, target=b)
    pending.add("dom0", "c2", "vm-b", "etat", asker=svc, target=b)
    pending.add("vm-b", "c3", "dom0", "stocker", asker=b, target=svc)
    rec.commit()
    assert (rec.store.commits, rec.store.rows_written) == (1, 3)
    rec.commit()  # nothing changed: no transaction at all
    assert rec.store.commits == 1
    # Answered within one interval and forwarded within it: one write, one delete.
    pending.close("vm-a", "c1")
    pending.add("vm-a", "c4", "vm-b", "lister", asker=a, target=b)
    pending.add("vm-a", "c5", "vm-b", "lister", asker=a, target=b)
    pending.close("vm-a", "c5")  # never written
    rec.commit()
    assert (rec.store.commits, rec.store.rows_written) == (2, 5)

    again = recovery(tmp_path / "state.sqlite3", PendingCommands[Ep](limit=8, ttl=30.0),
                     wall=1010.0)
    assert again.restore() == 3
    assert again.restored[("vm-a", "c4")] == Restored(
        "vm-a", "c4", "vm-b", "lister", DOMAIN, "vm-a", DOMAIN, "vm-b", 1030.0)
    # A dom0 commander is dom0; a dom0 server is named by the command it serves.
    assert again.restored[("dom0", "c2")].asker_kind == SERVICE
    served = again.restored[("vm-b", "c3")]
    assert (served.target_kind, served.target) == (SERVICE, "stocker")
    # Restored ones stay in the file until they are resolved.
    again.commit()
    assert again.store.commits == 0
    del again.restored[("vm-a", "c4")]
    again.commit()
    assert len(InflightStore(Store.open(tmp_path / "state.sqlite3")).load()) == 2


def test_a_failing_file_is_said_once_and_the_next_commit_catches_up(tmp_path: Path) -> None:
    pending = PendingCommands[Ep](limit=8, ttl=30.0)
    a, b = Ep("domain", "vm-a"), Ep("domain", "vm-b")
    rec = recovery(tmp_path / "state.sqlite3", pending)
    good = rec.store.store.db
    rec.store.store.db = broken = sqlite3.connect(":memory:")
    broken.close()  # every statement fails
    with structlog.testing.capture_logs() as logs:
        pending.add("vm-a", "c1", "vm-b", "x", asker=a, target=b)
        rec.commit()
        pending.add("vm-a", "c2", "vm-b", "x", asker=a, target=b)
        rec.commit()
        assert [e["event"] for e in logs] == ["inflight.commit_failed"]
        rec.store.store.db = good
        rec.commit()
    assert [e["event"] for e in logs][-1] == "inflight.commit_recovered"
    assert {r.id for r in InflightStore(Store.open(tmp_path / "state.sqlite3")).load()} == {
        "c1", "c2"}
