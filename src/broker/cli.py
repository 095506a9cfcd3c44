"""The command lines: ``messagerie-broker`` and ``messagerie-policy``.

``messagerie-broker`` runs the daemon (``--config``), validates a configuration
(``--check-config``), explains a policy decision (``--explain``) or runs the embedded
demo (``--demo``); ``messagerie-policy`` is the explain tool on its own. Nothing else
imports this module: the daemon and the demo know nothing of their command line.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

import structlog

from messagerie import DOM0, TOUS

from . import arguments, logs
from .config import ConfigError
from .daemon import Daemon, load_everything
from .policy import RULE_TYPES, Policy, PolicyError, load_policy


def _parser() -> argparse.ArgumentParser:
    p = arguments.parser(
        "messagerie-broker", "Route messagerie messages between Xen domains (dom0 daemon).",
        ["messagerie-broker --config /etc/messagerie/broker.toml",
         "messagerie-broker --check-config /etc/messagerie/broker.toml",
         "messagerie-broker --demo",
         "messagerie-broker --explain /etc/messagerie/policy.toml --source vm-ui \\\n"
         "      --destination vm-sys-usb --type commande --nom liste_disques"])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--config", metavar="FILE", help="run with this configuration (TOML)")
    g.add_argument("--check-config", metavar="FILE",
                   help="validate a configuration (and its policy), then exit")
    g.add_argument("--demo", action="store_true",
                   help="run the embedded demo: three simulated domains on socat ptys")
    g.add_argument("--explain", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="would this message be allowed, and by which rule? "
                        "(POLICY --source S --destination D --type T [--nom N])")
    arguments.add_daemon_options(p, "broker.niveau_journal")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``messagerie-broker``."""
    args = _parser().parse_args(argv)
    if args.explain is not None:
        return policy_main(args.explain)
    if args.demo:
        from .demo import run_demo
        return run_demo(log_level=args.log_level or "info")
    path = args.check_config or args.config
    try:
        config, policy = load_everything(path)
    except (ConfigError, PolicyError) as exc:
        print(f"messagerie-broker: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"{path}: ok ({len(config.domains)} domains, "
              f"{len(config.discovery_patterns)} discovery patterns, "
              f"policy: {config.policy_path or 'none (allow all)'}"
              f"{f', {len(policy)} rules' if config.policy_path else ''})")
        return 0
    if args.log_level:
        from dataclasses import replace
        config = replace(config, log_level=args.log_level)
    logs.configure(config.log_level)
    try:
        code = asyncio.run(Daemon(config, policy, path).run())
        # The loop is closed and its signal handlers with it: a second SIGTERM now
        # (systemd's, an impatient operator's) must not turn exit 0 into "killed".
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        return code
    except OSError as exc:  # e.g. the dom0 socket's directory is not writable
        structlog.get_logger("broker").error("broker.failed", error=str(exc))
        return 1


OTHER_DOMU = "*"
"""The recipient ``--destination tous`` stands for "any DomU the policy does not name"."""


def policy_main(argv: Sequence[str] | None = None) -> int:
    """``messagerie-policy POLICY_FILE --source S --destination D --type T [--nom N]
    [--broadcast]``: would this message be allowed, and by which rule? Prints the
    verdict and the deciding rule. Exit status 0 when allowed, 1 when denied, 2 when
    the policy file is invalid (or the arguments are).

    ``--destination tous`` (without ``--broadcast``) is a broadcast as the broker
    routes it: the policy decides for each recipient, so the verdict of every
    recipient is printed (the domains the policy names, or ``--destinataires``, and
    ``*`` for any other DomU); allowed when at least one recipient gets it."""
    parser = _policy_parser()
    args = parser.parse_args(argv)
    return _explain(args)


def _policy_parser() -> argparse.ArgumentParser:
    parser = arguments.parser(
        "messagerie-policy",
        "Would this message be allowed by the routing policy, and by which rule?",
        ["messagerie-policy /etc/messagerie/policy.toml -s vm-ui -d vm-sys-usb \\\n"
         "      -t commande -n liste_disques",
         "messagerie-policy /etc/messagerie/policy.toml -s vm-sys-usb -d vm-ui \\\n"
         "      -t notification -n disque --broadcast"],
        "exit status: 0 allowed, 1 denied, 2 invalid policy or arguments")
    parser.add_argument("policy", metavar="POLICY_FILE", help="the policy file (TOML)")
    parser.add_argument("--source", "-s", required=True, help="sending domain")
    parser.add_argument("--destination", "-d", required=True,
                        help="destination domain (the recipient, with --broadcast), or tous "
                             "(every recipient's verdict)")
    parser.add_argument("--type", "-t", required=True,
                        choices=sorted((*RULE_TYPES, "reponse")), help="message type")
    parser.add_argument("--nom", "-n", default=None,
                        help="category (notification), command name (commande, reponse) "
                             "or composant (journal)")
    parser.add_argument("--broadcast", "-b", action="store_true",
                        help="the message is a broadcast (to tous); --destination is one "
                             "of its recipients")
    parser.add_argument("--destinataires", metavar="D1,D2", default=None,
                        help="with --destination tous: the connected domains to decide for "
                             "(default: every domain the policy names, and * for the others)")
    return parser


def _explain(args: argparse.Namespace) -> int:
    try:
        policy = load_policy(args.policy)
    except PolicyError as exc:
        print(f"messagerie-policy: invalid policy: {exc}", file=sys.stderr)
        return 2
    what = f"{args.type} {args.nom or '(no name)'}"
    if args.destination == TOUS and not args.broadcast:
        return _explain_broadcast(policy, args.source, args.type, args.nom, what=what,
                                  listed=args.destinataires)
    verdict = policy.evaluate(args.source, args.destination, args.type, args.nom,
                              broadcast=args.broadcast)
    route = f"{args.source} -> {args.destination}"
    if args.broadcast:
        route += " (recipient of a broadcast)"
    print(f"{route}: {what}")
    print(verdict.describe())
    return 0 if verdict.allowed else 1


def _explain_broadcast(policy: Policy, source: str, type: str, name: str | None, *, what: str,
                       listed: str | None) -> int:
    """What the broker's router does with a message to ``tous``: every connected domain
    but the source, and dom0 unless it is the source, each decided by the policy as a
    recipient of a broadcast (from dom0, its other services get it without the policy)."""
    if listed is not None:
        recipients = [r for r in dict.fromkeys(listed.split(",")) if r]
    else:
        recipients = [*sorted(policy.domains() - {DOM0}), OTHER_DOMU]
    recipients = [r for r in recipients if r not in (source, DOM0)]
    if source != DOM0:
        recipients.append(DOM0)
    print(f"{source} -> {TOUS}: {what}")
    delivered = 0
    for recipient in recipients:
        verdict = policy.evaluate(source, recipient, type, name, broadcast=True)
        delivered += verdict.allowed
        label = "any other domain" if recipient == OTHER_DOMU else recipient
        print(f"  {label}: {verdict.describe()}")
    print(f"delivered to {delivered} of {len(recipients)} recipients")
    return 0 if delivered else 1


if __name__ == "__main__":
    sys.exit(main())
