"""Per-domain limits against the real broker: socat ptys, the broker as a subprocess.

Three senders to one sink: vm-slow is held by its own ``[domaines.vm-slow]`` rate,
vm-usb-1 (found by discovery) by the pattern ``[domaines."vm-usb-*"]``, vm-fast by the
global ``[limites]`` only. Each sends a batch over its burst, then one more message:
that one cannot be read before the batch's deficit is paid back at the domain's own
rate, a lower bound on its arrival that no scheduling delay can break. A SIGHUP then
holds vm-fast to a low rate as well.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest

from messagerie import BlockingClient
from tests.support.broker_process import BrokerProcess
from tests.support.peers import Domu
from tests.support.ptys import PtyPair

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BATCH = 100


def line(src: str, i: int) -> bytes:
    return (b'{"type":"notification","source":"%s","destination":"vm-sink","payload":'
            b'{"categorie":"mesure","evenement":"lot","data":{"i":%d}}}\n' % (src.encode(), i))


def config(tmp: Path, fast_limits: str = "") -> str:
    return f"""
[dom0]
socket = "{tmp / 'dom0.sock'}"

[decouverte]
motifs = ["{tmp / 'disc'}/*.dom0"]
intervalle = 0.2

[limites]
debit = 100000
rafale = 100000

[domaines.vm-slow]
chemin = "{tmp / 'vm-slow.dom0'}"
debit = 200
rafale = 20

[domaines."vm-usb-*"]
debit = 100
rafale = 10
commandes_en_vol = 3

[domaines.vm-fast]
chemin = "{tmp / 'vm-fast.dom0'}"
{fast_limits}

[domaines.vm-sink]
chemin = "{tmp / 'vm-sink.dom0'}"
"""


def throttled(tmp: Path) -> dict[str, int]:
    with BlockingClient("dom0", path=tmp / "dom0.sock", reconnect=False) as c:
        stats: dict[str, Any] = c.commande("dom0", "statistiques", timeout=10).resultat
    return {name: s["limites"] for name, s in stats["domaines"].items()}


def batch_then_one(sender: Domu, name: str, sink: Domu) -> float:
    """Seconds from writing BATCH messages to the arrival of one more written after."""
    sink.inbox.clear()                  # what earlier rounds left
    start = time.monotonic()
    sender.write(b"".join(line(name, i) for i in range(BATCH)))
    # The last one is written once the batch arrived, so that it is read on its own,
    # after the batch's deficit is paid back.
    sink.until_sentinel(lambda m: m.source == name and m.payload["data"]["i"] == BATCH - 1,
                        timeout=30)
    sender.write(line(name, BATCH))
    got = sink.until_sentinel(lambda m: m.source == name and m.payload["data"]["i"] == BATCH,
                              timeout=30)
    elapsed = time.monotonic() - start
    assert [m.payload["data"]["i"] for m in sink.messages() if m.source == name][-BATCH - 1:] \
        == list(range(BATCH + 1))                  # held back, never dropped
    assert got
    return elapsed


def test_two_domains_held_to_different_rates_and_a_reload(tmp_path: Path) -> None:
    (tmp_path / "disc").mkdir()
    pairs = [PtyPair(tmp_path, n) for n in ("vm-slow", "vm-fast", "vm-sink")]
    pairs.append(PtyPair(tmp_path / "disc", "vm-usb-1"))
    conf = tmp_path / "broker.toml"
    conf.write_text(config(tmp_path))
    broker = BrokerProcess(conf)
    try:
        broker.wait_ready()
        broker.wait_event("domain.connected", domain="vm-usb-1")   # discovered
        for name in ("vm-slow", "vm-fast", "vm-sink"):
            broker.wait_event("domain.connected", domain=name)
        slow, fast, sink, usb = (Domu(p.domu) for p in pairs)

        # vm-slow: 200/s, burst 20: the 101st waits (100 - 20) / 200 = 0.4 s at least.
        assert batch_then_one(slow, "vm-slow", sink) >= (BATCH - 20) / 200 * 0.95
        # vm-usb-1, by the pattern: 100/s, burst 10: (100 - 10) / 100 = 0.9 s at least.
        assert batch_then_one(usb, "vm-usb-1", sink) >= (BATCH - 10) / 100 * 0.95
        batch_then_one(fast, "vm-fast", sink)
        counts = throttled(tmp_path)
        assert counts["vm-fast"] == 0, counts             # [limites]: never held
        assert counts["vm-slow"] > 0 and counts["vm-usb-1"] > 0, counts

        # A reload holds vm-fast to its own, lower, rate from now on.
        conf.write_text(config(tmp_path, "debit = 50\nrafale = 5"))
        broker.signal(signal.SIGHUP)
        broker.wait_event("config.reloaded")
        assert batch_then_one(fast, "vm-fast", sink) >= (BATCH - 5) / 50 * 0.95
        assert throttled(tmp_path)["vm-fast"] > 0

        # commandes_en_vol from the pattern: vm-usb-1's fourth command is refused.
        for i in range(4):
            usb.write(b'{"type":"commande","source":"vm-usb-1","destination":"vm-sink",'
                      b'"payload":{"id":"c%d","commande":"lister","arguments":{}}}\n' % i)
        [refusal] = [m for m in usb.wait_messages(1) if m.type == "reponse"]
        assert refusal.payload["id"] == "c3"
        assert refusal.payload["erreur"] == {"code": "limite",
                                             "message": "more than 3 commands in flight"}
        for d in (slow, fast, sink, usb):
            d.close()
    finally:
        assert broker.stop() == 0, broker.tail(20)
        for p in pairs:
            p.kill()
    assert not [t for t in broker.raw_lines if "Traceback" in t]
