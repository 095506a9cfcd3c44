"""Logging setup: structlog events, rendered at the edge.

One event name per thing that happened (``message.routed``, ``message.refused``,
``domain.connected``), context bound once per connection. On a terminal the events
are coloured key=value lines; otherwise one JSON object per line on stdout, which is
what journald wants. Under systemd (``JOURNAL_STREAM`` set) each line is prefixed with
its syslog priority (``<4>``), so ``journalctl -p warning`` works.

Filtered-out levels cost one method call: per-message events (``message.routed``)
are ``debug`` so that production (``info``) pays nothing for them.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

import msgspec
import structlog

_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "critical": 2,
             "exception": 3}


def _json_dumps(event: dict[str, Any], **_: Any) -> str:
    return msgspec.json.encode(event, enc_hook=repr).decode()


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
        processors.append(structlog.dev.ConsoleRenderer(colors=colours))
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

