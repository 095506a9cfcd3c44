"""Echo recognition: the broker's own output coming back on a DomU's channel (a tty in
echo mode) is dropped as ``frame.echoed``, not refused as a forged source; anything
else with a forged source still is."""

from __future__ import annotations

from typing import Any

import structlog

from broker.config import Config
from broker.echo import WINDOW, EchoWindow
from broker.endpoint import DomainEndpoint
from broker.hub import Broker

CONNECTE = (b'{"type":"notification","source":"dom0","destination":"tous","payload":'
            b'{"categorie":"domaine","evenement":"connecte","data":{"domaine":"vm"}}}')


def test_a_line_written_is_recognised_with_or_without_cr() -> None:
    w = EchoWindow()
    w.sent([CONNECTE + b"\n", b'{"x":1}\n'])
    assert w.is_echo(CONNECTE)
    assert w.is_echo(CONNECTE + b"\r")  # ONLCR: the echo ends in \r\n
    assert w.is_echo(b'{"x":1}')
    assert w.echoed == 3


def test_only_whole_lines_match() -> None:
    w = EchoWindow()
    w.sent([CONNECTE + b"\n"])
    assert not w.is_echo(CONNECTE[:-1])        # a prefix
    assert not w.is_echo(CONNECTE[1:])         # a suffix
    assert not w.is_echo(CONNECTE.replace(b"connecte", b"deconnecte"))
    assert not w.is_echo(b"")
    assert w.echoed == 0


def test_the_window_is_bounded_and_keeps_the_latest() -> None:
    w = EchoWindow()
    first = b'{"n":"first"}'
    w.sent([first + b"\n"])
    filler = [b'{"pad":"%s"}\n' % (b"x" * 100) for _ in range(2 * WINDOW // 100)]
    w.sent(filler)
    last = b'{"n":"last"}'
    w.sent([last + b"\n"])
    assert len(w._tail) <= 2 * WINDOW + 200
    assert not w.is_echo(first)
    assert w.is_echo(last)
    assert w.is_echo(filler[-1].rstrip(b"\n"))


def test_a_run_s_lines_are_echoes_each_on_its_own() -> None:
    w = EchoWindow()
    a, b = b'{"a":1}', b'{"b":2}'
    w.sent([a + b"\n", b + b"\n"])
    assert w.echoes(a + b"\r\n" + b + b"\r\n") == 2
    assert w.echoed == 2
    # One echo in front of forgeries covers only itself.
    assert w.echoes(a + b"\n" + b'{"c":3}\n' + b'{"d":4}\n') == 1
    assert w.echoed == 3
    assert w.echoes(b'{"c":3}\n\r\n') == 0


class FakeTransport:
    """What the endpoint writes, and a transport's surface it uses."""

    def __init__(self) -> None:
        self.written = bytearray()

    def write(self, data: bytes) -> None:
        self.written += data

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def set_write_buffer_limits(self, high: int, low: int) -> None: ...


def two_connected_domains() -> tuple[Broker, DomainEndpoint, DomainEndpoint]:
    """A broker with ``vm`` (whose channel echoes, in the tests) and ``vm-b``, both
    connected on fake transports that keep what is written."""
    broker = Broker(Config())
    vm = DomainEndpoint(broker, "vm", "/nonexistent")
    other = DomainEndpoint(broker, "vm-b", "/nonexistent")
    broker.domains.update(vm=vm, **{"vm-b": other})
    for ep in (vm, other):
        ep.connection_made(FakeTransport())  # type: ignore[arg-type]
        ep.connected_since = 1.0
    broker.invalidate_routes()
    return broker, vm, other


async def test_the_broker_drops_its_own_echo_and_still_refuses_forgeries() -> None:
    broker, vm, other = two_connected_domains()
    msg_b = (b'{"type":"notification","source":"vm-b","destination":"vm","payload":'
             b'{"categorie":"essai","evenement":"e","data":{"n":1}}}')
    commande = (b'{"type":"commande","source":"dom0","destination":"vm","payload":'
                b'{"id":"c1","commande":"identite","arguments":{}}}')
    with structlog.testing.capture_logs() as logs:
        other.data_received(msg_b + b"\n")          # routed to vm: written there
        broker.emit_state("vm-b", "connecte")        # dom0 -> tous, written to vm
        vm.send(commande + b"\n")
        vm.flush()
        written = bytes(vm.transport.written)
        assert msg_b in written and commande in written
        # vm's tty echoes all of it, cooked (\r\n), two of them in one read
        vm.data_received(written.replace(b"\n", b"\r\n"))
        # and a forgery: not something the broker wrote
        forged = msg_b.replace(b'"n":1', b'"n":2')
        vm.data_received(forged + b"\n")
    echoed = [e for e in logs if e["event"] == "frame.echoed"]
    refused = [e for e in logs if e["event"] == "message.refused"]
    assert sum(e["count"] for e in echoed) == 3
    assert {e["type"] for e in echoed} == {"notification", "commande"}
    assert all(e["log_level"] == "info" for e in echoed)
    assert [(e["why"], e["security"]) for e in refused] == [("spoofed_source", True)]
    assert vm.stats.refused == 1 and vm.echo.echoed == 3
    assert broker.statistics()["domaines"]["vm"]["echos"] == 3
    # no error answer went back for the echoed commande
    assert b'"statut":"erreur"' not in bytes(vm.transport.written)[len(written):]


async def test_one_echo_in_front_of_a_run_hides_none_of_its_forgeries() -> None:
    _, vm, other = two_connected_domains()

    def move(n: int) -> bytes:
        return (b'{"type":"notification","source":"vm-b","destination":"vm","payload":'
                b'{"categorie":"essai","evenement":"e","data":{"n":%d}}}\n' % n)

    other.data_received(move(0))  # routed to vm: written there, so vm may echo it
    vm.flush()
    assert bytes(vm.transport.written) == move(0)
    with structlog.testing.capture_logs() as logs:
        # The echo, then three forgeries with the same source, destination and
        # category: one run.
        vm.data_received(move(0) + move(1) + move(2) + move(3))
    assert vm.echo.echoed == 1
    assert vm.stats.refused == 3
    assert [e["count"] for e in logs if e["event"] == "frame.echoed"] == [1]
    assert [e["why"] for e in logs if e["event"] == "message.refused"] == [
        "spoofed_source"] * 3
