"""``messagerie-pont``: run the bridge, check its configuration, or show its status.

    messagerie-pont --config /etc/messagerie/pont.toml
    messagerie-pont --check-config /etc/messagerie/pont.toml
    messagerie-pont status --config /etc/messagerie/pont.toml
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import ssl
import sys
import time
from collections.abc import Sequence

import structlog

from broker import arguments

from .config import Config, ConfigError, load

DEFAULT_CONFIG = "/etc/messagerie/pont.toml"
STALE = 5.0
"""Seconds after which a status file no longer updated means the bridge is not running
(it rewrites it every second)."""


def _parser() -> argparse.ArgumentParser:
    p = arguments.parser(
        "messagerie-pont",
        "Bridge between the messagerie broker and an MQTT broker (see docs/bridge.md).",
        ["messagerie-pont --config /etc/messagerie/pont.toml",
         "messagerie-pont --check-config /etc/messagerie/pont.toml",
         "messagerie-pont status --config /etc/messagerie/pont.toml",
         "messagerie-pont status --json"],
        "exit status of status: 0 both sides connected, 1 a side is down, 3 not running")
    p.add_argument("action", nargs="?", choices=["run", "status"], default="run",
                   help="run the bridge (default) or show the running bridge's status")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--config", metavar="FILE",
                   help=f"configuration (TOML; default {DEFAULT_CONFIG})")
    g.add_argument("--check-config", metavar="FILE",
                   help="validate a configuration (and its TLS files), then exit")
    p.add_argument("--json", action="store_true", help="status: print the raw JSON")
    arguments.add_daemon_options(p, "pont.niveau_journal")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    path = args.check_config or args.config or DEFAULT_CONFIG
    try:
        config = load(path)
        if args.check_config:
            from .bridge import tls_context
            tls_context(config)
    except ConfigError as exc:
        print(f"messagerie-pont: {exc}", file=sys.stderr)
        return 2
    except (OSError, ssl.SSLError) as exc:
        print(f"messagerie-pont: {path}: mqtt TLS files: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"{path}: ok (host {config.host}, identity {config.identity}, "
              f"mqtt {config.mqtt.host}:{config.mqtt.port}"
              f"{' TLS' if config.mqtt.tls else ''}; out: {len(config.out_topics)} filters "
              f"qos {config.out_qos}; in: {len(config.in_topics)} filters, "
              f"{len(config.requests)} request topics, qos {config.in_qos})")
        return 0
    if args.action == "status":
        return status(config, raw=args.json)
    return run(config, args.log_level or config.log_level)


def run(config: Config, level: str) -> int:
    from broker.logs import configure
    from broker.notify import Notifier, watchdog_interval, watchdog_loop

    from .bridge import Bridge
    configure(level)
    log = structlog.get_logger("pont")

    async def serve() -> None:
        try:
            bridge = Bridge(config)
        except (OSError, ssl.SSLError) as exc:
            log.error("pont.tls_failed", error=str(exc))
            raise SystemExit(2) from None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, bridge.stop)
        try:
            await bridge.start()
        except OSError as exc:
            log.error("pont.listen_failed", canal=config.channel, error=str(exc))
            raise SystemExit(1) from None
        with Notifier() as notifier:
            tasks = []
            interval = watchdog_interval()
            if interval is not None:
                tasks.append(loop.create_task(watchdog_loop(notifier, interval)))
            notifier.ready(f"listening on {config.channel}")
            log.info("pont.ready", canal=config.channel, hote=config.host,
                     identite=config.identity, sortie=list(config.out_topics),
                     entree=list(config.in_topics), requetes=[r.topic for r in config.requests])
            try:
                await bridge.run()
            finally:
                notifier.stopping()
                for t in tasks:
                    t.cancel()
        log.info("pont.stopped")

    asyncio.run(serve())
    return 0


def status(config: Config, *, raw: bool = False) -> int:
    if config.status_path is None:
        print("messagerie-pont: pont.etat is not set: the bridge writes no status",
              file=sys.stderr)
        return 2
    try:
        with open(config.status_path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        print(f"messagerie-pont: not running ({config.status_path}: {exc})", file=sys.stderr)
        return 3
    age = time.time() - float(data.get("maj", 0))
    alive = age <= STALE and _pid_alive(int(data.get("pid", 0)))
    if raw:
        print(json.dumps({**data, "en_marche": alive}))
    else:
        c = data["compteurs"]
        lost = data["pertes"]
        print(f"host {data['hote']}, identity {data['identite']}, pid {data['pid']}"
              f"{'' if alive else f' (NOT RUNNING: status {age:.0f} s old)'}")
        print(f"broker: {'connected' if data['broker_connecte'] else 'DISCONNECTED'}; "
              f"mqtt: {'connected' if data['mqtt_connecte'] else 'DISCONNECTED'}"
              f"{' (' + data['mqtt_erreur'] + ')' if data.get('mqtt_erreur') else ''}")
        print(f"uplink buffer: {data['tampon']['messages']} messages, "
              f"{data['tampon']['octets']} bytes; dropped: {lost['nombre']} (count), "
              f"{lost['octets']} (bytes), {lost['age']} (age)")
        print(f"published {c['publies']}, injected {c['injectes']}, refused {c['refuses']}, "
              f"filtered {c['filtres']}, replies {c['reponses']}, timed out "
              f"{c['delais_depasses']}; commands in flight {data['commandes_en_vol']}")
    if not alive:
        return 3
    return 0 if data["broker_connecte"] and data["mqtt_connecte"] else 1


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


if __name__ == "__main__":
    sys.exit(main())
