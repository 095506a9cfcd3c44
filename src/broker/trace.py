"""The live traffic monitor: ``messagerie trace`` on the broker's trace socket.

Every message the broker routes, refuses, filters or drops becomes one trace event
(time, source, destination, type, name, id, size, verdict, targets or rule) sent to
each monitor whose filter it matches. Access is the socket's: it exists only when
``[trace] groupe`` is set, mode 0660 with that group, in ``/run/messagerie`` (0750),
so only root and the members of that group who may enter the directory can watch.

A monitor never slows routing: events are written without waiting, and once a
monitor's unread output passes :data:`MAX_BUFFER` its events are dropped and counted
(not queued) until it has read three quarters of it; it is told how many
(``{"perdus": n}``) as soon as it has. With no
monitor connected the hub's hooks cost one attribute test per message.

The protocol, JSON lines: the monitor sends one subscription
``{"domaine": D, "type": T, "nom": N, "verdict": V, "payload": bool}`` (every key
optional; ``domaine`` matches the source or the destination; ``verdict`` one of
:data:`VERDICTS`); the broker answers ``{"trace": "ok", ...}`` then events. A monitor that has not
subscribed within :data:`SUBSCRIPTION_TIMEOUT` is told so and disconnected. Asking for
payloads (off by default) is logged as ``trace.payload_enabled``, a security event
with the monitor's pid and uid.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

import msgspec
import structlog

from messagerie.model import TOUS

from .sockets import listen

if TYPE_CHECKING:
    from .endpoint import Endpoint
    from .router import Deliver, Routable

VERDICTS: Final = ("routed", "refused", "filtered", "dropped")
MAX_BUFFER: Final = 256 * 1024
"""Unread bytes a monitor may have before its events are dropped."""
MAX_SUBSCRIPTION: Final = 4096
SUBSCRIPTION_TIMEOUT: Final = 10.0
"""Seconds a monitor has, once connected, to send its subscription."""
PAYLOAD_MAX: Final = 4096
"""Bytes of a message's payload shown with ``--payload`` (the rest is cut)."""

_encode = msgspec.json.Encoder().encode


class Subscription(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    domaine: str | None = None
    type: str | None = None
    nom: str | None = None
    verdict: str | None = None
    payload: bool = False

    def matches(self, event: dict[str, Any]) -> bool:
        if self.domaine is not None and self.domaine not in (event["source"],
                                                             event["destination"]):
            return False
        if self.type is not None and event["type"] != self.type:
            return False
        if self.nom is not None and event["name"] != self.nom:
            return False
        return self.verdict is None or event["verdict"] == self.verdict


_decode_subscription = msgspec.json.Decoder(Subscription).decode


class Monitor(asyncio.Protocol):
    """One ``messagerie trace`` connection."""

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer
        self.transport: asyncio.Transport | None = None
        self.subscription: Subscription | None = None
        self.dropped = 0
        """Events dropped since the monitor last caught up."""
        self.dropped_total = 0
        self.paused = False
        """Its unread output passed MAX_BUFFER: drop until it reads."""
        self._buffer = b""
        self._deadline: asyncio.TimerHandle | None = None
        """Closes the connection if no subscription came in time."""
        self.creds: dict[str, int] = {}
        self.log = structlog.get_logger("broker").bind()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.tracer.connections.add(self)
        self._deadline = asyncio.get_running_loop().call_later(
            SUBSCRIPTION_TIMEOUT, self._fail,
            f"no subscription within {SUBSCRIPTION_TIMEOUT:g} s")
        transport.set_write_buffer_limits(high=MAX_BUFFER, low=MAX_BUFFER // 4)
        sock = transport.get_extra_info("socket")
        with contextlib.suppress(OSError, AttributeError, struct.error):
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                  struct.calcsize("3i"))
            pid, uid, gid = struct.unpack("3i", raw)
            self.creds = {"pid": pid, "uid": uid, "gid": gid}
        self.log = self.log.bind(monitor=self.creds.get("pid"), uid=self.creds.get("uid"))

    def data_received(self, data: bytes) -> None:
        if self.subscription is not None:
            return  # a monitor only listens after subscribing
        self._buffer += data
        if b"\n" not in self._buffer:
            if len(self._buffer) > MAX_SUBSCRIPTION:
                self._fail("subscription too long")
            return
        line = self._buffer.split(b"\n", 1)[0]
        self._buffer = b""
        try:
            sub = _decode_subscription(line)
        except msgspec.ValidationError as exc:
            self._fail(f"invalid subscription: {exc}")
            return
        except msgspec.DecodeError:
            self._fail("invalid subscription: not JSON")
            return
        if sub.verdict is not None and sub.verdict not in VERDICTS:
            self._fail(f"invalid subscription: verdict {sub.verdict!r} is not one of "
                       f"{', '.join(VERDICTS)}")
            return
        self.subscription = sub
        self._cancel_deadline()
        self._write({"trace": "ok", "verdicts": list(VERDICTS), "payload": sub.payload})
        self.log.info("trace.started", domaine=sub.domaine, type=sub.type, nom=sub.nom,
                      verdict=sub.verdict, payload=sub.payload)
        if sub.payload:
            self.log.warning("trace.payload_enabled", security=True, **self.creds,
                             detail="a monitor receives message payloads")
        self.tracer.add(self)

    def _fail(self, text: str) -> None:
        self._cancel_deadline()
        self._write({"trace": "erreur", "message": text})
        if self.transport is not None:
            self.transport.close()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _write(self, obj: dict[str, Any]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_encode(obj) + b"\n")

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.dropped:
            self._write({"perdus": self.dropped})
            self.dropped = 0

    def offer(self, event: dict[str, Any], payload: bytes | None) -> None:
        transport = self.transport
        if transport is None:
            return
        if self.paused:
            self.dropped += 1
            self.dropped_total += 1
            return
        if payload is not None:
            event = {**event, "payload": payload[:PAYLOAD_MAX].decode(errors="replace")}
        transport.write(_encode(event) + b"\n")

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._cancel_deadline()
        self.tracer.connections.discard(self)
        self.tracer.remove(self)
        if self.subscription is not None:
            self.log.info("trace.stopped", dropped=self.dropped_total)


class Tracer:
    """The monitors and the hooks the hub calls. ``hub.tracer`` is this object while at
    least one monitor listens, else None (the hot path's only cost)."""

    def __init__(self, hub: Any) -> None:
        self.hub = hub
        self.monitors: list[Monitor] = []
        """The subscribed monitors: those the hooks offer events to."""
        self.connections: set[Monitor] = set()
        """Every open connection, subscribed or not (closed by :meth:`stop`)."""
        self.server: asyncio.AbstractServer | None = None
        self.path: str | None = None

    # -- the socket ---------------------------------------------------------------
    async def start(self, path: str, group: str) -> None:
        self.server = await listen(path, lambda: Monitor(self), mode=0o660, group=group,
                                   setting="trace.groupe")
        self.path = path

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        # Every connection, not only the subscribed monitors: from Python 3.12
        # wait_closed() waits for all of them, and one that never subscribes, or
        # never reads, would hold the broker's shutdown forever. Abort: close() waits
        # for a monitor to read what is queued for it.
        for monitor in list(self.connections):
            if monitor.transport is not None:
                monitor.transport.abort()
        if self.server is not None:
            await self.server.wait_closed()
            self.server = None
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def add(self, monitor: Monitor) -> None:
        self.monitors.append(monitor)
        self.hub.tracer = self

    def remove(self, monitor: Monitor) -> None:
        if monitor in self.monitors:
            self.monitors.remove(monitor)
        if not self.monitors:
            self.hub.tracer = None

    # -- the hooks (only called while a monitor listens) --------------------------
    def _emit(self, peer: Endpoint | None, msg: Routable, verdict: str, size: int,
              explain: Callable[[], str] | None = None, **extra: Any) -> None:
        """Offer the event to every monitor whose filters it matches. ``explain``, when
        given, gives the event's ``rule``, asked only if some monitor takes the event
        (routing never pays for a rule nobody reads)."""
        event = {"time": time.time(), "channel": peer.name if peer is not None else None,
                 "source": msg.source, "destination": msg.destination, "type": msg.type,
                 "name": msg.name, "id": getattr(msg, "id", None), "size": size,
                 "verdict": verdict, **extra}
        for monitor in self.monitors:
            sub = monitor.subscription
            if sub is not None and sub.matches(event):
                if explain is not None and "rule" not in event:
                    event["rule"] = explain()
                monitor.offer(event, _payload(msg) if sub.payload else None)

    def routed(self, peer: Endpoint, msg: Routable, size: int, deliver: Deliver,
               run: bytes | None = None) -> None:
        """``msg`` was routed; ``run``, when given, is the bytes of the whole run
        (``msg`` its first frame's envelope): one event per frame of it."""
        targets = [*deliver.targets, *(["dom0"] if deliver.dom0_services else [])]
        if not targets:
            return  # a broadcast the policy filtered for everyone: "filtered" says it

        def explain() -> str:
            return self._allowed_by(msg, deliver)

        if run is None:
            self._emit(peer, msg, "routed", size, explain, targets=targets)
            return
        for frame in _frames(msg, run):
            self._emit(peer, frame, "routed", _size(frame), explain, targets=targets)

    def _allowed_by(self, msg: Routable, deliver: Deliver) -> str:
        """What let a routed message through, as the policy describes it (asked again:
        the router's cached decision keeps no rule)."""
        if msg.type == "reponse":
            return "answers a command in flight"
        if deliver.dom0_services and not deliver.targets:
            return "a broadcast from dom0 to its services"
        decide = self.hub.policy.decide
        if msg.destination == TOUS:
            reasons = sorted({decide(msg.source, t, msg.type, msg.name, broadcast=True).reason
                              for t in deliver.targets})
            return "; ".join(reasons)
        return str(decide(msg.source, msg.destination, msg.type, msg.name).reason)

    def refused(self, peer: Endpoint, msg: Routable, why: str, detail: str) -> None:
        self._emit(peer, msg, "refused", _size(msg), why=why, rule=detail)

    def filtered(self, peer: Endpoint, msg: Routable,
                 denied: Iterable[tuple[str, str]]) -> None:
        denied = list(denied)
        self._emit(peer, msg, "filtered", _size(msg),
                   denied=[d for d, _ in denied], rule="; ".join(sorted({r for _, r in denied})))

    def dropped(self, sender: Endpoint, dest: Endpoint, msg: Routable, count: int,
                run: bytes | None = None, *, why: str) -> None:
        """``count`` copies of ``msg`` were dropped for ``dest``, or, with ``run``, each
        frame of that run (``msg`` its first frame's envelope). ``why``: as
        ``message.dropped`` says it (``Endpoint.drop_why``: ``queue_full``,
        ``not_reading``, ``memory_budget``, ``offline``)."""
        frames = _frames(msg, run) if run is not None else [msg] * count
        for frame in frames:
            self._emit(sender, frame, "dropped", _size(frame), why=why,
                       targets=[dest.name])


def _frames(first: Routable, run: bytes) -> list[Routable]:
    """The frames of a run as envelopes of their own: the first one's source,
    destination, type and name (a run shares them), each its own bytes (for its size
    and payload)."""
    if not isinstance(first, msgspec.Struct):
        return [first] * run.count(b"\n")
    return [msgspec.structs.replace(first, raw=line) for line in run.split(b"\n") if line]


def _size(msg: Routable) -> int:
    raw = getattr(msg, "raw", None)
    return len(raw) + 1 if raw is not None else 0


def _payload(msg: Routable) -> bytes:
    """The message's ``payload`` member as sent (JSON text), for ``--payload``."""
    try:
        payload = json.loads(getattr(msg, "raw", None) or b"null")["payload"]
        return json.dumps(payload, ensure_ascii=False).encode()
    except (ValueError, TypeError, KeyError):
        return b"null"
