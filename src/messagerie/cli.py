"""``messagerie``: send, ask and listen from a shell, in a DomU or in dom0.

In a DomU it talks over the channel (``/dev/hvc1``); in dom0 over the broker's local
socket (``/run/messagerie/dom0.sock``), as ``dom0``. Exit status:

* 0: done (for ``command``: an ``ok`` reply);
* 1: an error reply (printed as ``error: <code>: <message>`` on stderr);
* 2: usage error (bad option, bad JSON, unknown own name);
* 3: no reply in time;
* 4: channel problem (cannot open it, it reset, the broker is away).

Errors are one line on stderr; ``--debug`` adds tracebacks and the client's logs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, Final, NoReturn

import structlog

from .channel import ChannelError, domu_channel_path
from .client import (
    DOM0_SOCKET,
    Client,
    CommandError,
    CommandTimeout,
    Disconnected,
    NameUnknown,
)
from .codec import encode, from_dict
from .model import DOM0, Commande, MessageInvalide, Notification

EXIT_OK: Final = 0
EXIT_ERROR_REPLY: Final = 1
EXIT_USAGE: Final = 2
EXIT_TIMEOUT: Final = 3
EXIT_CHANNEL: Final = 4

PATH_ENV: Final = "MESSAGERIE_PATH"
TRACE_SOCKET: Final = Path("/run/messagerie/trace.sock")
DEFAULT_TIMEOUT: Final = 10.0


class UsageError(Exception):
    """Bad arguments: exit 2."""


class ListenTimeout(Exception):
    """``listen --timeout``: no message in time: exit 3."""


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (no usage dump) and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    # The same options before or after the subcommand: defaults live on the main
    # parser only, so that a subparser does not overwrite a value given earlier.
    default: Any = argparse.SUPPRESS if suppress else None
    group = parser.add_argument_group("channel options")
    group.add_argument("--path", default=default, metavar="PATH",
                       help=f"channel: a tty or a unix socket (default: ${PATH_ENV}, else "
                            f"{DOM0_SOCKET} if it exists, else {domu_channel_path()})")
    group.add_argument("--channel", default=default, metavar="NAME",
                       help="use /dev/xen-channel/NAME")
    group.add_argument("--as", dest="name", default=default, metavar="NAME",
                       help="this domain's name (default: $MESSAGERIE_DOMAINE, dom0 on a "
                            "unix socket, /etc/messagerie/domaine, xenstore-read name)")
    group.add_argument("--timeout", type=float, default=argparse.SUPPRESS if suppress
                       else None, metavar="SECONDS",
                       help=f"how long to wait for a reply or the channel "
                            f"(default {DEFAULT_TIMEOUT:g}); for listen, how long to "
                            f"wait for each message (default: forever)")
    group.add_argument("--debug", action="store_true",
                       default=argparse.SUPPRESS if suppress else False,
                       help="log the client's events and show tracebacks")


#: What ``--help`` shows under "examples", per subcommand (the first ones also in the
#: main ``--help``).
EXAMPLES: Final[dict[str, list[str]]] = {
    "notify": ["messagerie notify tous domaine etat --set pret=true",
               "messagerie notify vm-ui fichier etat --data '{\"fichier\": \"a.pdf\"}'"],
    "send": ["messagerie send '{\"type\": \"notification\", \"destination\": \"tous\", "
             "\"categorie\": \"domaine\", \"evenement\": \"etat\", \"data\": {}}'"],
    "command": ["messagerie command vm-sys-usb liste_disques --timeout 5",
                "messagerie command vm-sys-usb liste_fichiers --set nom_disque=sda"],
    "listen": ["messagerie listen --type notification --source vm-sys-usb",
               "messagerie listen --count 1 --timeout 5    # exit 3 if nothing in 5 s"],
    "ping": ["messagerie ping"],
    "status": ["messagerie status", "messagerie status --json"],
    "schema": ["messagerie schema > message.schema.json",
               "messagerie schema --socle > socle.schema.json"],
    "trace": ["messagerie trace --domaine vm-sys-usb",
              "messagerie trace --verdict refused --json",
              "messagerie trace --type commande --nom liste_disques --payload"],
}


class ExampleFormatter(argparse.HelpFormatter):
    """Descriptions wrapped as usual; the examples epilog kept line by line."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def _examples(lines: list[str]) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="messagerie",
        description="Send notifications and commands, and listen, over a messagerie "
                    "channel (a DomU's pv-channel or dom0's broker socket).",
        epilog=_examples([e for name in EXAMPLES for e in EXAMPLES[name][:1]])
        + "\n\nexit status: 0 ok, 1 error reply, 2 usage error, 3 timeout (the client's or "
          "the broker's delai_depasse), "
          "4 channel problem",
        formatter_class=ExampleFormatter)
    _common(parser, suppress=False)
    sub = parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)

    def add(name: str, help: str, description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description,
                           epilog=_examples(EXAMPLES[name]),
                           formatter_class=ExampleFormatter)
        _common(p, suppress=True)
        return p

    p = add("notify", "send a notification",
            "Send a notification. Data from --data (a JSON object) and/or --set "
            "key=value (value parsed as JSON when it is valid JSON, else a string).")
    p.add_argument("destination", help="a domain, dom0 or tous")
    p.add_argument("categorie")
    p.add_argument("evenement")
    _payload_options(p, "--data")
    p.set_defaults(run=_notify)

    p = add("send", "send any message given as JSON",
            "Send one message given as a JSON object. 'source' is filled in when absent. "
            "A commande waits for its reply (unless --no-wait) and exits like 'command'.")
    p.add_argument("message", metavar="JSON")
    p.add_argument("--no-wait", action="store_true", help="do not wait for a reply")
    p.set_defaults(run=_send)

    p = add("command", "send a command and print its result",
            "Send a command and wait for its reply; print the resultat as JSON. "
            "Exit 0 on ok, 1 on an error reply, 3 on timeout, 4 on a channel problem.")
    p.add_argument("destination", help="a domain or dom0")
    p.add_argument("commande", metavar="NAME")
    _payload_options(p, "--args")
    p.set_defaults(run=_command)

    p = add("listen", "print incoming messages as JSON lines",
            "Print incoming messages, one JSON object per line. Commands received get "
            "the automatic commande_inconnue reply.")
    p.add_argument("--type", choices=["notification", "commande", "reponse", "journal"])
    p.add_argument("--categorie", metavar="C")
    p.add_argument("--source", metavar="DOMAIN")
    p.add_argument("--count", type=int, metavar="N", help="exit after N messages")
    p.set_defaults(run=_listen)

    p = add("ping", "ask dom0's broker for a pong and print the round trip",
            "Send the built-in 'ping' command to dom0 and print the round-trip time.")
    p.set_defaults(run=_ping)

    p = add("status", "print the broker's domains and counters",
            "Ask dom0's broker for 'domaines' and 'statistiques'; print a table.")
    p.add_argument("--json", action="store_true", help="print both results as JSON")
    p.set_defaults(run=_status)

    p = add("trace", "watch the broker's traffic live (dom0, members of [trace] groupe)",
            "Print every message the broker routes, refuses, filters or drops, one line "
            "each: time, source -> destination, type, name, id, size, verdict and "
            "targets or rule. Reads the broker's trace socket (--path, default "
            f"{TRACE_SOCKET}); a monitor that reads too slowly loses events, counted "
            "and shown, and never slows the routing.")
    p.add_argument("--domaine", metavar="DOMAIN", help="only messages from or to DOMAIN")
    p.add_argument("--type", choices=["notification", "commande", "reponse", "journal"])
    p.add_argument("--nom", metavar="NAME", help="only this category, command or component")
    p.add_argument("--verdict", choices=["routed", "refused", "filtered", "dropped"])
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--payload", action="store_true",
                   help="show payloads too (off by default; the broker logs it as a "
                        "security event)")
    p.add_argument("--count", type=int, metavar="N", help="exit after N events")
    p.set_defaults(run=_trace)

    p = add("schema", "print the JSON Schema of messages",
            "Print the JSON Schema that every message follows (--socle: the socle's "
            "commands' arguments and results, and its notifications' data).")
    p.add_argument("--socle", action="store_true",
                   help="the socle's catalogue instead (docs/schema/socle.schema.json)")
    p.set_defaults(run=_schema, offline=True)
    return parser


def _payload_options(p: argparse.ArgumentParser, flag: str) -> None:
    p.add_argument(flag, dest="json_object", metavar="JSON", help="a JSON object")
    p.add_argument("--set", dest="pairs", action="append", default=[], metavar="KEY=VALUE",
                   help="set one key (repeatable); VALUE is JSON if it parses, else a string")


def _object(args: argparse.Namespace, flag: str) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    if args.json_object is not None:
        value = _parse_json(args.json_object, flag)
        if not isinstance(value, dict):
            raise UsageError(f"{flag}: expected a JSON object")
        obj.update(value)
    for pair in args.pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--set {pair!r}: expected KEY=VALUE")
        try:
            obj[key] = json.loads(raw)
        except ValueError:
            obj[key] = raw
    return obj


def _parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{what}: invalid JSON: {exc}") from None


def resolve_path(args: argparse.Namespace) -> Path:
    """--path, else --channel, else $MESSAGERIE_PATH, else dom0's socket when it
    exists, else /dev/hvc1."""
    if args.path and args.channel:
        raise UsageError("give --path or --channel, not both")
    if args.path:
        return Path(args.path)
    if args.channel:
        return domu_channel_path(args.channel)
    if os.environ.get(PATH_ENV):
        return Path(os.environ[PATH_ENV])
    if DOM0_SOCKET.exists():
        return DOM0_SOCKET
    return domu_channel_path()


def _wait(args: argparse.Namespace) -> float:
    """--timeout for a reply or the channel (listen uses it for messages too)."""
    return DEFAULT_TIMEOUT if args.timeout is None else float(args.timeout)


def _client(args: argparse.Namespace) -> Client:
    return Client(args.name, path=resolve_path(args), timeout=_wait(args),
                  connect_timeout=_wait(args), reconnect=False)


def _print_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False))


async def _notify(args: argparse.Namespace) -> int:
    data = _object(args, "--data")
    client = _client(args)
    msg = Notification(client.name, args.destination, args.categorie, args.evenement, data)
    async with client:
        await client.send(msg)
    return EXIT_OK


async def _send(args: argparse.Namespace) -> int:
    obj = _parse_json(args.message, "JSON")
    if not isinstance(obj, dict):
        raise UsageError("JSON: a message is a JSON object")
    client = _client(args)
    obj.setdefault("source", client.name)
    msg = from_dict(obj)
    async with client:
        if isinstance(msg, Commande) and not args.no_wait:
            rep = await client.request(msg, timeout=_wait(args))
            _print_json(rep.resultat)
        else:
            await client.send(msg)
    return EXIT_OK


async def _command(args: argparse.Namespace) -> int:
    arguments = _object(args, "--args")
    async with _client(args) as client:
        rep = await client.command(args.destination, args.commande, arguments,
                                    timeout=_wait(args))
    _print_json(rep.resultat)
    return EXIT_OK


async def _listen(args: argparse.Namespace) -> int:
    if args.count is not None and args.count < 1:
        raise UsageError("--count: expected a positive number")
    client = _client(args)
    client.reconnect = True  # a listener outlives broker restarts
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError("--timeout: expected a positive number of seconds")
    seen = 0
    async with client:
        stream = client.messages(type=args.type, categorie=args.categorie,
                                 source=args.source)
        while args.count is None or seen < args.count:
            try:
                async with asyncio.timeout(args.timeout):  # None: forever
                    msg = await anext(stream)
            except StopAsyncIteration:
                break
            except TimeoutError:
                # Done when something was printed and no --count asked for more.
                if args.count is None and seen:
                    return EXIT_OK
                raise ListenTimeout(
                    f"no message in {args.timeout:g} s"
                    + (f" ({seen} of {args.count} received)" if args.count else "")
                ) from None
            line = msg.raw if msg.raw is not None else encode(msg)[:-1]
            sys.stdout.write(line.decode() + "\n")
            sys.stdout.flush()
            seen += 1
    return EXIT_OK


async def _trace(args: argparse.Namespace) -> int:
    if args.count is not None and args.count < 1:
        raise UsageError("--count: expected a positive number")
    path = Path(args.path) if args.path else TRACE_SOCKET
    try:
        async with asyncio.timeout(_wait(args)):
            reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 20)
    except (OSError, TimeoutError) as exc:
        text = exc.strerror if isinstance(exc, OSError) and exc.strerror else "timed out"
        hint = (" (is [trace] groupe set in broker.toml, and are you in that group?)"
                if isinstance(exc, FileNotFoundError | PermissionError) else "")
        raise ChannelError(getattr(exc, "errno", None) or 0, f"{text}{hint}",
                           str(path)) from None
    subscription = {"domaine": args.domaine, "type": args.type, "nom": args.nom,
                    "verdict": args.verdict, "payload": args.payload}
    writer.write(json.dumps({k: v for k, v in subscription.items() if v}).encode() + b"\n")
    seen = 0
    try:
        while args.count is None or seen < args.count:
            try:
                async with asyncio.timeout(args.timeout):
                    line = await reader.readline()
            except TimeoutError:
                if args.count is None and seen:
                    return EXIT_OK
                raise ListenTimeout(f"no trace event in {args.timeout:g} s") from None
            if not line:
                raise Disconnected("the broker closed the trace socket")
            event = json.loads(line)
            if "trace" in event:
                if event["trace"] != "ok":
                    raise UsageError(f"trace: {event.get('message')}")
                continue
            if not args.json:
                sys.stdout.write(format_trace(event) + "\n")
            else:
                sys.stdout.write(line.decode())
            sys.stdout.flush()
            if "perdus" not in event:
                seen += 1
    finally:
        writer.close()
    return EXIT_OK


def format_trace(event: dict[str, Any]) -> str:
    """One ``trace`` line: ``HH:MM:SS.mmm source -> destination type name id size
    verdict targets-or-rule``."""
    if "perdus" in event:
        return f"# {event['perdus']} events lost: this monitor read too slowly"
    stamp = time.strftime("%H:%M:%S", time.localtime(event.get("time", 0)))
    millis = int((event.get("time", 0) % 1) * 1000)
    verdict = str(event.get("verdict", "?"))
    if verdict == "routed":
        outcome = "-> " + ",".join(event.get("targets") or [])
        if event.get("rule"):
            outcome += f": {event['rule']}"
    elif verdict == "filtered":
        outcome = f"denied to {','.join(event.get('denied') or [])}: {event.get('rule')}"
    elif verdict == "dropped":
        outcome = f"{event.get('why')} at {','.join(event.get('targets') or [])}"
    else:
        outcome = f"{event.get('why')}: {event.get('rule')}"
    line = (f"{stamp}.{millis:03d} {event.get('source')} -> {event.get('destination')} "
            f"{event.get('type')} {event.get('name') or '-'} id={event.get('id') or '-'} "
            f"{event.get('size')}B {verdict.upper()} {outcome}")
    if "payload" in event:
        line += f" payload={event['payload']}"
    # What domains sent reaches a terminal: no control character goes there raw.
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in line)


async def _ping(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        start = time.perf_counter()
        rep = await client.command(DOM0, "ping", timeout=_wait(args))
        elapsed = time.perf_counter() - start
    info = rep.resultat if isinstance(rep.resultat, dict) else {}
    details = [f"{k} {info[k]}" for k in ("version", "uptime") if k in info]
    print(f"pong from {rep.source} in {elapsed * 1000:.2f} ms"
          + (f" ({', '.join(details)})" if details else ""))
    return EXIT_OK


async def _status(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        domaines, stats = await asyncio.gather(
            client.command(DOM0, "domaines", timeout=_wait(args)),
            client.command(DOM0, "statistiques", timeout=_wait(args)))
    if args.json:
        _print_json({"domaines": domaines.resultat, "statistiques": stats.resultat})
    else:
        print(format_status(domaines.resultat, stats.resultat))
    return EXIT_OK


def format_status(domaines: Any, stats: Any) -> str:
    """The ``status`` table: one row per domain (dom0's clients last), with its spool
    (messages, bytes, age of the oldest), then uptime and the spool's state."""
    counters = ("recus", "envoyes", "refuses", "perdus", "file")
    headers = ("DOMAIN", "STATE", "TYPE", "IN", "OUT", "REFUSED", "DROPPED", "QUEUE",
               "SPOOLED", "SPOOL_BYTES", "SPOOL_AGE", "PATH")
    stats = stats if isinstance(stats, dict) else {}
    per_domain = stats.get("domaines") if isinstance(stats.get("domaines"), dict) else {}
    rows: list[tuple[str, ...]] = []
    listed = domaines if isinstance(domaines, list) else []
    names = []
    for d in listed:
        if not isinstance(d, dict):
            continue
        name = str(d.get("nom", "?"))
        names.append(name)
        c = per_domain.get(name, {}) if isinstance(per_domain, dict) else {}
        state = "parti" if d.get("parti") else str(d.get("etat", "?"))  # departed
        rows.append((name, state, str(d.get("type", "")),
                     *(str(c.get(k, "")) for k in counters), *_spool_cells(c),
                     str(d.get("chemin", ""))))
    for name, c in sorted(per_domain.items()):
        if name not in names and isinstance(c, dict):
            rows.append((name, "", "", *(str(c.get(k, "")) for k in counters),
                         *_spool_cells(c), ""))
    if isinstance(stats.get("dom0"), dict):
        c = stats["dom0"]
        rows.append(("dom0", "", "local", *(str(c.get(k, "")) for k in counters),
                     "", "", "", ""))
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    numeric = {3, 4, 5, 6, 7, 8, 9, 10}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    out = [line(headers), *(line(r) for r in rows)]
    if "uptime" in stats:
        out.append(f"broker uptime: {_duration(stats['uptime'])}")
    spool = stats.get("spool")
    if isinstance(spool, dict):
        state = str(spool.get("etat", "?"))
        text = {"disponible": "available", "indisponible": "UNAVAILABLE",
                "desactive": "disabled (spool.actif = false)", "ferme": "closed"}.get(
                    state, state)
        where = f" ({spool['chemin']})" if spool.get("chemin") else ""
        if spool.get("temporaire"):
            where += ", temporary: lost at a broker restart"
        error = f": {spool['erreur']}" if spool.get("erreur") else ""
        out.append(f"spool: {text}{where}{error}")
    return "\n".join(out)


def _spool_cells(counters: Any) -> tuple[str, str, str]:
    """A domain's spool in the ``status`` table: messages, bytes, oldest's age."""
    spool = counters.get("spool") if isinstance(counters, dict) else None
    if not isinstance(spool, dict):
        return ("", "", "")
    age = spool.get("age")
    return (str(spool.get("messages", "")), str(spool.get("octets", "")),
            "" if age is None else _duration(age))


def _duration(seconds: Any) -> str:
    try:
        s = int(float(seconds))
    except (TypeError, ValueError):
        return str(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    return (f"{days}d " if days else "") + f"{hours:02d}:{minutes:02d}:{s:02d}"


async def _schema(args: argparse.Namespace) -> int:
    if args.socle:
        from . import socle  # the same bytes as docs/schema/socle.schema.json
        sys.stdout.write(socle.render())
        return EXIT_OK
    from .schema import render  # loaded on demand: the other subcommands do not need it

    # The same bytes as docs/schema/messagerie.schema.json.
    sys.stdout.write(render())
    return EXIT_OK


def _configure_logging(debug: bool) -> None:
    # stdout is for results (JSON lines); the client's events go to stderr, and only
    # errors unless --debug.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.DEBUG if debug else logging.ERROR),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True)
    if not debug:
        # asyncio reports a transport's failure as a "Fatal error on ... transport"
        # traceback: that is a channel problem, already reported as one line.
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def _fail(code: int, text: str) -> int:
    print(f"messagerie: {text}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.debug)
    run: Callable[[argparse.Namespace], Coroutine[Any, Any, int]] = args.run
    try:
        return asyncio.run(run(args))
    except CommandError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_ERROR_REPLY
    except ListenTimeout as exc:  # an expected end, not a failure to trace
        return _fail(EXIT_TIMEOUT, f"timeout: {exc}")
    except CommandTimeout as exc:
        if args.debug:
            raise
        return _fail(EXIT_TIMEOUT, f"timeout: {exc}")
    except (Disconnected, ChannelError) as exc:
        if args.debug:
            raise
        return _fail(EXIT_CHANNEL, f"channel: {exc}")
    except (UsageError, NameUnknown, MessageInvalide) as exc:
        if args.debug:
            raise
        return _fail(EXIT_USAGE, f"error: {exc}")
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # stdout closed early (e.g. `messagerie listen | head -1`): not an error.
        sys.stderr.close()
        return EXIT_OK
    except Exception as exc:
        if args.debug:
            raise
        return _fail(EXIT_ERROR_REPLY, f"internal error: {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    sys.exit(main())
