"""What the dom0 tools' command lines share (``messagerie-broker``,
``messagerie-policy``, ``messagerie-pont``): a parser whose ``--help`` ends with its
examples, one a line as written, and the options every daemon takes."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import messagerie

LOG_LEVELS = ("debug", "info", "warning", "error")


def parser(prog: str, description: str, examples: Sequence[str],
           note: str | None = None) -> argparse.ArgumentParser:
    """A parser for ``prog`` whose help ends with ``examples`` (one command each, kept
    as written) and ``note`` (its exit statuses, say)."""
    epilog = "examples:\n" + "\n".join(f"  {example}" for example in examples)
    return argparse.ArgumentParser(
        prog=prog, description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=epilog if note is None else f"{epilog}\n{note}")


def add_daemon_options(p: argparse.ArgumentParser, log_setting: str) -> None:
    """``--log-level`` (overriding the configuration's ``log_setting``) and
    ``--version``."""
    p.add_argument("--log-level", choices=LOG_LEVELS, help=f"override {log_setting}")
    p.add_argument("--version", action="version", version=messagerie.__version__)
