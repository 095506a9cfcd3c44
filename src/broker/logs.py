"""Logging setup: structlog events, rendered at the edge.

One event name per thing that happened (``message.routed``, ``message.refused``,
``domain.connected``), context bound once per connection. On a terminal the events
are coloured key=value lines; otherwise one JSON object per line on stdout, which is
what journald wants. Under systemd (``JOURNAL_STREAM`` set) each line is prefixed with
its syslog priority (``<4>``), so ``journalctl -p warning`` works.

Domains choose much of what is logged (a hostile frame's excerpt, a ``journal``'s text,
names and ids): no control character of theirs reaches the operator's terminal. On a
terminal every C0/C1 control (and DEL) in a string is printed escaped (``\\x1b``); in
JSON, C0 controls are escaped by JSON itself and C1 ones are written ``\\u009b``, so
``journalctl`` and ``jq`` show them inert and decode them back unchanged.

Filtered-out levels cost one method call: per-message events (``message.routed``)
are ``debug`` so that production (``info``) pays nothing for them.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any, TextIO

import msgspec
import structlog

_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "critical": 2,
             "exception": 3}


_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f]")
"""Characters a terminal may act on: C0, DEL, C1 (U+009B is a CSI on some)."""
_C1 = re.compile("[\x7f-\x9f]")
"""What JSON leaves raw of them (it escapes C0 itself)."""
_MULTILINE = frozenset({"exception", "stack"})
"""Keys whose newlines are the broker's own (tracebacks): kept on a terminal."""


def _escape_char(match: re.Match[str]) -> str:
    return f"\\x{ord(match.group()):02x}"


def _json_escape_char(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def _inert(text: str, keep_newlines: bool = False) -> str:
    """``text`` with every control character escaped (``\\x1b``)."""
    if keep_newlines:
        return "\n".join(_CONTROLS.sub(_escape_char, line) for line in text.split("\n"))
    return _CONTROLS.sub(_escape_char, text)


class _Inert:
    """A string shown as Python's ``repr`` shows it (quoted, every non-printable
    character escaped): the terminal renderer prints plain strings as they are and
    other values with ``repr``."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return repr(self.text)


def _escape_controls(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """For the terminal renderer: no string with a control character reaches it as
    is (nested values it prints with ``repr``, which escapes them already)."""
    out = {}
    for key, value in event.items():
        shown: Any = value
        if isinstance(value, str) and _CONTROLS.search(value):
            # Tracebacks are printed raw, line by line: their lines are escaped.
            shown = (_inert(value, keep_newlines=True) if key in _MULTILINE
                     else _Inert(value))
        out[_inert(key) if _CONTROLS.search(key) else key] = shown
    return out


def _json_dumps(event: dict[str, Any], **_: Any) -> str:
    text = msgspec.json.encode(event, enc_hook=repr).decode()
    # JSON escapes C0 but not C1 (nor DEL): escaped the JSON way, same value decoded.
    return _C1.sub(_json_escape_char, text) if _C1.search(text) else text


def _syslog_prefix(_: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    event["_priority"] = _PRIORITY.get(method, 6)
    return event


def _render_journal(_: Any, __: str, event: dict[str, Any]) -> str:
    priority = event.pop("_priority", 6)
    return f"<{priority}>{_json_dumps(event)}"


def configure(level: str = "info", *, stream: TextIO | None = None,
              force_json: bool | None = None) -> None:
    """Configure structlog for the broker (and anything else in the process)."""
    out = stream or sys.stdout
    reconfigure = getattr(out, "reconfigure", None)
    if reconfigure is not None:  # one line, one write: journald sees events at once
        reconfigure(line_buffering=True)
    tty = out.isatty() if force_json is None else not force_json
    colours = out.isatty()
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    if tty:
        processors += [_escape_controls, structlog.dev.ConsoleRenderer(colors=colours)]
    elif os.environ.get("JOURNAL_STREAM"):
        processors += [_syslog_prefix, _render_journal]
    else:
        processors.append(structlog.processors.JSONRenderer(serializer=_json_dumps))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(out),
        # Not cached: SIGHUP may change the level. Hot paths hold a bound logger
        # (``get_logger().bind()``) and rebind after a reload.
        cache_logger_on_first_use=False,
    )

