"""The library's events: silent until the application says otherwise.

``messagerie`` is a library first: a DomU service that has not configured logging
must not find the client's events on its stdout. The conventions are the standard
library's: every event goes to a ``logging`` logger under ``messagerie``
(``messagerie.client``), whose package logger carries a ``NullHandler``, so nothing
is printed (not even warnings through ``logging.lastResort``) until the application
configures ``logging`` (``logging.basicConfig(level=logging.INFO)`` shows them).

structlog only when asked: an application that has configured structlog
(``structlog.configure(...)``, as the broker and the ``messagerie`` command do) gets
the same events as structlog event dicts (``event="channel.connected"``, the bound
context as keys), through its own processors; ``structlog.testing.capture_logs()``
sees them too. structlog's unconfigured default (print everything to stdout) is never
used.

The choice is made at each event, not at import, so configuring logging after the
client was created still takes effect. Events are rare (connections, timeouts,
invalid frames), never per message on the hot path.
"""

from __future__ import annotations

import logging
from typing import Any

import structlog

ROOT = "messagerie"

logging.getLogger(ROOT).addHandler(logging.NullHandler())


class _Line:
    """``event key=value ...``, rendered only if a handler formats the record."""

    __slots__ = ("context", "event")

    def __init__(self, event: str, context: dict[str, Any]) -> None:
        self.event = event
        self.context = context

    def __str__(self) -> str:
        pairs = " ".join(f"{k}={v!r}" for k, v in self.context.items())
        return f"{self.event} {pairs}" if pairs else self.event


class EventLogger:
    """A structlog-shaped logger (``bind``, ``info(event, **kw)``) for the library."""

    __slots__ = ("_context", "_stdlib", "name")

    def __init__(self, name: str, context: dict[str, Any] | None = None) -> None:
        self.name = name
        self._context = context or {}
        self._stdlib = logging.getLogger(name)

    def bind(self, **context: Any) -> EventLogger:
        return EventLogger(self.name, {**self._context, **context})

    def _emit(self, level: int, method: str, event: str, kw: dict[str, Any],
              exc_info: bool = False) -> None:
        context = {**self._context, **kw}
        if structlog.is_configured():
            getattr(structlog.get_logger(self.name), method)(event, **context)
            return
        if self._stdlib.isEnabledFor(level):
            self._stdlib.log(level, "%s", _Line(event, context), exc_info=exc_info,
                             extra={"event": event, "context": context}, stacklevel=3)

    def debug(self, event: str, **kw: Any) -> None:
        self._emit(logging.DEBUG, "debug", event, kw)

    def info(self, event: str, **kw: Any) -> None:
        self._emit(logging.INFO, "info", event, kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._emit(logging.WARNING, "warning", event, kw)

    def error(self, event: str, **kw: Any) -> None:
        self._emit(logging.ERROR, "error", event, kw)

    def exception(self, event: str, **kw: Any) -> None:
        self._emit(logging.ERROR, "exception", event, kw, exc_info=True)


def get_logger(name: str) -> EventLogger:
    """The library's logger for ``name`` (a dotted name under ``messagerie``)."""
    return EventLogger(name)
