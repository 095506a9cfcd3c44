"""The systemd notify protocol (sd_notify(3)), without libsystemd.

systemd passes the service a datagram socket in ``NOTIFY_SOCKET`` (a path, or an
abstract socket written ``@name``); the service sends newline-separated
``KEY=value`` assignments to it: ``READY=1`` once it really serves, ``STATUS=...``
for ``systemctl status``, ``WATCHDOG=1`` to prove it is alive, ``RELOADING=1`` and
``STOPPING=1`` around a reload and a shutdown.

Everything here is a no-op when ``NOTIFY_SOCKET`` is unset (the broker run by hand or
in tests), and no send ever raises: a failed notification returns ``False`` and the
caller logs it. A daemon must not die because its supervisor's socket hiccupped.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Final

__all__ = ["Notifier", "watchdog_interval", "watchdog_loop"]

SEND_TIMEOUT: Final = 1.0
"""Seconds a send may block when systemd's socket queue is full. The sends run on the
event loop: bounded, so that a stuck supervisor cannot wedge the broker for long."""


def _address(value: str) -> str | bytes | None:
    """The socket address for a ``NOTIFY_SOCKET`` value; ``None`` when unsupported."""
    if value.startswith("@"):
        # Linux abstract namespace: a leading NUL byte, no file.
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    # "vsock:CID:PORT" (systemd >= 254, for VMs) and relative paths are not for us.
    return None


class Notifier:
    """Sends notifications to the service manager.

    ``Notifier()`` reads ``NOTIFY_SOCKET`` from the environment; ``Notifier(path)``
    uses the given address (a path or ``@abstract``); ``Notifier("")`` or an unset
    variable gives a disabled notifier whose methods do nothing and return ``False``.
    """

    def __init__(self, address: str | None = None, *,
                 environ: Mapping[str, str] | None = None,
                 timeout: float = SEND_TIMEOUT) -> None:
        if address is None:
            address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
        self.address_text = address
        self._address = _address(address) if address else None
        self._timeout = timeout
        self._socket: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        """True when there is a supervisor to notify."""
        return self._address is not None

    def __repr__(self) -> str:
        return f"Notifier({self.address_text!r})" if self.enabled else "Notifier(disabled)"

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=value`` assignments in one datagram. True when it was sent."""
        if self._address is None:
            return False
        data = "\n".join(assignments).encode("utf-8", "replace")
        try:
            if self._socket is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.settimeout(self._timeout)
                self._socket = sock
            self._socket.sendto(data, self._address)
        except OSError:
            # ENOENT (systemd gone), ECONNREFUSED, EAGAIN/timeout: report, never raise.
            self.close()
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: startup finished, the broker serves (channels open)."""
        if status is None:
            return self.send("READY=1")
        return self.send("READY=1", _status(status))

    def status(self, text: str) -> bool:
        """``STATUS=text``: one line shown by ``systemctl status``."""
        return self.send(_status(text))

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the service is alive."""
        return self.send("WATCHDOG=1")

    def reloading(self, status: str | None = None) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC`` (the systemd >= 253 reload protocol;
        older versions ignore it). Send :meth:`ready` when the reload is done."""
        fields = ["RELOADING=1",
                  f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"]
        if status is not None:
            fields.append(_status(status))
        return self.send(*fields)

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: shutdown began (the broker drains its queues)."""
        if status is None:
            return self.send("STOPPING=1")
        return self.send("STOPPING=1", _status(status))

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _status(text: str) -> str:
    # One assignment per line: a newline in the text would start a bogus assignment.
    return "STATUS=" + " ".join(text.splitlines())


def watchdog_interval(environ: Mapping[str, str] | None = None,
                      pid: int | None = None) -> float | None:
    """Seconds between two ``WATCHDOG=1`` pings, or ``None`` when no watchdog is set.

    ``WATCHDOG_USEC`` is the timeout systemd enforces (``WatchdogSec=``); when
    ``WATCHDOG_PID`` is set the watchdog is for that process only (``pid`` defaults
    to ours). Like sd_watchdog_enabled(3) recommends, ping at half the timeout.
    """
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    watchdog_pid = env.get("WATCHDOG_PID")
    if watchdog_pid:
        try:
            if int(watchdog_pid) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return usec / 2 / 1_000_000


async def watchdog_loop(notifier: Notifier, interval: float, *,
                        healthy: Callable[[], bool] | None = None,
                        on_failure: Callable[[], None] | None = None) -> None:
    """Ping ``WATCHDOG=1`` every ``interval`` seconds from the event loop; run it as a
    task and cancel it at shutdown.

    Pinging from a coroutine (not a thread) is the point: if the loop wedges, the
    pings stop and systemd restarts the service. ``healthy``, when given, is asked
    before each ping; a ping is skipped while it returns False (e.g. the router is
    stuck). ``on_failure`` is called when a ping could not be sent. Returns at once
    when the notifier is disabled.
    """
    if not notifier.enabled or interval <= 0:
        return
    while True:
        if (healthy is None or healthy()) and not notifier.watchdog() and on_failure:
            on_failure()
        await asyncio.sleep(interval)
