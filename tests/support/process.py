"""A program started as users start it (its console script), as a subprocess whose
JSON log events, one per line on stdout, are collected by a thread: what the broker
and the MQTT bridge tests wait on."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
from collections.abc import Sequence
from typing import Any

from .waiting import wait_until


class LoggedProcess:
    """``argv`` as a subprocess (stderr with stdout); ``events`` are the lines of its
    output that are JSON objects, ``raw_lines`` every line."""

    def __init__(self, argv: Sequence[str], *, env: dict[str, str] | None = None) -> None:
        self.name = os.path.basename(argv[0])
        self.events: list[dict[str, Any]] = []
        self.raw_lines: list[str] = []
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            text = line.decode(errors="replace").strip()
            with self._lock:
                self.raw_lines.append(text)
                with contextlib.suppress(ValueError):
                    self.events.append(json.loads(text))

    def find(self, event: str, **match: Any) -> list[dict[str, Any]]:
        """The events named ``event`` whose fields include ``match``."""
        with self._lock:
            return [e for e in self.events if e.get("event") == event
                    and all(e.get(k) == v for k, v in match.items())]

    def wait_event(self, event: str, timeout: float = 10.0, count: int = 1,
                   **match: Any) -> dict[str, Any]:
        """Wait until ``event`` (with these fields) was logged ``count`` times; return
        the ``count``-th."""
        found = wait_until(lambda: len(self.find(event, **match)) >= count and
                           self.find(event, **match), timeout,
                           lambda: f"log event {event} {match} (have: {self.tail()})")
        return found[count - 1]

    def wait_line(self, text: str, timeout: float = 10.0) -> str:
        """Wait until a raw output line contains ``text`` (for lines that are not bare
        JSON, e.g. with a journald priority prefix); return it."""
        def line() -> str | None:
            with self._lock:
                return next((ln for ln in self.raw_lines if text in ln), None)
        return wait_until(line, timeout, lambda: f"a line with {text!r} (have: {self.tail()})")

    def tail(self, n: int = 8) -> list[str]:
        with self._lock:
            return self.raw_lines[-n:]

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then the exit status (a program that does not exit fails the test)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.name} did not exit on SIGTERM") from None
        finally:
            self._reader.join(5)
