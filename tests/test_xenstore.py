"""xenstore-bound channels without Xen: the wire codec and the binding (sans-IO), the
asyncio client and the watcher against a stand-in xenstored speaking the same protocol
(tests/support/xenstored.py), and the broker started as users start it, binding,
rebinding on a reboot and refusing paths xenstore no longer gives a domain. The real
xenstored is the xen tier's (tests/guest, ``-m xen``)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.xenstore import (
    HEADER,
    MAX_PAYLOAD,
    Binding,
    Bound,
    Console,
    Op,
    Packet,
    PacketDecoder,
    XenDomain,
    XenstoreClient,
    XenstoreDiscovery,
    XenstoreError,
    bind,
    changes,
    encode,
    is_device_model,
    pty_problem,
    request,
)
from messagerie import Client
from tests.support.broker_process import BrokerProcess
from tests.support.peers import Domu, QemuSocket
from tests.support.waiting import wait_until
from tests.support.xenstored import (
    CHANNEL,
    DeviceModel,
    FakeXenstored,
    introduce_socket_domain,
    socket_channel,
)

# -- the wire --------------------------------------------------------------------------


def test_packets_survive_any_fragmentation() -> None:
    stream = (encode(Packet(Op.READ, 7, b"vm-a")) + request(Op.WATCH, 8, "/a", "tok")
              + encode(Packet(Op.WATCH_EVENT, 0, b"/a/b\0tok\0")))
    decoder = PacketDecoder()
    got: list[Packet] = []
    for i in range(len(stream)):
        got += decoder.feed(stream[i:i + 1])
    assert got == [Packet(Op.READ, 7, b"vm-a"), Packet(Op.WATCH, 8, b"/a\0tok\0"),
                   Packet(Op.WATCH_EVENT, 0, b"/a/b\0tok\0")]


def test_an_oversized_packet_is_a_protocol_error() -> None:
    with pytest.raises(XenstoreError, match="packet of 4097 bytes"):
        PacketDecoder().feed(HEADER.pack(Op.READ, 1, 0, MAX_PAYLOAD + 1))
    with pytest.raises(XenstoreError):
        encode(Packet(Op.READ, 1, b"x" * (MAX_PAYLOAD + 1)))


# -- the binding -----------------------------------------------------------------------

def sock(devid: int, name: str, path: str) -> Console:
    return Console(devid, name, "socket", path=path)


def pty(devid: int, name: str, tty: str) -> Console:
    return Console(devid, name, "pty", tty=tty)


DUMMY = pty(1, "dummy.devid0", "/dev/pts/1")


def test_bind_socket_and_pty_channels_by_name() -> None:
    bound = bind([
        XenDomain(0, "Domain-0"),
        XenDomain(3, "vm-a", (DUMMY, sock(2, "org.messagerie.0", "/var/run/vm-a.sock"))),
        XenDomain(4, "vm-b", (pty(1, "org.messagerie.0", "/dev/pts/9"),)),
        XenDomain(5, "vm-c", (sock(1, "autre", "/var/run/vm-c.sock"),)),
    ], pty_proofs={(4, 1, "/dev/pts/9"): ""})
    assert bound.bindings == {
        "vm-a": Binding("vm-a", 3, 2, "/var/run/vm-a.sock", "socket"),
        "vm-b": Binding("vm-b", 4, 1, "/dev/pts/9", "pty")}
    assert [(p.why, p.domain) for p in bound.problems] == [("no_channel", "vm-c")]


def test_the_channel_name_may_carry_the_domain_name() -> None:
    domains = [XenDomain(3, "vm-a", (sock(1, "vm-a-msg", "/run/a"),)),
               XenDomain(4, "vm-b", (sock(1, "vm-a-msg", "/run/b"),))]
    bound = bind(domains, "{domaine}-msg")
    assert list(bound.bindings) == ["vm-a"]  # vm-b's channel is not named vm-b-msg


def test_what_is_never_bound() -> None:
    bound = bind([
        XenDomain(3, "vm a", (sock(1, "org.messagerie.0", "/run/a"),)),      # bad name
        XenDomain(4, "dom0", (sock(1, "org.messagerie.0", "/run/b"),)),      # dom0
        XenDomain(5, "vm-c", (pty(1, "org.messagerie.0", ""),)),             # no tty yet
        XenDomain(6, "vm-d", (pty(1, "org.messagerie.0", "/etc/shadow"),)),  # not a pty
        XenDomain(7, "vm-e", (sock(1, "org.messagerie.0", "relative"),)),
    ])
    assert bound.bindings == {}
    assert [p.why for p in bound.problems] == ["bad_name", "bad_name", "no_path",
                                               "bad_path", "no_path"]


def test_a_pty_whose_ownership_is_not_proven_is_refused() -> None:
    dom = XenDomain(3, "vm-a", (pty(1, "org.messagerie.0", "/dev/pts/0"),))
    for proofs in (None, {(3, 1, "/dev/pts/0"): "held by sshd"}):
        bound = bind([dom], pty_proofs=proofs)
        assert bound.bindings == {}
        assert [p.why for p in bound.problems] == ["pty_not_owned"]
    assert "held by sshd" in bind([dom], pty_proofs=proofs).problems[0].detail
    assert list(bind([dom], pty_proofs={(3, 1, "/dev/pts/0"): ""}).bindings) == ["vm-a"]


def test_what_a_device_model_looks_like() -> None:
    qemu = ["/usr/bin/qemu-system-i386", "-xen-domid", "5", "-no-shutdown",
            "-machine", "xenpv"]
    assert is_device_model(qemu, 5)
    assert not is_device_model(qemu, 55) and not is_device_model(qemu, 6)
    assert is_device_model(["qemu", "--xen-domid", "5"], 5)
    assert not is_device_model(["bash", "-xen-domid"], 5)
    assert not is_device_model(["sleep", "5"], 5)


@pytest.mark.integration
def test_a_pty_is_proven_only_when_the_domains_device_model_holds_it() -> None:
    """Real processes: a stand-in device model (argv ``-xen-domid 5``) holding a pty's
    master, against a pty any other program holds, one whose slave stays open, one that
    is a session's controlling terminal (an admin's terminal), and non-ptys."""
    models = [DeviceModel(5), DeviceModel(None), DeviceModel(5, "--keep-slave"),
              DeviceModel(5, "--ctty")]
    dm, plain, keep, ctty = models
    try:
        assert pty_problem(dm.tty, 5) == ""
        assert "not by a device model of domid 6" in pty_problem(dm.tty, 6)
        assert f"held by pid {plain.proc.pid}" in pty_problem(plain.tty, 5)
        assert f"open in pid {keep.proc.pid}" in pty_problem(keep.tty, 5)
        assert f"controlling terminal of pid {ctty.proc.pid}" in pty_problem(ctty.tty, 5)
        # the DomU's end of the stand-in: its slave is open in the helper itself
        assert pty_problem(dm.domu, 5) != ""
        # the broker's own descriptors do not count (it has the channel open)
        fd = os.open(dm.tty, os.O_RDWR | os.O_NOCTTY)
        try:
            assert pty_problem(dm.tty, 5) == ""
        finally:
            os.close(fd)
        assert "is not a /dev/pts/N path" in pty_problem("/dev/tty1", 5)
        assert "No such file" in pty_problem("/dev/pts/999999", 5)
        gone = dm.tty
        dm.close()
        assert pty_problem(gone, 5) != ""  # its device model is gone: nothing is proven
    finally:
        for m in models:
            m.close()


def test_a_path_two_domains_claim_goes_to_neither_unless_one_held_it() -> None:
    a = XenDomain(3, "vm-a", (pty(1, "org.messagerie.0", "/dev/pts/4"),))
    b = XenDomain(4, "vm-b", (pty(1, "org.messagerie.0", "/dev/pts/4"),))  # wrote a's pty
    proofs = {(3, 1, "/dev/pts/4"): "", (4, 1, "/dev/pts/4"): ""}
    bound = bind([a, b], pty_proofs=proofs)
    assert bound.bindings == {}
    assert {(p.why, p.domain) for p in bound.problems} == {("path_conflict", "vm-a"),
                                                           ("path_conflict", "vm-b")}
    held = {"vm-a": Binding("vm-a", 3, 1, "/dev/pts/4", "pty")}
    again = bind([a, b], previous=held, pty_proofs=proofs)
    assert again.bindings == held
    assert [(p.why, p.domain) for p in again.problems] == [("path_conflict", "vm-b")]


def test_a_pty_path_changed_after_the_device_model_wrote_it_is_refused() -> None:
    now = XenDomain(3, "vm-a", (pty(1, "org.messagerie.0", "/dev/pts/8"),))
    proofs = {(3, 1, "/dev/pts/8"): ""}
    bound = bind([now], first_ttys={(3, 1): "/dev/pts/4"}, pty_proofs=proofs)
    assert bound.bindings == {}
    assert [p.why for p in bound.problems] == ["tty_changed"]
    assert bind([now], first_ttys={(3, 1): "/dev/pts/8"},
                pty_proofs=proofs).bindings["vm-a"].path == "/dev/pts/8"


def test_a_reboot_is_a_new_binding() -> None:
    old = bind([XenDomain(3, "vm-a", (sock(1, "org.messagerie.0", "/run/a.sock"),))])
    # the old domain still dying while the new one starts: the newer domid wins
    new = bind([XenDomain(3, "vm-a", (sock(1, "org.messagerie.0", "/run/a.sock"),)),
                XenDomain(9, "vm-a", (sock(1, "org.messagerie.0", "/run/a2.sock"),))])
    assert new.bindings["vm-a"].domid == 9
    gone, made = changes(old.bindings, new.bindings)
    assert gone == ["vm-a"] and made == [new.bindings["vm-a"]]
    assert changes(new.bindings, new.bindings) == ([], [])


# -- the client and the watcher against a stand-in xenstored -------------------------

@pytest.fixture
def xenstored(tmp_path: Path) -> Iterator[FakeXenstored]:
    fake = FakeXenstored(tmp_path / "xenstored.sock")
    yield fake
    fake.close()


@pytest.mark.integration
async def test_client_reads_lists_and_watches(xenstored: FakeXenstored) -> None:
    xenstored.write("/local/domain/3/name", "vm-a")
    async with XenstoreClient(str(xenstored.path)) as xs:
        assert await xs.read("/local/domain/3/name") == "vm-a"
        assert await xs.read("/local/domain/3/nothing") is None
        assert await xs.directory("/local/domain") == ["3"]
        assert await xs.directory("/nowhere") == []
        await xs.watch("/local/domain", "t")
        await asyncio.wait_for(xs.changed.wait(), 5)  # fires once when set
        xs.changed.clear()
        events = xs.events
        await asyncio.to_thread(xenstored.write, "/local/domain/3/device/x", "1")
        await asyncio.wait_for(xs.changed.wait(), 5)
        assert xs.events == events + 1
        xenstored.drop_clients()
        with pytest.raises(XenstoreError):
            await asyncio.wait_for(xs.closed, 5)


@pytest.mark.integration
async def test_discovery_binds_rebinds_and_stops_trusting(xenstored: FakeXenstored) -> None:
    seen: list[Bound] = []
    disc = XenstoreDiscovery(seen.append, path=str(xenstored.path), min_interval=0.01)
    task = asyncio.get_running_loop().create_task(disc.run())
    try:
        await asyncio.wait_for(disc.connected.wait(), 5)
        xenstored.add_domain(3, "vm-a", {1: {"name": "org.messagerie.0",
                                             "connection": "socket", "path": "/run/a"}})

        async def bound_to(domid: int | None) -> Binding | None:
            async with asyncio.timeout(5):
                while True:
                    b = seen[-1].bindings.get("vm-a") if seen else None
                    if (b.domid if b else None) == domid:
                        return b
                    await asyncio.sleep(0.01)
        first = await bound_to(3)
        assert first is not None and await disc.still_bound(first)
        xenstored.remove_domain(3)
        await bound_to(None)
        assert not await disc.still_bound(first)
        xenstored.add_domain(4, "vm-a", {1: {"name": "org.messagerie.0",
                                             "connection": "socket", "path": "/run/a2"}})
        second = await bound_to(4)
        assert second is not None and second.path == "/run/a2"
        assert not await disc.still_bound(first)  # same name, but not that domid or path
        # Watched, not polled: once the burst is over, nothing is read until the next
        # event (the sentinel: domid 4 is read again after it).
        def snapshots() -> int:
            return sum(1 for op, args in list(xenstored.requests)
                       if op == Op.READ and args == ["/local/domain/4/name"])
        async with asyncio.timeout(10):
            while True:
                before = len(xenstored.requests)
                await asyncio.sleep(0.5)
                if len(xenstored.requests) == before:
                    break
        quiet = snapshots()
        await asyncio.sleep(1.0)  # a poller at any interval under 1 s would show here
        assert snapshots() == quiet
        await asyncio.to_thread(xenstored.write, "/local/domain/0/backend/console/4/x", "")
        async with asyncio.timeout(5):
            while snapshots() == quiet:  # noqa: ASYNC110  (another thread's counter)
                await asyncio.sleep(0.01)
    finally:
        task.cancel()


@pytest.mark.integration
async def test_an_event_rescans_only_the_domain_it_names(xenstored: FakeXenstored) -> None:
    """A domain writing its own nodes in a loop costs a reading of that domain, never a
    rescan of all; its frontend is watched only until its pty's first path is known
    (a socket domain's, never), and that path is not read again."""
    for domid in range(3, 23):
        xenstored.add_domain(domid, f"vm-{domid}", {1: {
            "name": "org.messagerie.0", "connection": "socket", "path": f"/run/s{domid}"}})
    model = DeviceModel(30)
    xenstored.add_domain(30, "vm-p", {1: {"name": "org.messagerie.0", "connection": "pty"}})
    seen: list[Bound] = []
    disc = XenstoreDiscovery(seen.append, path=str(xenstored.path), min_interval=0.01)
    task = asyncio.get_running_loop().create_task(disc.run())

    def requests() -> list[tuple[int, list[str]]]:
        with xenstored.lock:
            return list(xenstored.requests)

    def watched() -> set[str]:
        with xenstored.lock:
            return {w[1] for w in xenstored.watches}

    try:
        await asyncio.wait_for(disc.connected.wait(), 5)
        front = "/local/domain/30/device/console"
        async with asyncio.timeout(5):
            while front not in watched():  # noqa: ASYNC110  (another thread's state)
                await asyncio.sleep(0.01)
        assert not any(w.startswith("/local/domain/3/") for w in watched())
        async with asyncio.timeout(10):  # the watches' first events' rescans are over
            while True:
                before = len(requests())
                await asyncio.sleep(0.3)
                if len(requests()) == before:
                    break
        # the device model writes the pty's path: bound, then the frontend unwatched
        await asyncio.to_thread(xenstored.write, f"{front}/1/tty", model.tty)
        async with asyncio.timeout(10):
            while "vm-p" not in (seen[-1].bindings if seen else {}):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            while front in watched():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert seen[-1].bindings["vm-p"].path == model.tty
        # vm-3 (a socket domain) and vm-p write their frontends in a loop
        for i in range(50):
            await asyncio.to_thread(xenstored.write, f"/local/domain/3/device/console/1/x{i}", "")
            await asyncio.to_thread(xenstored.write, f"{front}/1/tty", f"/dev/pts/{i}")
        # the sentinel: dom0 writes domid 5's backend, and domid 5 is read
        await asyncio.to_thread(xenstored.write, "/local/domain/0/backend/console/5/x", "")
        async with asyncio.timeout(5):
            while ["/local/domain/5/name"] not in [a for _, a in requests()[before:]]:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        after = requests()[before:]
        assert (Op.DIRECTORY, ["/local/domain"]) not in after  # no full rescan
        names = {a[0] for op, a in after if op == Op.READ and a[0].endswith("/name")}
        assert names <= {"/local/domain/30/name", "/local/domain/5/name",
                         "/local/domain/0/backend/console/5/1/name",
                         "/local/domain/0/backend/console/30/1/name"}
        assert [a for op, a in after if op == Op.READ and a[0] == f"{front}/1/tty"] \
            == [[f"{front}/1/tty"]]  # read once, when the device model wrote it
        assert seen[-1].bindings["vm-p"].path == model.tty  # what the domain wrote: ignored
    finally:
        task.cancel()
        model.close()


# -- the broker, as users start it -------------------------------------------------------

def ping(peer: QemuSocket | Domu, source: str, rid: str) -> dict[str, Any]:
    peer.send({"type": "commande", "source": source, "destination": "dom0",
               "payload": {"id": rid, "commande": "ping", "arguments": {}}})
    reply = wait_until(lambda: (peer.pump(0.05), next(
        (m for m in peer.messages() if m.type == "reponse" and m.id == rid), None))[1],
        10, f"the broker's answer to {rid}")
    return {"source": reply.source, "destination": reply.destination, "statut": reply.statut}


@pytest.fixture
def broker_on_xenstore(tmp_path: Path, xenstored: FakeXenstored) -> Iterator[BrokerProcess]:
    config = tmp_path / "broker.toml"
    config.write_text(f'[broker]\nniveau_journal = "debug"\n'
                      f'[dom0]\nsocket = "{tmp_path / "dom0.sock"}"\n'
                      f'[decouverte]\nxenstore = true\nxenstore_chemin = "{xenstored.path}"\n'
                      f'[reconnexion]\nmin = 0.05\nmax = 0.2\n')
    broker = BrokerProcess(config)
    broker.wait_ready(10)
    yield broker
    broker.stop()


@pytest.mark.integration
@pytest.mark.slow
def test_broker_binds_from_xenstore_and_follows_a_reboot(
        tmp_path: Path, xenstored: FakeXenstored, broker_on_xenstore: BrokerProcess) -> None:
    broker = broker_on_xenstore
    broker.wait_event("xenstore.connected")
    qemu = QemuSocket(tmp_path / "vm-a-1.sock")
    xenstored.add_domain(3, "vm-a", socket_channel(qemu.path))
    broker.wait_event("domain.bound", domain="vm-a", domid=3)
    qemu.accept(10)
    assert ping(qemu, "vm-a", "p1") == {"source": "dom0", "destination": "vm-a",
                                        "statut": "ok"}
    # Reboot: the old domain goes (its socket path stays, another QEMU could listen
    # there), the new one has a new domid and a new socket.
    qemu.drop()
    xenstored.remove_domain(3)
    broker.wait_event("domain.unbound", domain="vm-a", domid=3)
    qemu2 = QemuSocket(tmp_path / "vm-a-2.sock")
    xenstored.add_domain(7, "vm-a", socket_channel(qemu2.path))
    broker.wait_event("domain.bound", domain="vm-a", domid=7)
    qemu2.accept(10)
    assert ping(qemu2, "vm-a", "p2")["statut"] == "ok"  # the sentinel for what follows
    # Nothing connected to the old path since it was unbound.
    readable = __import__("select").select([qemu.server], [], [], 0)[0]
    assert readable == [], "the broker went back to a path xenstore no longer lists"
    # The log is read in its own thread: the answer may come before the event is read.
    broker.wait_event("domain.connected", domain="vm-a", path=str(qemu2.path))
    connected = broker.find("domain.connected", domain="vm-a")
    assert [e["path"] for e in connected] == [str(qemu.path), str(qemu2.path)]
    qemu.close()
    qemu2.close()


@pytest.mark.integration
@pytest.mark.slow
async def test_broker_never_gives_a_domain_a_pty_another_holds(
        tmp_path: Path, xenstored: FakeXenstored, broker_on_xenstore: BrokerProcess) -> None:
    """A pty's path is in the domain's own frontend, which the domain can write: one
    that writes another domain's pty or a dom0 terminal there gets nothing (its device
    model does not hold that pty), and the other keeps it; once the device model's
    value is recorded, what the domain writes there is ignored."""
    broker = broker_on_xenstore
    broker.wait_event("xenstore.connected")
    a, b = DeviceModel(3), DeviceModel(4)  # QEMU for domids 3 and 4: their ptys
    admin = DeviceModel(None, "--ctty")  # a dom0 terminal, such as an ssh session's
    a_tty, b_tty = a.tty, b.tty  # /dev/pts/N
    pty_channel = {1: {"name": CHANNEL, "connection": "pty"}}
    # vm-c and vm-d wrote a dom0 terminal and vm-a's pty into their frontends before
    # this broker first saw them (it was restarted): no first value protects those.
    xenstored.add_domain(5, "vm-c", pty_channel, {1: admin.tty})
    xenstored.add_domain(6, "vm-d", pty_channel, {1: a_tty})
    xenstored.add_domain(3, "vm-a", pty_channel, {1: a_tty})
    xenstored.add_domain(4, "vm-b", pty_channel, {1: b_tty})
    broker.wait_event("domain.connected", domain="vm-a")
    broker.wait_event("domain.connected", domain="vm-b")
    vm_a, vm_b = Domu(Path(a.domu)), Domu(Path(b.domu))
    try:
        refused = {e["domain"]: e for e in broker.find("xenstore.unbound",
                                                       why="pty_not_owned")}
        assert refused["vm-c"]["level"] == "warning"
        assert f"controlling terminal of pid {admin.proc.pid}" in refused["vm-c"]["detail"]
        assert "not by a device model of domid 6" in refused["vm-d"]["detail"]
        assert ping(vm_b, "vm-b", "b1")["destination"] == "vm-b"
        # vm-b rewrites its frontend's tty with vm-a's pty: the broker no longer reads
        # it (the device model's first value is recorded), even on a full rescan
        xenstored.write("/local/domain/4/device/console/1/tty", a_tty)
        full = len([r for r in list(xenstored.requests) if r == (Op.DIRECTORY,
                                                                  ["/local/domain"])])
        xenstored.introduce()
        wait_until(lambda: len([r for r in list(xenstored.requests) if r == (
            Op.DIRECTORY, ["/local/domain"])]) > full, 10, "a full rescan")
        assert ping(vm_b, "vm-b", "b2")["destination"] == "vm-b"  # vm-b keeps its own
        assert ping(vm_a, "vm-a", "a1")["destination"] == "vm-a"  # vm-a keeps its channel
        async with Client.dom0(tmp_path / "dom0.sock") as svc:
            listing = (await svc.commande("dom0", "domaines")).resultat
        assert sorted((d["nom"], d["chemin"]) for d in listing) == [("vm-a", a_tty),
                                                                    ("vm-b", b_tty)]
        # and when vm-a goes, nobody inherits the path vm-b wrote
        xenstored.remove_domain(3)
        broker.wait_event("domain.unbound", domain="vm-a")
        assert broker.find("domain.bound", domain="vm-b", path=a_tty) == []
        assert [e for e in broker.find("domain.connected") if e["path"] == a_tty
                and e["domain"] != "vm-a"] == []
        assert [e["domain"] for e in broker.find("domain.bound")
                if e["domain"] in ("vm-c", "vm-d")] == []
    finally:
        vm_a.close()
        vm_b.close()
        for model in (a, b, admin):
            model.close()


# -- configuration -------------------------------------------------------------------------

def test_xenstore_keys_of_the_configuration() -> None:
    from broker.config import ConfigError, parse_config
    cfg = parse_config({"decouverte": {"xenstore": True, "canal": "{domaine}-msg",
                                       "xenstore_chemin": "/dev/xen/xenbus"}})
    assert (cfg.xenstore, cfg.xenstore_channel, cfg.xenstore_path) == (
        True, "{domaine}-msg", "/dev/xen/xenbus")
    assert parse_config({"decouverte": {"xenstore": True}}).xenstore_channel == CHANNEL
    with pytest.raises(ConfigError, match=r"decouverte\.xenstore: expected bool"):
        parse_config({"decouverte": {"xenstore": "yes"}})
    with pytest.raises(ConfigError, match=r"decouverte\.canal: 'a b' is not a channel name"):
        parse_config({"decouverte": {"xenstore": True, "canal": "a b"}})
    with pytest.raises(ConfigError, match="no domain"):
        parse_config({"decouverte": {"xenstore": False}})


@pytest.mark.integration
@pytest.mark.slow
def test_broker_without_xenstore_says_so_and_binds_once_it_appears(tmp_path: Path) -> None:
    """No xenstored yet (dom0 still starting): the broker serves anyway, says why it
    binds nothing, and binds once xenstore answers."""
    path = tmp_path / "xenstored.sock"
    config = tmp_path / "broker.toml"
    config.write_text(f'[dom0]\nsocket = "{tmp_path / "dom0.sock"}"\n'
                      f'[decouverte]\nxenstore = true\nxenstore_chemin = "{path}"\n'
                      f'[reconnexion]\nmin = 0.05\nmax = 0.2\n')
    broker = BrokerProcess(config)
    fake = None
    try:
        broker.wait_ready(15)
        down = broker.wait_event("xenstore.unavailable")
        assert str(path) in down["error"]
        fake = FakeXenstored(path)
        qemu = QemuSocket(tmp_path / "vm-a.sock")
        fake.add_domain(5, "vm-a", socket_channel(qemu.path))
        broker.wait_event("xenstore.connected", timeout=15)
        broker.wait_event("domain.bound", domain="vm-a", domid=5)
        qemu.accept(10)
        assert ping(qemu, "vm-a", "p")["statut"] == "ok"
        qemu.close()
    finally:
        broker.stop()
        if fake is not None:
            fake.close()


@pytest.mark.integration
@pytest.mark.slow
def test_a_domain_rebooted_under_a_new_domid_gets_its_spool_once_proven(
        tmp_path: Path, xenstored: FakeXenstored, broker_on_xenstore: BrokerProcess) -> None:
    """``xl reboot``: the domain is released, then introduced again with a new domid.
    Meanwhile it stays known as offline and what is sent to it is spooled; an
    incarnation whose channel is not proven (a pty its device model does not hold)
    gets none of it; the next proven one gets all of it first, in order."""
    broker = broker_on_xenstore
    broker.wait_event("xenstore.connected")
    sender = introduce_socket_domain(xenstored, 2, "vm-s", tmp_path / "vm-s.sock")
    qemu = introduce_socket_domain(xenstored, 3, "vm-a", tmp_path / "vm-a-1.sock")
    broker.wait_event("domain.connected", domain="vm-a")
    qemu.drop()
    xenstored.remove_domain(3)
    broker.wait_event("domain.departed", domain="vm-a")
    for i in range(20):
        sender.send({"type": "notification", "source": "vm-s", "destination": "vm-a",
                     "payload": {"categorie": "test", "evenement": "seq", "data": {"i": i}}})
    sender.send({"type": "commande", "source": "vm-s", "destination": "vm-a",
                 "payload": {"id": "c1", "commande": "liste_disques", "arguments": {}}})
    assert ping(sender, "vm-s", "s1")["statut"] == "ok"  # all of it routed by now
    assert broker.find("message.refused", destination="vm-a") == []
    # An impostor incarnation: its frontend names a pty that domid 4's device model
    # holds. The remembered name proves nothing: it is refused like a fresh domain.
    other = DeviceModel(4)
    try:
        xenstored.add_domain(7, "vm-a", {1: {"name": CHANNEL, "connection": "pty"}},
                             {1: other.tty})
        broker.wait_event("xenstore.unbound", domain="vm-a", why="pty_not_owned")
        assert broker.find("domain.returned", domain="vm-a") == []
        xenstored.remove_domain(7)
    finally:
        other.close()
    qemu2 = QemuSocket(tmp_path / "vm-a-2.sock")
    xenstored.add_domain(8, "vm-a", socket_channel(qemu2.path))
    broker.wait_event("domain.bound", domain="vm-a", domid=8)
    qemu2.accept(10)
    broker.wait_event("domain.returned", domain="vm-a")
    got = qemu2.wait_messages(21)
    assert [m.payload["data"]["i"] for m in got[:20]] == list(range(20))
    assert got[20].type == "commande" and got[20].id == "c1"
    qemu2.send({"type": "reponse", "source": "vm-a", "destination": "vm-s",
                "payload": {"id": "c1", "commande": "liste_disques", "statut": "ok",
                            "resultat": ["xvda"]}})
    answer = wait_until(lambda: (sender.pump(0.05), next(
        (m for m in sender.messages() if m.type == "reponse" and m.id == "c1"), None))[1],
        10, "the answer to c1")
    assert answer.payload["resultat"] == ["xvda"]
    for peer in (sender, qemu, qemu2):
        peer.close()
