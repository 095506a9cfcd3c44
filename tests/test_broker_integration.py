"""The broker as users run it, over real socat ptys and unix sockets."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from messagerie import Reponse
from tests.support.broker_process import BIN, BrokerProcess, BrokerSystem, write_config
from tests.support.corpus import spec_example
from tests.support.peers import Domu, QemuSocket, is_sentinel, sentinel
from tests.support.ptys import PtyPair
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

SPEC = spec_example("vm-a") + b"\n"


def notif(src: str, dst: str, i: int = 0, cat: str = "entree") -> dict[str, object]:
    return {"type": "notification", "source": src, "destination": dst,
            "payload": {"categorie": cat, "evenement": "souris",
                        "data": {"i": i, "position": {"x": i % 1024, "y": 7}}}}


def cmd(src: str, dst: str, id: str, name: str = "liste_disques") -> dict[str, object]:
    return {"type": "commande", "source": src, "destination": dst,
            "payload": {"id": id, "commande": name, "arguments": {}}}


@pytest.fixture
def three(tmp_path: Path) -> Iterator[BrokerSystem]:
    s = BrokerSystem(tmp_path, ("vm-a", "vm-b", "vm-c"), missing=("vm-off",))
    yield s
    assert s.close() == 0


def test_unicast_forwards_the_bytes_unchanged(three: BrokerSystem) -> None:
    a, b = three.domus["vm-a"], three.domus["vm-b"]
    # Unusual but valid spacing and key order: forwarded as received, not re-encoded.
    line = (b'{"payload": {"evenement":"connect","categorie":"device","data":{}},'
            b' "destination":"vm-b","source":"vm-a","type":"notification"}\n')
    a.write(line)
    (msg,) = b.wait_messages(1)
    assert msg.raw is not None and msg.raw + b"\n" == line
    c = three.domus["vm-c"]
    a.send(sentinel("vm-a", "vm-c"))  # after the unicast, on vm-a's channel
    assert c.until_sentinel(is_sentinel)[:-1] == [], "the unicast reached a third domain"


def test_broadcast_reaches_everyone_but_its_sender(three: BrokerSystem) -> None:
    a, b, c = (three.domus[n] for n in ("vm-a", "vm-b", "vm-c"))
    a.write(SPEC)
    for d in (b, c):
        (msg,) = d.wait_messages(1)
        assert msg.raw is not None and msg.raw + b"\n" == SPEC
    # vm-b has the broadcast: had it been queued for vm-a, it would be ahead of this.
    b.send(sentinel("vm-b", "vm-a"))
    assert a.until_sentinel(is_sentinel)[:-1] == [], "a broadcast came back to its sender"


def test_spoofed_source_is_refused_and_logged(three: BrokerSystem) -> None:
    a, b = three.domus["vm-a"], three.domus["vm-b"]
    a.send(notif("vm-b", "tous"))
    a.send(cmd("vm-c", "vm-b", "s1"))
    ev = three.broker.wait_event("message.refused", why="spoofed_source", count=2)
    assert ev["security"] is True and ev["domain"] == "vm-a"
    a.send(notif("vm-a", "vm-b", 42))  # the channel keeps working
    (msg,) = b.wait_messages(1)
    assert msg.payload["data"]["i"] == 42


def test_garbage_and_oversize_frames_between_valid_ones(three: BrokerSystem) -> None:
    a, b = three.domus["vm-a"], three.domus["vm-b"]
    a.send(notif("vm-a", "vm-b", 1))
    a.write(b"\x00 garbage \x01\n")  # ASCII: "\xff" would be named invalid_utf8 first
    a.write(b'{"type":"notification","source":"vm-a","destination":"vm-b","payload":{"x":"'
            + b"A" * 200_000 + b'"}}\n')
    a.write(b'{"type":"nope","source":"vm-a","destination":"vm-b","payload":{}}\n')
    a.send(notif("vm-a", "vm-b", 2))
    msgs = b.wait_messages(2)
    assert [m.payload["data"]["i"] for m in msgs] == [1, 2]
    wait_until(lambda: len(three.broker.find("frame.invalid")) >= 3, 5, "three frame.invalid")
    reasons = {e["reason"] for e in three.broker.find("frame.invalid")}
    assert reasons == {"invalid_json", "too_large", "unknown_type"}


def test_command_to_offline_or_unknown_domain_is_answered_at_once(tmp_path: Path) -> None:
    # Without the spool (spool.actif = false): the offline domain is refused at once
    # too (with it, the command waits in vm-off's spool: tests/test_spool_integration.py).
    three = BrokerSystem(tmp_path, ("vm-a", "vm-b", "vm-c"), missing=("vm-off",),
                         extra="[spool]\nactif = false\n")
    a = three.domus["vm-a"]
    a.send(cmd("vm-a", "vm-off", "c1"))
    a.send(cmd("vm-a", "vm-nowhere", "c2"))
    a.send(cmd("vm-a", "dom0", "c3", "ping"))
    replies = {m.payload["id"]: m for m in a.wait_messages(3, timeout=5)}
    assert isinstance(replies["c1"], Reponse)
    assert replies["c1"].erreur == {"code": "destination_hors_ligne",
                                    "message": "domain 'vm-off' is not connected"}
    assert replies["c2"].erreur is not None
    assert replies["c2"].erreur["code"] == "destination_inconnue"
    assert replies["c3"].ok and replies["c3"].resultat["pong"] is True
    assert three.close() == 0


def test_command_round_trip_and_unsolicited_reponse_refused(three: BrokerSystem) -> None:
    a, b = three.domus["vm-a"], three.domus["vm-b"]
    a.send(cmd("vm-a", "vm-b", "r1"))
    (asked,) = b.wait_messages(1)
    assert asked.payload["id"] == "r1"
    reply = {"type": "reponse", "source": "vm-b", "destination": "vm-a",
             "payload": {"id": "r1", "commande": "liste_disques", "statut": "ok",
                         "resultat": ["sda"]}}
    b.send(reply)
    b.send(reply)  # a second answer to the same command is not solicited any more
    (rep,) = a.wait_messages(1)
    assert rep.payload["resultat"] == ["sda"]
    three.broker.wait_event("message.refused", why="unsolicited_reponse")
    b.send(sentinel("vm-b", "vm-a"))  # after both answers, on vm-b's channel
    assert [m.type for m in a.until_sentinel(is_sentinel)] == ["reponse", "notification"]


def test_domain_killed_and_restarted_is_found_again(three: BrokerSystem) -> None:
    a, b = three.domus["vm-a"], three.domus["vm-b"]
    three.domus["vm-b"].close()
    three.pairs["vm-b"].kill()
    three.broker.wait_event("domain.disconnected", domain="vm-b")
    # Everyone is told (the field's domain-state notification).
    wait_until(lambda: (a.pump(), [m for m in a.inbox if getattr(m, "source", "") == "dom0"
                                   and m.payload.get("evenement") == "deconnecte"])[1],
               5, "deconnecte notification")
    a.send(cmd("vm-a", "vm-b", "while-down"))  # into vm-b's spool
    three.pairs["vm-b"].start()
    three.domus["vm-b"] = b = Domu(three.pairs["vm-b"].domu)
    three.broker.wait_event("domain.connected", domain="vm-b", count=2)
    a.send(notif("vm-a", "vm-b", 7))
    asked, msg = b.wait_messages(2)
    assert asked.type == "commande" and asked.payload["id"] == "while-down"
    assert msg.payload["data"]["i"] == 7


def test_pending_command_answered_when_its_destination_goes_down(three: BrokerSystem) -> None:
    a, b = three.domus["vm-a"], three.domus["vm-b"]
    a.send(cmd("vm-a", "vm-b", "lost"))
    b.wait_messages(1)
    b.close()
    three.pairs["vm-b"].kill()
    (rep,) = a.wait_messages(1)
    assert rep.payload["id"] == "lost"
    assert rep.payload["erreur"]["code"] == "destination_hors_ligne"
    three.pairs["vm-b"].start()
    three.domus["vm-b"] = Domu(three.pairs["vm-b"].domu)


@pytest.mark.slow
def test_full_speed_burst_arrives_whole_in_order_and_unchanged(tmp_path: Path) -> None:
    # The hot path over real ptys: runs of canonical mouse moves validated per read,
    # several tty reads per wake-up; a non-canonical frame (spaces) every 97 messages
    # and a second sender break the runs. Nothing may be lost, reordered, re-encoded,
    # or taken for a hang-up (an empty re-read is "nothing yet", not end of file).
    s = BrokerSystem(tmp_path, ("vm-a", "vm-b", "vm-c"),
                     # A reader starved by a loaded machine is not a stalled domain here.
                     extra="[limites]\ndebit = 1000000\nrafale = 1000000\n"
                           "delai_blocage = 60\n")
    try:
        a, b, c = s.domus["vm-a"], s.domus["vm-b"], s.domus["vm-c"]
        n = 30_000

        def frame(src: bytes, i: int) -> bytes:
            if i % 97 == 0:
                return (b'{"type": "notification", "source": "%s", "destination": "vm-b", '
                        b'"payload": {"categorie": "entree", "evenement": "souris", '
                        b'"data": {"i": %d}}}\n' % (src, i))
            return (b'{"type":"notification","source":"%s","destination":"vm-b","payload":'
                    b'{"categorie":"entree","evenement":"souris","data":{"i":%d,'
                    b'"position":{"x":%d,"y":7},"boutons":{"gauche":0,"droit":1}}}}\n'
                    % (src, i, i % 1920))
        burst_a = b"".join(frame(b"vm-a", i) for i in range(n))
        burst_c = b"".join(frame(b"vm-c", i) for i in range(n // 10))
        writers = [threading.Thread(target=d.write, args=(data,))
                   for d, data in ((a, burst_a), (c, burst_c))]
        for w in writers:
            w.start()
        msgs = b.wait_messages(n + n // 10, timeout=180)
        for w in writers:
            w.join(10)
        from_a = [m for m in msgs if m.source == "vm-a"]
        assert [m.payload["data"]["i"] for m in from_a] == list(range(n)), "lost or reordered"
        assert b"".join(m.raw + b"\n" for m in from_a if m.raw) == burst_a, "re-encoded"
        assert [m.payload["data"]["i"] for m in msgs if m.source == "vm-c"] == \
            list(range(n // 10))
        assert s.broker.find("domain.disconnected") == []
        assert s.broker.find("frame.invalid") == []
    finally:
        assert s.close() == 0


@pytest.mark.slow
def test_a_domain_that_never_reads_does_not_delay_the_others(tmp_path: Path) -> None:
    s = BrokerSystem(tmp_path, ("vm-a", "vm-b", "vm-mute"),
              # 2 s: vm-mute never reads, so it stalls whatever the bound; vm-b's reader,
              # starved for a moment on a loaded machine, must not be taken for stalled.
              extra="[limites]\nfile_octets = 65536\ndelai_blocage = 2\n"
                    "debit = 1000000\nrafale = 1000000\n")
    try:
        a, b = s.domus["vm-a"], s.domus["vm-b"]
        s.domus["vm-mute"].close()  # vm-mute's side is never read again
        n = 10_000
        batch = bytearray()
        for i in range(n):
            # Every 10th message is a broadcast, which also goes to vm-mute.
            batch += (b'{"type":"notification","source":"vm-a","destination":"%s",'
                      b'"payload":{"categorie":"entree","evenement":"souris",'
                      b'"data":{"i":%d,"position":{"x":%d,"y":7}}}}\n'
                      % (b"tous" if i % 10 == 0 else b"vm-b", i, i % 1024))
        started = time.monotonic()
        writer = threading.Thread(target=a.write, args=(bytes(batch),))
        writer.start()
        msgs = b.wait_messages(n, timeout=120)
        elapsed = time.monotonic() - started
        writer.join(10)
        assert [m.payload["data"]["i"] for m in msgs] == list(range(n)), "lost or reordered"
        s.broker.wait_event("domain.stalled", domain="vm-mute")
        s.broker.wait_event("message.dropped", domain="vm-mute")
        assert elapsed < 30
    finally:
        s.domus.pop("vm-mute")
        assert s.close() == 0


def test_unix_socket_domain_as_qemu_listens(tmp_path: Path) -> None:
    qemu = QemuSocket(tmp_path / "vm-s-msg.sock")
    pair = PtyPair(tmp_path, "vm-p")
    config = write_config(tmp_path / "b.toml", {"vm-s": qemu.path, "vm-p": pair.dom0})
    broker = BrokerProcess(config)
    try:
        qemu.accept()
        broker.wait_event("domain.connected", domain="vm-s")
        p = Domu(pair.domu)
        broker.wait_event("broker.ready")
        qemu.send(notif("vm-s", "vm-p", 5))
        (msg,) = p.wait_messages(1)
        assert msg.payload["data"]["i"] == 5
        p.send(notif("vm-p", "vm-s", 6))
        (msg,) = qemu.wait_messages(1)
        assert msg.payload["data"]["i"] == 6
        # QEMU closes (domain shut down) then listens again: the broker reconnects.
        qemu.drop()
        broker.wait_event("domain.disconnected", domain="vm-s")
        qemu.accept()
        broker.wait_event("domain.connected", domain="vm-s", count=2)
        p.send(notif("vm-p", "vm-s", 8))
        msgs = qemu.wait_messages(2)
        assert msgs[-1].payload["data"]["i"] == 8
        p.close()
    finally:
        assert broker.stop() == 0
        qemu.close()
        pair.kill()


def test_discovery_picks_up_a_domain_that_appears(tmp_path: Path) -> None:
    pair = PtyPair(tmp_path, "vm-p")
    config = write_config(tmp_path / "b.toml", {"vm-p": pair.dom0}, extra=(
        f'[decouverte]\nmotifs = ["{tmp_path}/*-msg.sock"]\nintervalle = 0.2\n'))
    broker = BrokerProcess(config)
    qemu = None
    try:
        broker.wait_event("broker.ready")
        qemu = QemuSocket(tmp_path / "vm-new-msg.sock")
        appeared = time.monotonic()
        qemu.accept()
        broker.wait_event("domain.connected", domain="vm-new")
        latency = time.monotonic() - appeared
        assert latency < 2.0
        (tmp_path / "bad name-msg.sock").touch()
        broker.wait_event("discovery.bad_name")
        qemu.close()
        qemu = None
        broker.wait_event("domain.departed", domain="vm-new")  # kept a while, offline
    finally:
        assert broker.stop() == 0
        if qemu is not None:
            qemu.close()
        pair.kill()


def test_sighup_reload_and_bad_config_keeps_running(tmp_path: Path) -> None:
    s = BrokerSystem(tmp_path, ("vm-a",))
    b_pair = PtyPair(tmp_path, "vm-b")  # exists, not configured yet
    b = None
    try:
        a = s.domus["vm-a"]
        s.reconfigure({**s.paths, "vm-b": b_pair.dom0})
        s.broker.signal(signal.SIGHUP)
        s.broker.wait_event("config.reloaded")
        s.broker.wait_event("domain.connected", domain="vm-b")
        b = Domu(b_pair.domu)
        a.send(notif("vm-a", "vm-b", 1))
        assert b.wait_messages(1)[0].payload["data"]["i"] == 1
        s.config.write_text("[domaines.vm-a]\nchemin = 12\n")
        s.broker.signal(signal.SIGHUP)
        ev = s.broker.wait_event("config.reload_failed")
        assert "domaines.vm-a.chemin" in ev["error"]
        a.send(notif("vm-a", "vm-b", 2))  # the running configuration stays
        assert b.wait_messages(2)[1].payload["data"]["i"] == 2
    finally:
        assert s.close() == 0
        if b is not None:
            b.close()
        b_pair.kill()


def test_unreadable_paths_do_not_stop_the_others(tmp_path: Path) -> None:
    (tmp_path / "regular").write_text("not a channel")
    s = BrokerSystem(tmp_path, ("vm-a", "vm-b"), missing=("vm-none",),
                     paths={"vm-file": tmp_path / "regular"})
    try:
        ev = s.broker.wait_event("domain.unavailable", domain="vm-file")
        assert "not a tty nor a unix socket" in ev["error"]
        s.broker.wait_event("domain.unavailable", domain="vm-none")
        s.domus["vm-a"].send(notif("vm-a", "vm-b", 3))
        assert s.domus["vm-b"].wait_messages(1)[0].payload["data"]["i"] == 3
    finally:
        assert s.close() == 0


def test_check_config_exit_status(tmp_path: Path) -> None:
    good = write_config(tmp_path / "good.toml", {"vm-a": tmp_path / "x"})
    bad = tmp_path / "bad.toml"
    bad.write_text('[domaines."vm a"]\nchemin = "/x"\n')
    exe = str(BIN / "messagerie-broker")
    ok = subprocess.run([exe, "--check-config", str(good)], capture_output=True, text=True,
                        check=False)
    assert ok.returncode == 0 and "ok" in ok.stdout
    ko = subprocess.run([exe, "--check-config", str(bad)], capture_output=True, text=True,
                        check=False)
    assert ko.returncode == 2
    assert ko.stderr.count("\n") == 1 and "domaines.vm a" in ko.stderr
    assert "Traceback" not in ko.stderr


def test_sigterm_drains_and_exits_zero(tmp_path: Path) -> None:
    s = BrokerSystem(tmp_path, ("vm-a", "vm-b"))
    a, b = s.domus["vm-a"], s.domus["vm-b"]
    for i in range(200):
        a.send(notif("vm-a", "vm-b", i))
    b.wait_messages(200)
    assert s.close() == 0
    ev = s.broker.find("broker.stopped")[0]
    assert ev["received"] >= 200 and ev["undelivered_bytes"] == 0


def test_dom0_socket_permissions(tmp_path: Path) -> None:
    s = BrokerSystem(tmp_path, ("vm-a",), extra="")
    try:
        mode = os.stat(tmp_path / "dom0.sock").st_mode & 0o777
        assert mode == 0o660
    finally:
        assert s.close() == 0


def test_sighup_reloads_the_policy_and_refuses_a_bad_one(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    allow = ('[[regle]]\nsource = "vm-a"\ndestination = "vm-b"\ntype = "notification"\n'
             'action = "allow"\n')
    policy.write_text(allow)
    s = BrokerSystem(tmp_path, ("vm-a", "vm-b"), extra=f'[broker]\npolitique = "{policy}"\n')
    try:
        a, b = s.domus["vm-a"], s.domus["vm-b"]
        a.send(notif("vm-a", "vm-b", 1))
        assert b.wait_messages(1)[0].payload["data"]["i"] == 1
        # Denied from now on; rule 2 lets the sentinel (a command) through.
        policy.write_text(allow.replace('"allow"', '"deny"') + (
            '[[regle]]\nsource = "vm-a"\ndestination = "vm-b"\ntype = "commande"\n'
            'action = "allow"\n'))
        s.broker.signal(signal.SIGHUP)
        s.broker.wait_event("config.reloaded")
        a.send(notif("vm-a", "vm-b", 2))
        ev = s.broker.wait_event("message.refused", why="policy_denied")
        assert "rule 1 (line 1)" in ev["detail"]
        policy.write_text(allow + '[[regle]]\nsource = "vm-a"\naction = "maybe"\n')
        s.broker.signal(signal.SIGHUP)
        failed = s.broker.wait_event("config.reload_failed")
        assert "policy.toml:6" in failed["error"] and "regle[2]" in failed["error"]
        a.send(notif("vm-a", "vm-b", 3))  # the deny policy still rules
        s.broker.wait_event("message.refused", why="policy_denied", count=2)
        a.send(cmd("vm-a", "vm-b", "sentinelle"))  # after 2 and 3, on vm-a's channel
        got = b.until_sentinel(lambda m: m.type == "commande")
        assert [(m.type, m.payload.get("data", {}).get("i")) for m in got] == [
            ("notification", 1), ("commande", None)], "a denied notification was delivered"
    finally:
        assert s.close() == 0


def test_a_second_broker_does_not_steal_the_dom0_socket(tmp_path: Path) -> None:
    pair = PtyPair(tmp_path, "vm-a")
    config = write_config(tmp_path / "b.toml", {"vm-a": pair.dom0})
    first = BrokerProcess(config)
    try:
        first.wait_event("broker.ready")
        second = BrokerProcess(config)
        assert second.proc.wait(15) == 1
        ev = second.wait_event("broker.failed")
        assert "another broker is listening" in ev["error"]
        # The first one still serves its socket.
        ping = subprocess.run([str(BIN / "messagerie"), "--path", str(tmp_path / "dom0.sock"),
                               "ping"], capture_output=True, text=True, check=False)
        assert ping.returncode == 0, ping.stderr
    finally:
        assert first.stop() == 0
        pair.kill()
