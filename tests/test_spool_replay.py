"""A spool's replay interrupted: the domain rebound to a new channel, the broker
stopped, the state directory full. Real processes: the broker as users start it,
domains on socat ptys."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.broker_process import BrokerSystem
from tests.support.peers import Domu, is_sentinel, sentinel
from tests.support.ptys import PtyPair
from tests.support.spool_system import (
    RECONNECT,
    down,
    frame,
    reconnect,
    spool_system,
    status,
    tmpfs,
)
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


def replayed(s: BrokerSystem, name: str) -> int:
    count: int = status(s)["domaines"][name]["spool"]["rejoues"]
    return count


def spool_numbered(s: BrokerSystem, total: int, pad: Callable[[int], int]) -> None:
    """Take vm-c down, send it ``total`` notifications from vm-a, number ``n`` padded
    with ``pad(n)`` bytes, and wait until all of them are spooled."""
    down(s, "vm-c")
    for n in range(total):
        s.domus["vm-a"].send({"type": "notification", "source": "vm-a", "destination": "vm-c",
                              "payload": {"categorie": "flux", "evenement": "n",
                                          "data": {"n": n, "pad": "p" * pad(n)}}})
    wait_until(lambda: status(s)["domaines"]["vm-c"]["spool"]["messages"] == total,
               what=f"{total} spooled", timeout=30)


def test_a_domain_rebound_during_its_replay_gets_the_rest_and_live_traffic(
        tmp_path: Path) -> None:
    """vm-c comes back and does not read; while its spool is replayed, a reload moves
    it to a new pty. The new channel gets every row the old one did not take, then the
    live traffic: none lost, none stuck in the spool."""
    s = spool_system(tmp_path, ("vm-a", "vm-c"))
    new = PtyPair(tmp_path, "vm-c-new")
    try:
        a = s.domus["vm-a"]
        total = 2000
        spool_numbered(s, total, lambda n: 200)
        old = reconnect(s, "vm-c")  # reads nothing: the replay fills pty and transport
        wait_until(lambda: replayed(s, "vm-c") > 0, what="the replay under way")
        s.reconfigure({"vm-a": s.paths["vm-a"], "vm-c": new.dom0})
        s.broker.signal(signal.SIGHUP)
        s.broker.wait_event("config.reloaded")
        fresh = Domu(new.domu)
        a.send(sentinel("vm-a", "vm-c"))
        got = fresh.until_sentinel(is_sentinel, timeout=30)
        ns_new = [m.payload["data"]["n"] for m in got if not is_sentinel(m)]

        def old_numbers() -> list[int]:
            return [m.payload["data"]["n"] for m in old.messages()
                    if m.type == "notification" and "n" in m.payload.get("data", {})]

        # What the old pty's kernel buffer held is read there; the rest came anew.
        wait_until(lambda: (old.pump(), not set(range(total)) - set(ns_new)
                            - set(old_numbers()))[1], interval=0,
                   what=lambda: f"all {total}: new got {len(ns_new)}, "
                                f"old got {len(old_numbers())}")
        assert ns_new == sorted(ns_new)  # in order on the new channel
        assert status(s)["domaines"]["vm-c"]["spool"]["messages"] == 0
        print("old pty got", len(old_numbers()), "new got", len(ns_new))
    finally:
        new.kill()
        s.close()


def test_sigterm_during_a_replay_keeps_the_cut_rows_tail(tmp_path: Path) -> None:
    """SIGTERM while vm-c, back but not reading, is being replayed its spool: the row
    whose head the kernel took is kept as its tail. Started again, the broker completes
    that frame: every message arrives, and no line is corrupt."""
    s = BrokerSystem(tmp_path, ("vm-a", "vm-c"), wait_connected=True,
                     extra=RECONNECT + "[limites]\ndelai_blocage = 0.2\n",
                     env={"STATE_DIRECTORY": str(tmp_path / "state")})
    try:
        a = s.domus["vm-a"]
        total = 2000
        spool_numbered(s, total, lambda n: n % 97)
        c = reconnect(s, "vm-c")  # does not read yet
        wait_until(lambda: replayed(s, "vm-c") > 0, what="the replay under way")
        assert s.restart(signal.SIGTERM) == 0
        a.send(sentinel("vm-a", "vm-c"))
        got = c.until_sentinel(is_sentinel, timeout=60)
        ns = [m.payload["data"]["n"] for m in got if not is_sentinel(m)]
        lines = bytes(c.raw).split(b"\n")[:-1]
        corrupt = [line[:80] for line in lines if not line.startswith(b'{"type"')
                   or line.count(b'{"type"') != 1]
        assert not corrupt
        assert sorted(set(ns)) == list(range(total)), sorted(set(range(total)) - set(ns))
        print("received", len(ns), "distinct", len(set(ns)))
    finally:
        s.close()


def live(i: int) -> bytes:
    return (b'{"type":"notification","source":"vm-a","destination":"vm-b","payload":'
            b'{"categorie":"test","evenement":"live","data":{"live":%d}}}\n' % i)


@pytest.mark.slow
def test_a_full_state_directory_and_a_returning_domain(tmp_path: Path) -> None:
    """The state directory is full and vm-b, which has spooled messages, comes back and
    reads slowly while vm-a sends to it for longer than the spool's retry period: every
    committed message is replayed, and every live message arrives (none routed into the
    spool that cannot be written and dropped), in order among themselves."""
    with tmpfs(tmp_path / "state", "size=2m") as state:
        s = spool_system(tmp_path, ("vm-a", "vm-b"), spool_file=state / "spool.sqlite3")
        try:
            a = s.domus["vm-a"]
            down(s, "vm-b")
            sent = [frame("vm-a", "vm-b", i) for i in range(8000)]
            for i in range(0, 8000, 100):
                a.write(b"".join(sent[i:i + 100]))
            s.broker.wait_event("spool.unavailable")
            kept = status(s)["domaines"]["vm-b"]["spool"]["messages"]
            b = reconnect(s, "vm-b")  # reads nothing yet
            wait_until(lambda: len(s.broker.find("domain.connected", domain="vm-b")) >= 2,
                       what="vm-b back")
            dropped_before = len(s.broker.find("spool.dropped"))
            # 20 live messages a second and a slow reader (its replay lasts), past the
            # spool's retry period (5 s). The sleep is the sending rate, not a wait.
            n = 0
            until = time.monotonic() + 6.0
            while time.monotonic() < until:
                a.write(live(n))
                n += 1
                time.sleep(0.05)
                if n % 4 == 0:
                    b.pump(0.01)

            def live_got() -> list[int]:
                return [int(line.split(b'"live":')[1].split(b"}")[0])
                        for line in bytes(b.raw).split(b"\n")[:-1] if b'"live"' in line]

            wait_until(lambda: (b.pump(), len(set(live_got())) >= n)[1], interval=0,
                       timeout=30, what=lambda: f"{n} live, got {len(set(live_got()))}")
            wait_until(lambda: (b.pump(), len({line for line in b.lines_from("vm-a")
                                              if b'"seq"' in line}) >= kept)[1],
                       interval=0, timeout=30, what=f"{kept} replayed")
            assert live_got() == list(range(n))  # each once, in order
            spooled = {line for line in b.lines_from("vm-a") if b'"seq"' in line}
            assert spooled == set(sent[:kept])
            assert len(s.broker.find("spool.dropped")) == dropped_before
            print("kept", kept, "live", n)
        finally:
            s.close()
