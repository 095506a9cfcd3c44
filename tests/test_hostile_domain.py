"""A hostile domain against the real broker: socat ptys, the broker as a subprocess,
a routing policy.

vm-evil plays vm-sys-usb (it parses untrusted USB content and is assumed owned): it
may only send ``entree`` notifications to vm-ui. vm-ui and vm-diag are honest and
talk to each other. Every test checks that the honest pair is unaffected and that
what vm-evil tried was refused, filtered, throttled or counted, and logged.

Absence is proven with sentinels, not sleeps: the broker handles one channel's
frames in order and a destination's queue is FIFO, so once a message sent *after*
a refused one has arrived, the refused one would have arrived before it.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from messagerie import BlockingClient, Message
from messagerie.channel import READ_SIZE
from tests.support.broker_process import BrokerSystem
from tests.support.peers import Domu
from tests.support.ptys import SOCAT
from tests.support.waiting import async_wait_until, wait_until

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(SOCAT is None, reason="socat is required")]

PEERS = Path(__file__).resolve().parent.parent / "bench" / "peers.py"
RATE = 20_000
BURST = 500
MAX_FRAME = 262_144
"""Large enough for 100 000 nested arrays (200 001 bytes) to reach the JSON parser."""

POLICY = """\
[groupes]
metier = ["vm-ui", "vm-diag"]

[[regle]]   # rule 1: the hostile domain relays input to the UI, nothing else
source = "vm-evil"
destination = "vm-ui"
type = "notification"
nom = "entree"
action = "allow"

[[regle]]   # rule 2
source = "vm-evil"
destination = "*"
type = "*"
action = "deny"

[[regle]]   # rule 3: the honest pair
source = "@metier"
destination = "@metier"
type = "*"
action = "allow"

[[regle]]   # rule 4: dom0's built-ins (statistiques)
source = "dom0"
destination = "dom0"
type = "commande"
action = "allow"

[[regle]]   # rule 5: domain state notifications
source = "dom0"
destination = "tous"
type = "notification"
nom = "domaine"
action = "allow"
"""


def line(src: str, dst: str, i: int, cat: str = "diagnostic") -> bytes:
    return (b'{"type":"notification","source":"%s","destination":"%s","payload":'
            b'{"categorie":"%s","evenement":"mesure","data":{"i":%d}}}\n'
            % (src.encode(), dst.encode(), cat.encode(), i))


def command(src: str, dst: str, id: str, name: str = "liste_disques") -> dict[str, Any]:
    return {"type": "commande", "source": src, "destination": dst,
            "payload": {"id": id, "commande": name, "arguments": {}}}


def numbers(msgs: list[Message], source: str) -> list[int]:
    return [m.payload["data"]["i"] for m in msgs if m.source == source]


def rss_kib(pid: int) -> int:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    assert match, "no VmRSS"
    return int(match.group(1))


class Hostile(BrokerSystem):
    """vm-evil, vm-ui and vm-diag on socat ptys; the broker with the policy above."""

    def __init__(self, tmp: Path) -> None:
        policy = tmp / "policy.toml"
        policy.write_text(POLICY)
        extra = (f'[broker]\ntaille_max_trame = {MAX_FRAME}\npolitique = "{policy}"\n\n'
                 f"[limites]\ndebit = {RATE}\nrafale = {BURST}\n\n"
                 "[reconnexion]\nmin = 0.05\nmax = 0.2\n")
        super().__init__(tmp, ("vm-evil", "vm-ui", "vm-diag"), extra=extra,
                         wait_connected=True)
        self.evil, self.ui, self.diag = (self.domus[n] for n in ("vm-evil", "vm-ui", "vm-diag"))

    @property
    def pid(self) -> int:
        return self.broker.proc.pid

    def statistics(self) -> dict[str, Any]:
        with BlockingClient("dom0", path=self.dom0_socket, reconnect=False) as c:
            result: dict[str, Any] = c.commande("dom0", "statistiques", timeout=10).resultat
        return result

    def alive(self) -> None:
        assert self.broker.proc.poll() is None, f"broker died: {self.broker.tail(20)}"


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Hostile]:
    s = Hostile(tmp_path)
    yield s
    s.alive()
    assert s.close() == 0, s.broker.tail(20)
    assert not s.broker.find("broker.task_failed")
    assert not [t for t in s.broker.raw_lines if "Traceback" in t]


def test_forged_source_is_refused_logged_and_not_delivered(h: Hostile) -> None:
    # vm-ui may write to vm-diag, vm-diag may command vm-ui: vm-evil claims to be them.
    h.evil.write(line("vm-ui", "vm-diag", 666))
    h.evil.send(command("vm-diag", "vm-ui", "forged"))
    h.evil.write(line("vm-ui", "tous", 667))
    events = h.broker.wait_event("message.refused", why="spoofed_source", count=3)
    refusals = h.broker.find("message.refused", why="spoofed_source")
    assert all(e["security"] is True and e["domain"] == "vm-evil" for e in refusals), events
    assert {e["source"] for e in refusals} == {"vm-ui", "vm-diag"}
    # Sentinels, sent after the refusals were decided.
    h.ui.write(line("vm-ui", "vm-diag", 1))
    h.evil.write(line("vm-evil", "vm-ui", 2, "entree"))
    # vm-ui's: the refusals were logged, so decided, before it was written.
    assert numbers(h.diag.until_sentinel(lambda m: m.source == "vm-ui"), "vm-ui") == [1]
    assert [m.source for m in h.diag.messages()] == ["vm-ui"]
    # vm-evil's: on the forged frames' channel, after them.
    got = h.ui.until_sentinel(lambda m: m.source == "vm-evil")
    assert [(m.source, m.type) for m in got] == [("vm-evil", "notification")]
    assert h.statistics()["domaines"]["vm-evil"]["refuses"] == 3


def test_broadcast_is_filtered_per_recipient(h: Hostile) -> None:
    # A forged file state (only dom0 reports those) to everyone: nobody may receive it.
    h.evil.write(line("vm-evil", "tous", 1, "fichier"))
    # Input to everyone: vm-ui may receive it (rule 1), vm-diag and dom0 may not.
    h.evil.write(line("vm-evil", "tous", 2, "entree"))
    h.broker.wait_event("message.filtered", domain="vm-evil", count=2)
    fichier, entree = h.broker.find("message.filtered", domain="vm-evil")
    assert fichier["security"] is True and fichier["name"] == "fichier"
    assert sorted(fichier["denied"]) == ["dom0", "vm-diag", "vm-ui"]
    assert entree["name"] == "entree" and sorted(entree["denied"]) == ["dom0", "vm-diag"]
    # The deciding rules are named: rule 2 for the DomUs, the default deny for dom0.
    for ev in (fichier, entree):
        assert any(r.startswith("rule 2 (line ") and "deny vm-evil -> *" in r
                   for r in ev["rules"]), ev["rules"]
        assert "default deny (no rule matched)" in ev["rules"]
    # Sentinels. vm-evil's to vm-ui is on the broadcasts' channel, after them; vm-ui's to
    # vm-diag is written once both were filtered (logged above), so after they would
    # have been queued for vm-diag.
    h.evil.write(line("vm-evil", "vm-ui", 3, "entree"))
    h.ui.write(line("vm-ui", "vm-diag", 4))
    ui = h.ui.until_sentinel(lambda m: m.source == "vm-evil" and m.payload["data"]["i"] == 3)
    assert numbers(ui, "vm-evil") == [2, 3] and len(ui) == 2
    diag = h.diag.until_sentinel(lambda m: m.source == "vm-ui")
    assert numbers(diag, "vm-ui") == [4] and len(diag) == 1
    # Nothing comes back to the sender either: the refusal of a command it sends after
    # the broadcasts is the first thing it gets (but the broker's state notifications).
    h.evil.send(command("vm-evil", "vm-diag", "sentinelle"))
    back = h.evil.until_sentinel(lambda m: m.type == "reponse")
    assert [(m.type, m.payload.get("id")) for m in back] == [("reponse", "sentinelle")], back


def test_denied_command_is_answered_refuse_without_revealing_the_rule(h: Hostile) -> None:
    h.evil.send(command("vm-evil", "vm-diag", "c1"))          # rule 2
    h.evil.send(command("vm-evil", "vm-ui", "c2", "lit_fichier"))  # rule 2 (not entree)
    h.evil.send(command("vm-evil", "dom0", "c3", "statistiques"))   # default deny
    replies = {m.payload["id"]: m for m in h.evil.wait_messages(3)}
    for id in ("c1", "c2", "c3"):
        rep = replies[id]
        assert rep.type == "reponse" and rep.source == "dom0" and rep.destination == "vm-evil"
        assert rep.payload["statut"] == "erreur"
        err = rep.payload["erreur"]
        assert err["code"] == "refuse", err
        assert not re.search(r"rule|line \d|deny|@metier|vm-evil", err["message"])
    # The broker's log is read by another thread: wait for its lines, do not race them.
    h.broker.wait_event("message.refused", why="policy_denied", count=3, timeout=30)
    denials = {e["id"]: e for e in h.broker.find("message.refused", why="policy_denied")}
    assert set(denials) == {"c1", "c2", "c3"}
    assert denials["c1"]["security"] is True and denials["c1"]["domain"] == "vm-evil"
    assert re.match(r"rule 2 \(line \d+\): deny vm-evil -> \*", denials["c1"]["detail"])
    assert denials["c2"]["detail"].startswith("rule 2 ")
    assert denials["c3"]["detail"] == "default deny (no rule matched)"
    for id, ev in denials.items():
        assert ev["detail"] not in replies[id].payload["erreur"]["message"]
    # The commands never reached their destinations.
    h.ui.write(line("vm-ui", "vm-diag", 1))
    h.diag.write(line("vm-diag", "vm-ui", 2))
    assert [m.type for m in h.diag.wait_messages(1)] == ["notification"]
    assert [m.type for m in h.ui.wait_messages(1)] == ["notification"]
    assert h.statistics()["commandes_en_attente"] == 0


class Reader(threading.Thread):
    """Reads a DomU end in the background as raw lines: counts vm-evil's messages
    cheaply and keeps the honest ones (from ``honest``), in arrival order."""

    def __init__(self, domu: Domu, honest: str) -> None:
        super().__init__(daemon=True)
        self.fd = domu.fd
        self.marker = b'"source":"%s"' % honest.encode()
        self.evil = 0
        self.honest: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        pending = b""
        while not self.stop.is_set():
            ready, _, _ = select.select([self.fd], [], [], 0.05)
            if not ready:
                continue
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                continue
            data = pending + data
            cut = data.rfind(b"\n") + 1
            whole, pending = data[:cut], data[cut:]
            self.evil += whole.count(b'"source":"vm-evil"')
            if self.marker in whole:
                for ln in whole.split(b"\n"):
                    if self.marker in ln:
                        self.honest.append(json.loads(ln)["payload"]["data"]["i"])


@pytest.mark.slow
def test_flood_is_throttled_and_honest_traffic_all_delivered(h: Hostile) -> None:
    n_flood, n_honest = 100_000, 1_000
    rss_before = rss_kib(h.pid)
    ui_reader, diag_reader = Reader(h.ui, "vm-diag"), Reader(h.diag, "vm-ui")
    ui_reader.start()
    diag_reader.start()
    # As fast as it can: the whole flood built in advance, one write loop, own process.
    flood = subprocess.Popen([sys.executable, str(PEERS), "send", str(h.pairs["vm-evil"].domu),
                              str(n_flood), "--source", "vm-evil", "--dest", "vm-ui"],
                             stdout=subprocess.PIPE, text=True)
    started = time.monotonic()
    try:
        wait_until(lambda: ui_reader.evil >= 2 * BURST, 20, "the flood to be under way")

        def talk(domu: Domu, src: str, dst: str) -> None:
            for i in range(0, n_honest, 10):  # ~500 msg/s, well under the rate limit
                domu.write(b"".join(line(src, dst, j) for j in range(i, i + 10)))
                time.sleep(0.02)  # pacing the load, not synchronisation

        talkers = [threading.Thread(target=talk, args=(h.ui, "vm-ui", "vm-diag")),
                   threading.Thread(target=talk, args=(h.diag, "vm-diag", "vm-ui"))]
        for t in talkers:
            t.start()
        for t in talkers:
            t.join(60)
        assert flood.poll() is None, "the flood ended before the honest traffic: no overlap"
        wait_until(lambda: len(diag_reader.honest) >= n_honest
                   and len(ui_reader.honest) >= n_honest, 30, "all honest messages")
        assert diag_reader.honest == list(range(n_honest)), "honest vm-ui -> vm-diag lost"
        assert ui_reader.honest == list(range(n_honest)), "honest vm-diag -> vm-ui lost"
        assert flood.wait(60) == 0
        flood_seconds = time.monotonic() - started
        wait_until(lambda: ui_reader.evil >= n_flood, 30, "the whole (allowed) flood")
    finally:
        if flood.poll() is None:
            flood.kill()
            flood.wait()
        for r in (ui_reader, diag_reader):
            r.stop.set()
            r.join(5)
    # Throttled, in time: what exceeds the burst is read at the configured rate.
    # (The bucket is checked after each read of up to 64 KiB: the last read is free.)
    assert flood_seconds >= 0.8 * (n_flood - BURST - READ_SIZE // 200) / RATE, flood_seconds
    stats = h.statistics()["domaines"]
    evil = stats["vm-evil"]
    assert evil["recus"] == n_flood and evil["limites"] > 0, evil
    assert evil["limites"] <= n_flood - BURST
    for honest in ("vm-ui", "vm-diag"):
        assert stats[honest]["perdus"] == 0 and stats[honest]["refuses"] == 0, stats[honest]
        assert stats[honest]["recus"] == n_honest
    assert ui_reader.evil == n_flood, "throttling lost messages"
    h.alive()
    rss_after = rss_kib(h.pid)
    assert rss_after < 100 * 1024, f"broker RSS {rss_after} KiB"
    assert rss_after - rss_before < 40 * 1024, (rss_before, rss_after)


def test_hostile_bytes_between_valid_frames(h: Hostile) -> None:
    rss_before = rss_kib(h.pid)
    valid = line("vm-evil", "vm-ui", 0, "entree")
    corpus: list[tuple[str, bytes]] = [
        ("garbage", b"\xde\xad\xbe\xef garbage }{][ \x7f\n"),
        ("nul", b"\x00" * 4096 + b"\n"),
        # Terminal control characters: would be XOFF/EOF/interrupt on a cooked tty.
        ("control", b"\x13\x11\x03\x04\x1a\x1c\x7f\r\n"),
        ("10 MB", b'{"type":"notification","payload":"' + b"A" * (10 * 1024 * 1024)),
        ("invalid utf-8", b'{"type":"notification","source":"vm-evil","destination":'
                          b'"vm-ui","payload":{"categorie":"entree","evenement":"\xff\xfe"}}\n'),
        ("nested", b"[" * 100_000 + b"]" * 100_000 + b"\n"),
        ("nested object", b'{"type":"notification","source":"vm-evil","destination":"vm-ui",'
                          b'"payload":{"categorie":"entree","evenement":"x","data":'
                          + b'{"a":' * 30_000 + b"1" + b"}" * 30_000 + b"}}\n"),
    ]
    for i, (_, hostile) in enumerate(corpus, 1):
        h.evil.write(hostile)
        if not hostile.endswith(b"\n"):
            h.evil.write(b"\n")  # the line without a newline ends where the next one starts
        h.evil.write(valid.replace(b'"i":0', b'"i":%d' % i))
        h.diag.write(line("vm-diag", "vm-ui", i))
        h.ui.write(line("vm-ui", "vm-diag", i))
    n = len(corpus)
    got = h.ui.wait_messages(2 * n, timeout=30)
    assert numbers(got, "vm-evil") == list(range(1, n + 1)), "a valid frame after junk was lost"
    assert numbers(got, "vm-diag") == list(range(1, n + 1))
    assert numbers(h.diag.wait_messages(n), "vm-ui") == list(range(1, n + 1))
    h.broker.wait_event("frame.invalid", domain="vm-evil", count=n)
    events = h.broker.find("frame.invalid", domain="vm-evil")
    reasons = [e["reason"] for e in events]
    # "\xde\xad\xbe\xef garbage": invalid UTF-8 is named before bad JSON, whatever the parser.
    assert reasons == ["invalid_utf8", "invalid_json", "invalid_json", "too_large",
                       "invalid_utf8", "invalid_json", "invalid_json"], reasons
    assert "nested too deeply" in events[5]["detail"]
    assert events[3]["size"] > MAX_FRAME
    assert not h.broker.find("frame.invalid", domain="vm-ui")
    assert not h.broker.find("frame.invalid", domain="vm-diag")
    evil = h.statistics()["domaines"]["vm-evil"]
    assert evil["invalides"] == n and evil["recus"] == n
    h.alive()
    rss_after = rss_kib(h.pid)
    assert rss_after < 100 * 1024, f"broker RSS {rss_after} KiB"
    assert rss_after - rss_before < 40 * 1024, (rss_before, rss_after)


@pytest.mark.slow
def test_reconnect_storm_does_not_disturb_the_honest_pair(h: Hostile) -> None:
    fds_before = len(os.listdir(f"/proc/{h.pid}/fd"))
    diag_reader = Reader(h.diag, "vm-ui")
    diag_reader.start()
    sent = 0
    stop = threading.Event()

    def talk() -> None:
        nonlocal sent
        while not stop.is_set():
            h.ui.write(line("vm-ui", "vm-diag", sent))
            sent += 1
            time.sleep(0.005)  # pacing the load, not synchronisation

    talker = threading.Thread(target=talk)
    talker.start()
    evil = h.pairs["vm-evil"]
    h.domus.pop("vm-evil").close()
    try:
        for _ in range(20):
            # The next kill as soon as the broker has the new channel open: 20 real
            # connect/hang-up cycles, as fast as the broker reconnects.
            ups = len(h.broker.find("domain.connected", domain="vm-evil"))
            evil.kill()
            evil.start()  # returns once socat's links exist
            h.broker.wait_event("domain.connected", domain="vm-evil", count=ups + 1)
        stop.set()
        talker.join(10)
        wait_until(lambda: len(diag_reader.honest) >= sent, 20, "honest messages of the storm")
    finally:
        stop.set()
        diag_reader.stop.set()
        diag_reader.join(5)
    assert sent > 0 and diag_reader.honest == list(range(sent)), "honest traffic lost"
    # vm-evil comes back and is served (bytes written before the broker reopens the
    # channel wait in the pty).
    h.domus["vm-evil"] = Domu(evil.domu)
    h.domus["vm-evil"].write(line("vm-evil", "vm-ui", 99, "entree"))
    assert numbers(h.ui.wait_messages(1, timeout=15), "vm-evil") == [99]
    # Logs follow state changes, not retries: at most one domain.unavailable per outage.
    unavailable = len(h.broker.find("domain.unavailable", domain="vm-evil"))
    disconnected = len(h.broker.find("domain.disconnected", domain="vm-evil"))
    assert unavailable <= disconnected + 1, (unavailable, disconnected)
    # A long outage: with reconnexion.max = 0.2 s the broker retries at least 5 times a
    # second. The outage is logged when it starts (and again only if its cause changes,
    # e.g. the pty still exists but fails, then the link is gone), not per retry.
    before = len(h.broker.find("domain.unavailable", domain="vm-evil"))
    h.domus.pop("vm-evil").close()
    # SIGTERM: socat removes its links. After a SIGKILL they would dangle towards a
    # /dev/pts number that any process on the machine may get next, and the broker would
    # open that stranger's pty (a static pty path is only as good as its binding).
    evil.stop()
    h.broker.wait_event("domain.disconnected", domain="vm-evil", count=disconnected + 1,
                        timeout=30)
    h.broker.wait_event("domain.unavailable", domain="vm-evil", count=before + 1, timeout=30)

    def failures() -> int:
        return int(h.statistics()["domaines"]["vm-evil"]["echecs_connexion"])

    # Let the cause settle (the pty may still exist and fail before its link is gone):
    # two more failed attempts. Then six more retries, none of which may be logged.
    first = failures()
    wait_until(lambda: failures() >= first + 2, 60, "two more failed attempts")
    settled = len(h.broker.find("domain.unavailable", domain="vm-evil"))
    retried = failures()
    wait_until(lambda: failures() >= retried + 6, 60, "six more failed attempts")
    assert len(h.broker.find("domain.unavailable", domain="vm-evil")) == settled, [
        (e["event"], e.get("error"), e.get("reason"), e.get("timestamp"))
        for e in h.broker.events if e.get("domain") == "vm-evil"][-8:]
    assert settled - before <= 2, h.broker.find("domain.unavailable", domain="vm-evil")
    wait_until(lambda: len(os.listdir(f"/proc/{h.pid}/fd")) <= fds_before, 30,
               "file descriptors back to their count (no leak)")
    # Counted before the restart: the broker may reconnect before start() returns.
    ups = len(h.broker.find("domain.connected", domain="vm-evil"))
    evil.start()
    h.broker.wait_event("domain.connected", domain="vm-evil", count=ups + 1)


@pytest.mark.slow
def test_a_flood_of_invalid_frames_is_throttled_too(h: Hostile) -> None:
    # Junk costs a decode attempt per frame like a message does: it spends the same
    # budget, or a hostile domain would get unlimited CPU by sending garbage.
    n, junk = 40_000, b"x" * 60 + b"\n"
    started = time.monotonic()
    writer = threading.Thread(target=h.evil.write, args=(junk * n,))
    writer.start()
    for i in range(20):  # the honest pair keeps talking meanwhile
        h.ui.write(line("vm-ui", "vm-diag", i))
    wait_until(lambda: h.statistics()["domaines"]["vm-evil"]["invalides"] >= n, 30,
               "every junk frame read", interval=0.05)
    elapsed = time.monotonic() - started
    writer.join(10)
    assert numbers(h.diag.wait_messages(20), "vm-ui") == list(range(20))
    evil = h.statistics()["domaines"]["vm-evil"]
    assert evil["invalides"] == n and evil["limites"] > 0, evil
    # The bucket is checked after each read (up to 64 KiB): the last read is free.
    assert elapsed >= 0.8 * (n - BURST - READ_SIZE // len(junk)) / RATE, elapsed
    # The journal is not flooded: 20 warnings a second, the rest counted.
    events = h.broker.find("frame.invalid", domain="vm-evil")
    assert len(events) <= 20 * (elapsed + 2)
    assert sum(e["suppressed"] for e in events) + len(events) <= n


@pytest.mark.slow
async def test_socket_channels_are_read_64_kib_at_a_time() -> None:
    """Fairness on connection=socket channels: one wake-up reads at most 64 KiB, as
    on a pty, so a flooding domain's turn in the loop stays short (asyncio's socket
    transports read 256 KiB by default)."""
    import asyncio
    import socket

    from broker.config import Config, Limits
    from broker.endpoint import Endpoint as Peer
    from broker.hub import Broker

    sizes: list[int] = []

    class Recording(Peer):
        def data_received(self, data: bytes) -> None:
            sizes.append(len(data))
            super().data_received(data)

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    # No rate or CPU budget: the read size is the point, not the throttling.
    broker = Broker(Config(dom0_socket=None, limits=Limits(rate=1e9, burst=10**9,
                                                           cpu_share=1e9, cpu_burst=1e9)))
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_unix_connection(lambda: Recording(broker, "vm-evil"),
                                                     sock=ours)
    flood = b"}\n" * (512 * 1024)  # 1 MiB of junk frames, written in one go
    await loop.run_in_executor(None, theirs.sendall, flood)
    try:
        # Generous: 512 Ki junk frames on a loaded machine.
        await async_wait_until(lambda: sum(sizes) >= len(flood), 60, "the whole flood read")
    finally:
        transport.close()
        theirs.close()
    assert sum(sizes) == len(flood)
    assert max(sizes) <= READ_SIZE, max(sizes)
