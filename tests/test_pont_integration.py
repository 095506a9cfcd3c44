# ruff: noqa: ASYNC109, ASYNC221, ASYNC230  (subprocesses and pty writes; explicit timeouts read best)
"""The MQTT bridge with real parts: mosquitto (started by the tests on loopback), the
broker as users start it with a DomU on a socat pty, and ``messagerie-pont`` as users
start it, declared to the broker as the domain ``supervision`` on its unix socket.

The MQTT side of each test is an aiomqtt client (MQTT 5).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from messagerie.client import Client
from messagerie.codec import decode, encode
from messagerie.model import Commande, Notification, Reponse
from tests.support.broker_process import BrokerProcess, write_config
from tests.support.mqtt import Mosquitto, PontProcess, Tls, make_ca, pont_config
from tests.support.policy import Rule, write_policy
from tests.support.ptys import PtyPair
from tests.support.waiting import async_wait_until, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

POLICY = (Rule("vm-a", "supervision", "notification", ["disque", "sentinelle"]),
          Rule("supervision", "vm-a", "commande", "liste_disques"))

OUT = '[sortie]\nqos = {qos}\nsujets = ["messagerie/{host}/vm-a/notification/disque", ' \
      '"messagerie/{host}/vm-a/notification/sentinelle"]\n'
IN = '[entree]\nsujets = ["messagerie/{host}/supervision/commande/#"]\n' \
     '[[requete]]\nsujet = "{host}/system/disks/list_disks"\ndestination = "vm-a"\n' \
     'commande = "liste_disques"\n'


class Host:
    """One appliance: a broker with the DomU vm-a on a pty and the bridge."""

    def __init__(self, directory: Path, name: str, mqtt_port: int, *, pont_extra: str = "",
                 tls: Tls | None = None, ca: Path | None = None, qos: int = 0,
                 login: tuple[str, str] | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.dir = directory
        self.pair = PtyPair(directory, "vm-a")
        self.channel = directory / "pont.sock"
        policy = write_policy(directory / "policy.toml", *POLICY)
        self.pont_config = pont_config(
            directory / "pont.toml", host=name, port=mqtt_port, channel=self.channel,
            tls=tls, ca=ca, login=login,
            extra=(OUT + IN).replace("{host}", name).replace("{qos}", str(qos)) + pont_extra)
        self.pont = PontProcess(self.pont_config)
        self.pont.wait_event("pont.ready")
        config = write_config(directory / "broker.toml",
                              {"vm-a": self.pair.dom0, "supervision": self.channel},
                              extra=f'[broker]\npolitique = "{policy}"\n'
                                    "[reconnexion]\nmin = 0.05\nmax = 0.2\n")
        self.broker = BrokerProcess(config)
        self.broker.wait_ready()
        self.pont.wait_event("broker.connected")

    def status(self) -> dict[str, object]:
        data: dict[str, object] = json.loads((self.dir / f"{self.name}-status.json").read_text())
        return data

    def domu(self) -> Client:
        return Client("vm-a", path=self.pair.domu, backoff_max=0.5)

    def close(self) -> None:
        self.pont.stop()
        self.broker.stop()
        self.pair.kill()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    m = Mosquitto(tmp_path)
    yield m
    m.stop()


@pytest.fixture
def host(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Host]:
    h = Host(tmp_path / "h1", "h1", mosquitto.port)
    h.pont.wait_event("mqtt.connected")
    yield h
    h.close()


@pytest.fixture
async def mqtt(mosquitto: Mosquitto) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="test-supervisor",
                              protocol=aiomqtt.ProtocolVersion.V5) as c:
        yield c


async def next_message(client: aiomqtt.Client, timeout: float = 15.0) -> aiomqtt.Message:
    async with asyncio.timeout(timeout):
        return await anext(aiter(client.messages))


def notification_frame(categorie: str, n: int = 0) -> bytes:
    # Spaces and key order of the DomU's own: byte-identical means these very bytes.
    return (b'{"type": "notification", "source": "vm-a", "destination": "tous", '
            b'"payload": {"categorie": "' + categorie.encode() + b'", "evenement": "ajout", '
            b'"data": {"nom": "sdb", "n": ' + str(n).encode() + b', "txt": "\\u00e9t\xc3\xa9"}}}\n')


def command(name: str, id: str, source: str = "supervision") -> bytes:
    return encode(Commande(source, "vm-a", name, {"disque": "sdb"}, id=id)).rstrip(b"\n")


def reply_props(topic: str, correlation: bytes) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = topic
    props.CorrelationData = correlation
    return props


async def test_domu_notification_reaches_mqtt_byte_identical(
        host: Host, mqtt: aiomqtt.Client) -> None:
    await mqtt.subscribe("messagerie/#")
    with open(host.pair.domu, "wb", buffering=0) as domu:
        # "entree" is not in sortie.sujets (and not allowed by the policy either):
        # it never crosses; the sentinel after it proves it.
        domu.write(notification_frame("entree"))
        domu.write(notification_frame("disque", 7))
        domu.write(notification_frame("sentinelle"))
        got = []
        while not got or got[-1].topic.value.split("/")[-1] != "sentinelle":
            got.append(await next_message(mqtt))
    assert [m.topic.value for m in got] == ["messagerie/h1/vm-a/notification/disque",
                                            "messagerie/h1/vm-a/notification/sentinelle"]
    assert got[0].payload == notification_frame("disque", 7).rstrip(b"\n")


async def test_mqtt_commands_reach_the_domu_and_get_its_answer(
        host: Host, mqtt: aiomqtt.Client) -> None:
    domu = host.domu()
    seen: list[Commande] = []

    @domu.handler("liste_disques")
    async def lister(cmd: Commande) -> list[str]:
        seen.append(cmd)
        return ["sda", cmd.arguments.get("disque", "?")]

    async with domu:
        await mqtt.subscribe("reply/#")
        await mqtt.subscribe("h1/system/disks/list_disks/response/#")
        # MQTT 5 request/response: response topic and correlation data.
        await mqtt.publish("messagerie/h1/supervision/commande/liste_disques",
                           command("liste_disques", "c0ffee01"), qos=1,
                           properties=reply_props("reply/me", b"\x00corr-1"))
        answer = await next_message(mqtt)
        assert answer.topic.value == "reply/me"
        assert answer.properties is not None
        assert answer.properties.CorrelationData == b"\x00corr-1"
        rep = decode(answer.payload)  # type: ignore[arg-type]
        assert isinstance(rep, Reponse) and rep.ok, rep
        assert (rep.source, rep.destination, rep.id) == ("vm-a", "supervision", "c0ffee01")
        assert rep.resultat == ["sda", "sdb"]
        # The field's form: arguments on .../request, the answer on .../response/<who>.
        await mqtt.publish("h1/system/disks/list_disks/request", b'{"disque": "sdc"}', qos=1)
        answer = await next_message(mqtt)
        assert answer.topic.value == "h1/system/disks/list_disks/response/supervision"
        rep = decode(answer.payload)  # type: ignore[arg-type]
        assert isinstance(rep, Reponse) and rep.ok and rep.resultat == ["sda", "sdc"]
    assert [c.source for c in seen] == ["supervision", "supervision"]


async def test_denied_and_forged_commands_get_the_error(
        host: Host, mqtt: aiomqtt.Client) -> None:
    domu = host.domu()
    seen: list[str] = []

    async def handler(cmd: Commande) -> str:
        seen.append(cmd.commande)
        return "done"

    domu.add_handler("formater", handler)
    domu.add_handler("liste_disques", handler)
    async with domu:
        await mqtt.subscribe("reply/#")
        # Not allowed by the policy: the broker answers refuse.
        await mqtt.publish("messagerie/h1/supervision/commande/formater",
                           command("formater", "d0d0d0d1"), qos=1,
                           properties=reply_props("reply/x", b"1"))
        answer = await next_message(mqtt)
        rep = decode(answer.payload)  # type: ignore[arg-type]
        assert isinstance(rep, Reponse) and not rep.ok
        assert rep.erreur is not None and rep.erreur["code"] == "refuse"
        assert answer.properties is not None and answer.properties.CorrelationData == b"1"
        # Claiming to be dom0, from MQTT: refused by the bridge, never injected.
        await mqtt.publish("messagerie/h1/supervision/commande/liste_disques",
                           command("liste_disques", "d0d0d0d2", source="dom0"), qos=1,
                           properties=reply_props("reply/x", b"2"))
        answer = await next_message(mqtt)
        rep = decode(answer.payload)  # type: ignore[arg-type]
        assert isinstance(rep, Reponse) and rep.erreur is not None
        assert rep.erreur["code"] == "refuse" and "dom0" in rep.erreur["message"]
        # An allowed one after them: it is the first the DomU sees.
        await mqtt.publish("messagerie/h1/supervision/commande/liste_disques",
                           command("liste_disques", "d0d0d0d3"), qos=1,
                           properties=reply_props("reply/x", b"3"))
        answer = await next_message(mqtt)
        assert decode(answer.payload).ok  # type: ignore[arg-type, attr-defined]
    assert seen == ["liste_disques"]
    host.broker.wait_event("message.refused", why="policy_denied")
    host.pont.wait_event("mqtt.refused", reason="source")


def persistent_mosquitto(directory: Path) -> Mosquitto:
    """A mosquitto that keeps sessions across its restart (the subscriber's queue)."""
    m = Mosquitto(directory, start=False)
    m.conf.write_text(m.conf.read_text().replace(
        "persistence false", f"persistence true\npersistence_location {directory}/"))
    return m.start()


async def drain(client: aiomqtt.Client, want: int, timeout: float = 30.0) -> list[bytes]:
    got: list[bytes] = []
    async with asyncio.timeout(timeout):
        async for m in client.messages:
            got.append(m.payload)  # type: ignore[arg-type]
            if len({json.loads(p)["payload"]["data"]["n"] for p in got}) >= want:
                break
    return got


@pytest.mark.parametrize(("bound", "during"), [(1000, 100), (60, 100)])
async def test_uplink_down_mid_flow(tmp_path: Path, bound: int, during: int) -> None:
    """mosquitto stopped and started again mid-flow: nothing is lost within the buffer
    bound (QoS 1 may duplicate: counted once); beyond it, the oldest are dropped,
    counted and logged."""
    broker = persistent_mosquitto(tmp_path)
    host = None
    try:
        # The bridge publishes QoS 1; the subscriber's session outlives the restart.
        host = Host(tmp_path / "h1", "h1", broker.port, qos=1,
                    pont_extra=f"[tampon]\nmessages = {bound}\n")
        host.pont.wait_event("mqtt.connected")
        sub = aiomqtt.Client("127.0.0.1", broker.port, identifier="persistent-sub",
                             clean_session=False)
        async with sub:
            await sub.subscribe("messagerie/h1/#", qos=1)
        domu = open(host.pair.domu, "wb", buffering=0)  # noqa: SIM115
        for n in range(50):
            domu.write(notification_frame("disque", n))
        wait_until(lambda: host.status()["compteurs"]["publies"] >= 50,  # type: ignore[index]
                   what=lambda: f"50 published: {host.status()}, {host.pont.tail()}")
        broker.stop()
        host.pont.wait_event("mqtt.disconnected")
        for n in range(50, 50 + during):
            domu.write(notification_frame("disque", n))
        wait_until(lambda: host.status()["tampon"]["messages"] >= min(bound, during)  # type: ignore[index]
                   and host.status()["compteurs"]["filtres"] == 0, what="buffered")  # type: ignore[index]
        broker.start()
        host.pont.wait_event("mqtt.connected", count=2)
        for n in range(50 + during, 100 + during):
            domu.write(notification_frame("disque", n))
        domu.close()
        lost = max(0, during - bound)
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="persistent-sub",
                                  clean_session=False) as sub:
            await sub.subscribe("messagerie/h1/#", qos=1)
            got = await drain(sub, 100 + during - lost)
        numbers = [json.loads(p)["payload"]["data"]["n"] for p in got]
        unique = sorted(set(numbers))
        expected = [*range(50), *range(50 + lost, 100 + during)]
        assert unique == expected
        assert all(p == notification_frame("disque", json.loads(p)["payload"]["data"]["n"])
                   .rstrip(b"\n") for p in got)
        if lost:
            event = host.pont.wait_event("uplink.dropping")
            assert event["level"] == "warning"
            wait_until(lambda: host.status()["pertes"]["nombre"] == lost,  # type: ignore[index]
                       what=f"{lost} drops counted")
        else:
            assert host.pont.find("uplink.dropping") == []
    finally:
        if host is not None:
            host.close()
        broker.stop()


async def test_a_dead_uplink_never_holds_the_broker_back(tmp_path: Path) -> None:
    """mosquitto gone, a burst for the bridge: the bridge reads it all (the broker
    neither drops for it nor declares it stalled); beyond its buffer the oldest are
    dropped and counted."""
    mosq = Mosquitto(tmp_path)
    host = Host(tmp_path / "h1", "h1", mosq.port, pont_extra="[tampon]\nmessages = 100\n")
    try:
        host.pont.wait_event("mqtt.connected")
        mosq.stop()
        host.pont.wait_event("mqtt.disconnected")
        n = 3000
        with open(host.pair.domu, "wb", buffering=0) as domu:
            domu.write(b"".join(notification_frame("disque", i) for i in range(n)))
        wait_until(lambda: host.status()["pertes"]["nombre"] == n - 100,  # type: ignore[index]
                   what=lambda: f"{n - 100} drops counted: {host.status()}")
        assert host.status()["tampon"]["messages"] == 100  # type: ignore[index]
        assert host.pont.wait_event("uplink.dropping")["mqtt_connected"] is False
        assert host.broker.find("message.dropped") == []
        assert host.broker.find("domain.stalled") == []
    finally:
        host.close()


async def test_tls_with_a_test_ca_and_a_bad_certificate(tmp_path: Path) -> None:
    good, other = make_ca(tmp_path, "ca"), make_ca(tmp_path, "other")
    broker = Mosquitto(tmp_path, tls=good)
    hosts: list[Host] = []
    try:
        ok = Host(tmp_path / "ok", "h1", broker.port, tls=good)
        hosts.append(ok)
        event = ok.pont.wait_event("mqtt.connected")
        assert event["tls"] is True
        # The server's certificate is not signed by the CA this bridge trusts.
        bad = Host(tmp_path / "bad", "h2", broker.port, tls=good, ca=other.ca)
        hosts.append(bad)
        failed = bad.pont.wait_event("mqtt.connect_failed")
        assert "certificate" in failed["error"] and "refused" in failed["error"], failed
        assert failed["level"] == "error"
        wait_until(lambda: bad.status()["mqtt_erreur"] == failed["error"], what="status")
        assert bad.status()["mqtt_connecte"] is False
        assert bad.pont.find("mqtt.connected") == []
    finally:
        for h in hosts:
            h.close()
        broker.stop()


async def test_username_and_password(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path, users={"kiosque": "s3cret"})
    hosts: list[Host] = []
    try:
        ok = Host(tmp_path / "ok", "h1", broker.port, login=("kiosque", "s3cret"))
        hosts.append(ok)
        ok.pont.wait_event("mqtt.connected")
        bad = Host(tmp_path / "bad", "h2", broker.port, login=("kiosque", "wrong"))
        hosts.append(bad)
        failed = bad.pont.wait_event("mqtt.connect_failed")
        assert "not authorized" in failed["error"].lower() or \
            "bad user name or password" in failed["error"].lower(), failed
        assert bad.pont.find("mqtt.connected") == []
    finally:
        for h in hosts:
            h.close()
        broker.stop()


async def test_two_hosts_on_one_mosquitto(tmp_path: Path, mosquitto: Mosquitto,
                                          mqtt: aiomqtt.Client) -> None:
    hosts = [Host(tmp_path / name, name, mosquitto.port) for name in ("h1", "h2")]
    try:
        for h in hosts:
            h.pont.wait_event("mqtt.connected")
        await mqtt.subscribe("messagerie/+/vm-a/notification/#")
        await mqtt.subscribe("reply/#")
        for i, h in enumerate(hosts):
            with open(h.pair.domu, "wb", buffering=0) as domu:
                domu.write(notification_frame("disque", i))
            m = await next_message(mqtt)
            assert m.topic.value == f"messagerie/{h.name}/vm-a/notification/disque"
            assert json.loads(m.payload)["payload"]["data"]["n"] == i  # type: ignore[arg-type]
        # A command to h2 reaches h2's vm-a only.
        answered: dict[str, list[str]] = {"h1": [], "h2": []}
        clients = []
        for h in hosts:
            c = h.domu()
            c.add_handler("liste_disques", lambda cmd, n=h.name: answered[n].append(cmd.id) or n)
            clients.append(c)
        async with clients[0], clients[1]:
            await mqtt.publish("messagerie/h2/supervision/commande/liste_disques",
                               command("liste_disques", "e0e0e0e2"), qos=1,
                               properties=reply_props("reply/h2", b"x"))
            answer = await next_message(mqtt)
            assert answer.topic.value == "reply/h2"
            assert decode(answer.payload).resultat == "h2"  # type: ignore[arg-type, attr-defined]
        assert answered == {"h1": [], "h2": ["e0e0e0e2"]}
    finally:
        for h in hosts:
            h.close()


async def test_broker_restart_reconnects_and_status(host: Host, mqtt: aiomqtt.Client) -> None:
    """The broker restarted: it connects to the bridge again and flows resume; the
    status command reports both sides."""
    import subprocess

    from tests.support.mqtt import PONT
    result = subprocess.run([str(PONT), "status", "--config", str(host.pont_config)],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broker: connected; mqtt: connected" in result.stdout
    host.broker.stop()
    host.pont.wait_event("broker.disconnected")
    await async_wait_until(lambda: host.status()["broker_connecte"] is False, what="status")
    result = subprocess.run([str(PONT), "status", "--config", str(host.pont_config)],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 1 and "broker: DISCONNECTED" in result.stdout
    host.broker = BrokerProcess(host.broker.config)
    host.broker.wait_ready()
    host.pont.wait_event("broker.connected", count=2)
    await mqtt.subscribe("messagerie/#")
    with open(host.pair.domu, "wb", buffering=0) as domu:
        domu.write(notification_frame("disque", 42))
    m = await next_message(mqtt)
    assert m.payload == notification_frame("disque", 42).rstrip(b"\n")
    assert Notification  # the model is what the frames decode to
