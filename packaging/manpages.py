"""Write the man pages of the four commands from their own argparse parsers.

    python packaging/manpages.py OUTDIR

messagerie(1), messagerie-policy(1), messagerie-broker(8) and messagerie-pont(8) say
what ``--help`` says (options, examples, exit status), so they cannot drift from the
code; FILES and SEE ALSO are added here. The date is $SOURCE_DATE_EPOCH's (set by
dpkg-buildpackage from debian/changelog), so a rebuild gives the same bytes.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

os.environ["COLUMNS"] = "80"  # argparse wraps help at the terminal's width

import messagerie
from broker import cli as broker_cli
from messagerie import cli
from pont import cli as pont_cli

FILES = {
    "messagerie": [("/dev/hvc1, /dev/xen-channel/NAME", "a DomU's channel to dom0"),
                   ("/run/messagerie/dom0.sock", "the broker's local socket (dom0)"),
                   ("/run/messagerie/trace.sock", "the broker's trace socket (trace)"),
                   ("/etc/messagerie/domaine", "this domain's name (a DomU)")],
    "messagerie-broker": [("/etc/messagerie/broker.toml", "the configuration"),
                          ("/etc/messagerie/policy.toml", "the routing policy"),
                          ("/run/messagerie/dom0.sock", "the local socket of dom0 services"),
                          ("/usr/share/doc/messagerie-xen/",
                           "the documentation (broker.md: configuration, limits, logs)")],
    "messagerie-policy": [("/etc/messagerie/policy.toml", "the routing policy")],
    "messagerie-pont": [("/etc/messagerie/pont.toml", "the configuration"),
                        ("/run/messagerie-pont/pont.sock", "the socket the broker connects to"),
                        ("/run/messagerie-pont/status.json", "the bridge's status"),
                        ("/usr/share/doc/messagerie-xen/docs/bridge.md", "the documentation")],
}
SEE_ALSO = {
    "messagerie": r"\fBmessagerie-broker\fR(8), \fBmessagerie-policy\fR(1)",
    "messagerie-broker": r"\fBmessagerie\fR(1), \fBmessagerie-policy\fR(1), "
                         r"\fBsystemctl\fR(1), \fBjournalctl\fR(1)",
    "messagerie-policy": r"\fBmessagerie-broker\fR(8), \fBmessagerie\fR(1)",
    "messagerie-pont": r"\fBmessagerie-broker\fR(8), \fBsystemctl\fR(1)",
}


def _escape(line: str) -> str:
    line = line.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + line if line.startswith((".", "'")) else line


def _verbatim(text: str) -> list[str]:
    return [".nf", *(_escape(line) for line in text.rstrip("\n").splitlines()), ".fi"]


def _sentence(text: str) -> str:
    return text.split(". ", maxsplit=1)[0].rstrip(".")


def page(name: str, section: int, parser: argparse.ArgumentParser,
         subcommands: dict[str, argparse.ArgumentParser] | None = None) -> str:
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0")) or None
    day = (datetime.datetime.fromtimestamp(epoch, datetime.UTC) if epoch
           else datetime.datetime.now(datetime.UTC)).strftime("%Y-%m-%d")
    help_text = parser.format_help()
    usage, _, rest = help_text.partition("\n\n")
    out = [f'.TH {name.upper()} {section} {day} "messagerie-xen {messagerie.__version__}" '
           f'"messagerie"',
           ".SH NAME", f"{_escape(name)} \\- {_escape(_sentence(parser.description or ''))}",
           ".SH SYNOPSIS", *_verbatim(usage.removeprefix("usage: ")),
           ".SH DESCRIPTION", *_verbatim(rest)]
    for sub, sub_parser in (subcommands or {}).items():
        out += [f".SS {_escape(sub)}", *_verbatim(sub_parser.format_help())]
    out += [".SH FILES"]
    for path, what in FILES[name]:
        out += [".TP", f"\\fI{_escape(path)}\\fR", _escape(what)]
    out += [".SH SEE ALSO", SEE_ALSO[name]]
    return "\n".join(out) + "\n"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def main(outdir: str) -> int:
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    main_parser = cli.build_parser()
    pages = {
        "messagerie.1": page("messagerie", 1, main_parser, _subparsers(main_parser)),
        "messagerie-broker.8": page("messagerie-broker", 8, broker_cli._parser()),
        "messagerie-policy.1": page("messagerie-policy", 1, broker_cli._policy_parser()),
        "messagerie-pont.8": page("messagerie-pont", 8, pont_cli._parser()),
    }
    for filename, text in pages.items():
        (out / filename).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
