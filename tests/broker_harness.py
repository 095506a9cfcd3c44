"""Real parts for broker integration tests: socat ptys, unix-socket listeners standing
in for QEMU, and the broker started as users start it (its console script).

Everything waits on conditions with deadlines; nothing sleeps a fixed time.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable
from pathlib import Path
from typing import Any

from messagerie import FrameDecoder, FrameError, Message

BIN = Path(sys.executable).parent
SOCAT = shutil.which("socat")


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
               interval: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class PtyPair:
    """``socat`` linking two ptys: ``dom0`` (the broker's end) and ``domu`` (the VM's)."""

    def __init__(self, directory: Path, name: str) -> None:
        assert SOCAT, "socat is required (apt-get install -y socat)"
        self.name = name
        self.dom0 = directory / f"{name}.dom0"
        self.domu = directory / f"{name}.domu"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        for p in (self.dom0, self.domu):
            if p.is_symlink():
                p.unlink()
        self.proc = subprocess.Popen(
            [SOCAT, f"pty,raw,echo=0,link={self.dom0}", f"pty,raw,echo=0,link={self.domu}"],
            stderr=subprocess.DEVNULL)
        wait_until(lambda: self.dom0.exists() and self.domu.exists(), 10, f"socat {self.name}")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


class Domu:
    """The DomU side of a channel, raw bytes in and out, with a frame decoder."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        if os.isatty(self.fd):
            tty.setraw(self.fd, termios.TCSANOW)
        self.decoder = FrameDecoder(1 << 24)
        self.inbox: list[Message | FrameError] = []

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except BlockingIOError:
                select.select([], [self.fd], [], 1.0)
                continue
            view = view[n:]

    def send(self, msg: dict[str, Any]) -> None:
        self.write(json.dumps(msg, separators=(",", ":")).encode() + b"\n")

    def pump(self, timeout: float = 0.05) -> None:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return
        try:
            data = os.read(self.fd, 1 << 16)
        except (BlockingIOError, OSError):
            return
        self.inbox.extend(self.decoder.feed(data))

    def messages(self, *, exclude_dom0: bool = True) -> list[Message]:
        return [m for m in self.inbox if isinstance(m, Message)
                and not (exclude_dom0 and m.source == "dom0" and m.type == "notification")]

    def wait_messages(self, n: int, timeout: float = 10.0, **kw: Any) -> list[Message]:
        deadline = time.monotonic() + timeout
        while len(self.messages(**kw)) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {n} messages, got {len(self.messages(**kw))}: "
                                     f"{self.messages(**kw)[-3:]}")
            self.pump()
        return self.messages(**kw)

    def drain_for(self, seconds: float) -> None:
        """Read whatever arrives during ``seconds`` (to assert that nothing else does)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.pump(0.02)

    def close(self) -> None:
        os.close(self.fd)


class QemuSocket:
    """A unix socket listener, as QEMU's ``connection=socket`` chardev: the broker
    connects to it. Accepts one connection at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.conn: socket.socket | None = None
        self.decoder = FrameDecoder(1 << 24)
        self.inbox: list[Message | FrameError] = []

    def accept(self, timeout: float = 10.0) -> None:
        self.server.settimeout(timeout)
        self.conn, _ = self.server.accept()
        self.conn.setblocking(False)

    def send(self, msg: dict[str, Any]) -> None:
        assert self.conn is not None
        self.conn.setblocking(True)
        self.conn.sendall(json.dumps(msg, separators=(",", ":")).encode() + b"\n")
        self.conn.setblocking(False)

    def wait_messages(self, n: int, timeout: float = 10.0) -> list[Message]:
        assert self.conn is not None
        deadline = time.monotonic() + timeout

        def got() -> list[Message]:
            return [m for m in self.inbox if isinstance(m, Message)
                    and not (m.source == "dom0" and m.type == "notification")]
        while len(got()) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {n} messages, got {got()}")
            ready, _, _ = select.select([self.conn], [], [], 0.05)
            if ready:
                data = self.conn.recv(1 << 16)
                if not data:
                    raise AssertionError("broker closed the socket")
                self.inbox.extend(self.decoder.feed(data))
        return got()

    def drop(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def close(self) -> None:
        self.drop()
        self.server.close()
        with_suppress_unlink(self.path)


def with_suppress_unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


class BrokerProcess:
    """``messagerie-broker --config FILE`` as a subprocess; its JSON log events are
    collected from stdout by a thread."""

    def __init__(self, config: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.events: list[dict[str, Any]] = []
        self.raw_lines: list[str] = []
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(
            [str(BIN / "messagerie-broker"), "--config", str(config), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
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
        with self._lock:
            return [e for e in self.events if e.get("event") == event
                    and all(e.get(k) == v for k, v in match.items())]

    def wait_event(self, event: str, timeout: float = 10.0, count: int = 1,
                   **match: Any) -> dict[str, Any]:
        found = wait_until(lambda: len(self.find(event, **match)) >= count and
                           self.find(event, **match), timeout,
                           f"log event {event} {match} (have: {self.tail()})")
        return found[count - 1]  # type: ignore[no-any-return]

    def tail(self, n: int = 8) -> list[str]:
        with self._lock:
            return self.raw_lines[-n:]

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("broker did not exit on SIGTERM") from None
        finally:
            self._reader.join(5)


def write_config(path: Path, domains: dict[str, Path], *, extra: str = "",
                 dom0_socket: Path | None = None) -> Path:
    lines = [f'[dom0]\nsocket = "{dom0_socket or path.parent / "dom0.sock"}"\n']
    if extra:
        lines.append(extra)
    for name, chemin in domains.items():
        lines.append(f'[domaines.{name}]\nchemin = "{chemin}"\n')
    path.write_text("\n".join(lines))
    return path


class BrokerSystem:
    """Domains on socat ptys, the broker started on them as users start it, and each
    domain's DomU end. ``missing`` domains are configured with a path that does not
    exist (offline); ``paths`` adds domains on paths of the caller's (a unix socket, a
    regular file...)."""

    def __init__(self, tmp: Path, names: tuple[str, ...], *, extra: str = "",
                 missing: tuple[str, ...] = (), paths: dict[str, Path] | None = None,
                 dom0_socket: Path | None = None, wait_connected: bool = False) -> None:
        self.tmp = tmp
        self.pairs = {n: PtyPair(tmp, n) for n in names}
        self.paths = {n: p.dom0 for n, p in self.pairs.items()}
        self.paths.update({n: tmp / f"{n}.absent" for n in missing})
        self.paths.update(paths or {})
        self.dom0_socket = dom0_socket or tmp / "dom0.sock"
        self.extra = extra
        self.config = write_config(tmp / "broker.toml", self.paths, extra=extra,
                                   dom0_socket=self.dom0_socket)
        self.broker = BrokerProcess(self.config)
        self.broker.wait_event("broker.ready")
        if wait_connected:
            wait_until(lambda: len(self.broker.find("domain.connected")) >= len(names), 10,
                       f"{len(names)} domains connected")
        self.domus = {n: Domu(p.domu) for n, p in self.pairs.items()}

    def reconfigure(self, paths: dict[str, Path]) -> None:
        """Rewrite the configuration with these domains (same dom0 socket and extra
        keys); send SIGHUP to apply it."""
        write_config(self.config, paths, extra=self.extra, dom0_socket=self.dom0_socket)

    def close(self) -> int:
        code = self.broker.stop()
        for d in self.domus.values():
            d.close()
        for p in self.pairs.values():
            p.kill()
        return code
