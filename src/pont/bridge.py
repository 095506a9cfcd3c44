"""The bridge service: the broker's channel on one side, an MQTT client on the other.

To the messagerie broker the bridge is a domain (its identity) whose channel is a unix
socket the bridge listens on, declared in the broker's configuration like a QEMU
channel socket (``[domaines.supervision] chemin = ...``). The broker connects to it,
checks the ``source`` of everything the bridge writes, applies its policy, and
reconnects with its own backoff when either side restarts.

Three tasks share the loop: the broker connection (reads frames, never blocks on the
uplink: what goes up waits in :class:`~pont.buffer.UplinkBuffer`), the MQTT session
(connects with backoff, subscribes, injects what is let in), the uplink publisher
(drains the buffer in order while MQTT is up). Commands from MQTT wait in ``pending``
for their reply (bounded in number and time), which goes back to the requester's
reply topic with its correlation data.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import ssl
import time
from dataclasses import dataclass
from typing import Any

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from messagerie.codec import FrameDecoder, FrameError, encode
from messagerie.model import Commande, Message, Reponse
from messagerie.vocabulary import Code

from .buffer import Item, UplinkBuffer
from .config import Config
from .mapping import (
    REQUEST,
    Inject,
    Refuse,
    ReplyTo,
    error_reply,
    inbound,
    matches_any,
    topic_for,
)

_QUIET = logging.getLogger("pont.aiomqtt")
_QUIET.setLevel(logging.ERROR)
"""aiomqtt's own logger: it warns at every publish beyond 10 awaiting confirmation,
which the window does on purpose (and costs more than the publish); the bridge logs
its own events."""

MAX_FRAME = 65536
PUBLISH_TIMEOUT = 10.0
"""Seconds a window of publications may take before the connection is deemed lost."""
WINDOW = 64
"""Messages published at once, awaiting their confirmation."""
BROKER_WRITE_HIGH = 1 << 20
"""Bytes waiting to be written to the broker beyond which MQTT reading pauses."""


@dataclass
class Pending:
    reply_to: ReplyTo
    commande: str
    deadline: float


@dataclass
class Counters:
    published: int = 0
    injected: int = 0
    filtered: int = 0
    refused: int = 0
    replies: int = 0
    timed_out: int = 0
    mqtt_connections: int = 0
    broker_connections: int = 0


def tls_context(config: Config) -> ssl.SSLContext | None:
    """The TLS context of the MQTT connection (``None``: plain TCP). Raises ``OSError``
    or ``ssl.SSLError`` naming the file that cannot be used."""
    m = config.mqtt
    if not m.tls:
        return None
    ctx = ssl.create_default_context(cafile=m.ca)
    if m.certificate is not None and m.key is not None:
        ctx.load_cert_chain(m.certificate, m.key)
    return ctx


class Bridge:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.log = structlog.get_logger("pont").bind(hote=config.host, identite=config.identity)
        b = config.buffer
        self.buffer = UplinkBuffer(b.messages, b.bytes, b.age)
        self.pending: dict[str, Pending] = {}
        self.counters = Counters()
        self.broker: asyncio.StreamWriter | None = None
        self.mqtt: aiomqtt.Client | None = None
        self.mqtt_up = asyncio.Event()
        self.mqtt_gone = asyncio.Event()
        """Set when an MQTT session ends, cleared when one starts."""
        self.queued = asyncio.Event()
        self.stopping = asyncio.Event()
        self.started = time.time()
        self.last_error: str | None = None
        self._dropping = False
        self._server: asyncio.AbstractServer | None = None
        self._tls = tls_context(config)

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on the channel socket (the broker connects to it)."""
        path = self.config.channel
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve_broker, path)
        finally:
            os.umask(old)
        os.chmod(path, self.config.channel_mode)
        self.log.info("pont.listening", canal=path)

    async def run(self) -> None:
        """Serve until :meth:`stop`."""
        if self._server is None:
            await self.start()
        tasks = [asyncio.create_task(self._mqtt_session(), name="mqtt"),
                 asyncio.create_task(self._uplink(), name="uplink"),
                 asyncio.create_task(self._housekeeping(), name="housekeeping")]
        try:
            await self.stopping.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._close_server()
            self.write_status()

    def stop(self) -> None:
        self.stopping.set()

    async def _close_server(self) -> None:
        if self._server is not None:
            self._server.close()
            if self.broker is not None:
                self.broker.transport.abort()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(OSError):
            os.unlink(self.config.channel)

    # --- the broker side ---------------------------------------------------------------

    async def _serve_broker(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        if self.broker is not None:
            # The broker reconnected before we saw the old connection go: the newest wins.
            self.broker.transport.abort()
        self.broker = writer
        writer.transport.set_write_buffer_limits(high=BROKER_WRITE_HIGH)
        self.counters.broker_connections += 1
        self.log.info("broker.connected")
        self.write_status()
        decoder = FrameDecoder(MAX_FRAME)
        try:
            while data := await reader.read(1 << 16):
                for item in decoder.feed(data):
                    if isinstance(item, FrameError):
                        self.log.warning("broker.invalid_frame", error=str(item))
                    else:
                        self.from_broker(item)
        except OSError as exc:
            self.log.info("broker.read_failed", error=str(exc))
        except asyncio.CancelledError:
            # The bridge stops. (Re-raised, asyncio's stream server would log the
            # cancelled handler as an error.)
            pass
        finally:
            if self.broker is writer:
                self.broker = None
                self.log.info("broker.disconnected")
                self.write_status()
                self._fail_pending("the broker's channel reset")
            writer.transport.abort()

    def from_broker(self, msg: Message) -> None:
        """A message the broker delivered to the bridge's identity."""
        raw = msg.raw.rstrip(b"\r\n") if msg.raw is not None else encode(msg).rstrip(b"\n")
        if isinstance(msg, Reponse):
            waiting = self.pending.pop(msg.id, None)
            if waiting is not None:
                self.counters.replies += 1
                self._queue(waiting.reply_to.topic, raw, waiting.reply_to.correlation)
                return
        if isinstance(msg, Commande):
            # Nothing in dom0 is served by the bridge: every command gets an answer.
            self._to_broker(encode(msg.fail(Code.COMMANDE_INCONNUE,
                                            "the MQTT bridge serves no command")))
            return
        topic = topic_for(self.config.prefix, self.config.host, msg)
        if not matches_any(self.config.out_topics, topic):
            self.counters.filtered += 1
            return
        self._queue(topic, raw, None)

    def _to_broker(self, frame: bytes) -> bool:
        if self.broker is None or self.broker.is_closing():
            return False
        self.broker.write(frame if frame.endswith(b"\n") else frame + b"\n")
        return True

    def _fail_pending(self, why: str) -> None:
        for id, p in list(self.pending.items()):
            del self.pending[id]
            self._answer(error_reply(self.config.identity, p.reply_to, p.commande, id,
                                     code=Code.DESTINATION_HORS_LIGNE, message=why))

    # --- the uplink ---------------------------------------------------------------------

    def _queue(self, topic: str, payload: bytes, correlation: bytes | None) -> None:
        now = time.monotonic()
        self.buffer.expire(now)
        dropped = self.buffer.put(Item(topic, payload, self.config.out_qos, correlation, now))
        if dropped:
            self._note_drops()
        self.queued.set()

    def _note_drops(self) -> None:
        if not self._dropping:
            self._dropping = True
            d = self.buffer.dropped
            self.log.warning("uplink.dropping", queued=len(self.buffer),
                             queued_bytes=self.buffer.size, dropped_count=d.count,
                             dropped_bytes=d.bytes, dropped_age=d.age,
                             mqtt_connected=self.mqtt_up.is_set())

    def _answer(self, answer: tuple[ReplyTo, bytes]) -> None:
        reply_to, payload = answer
        self._queue(reply_to.topic, payload, reply_to.correlation)

    async def _uplink(self) -> None:
        """Publish the buffer's head, in order, while MQTT is up: up to ``WINDOW``
        messages at a time (QoS 1 waits for each PUBACK; a window keeps the uplink from
        going at one message per round trip). What the connection lost before it was
        confirmed goes back to the head of the buffer and is sent again after the
        reconnection: with QoS 1 a message may arrive twice, never lost within bounds."""
        while True:
            await self.mqtt_up.wait()
            client = self.mqtt
            if client is None:
                self.mqtt_up.clear()
                continue
            batch = self.buffer.take(WINDOW)
            if not batch:
                if self._dropping:
                    self._dropping = False
                    self.log.info("uplink.drained", dropped_total=self.buffer.dropped.total)
                self.queued.clear()
                await self.queued.wait()
                continue
            try:
                async with asyncio.timeout(PUBLISH_TIMEOUT):
                    results = await asyncio.gather(
                        *(self._publish(client, item) for item in batch),
                        return_exceptions=True)
            except TimeoutError:
                results = [aiomqtt.MqttError("publish timed out")] * len(batch)
            failed = [item for item, r in zip(batch, results, strict=True) if r is not None]
            self.counters.published += len(batch) - len(failed)
            if failed:
                error = next(r for r in results if r is not None)
                self.log.info("mqtt.publish_failed", error=str(error), requeued=len(failed))
                if self.buffer.requeue(failed):
                    self._note_drops()
                if isinstance(error, aiomqtt.MqttError):
                    self.mqtt_up.clear()
                    # Wait for the session to notice and reconnect.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1.0):
                            await self.mqtt_gone.wait()

    async def _publish(self, client: aiomqtt.Client, item: Item) -> None:
        props = None
        if item.correlation is not None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.CorrelationData = item.correlation
        # No timeout per message (the batch has one): aiomqtt then awaits the
        # confirmation directly instead of through a task and a timer of its own.
        await client.publish(item.topic, item.payload, qos=item.qos, properties=props,
                             timeout=math.inf)

    # --- the MQTT side -----------------------------------------------------------------

    def _client(self) -> aiomqtt.Client:
        m = self.config.mqtt
        return aiomqtt.Client(
            m.host, m.port, username=m.username, password=m.password,
            identifier=m.client_id or f"messagerie-pont-{self.config.host}",
            protocol=aiomqtt.ProtocolVersion.V5, keepalive=m.keepalive,
            tls_context=self._tls, timeout=10.0,
            max_queued_incoming_messages=1024, logger=_QUIET)

    def subscriptions(self) -> list[str]:
        return [*self.config.in_topics, *(f"{r.topic}/{REQUEST}" for r in self.config.requests)]

    async def _mqtt_session(self) -> None:
        delay = self.config.backoff_min
        m = self.config.mqtt
        while True:
            try:
                async with self._client() as client:
                    topics = self.subscriptions()
                    if topics:
                        # no_local: what the bridge publishes never comes back to it.
                        opts = SubscribeOptions(qos=self.config.in_qos, noLocal=True)
                        await client.subscribe([(t, opts) for t in topics])
                    self.mqtt = client
                    self.mqtt_gone.clear()
                    self.counters.mqtt_connections += 1
                    self.last_error = None
                    delay = self.config.backoff_min
                    self.log.info("mqtt.connected", serveur=f"{m.host}:{m.port}",
                                  tls=self._tls is not None, abonnements=topics,
                                  queued=len(self.buffer))
                    self.mqtt_up.set()
                    self.write_status()
                    async for message in client.messages:
                        await self.from_mqtt(message)
            except aiomqtt.MqttError as exc:
                error = _explain(exc)
                if self.mqtt is not None:
                    self.log.warning("mqtt.disconnected", error=error, queued=len(self.buffer))
                elif error != self.last_error:
                    self.log.error("mqtt.connect_failed", serveur=f"{m.host}:{m.port}",
                                   error=error, retry_in=delay)
                else:
                    self.log.debug("mqtt.connect_failed", error=error, retry_in=delay)
                self.last_error = error
            finally:
                self.mqtt = None
                self.mqtt_up.clear()
                self.mqtt_gone.set()
                self.write_status()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.config.backoff_max)

    async def from_mqtt(self, message: aiomqtt.Message) -> None:
        topic = str(message.topic)
        payload = message.payload
        if not isinstance(payload, bytes | bytearray):
            payload = str(payload).encode() if payload is not None else b""
        props = message.properties
        response_topic = getattr(props, "ResponseTopic", None) if props else None
        correlation = getattr(props, "CorrelationData", None) if props else None
        c = self.config
        decision = inbound(topic, bytes(payload), prefix=c.prefix, host=c.host,
                           identity=c.identity, requests=c.requests,
                           response_topic=response_topic, correlation=correlation,
                           in_flight=frozenset(self.pending))
        match decision:
            case Refuse(reason=reason, detail=detail, answer=answer):
                self.counters.refused += 1
                self.log.warning("mqtt.refused", topic=topic, reason=reason, detail=detail)
                if answer is not None:
                    self._answer(answer)
            case Inject(message=msg, frame=frame, reply_to=reply_to):
                await self._inject(msg, frame, reply_to)

    async def _inject(self, msg: Message, frame: bytes, reply_to: ReplyTo | None) -> None:
        c = self.config
        if isinstance(msg, Commande) and reply_to is not None:
            refusal = None
            if self.broker is None:
                refusal = (Code.DESTINATION_HORS_LIGNE,
                           "the broker is not connected to the bridge")
            elif len(self.pending) >= c.max_commands:
                refusal = (Code.LIMITE, f"{c.max_commands} commands from MQTT already in flight")
            if refusal is not None:
                self.counters.refused += 1
                self._answer(error_reply(c.identity, reply_to, msg.commande, msg.id,
                                         code=refusal[0], message=refusal[1]))
                return
            self.pending[msg.id] = Pending(reply_to, msg.commande,
                                           time.monotonic() + c.command_timeout)
        if not self._to_broker(frame):
            self.counters.refused += 1
            self.log.info("mqtt.dropped", reason="broker_offline", type=msg.type)
            return
        self.counters.injected += 1
        if self.broker is not None and \
                self.broker.transport.get_write_buffer_size() > BROKER_WRITE_HIGH:
            # The broker reads slowly: stop reading MQTT until it catches up (paho's
            # queue and mosquitto's then hold the rest, within their own bounds).
            with contextlib.suppress(OSError, ConnectionError):
                await self.broker.drain()

    # --- timers and status -------------------------------------------------------------

    async def _housekeeping(self) -> None:
        while True:
            now = time.monotonic()
            for id, p in list(self.pending.items()):
                if p.deadline <= now:
                    del self.pending[id]
                    self.counters.timed_out += 1
                    self._answer(error_reply(
                        self.config.identity, p.reply_to, p.commande, id,
                        code=Code.DELAI_DEPASSE,
                        message=f"no answer within {self.config.command_timeout} s"))
            if self.buffer.expire(now):
                self._note_drops()
            self.write_status()
            await asyncio.sleep(1.0)

    def status(self) -> dict[str, Any]:
        d = self.buffer.dropped
        c = self.counters
        return {
            "pid": os.getpid(), "hote": self.config.host, "identite": self.config.identity,
            "depuis": self.started, "maj": time.time(),
            "broker_connecte": self.broker is not None,
            "mqtt_connecte": self.mqtt_up.is_set(),
            "mqtt_erreur": self.last_error,
            "tampon": {"messages": len(self.buffer), "octets": self.buffer.size},
            "pertes": {"nombre": d.count, "octets": d.bytes, "age": d.age},
            "commandes_en_vol": len(self.pending),
            "compteurs": {"publies": c.published, "injectes": c.injected,
                          "filtres": c.filtered, "refuses": c.refused, "reponses": c.replies,
                          "delais_depasses": c.timed_out,
                          "connexions_mqtt": c.mqtt_connections,
                          "connexions_broker": c.broker_connections},
        }

    def write_status(self) -> None:
        """Every second, and at once when a side connects or goes."""
        path = self.config.status_path
        if path is None:
            return
        tmp = f"{path}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(self.status(), f)
            os.replace(tmp, path)
        except OSError as exc:
            self.log.warning("status.write_failed", path=path, error=str(exc))


def _explain(exc: aiomqtt.MqttError) -> str:
    """The most useful text of a connection failure: a TLS verification error's
    reason, a refused CONNECT's reason code, else aiomqtt's text."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"TLS: the server's certificate was refused: {cause.verify_message}"
        if isinstance(cause, ssl.SSLError):
            return f"TLS: {cause.reason or cause}"
        cause = cause.__cause__ or cause.__context__
    return str(exc)
