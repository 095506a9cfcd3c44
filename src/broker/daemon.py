"""The daemon's wiring: signals, systemd, discovery, reload, drain.

The command line that starts it is :mod:`broker.cli`.

Behaves as systemd's daemon guidance asks: no forking, no pid file, logs on stdout;
``READY=1`` once the dom0 socket listens and every configured channel had its first
connection attempt; ``WATCHDOG=1`` from the event loop; SIGHUP reloads configuration
and policy (a bad one is refused and the running one stays); SIGTERM drains the
outbound queues, keeps what it could not drain and the commands in flight in the state
file (``broker.spool``, ``broker.inflight``) and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import structlog

import messagerie

from . import logs
from .config import Config, ConfigError, load_config
from .discovery import scan
from .dom0 import Dom0Socket
from .endpoint import Endpoint
from .hub import Broker
from .inflight import COMMIT_INTERVAL, InflightStore, Recovery
from .notify import Notifier, watchdog_interval, watchdog_loop
from .policy import Policy, PolicyError, load_policy
from .spool import DISABLED, Store, StoreError, default_path
from .trace import Tracer
from .xenstore import Binding, Bound, XenstoreDiscovery, changes, verifier

DRAIN_TIMEOUT = 5.0
TRAFFIC_INTERVAL = 10.0
"""Seconds between two ``traffic.summary`` events."""
READY_TIMEOUT = 5.0


def load_everything(path: str | Path) -> tuple[Config, Policy]:
    """Configuration and the policy it names; raises ConfigError or PolicyError."""
    config = load_config(path)
    policy = load_policy(config.policy_path) if config.policy_path else Policy.allow_all()
    return config, policy


class Daemon:
    def __init__(self, config: Config, policy: Policy, config_path: str | None) -> None:
        self.config_path = config_path
        self.policy = policy
        self.broker = Broker(config, policy)
        self.dom0_socket = Dom0Socket(self.broker, self.broker.dom0)
        self.tracer = Tracer(self.broker)
        self.notifier = Notifier()
        self.stop_event = asyncio.Event()
        self.discovered: dict[str, str] = {}
        self.reported_bad: set[str] = set()
        self.log = structlog.get_logger("broker").bind()
        self.tasks: list[asyncio.Task[None]] = []
        self.ready = asyncio.Event()
        self.xenstore: XenstoreDiscovery | None = None
        self.xen_bound: dict[str, Binding] = {}
        """Domains bound through xenstore, by name."""

    @property
    def config(self) -> Config:
        return self.broker.config

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        cfg = self.config
        if self.policy.origin == "<allow-all>":
            self.log.warning("policy.none", detail="no policy configured: every message is "
                             "allowed; set broker.politique for a deployment")
        if cfg.dom0_socket:
            await self.dom0_socket.start(cfg.dom0_socket, cfg.dom0_mode, cfg.dom0_group)
        if cfg.trace_group:
            await self.tracer.start(cfg.trace_socket, cfg.trace_group)
        self.broker.open_spool()
        for domain in cfg.domains.values():
            self.broker.add_domain(domain.name, domain.path)
        self.rescan()
        self.open_state()
        for sig, handler in ((signal.SIGTERM, self.stop_event.set),
                             (signal.SIGINT, self.stop_event.set),
                             (signal.SIGHUP, self.reload)):
            loop.add_signal_handler(sig, handler)
        self.tasks = [
            # The interval is read at each turn: a reload that changes it applies.
            loop.create_task(self._every(lambda: self.config.discovery_interval, self.rescan),
                             name="discovery"),
            loop.create_task(self._every(1.0, self._expire), name="expiry"),
            loop.create_task(self._every(1.0, self._sweep), name="spool"),
            loop.create_task(self._every(5.0, self._status), name="status"),
            loop.create_task(self._every(TRAFFIC_INTERVAL, self._traffic), name="traffic"),
        ]
        if self.broker.recovery is not None:
            self.tasks.append(loop.create_task(
                self._every(COMMIT_INTERVAL, self.broker.recovery.commit), name="inflight"))
        if cfg.xenstore:
            self.xenstore = XenstoreDiscovery(self.apply_xenstore, path=cfg.xenstore_path,
                                              template=cfg.xenstore_channel,
                                              retry_max=cfg.reconnect_max)
            self.tasks.append(loop.create_task(self.xenstore.run(), name="xenstore"))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.xenstore.connected.wait(), READY_TIMEOUT)
        interval = watchdog_interval()
        if interval:
            self.tasks.append(loop.create_task(watchdog_loop(
                self.notifier, interval,
                on_failure=lambda: self.log.warning("systemd.watchdog_failed")),
                name="watchdog"))
        await self._wait_first_attempts()
        self.notifier.ready(self._status_text())
        self.ready.set()
        self.log.info("broker.ready", version=messagerie.__version__, config=cfg.source,
                      domains=len(self.broker.domains), dom0_socket=cfg.dom0_socket,
                      policy=self.policy.origin,
                      cpu_scale=round(self.broker.settings.cpu_scale, 2))
        await self.stop_event.wait()
        await self.shutdown()
        return 0

    def open_state(self) -> None:
        """The commands in flight of the previous process, and their table from now on
        (``broker.inflight``), in the spool's state file (systemd's
        ``StateDirectory=`` gives it as ``$STATE_DIRECTORY``; or ``spool.chemin``).
        Without one that outlives the process, or if it cannot be opened, the broker
        routes as before, keeping nothing across a restart (and says so)."""
        spool = self.broker.spool
        store: Store | None = None
        try:
            if spool.available and spool.store is not None and not spool.temporary:
                store = spool.store
            elif spool.state == DISABLED:  # spool.actif = false: the file, for this table
                path, temporary = ((self.config.spool_path, False) if self.config.spool_path
                                   else default_path())
                if temporary:
                    with contextlib.suppress(OSError):  # default_path made it: no use
                        os.rmdir(os.path.dirname(path))
                else:
                    store = Store.open(path)
            if store is None:
                self.log.info("state.none", detail="no state directory ($STATE_DIRECTORY, "
                              "spool.chemin) or the spool is unavailable: commands in "
                              "flight are not kept across a restart")
                return
            recovery = Recovery(self.broker.pending, InflightStore(store))
            recovery.restore()
        except StoreError as exc:
            self.log.error("state.unavailable", path=exc.path, error=exc.reason,
                           detail="commands in flight are not kept across a restart")
            return
        self.broker.recovery = recovery
        # Answer at once what expired while the broker was down, to whoever is here.
        asyncio.get_running_loop().call_later(0.2, self._expire)

    def _sweep(self) -> None:
        self.broker.sweep_spool()
        self.broker.sweep_departed()

    def _expire(self) -> None:
        self.broker.expire_pending()
        self.broker.expire_restored()

    async def _wait_first_attempts(self) -> None:
        waits = [ep.attempted.wait() for ep in self.broker.domains.values()]
        if waits:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waits), READY_TIMEOUT)

    async def _every(self, interval: float | Callable[[], float],
                     fn: Callable[[], None]) -> None:
        while True:
            await asyncio.sleep(interval() if callable(interval) else interval)
            try:
                fn()
            except Exception:
                self.log.exception("broker.task_failed", task=getattr(fn, "__name__", "?"))

    def rescan(self) -> None:
        if not self.config.discovery_patterns:
            return
        found, rejected = scan(self.config.discovery_patterns)
        for path in rejected:
            if path not in self.reported_bad:
                self.log.warning("discovery.bad_name", path=path)
        self.reported_bad = set(rejected)  # said once while it stays there
        declared = self.config.domains
        for name, path in found.items():
            if name in declared or name in self.xen_bound or self.discovered.get(name) == path:
                continue
            if name in self.discovered:  # same name, new path: its spool follows
                self.broker.depart_domain(name, "its socket moved")
            self.discovered[name] = path
            self.broker.add_domain(name, path, discovered=True)
        for name in list(self.discovered):
            if name not in found or name in declared or name in self.xen_bound:
                del self.discovered[name]
                if name in declared or name in self.xen_bound:
                    continue  # the declaration (or xenstore) took the name over
                # Known as offline for a while: spooled for, replayed if it comes back.
                self.broker.depart_domain(name, "its socket file disappeared")

    def apply_xenstore(self, bound: Bound) -> None:
        """Bind, rebind and unbind domains as xenstore now shows them. A domain whose
        domid or path changed (a reboot) gets a new endpoint; its old path is not
        reopened (each endpoint asks xenstore before every attempt: ``verify``)."""
        declared = self.config.domains
        wanted = {n: b for n, b in bound.bindings.items() if n not in declared}
        gone, made = changes(self.xen_bound, wanted)
        for name in gone:
            old = self.xen_bound.pop(name)
            # Released or rebooted (new domid): known as offline for a while, its spool
            # kept for the domain xenstore binds next under this name (proved anew).
            self.broker.depart_domain(name, "xenstore released it" if name not in wanted
                                      else "xenstore gave it a new domid or channel")
            self.log.info("domain.unbound", domain=name, domid=old.domid, path=old.path,
                          now=wanted[name].domid if name in wanted else None)
        for b in made:
            if self.discovered.pop(b.domain, None) is not None:  # xenstore knows better
                self.broker.remove_domain(b.domain)
            ep = self.broker.add_domain(b.domain, b.path, discovered=True)
            assert self.xenstore is not None
            ep.verify = verifier(self.xenstore, b)
            self.xen_bound[b.domain] = b
            self.log.info("domain.bound", domain=b.domain, domid=b.domid, devid=b.devid,
                          path=b.path, connection=b.connection)

    def reload(self) -> bool:
        """Apply the configuration file again. False (and nothing changed) if invalid.

        Synchronous on purpose: a reload never interleaves with another one, nor with
        discovery or a read being routed."""
        self.notifier.reloading("reloading configuration")
        if self.config_path is None:
            self.log.warning("config.reload_ignored", detail="embedded configuration")
            self.notifier.ready(self._status_text())
            return False
        try:
            new, policy = load_everything(self.config_path)
        except (ConfigError, PolicyError) as exc:
            self.log.error("config.reload_failed", error=str(exc),
                           detail="the running configuration stays")
            self.notifier.ready(self._status_text())
            return False
        old = self.config
        if (new.dom0_socket != old.dom0_socket or new.max_frame != old.max_frame
                or (new.trace_socket, new.trace_group) != (old.trace_socket, old.trace_group)
                or (new.xenstore, new.xenstore_channel, new.xenstore_path)
                != (old.xenstore, old.xenstore_channel, old.xenstore_path)
                or (new.spool, new.spool_path) != (old.spool, old.spool_path)):
            self.log.warning("config.restart_needed",
                             detail="dom0.socket, trace.*, broker.taille_max_trame, "
                                    "decouverte.xenstore*, spool.actif and spool.chemin "
                                    "apply at restart")
        broker = self.broker
        logs.configure(new.log_level)
        broker.reconfigure(new)
        broker.policy = self.policy = policy
        removed = [n for n, ep in broker.domains.items()
                   if not ep.discovered and (n not in new.domains
                                             or new.domains[n].path != ep.path)]
        for name in removed:
            broker.remove_domain(name)
        for name, domain in new.domains.items():
            if name in broker.domains and broker.domains[name].discovered:
                broker.remove_domain(name)
                self.discovered.pop(name, None)
                self.xen_bound.pop(name, None)
            if name not in broker.domains:
                broker.add_domain(name, domain.path)
        if self.xenstore is not None:
            self.apply_xenstore(self.xenstore.current)  # a domain no longer declared
        self.rescan()
        self.log.info("config.reloaded", config=new.source, domains=len(broker.domains),
                      policy=new.policy_path or "allow-all", rules=len(policy))
        self.notifier.ready(self._status_text())
        return True

    def _status_text(self) -> str:
        b = self.broker
        up = sum(1 for _ in b.connected())
        t = b.totals()
        return (f"{up}/{len(b.domains)} domains connected, {len(b.dom0.clients)} dom0 "
                f"services; {t['received']} received, {t['refused']} refused, "
                f"{t['invalid']} invalid, {t['dropped']} dropped")

    def _traffic(self) -> None:
        self.broker.log_traffic(TRAFFIC_INTERVAL)

    def _status(self) -> None:
        self.notifier.status(self._status_text())

    @staticmethod
    async def _drain(peers: list[Endpoint]) -> None:
        """Wait until every queue is empty, at most ``DRAIN_TIMEOUT``; a peer whose
        queue did not shrink for its ``limites.delai_blocage`` is not waited for (it
        does not read: what is left for a domain goes to its spool when its channel
        is closed)."""
        start = time.monotonic()
        progress = {p: (p.queued(), start) for p in peers}
        # Transports have no "drained" event; poll, bounded.
        while True:
            now = time.monotonic()
            waiting = False
            for p in peers:
                queued = p.queued()
                if not queued:
                    continue
                last, since = progress[p]
                if queued < last:
                    progress[p] = (queued, since := now)
                waiting = waiting or now - since < p.limits.stall_timeout
            if not waiting or now - start >= DRAIN_TIMEOUT:
                return
            await asyncio.sleep(0.01)

    async def shutdown(self) -> None:
        """Stop reading, flush what is queued (bounded), commit the commands in flight,
        then close the channels: what is left for a domain goes to its spool (committed
        when the spool closes); what is left for a dom0 service is lost with its
        connection."""
        self.notifier.stopping("draining")
        self.log.info("broker.stopping")
        self.broker.stopping = True  # nothing resumes reading from now on
        for task in self.tasks:
            task.cancel()
        peers = self.broker.endpoints()
        for peer in peers:
            peer.stop_reading()
        await self._drain(peers)
        left = sum(p.queued() for p in peers)
        recovery = self.broker.recovery
        if recovery is not None:
            # Before the endpoints close: closing them fails what waits on them.
            recovery.commit()
        self.broker.log_traffic(TRAFFIC_INTERVAL)
        await self.dom0_socket.stop()
        await self.tracer.stop()
        for ep in list(self.broker.domains.values()):
            await ep.stop()
        self.broker.close_spool()
        self.log.info("broker.stopped", undelivered_bytes=left, **self.broker.totals())
        self.notifier.close()
