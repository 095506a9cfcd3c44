"""A stand-in for xenstored, for the tests that run without Xen: the same wire
protocol (``xsd_sockmsg`` packets) on a unix socket, a tree of nodes, and watches that
fire as xenstored's do (once when set, then on every change at or below their path;
``@introduceDomain``/``@releaseDomain`` when the test says a domain came or went).

A real xenstored needs a hypervisor (it aborts on its first request without one): the
xen tier (tests/guest, ``-m xen``) runs the broker against the real one.

It implements what the broker uses (READ, DIRECTORY, WATCH, UNWATCH) and answers
anything else with ``EINVAL``. The test thread edits the tree with :meth:`write`,
:meth:`rm` and :meth:`introduce`/:meth:`release`; a serving thread answers requests.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

from .peers import QemuSocket

HEADER = struct.Struct("<IIII")
DIRECTORY, READ, WATCH, UNWATCH, WATCH_EVENT, ERROR = 1, 2, 4, 5, 15, 16


class FakeXenstored:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.nodes: dict[str, str] = {}
        self.lock = threading.RLock()
        self.watches: list[tuple[socket.socket, str, str]] = []
        self.requests: list[tuple[int, list[str]]] = []
        """Every request served: (type, arguments), for tests that count them."""
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(4)
        self.conns: list[socket.socket] = []
        self.buffers: dict[socket.socket, bytes] = {}
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    # -- the test's side -------------------------------------------------------------

    def write(self, path: str, value: str) -> None:
        with self.lock:
            self.nodes[path] = value
            self._fire(path)

    def write_many(self, base: str, values: dict[str, str]) -> None:
        for key, value in values.items():
            self.write(f"{base}/{key}", value)

    def rm(self, path: str) -> None:
        with self.lock:
            for key in [k for k in self.nodes if k == path or k.startswith(path + "/")]:
                del self.nodes[key]
            self._fire(path)

    def introduce(self) -> None:
        with self.lock:
            self._fire("@introduceDomain")

    def release(self) -> None:
        with self.lock:
            self._fire("@releaseDomain")

    def add_domain(self, domid: int, name: str, channels: dict[int, dict[str, str]],
                   ttys: dict[int, str] | None = None) -> None:
        """What ``xl create`` writes: the domain's name, its console backends (dom0's)
        and frontends (the domain's), then ``@introduceDomain``."""
        self.write(f"/local/domain/{domid}/name", name)
        self.write(f"/local/domain/{domid}/domid", str(domid))
        for devid, backend in channels.items():
            self.write_many(f"/local/domain/0/backend/console/{domid}/{devid}", backend)
            self.write(f"/local/domain/{domid}/device/console/{devid}/tty",
                       (ttys or {}).get(devid, ""))
        self.introduce()

    def remove_domain(self, domid: int) -> None:
        """What destroying a domain leaves: none of its nodes, ``@releaseDomain``."""
        self.rm(f"/local/domain/{domid}")
        self.rm(f"/local/domain/0/backend/console/{domid}")
        self.release()

    def close(self) -> None:
        self.running = False
        self.server.close()
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.close()
        self.thread.join(5)
        self.path.unlink(missing_ok=True)

    def drop_clients(self) -> None:
        """xenstored restarting: every connection closed (the socket stays)."""
        with self.lock:
            for c in self.conns:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)

    # -- the protocol ------------------------------------------------------------------

    def _fire(self, path: str) -> None:
        for conn, watched, token in list(self.watches):
            if path == watched or (not watched.startswith("@")
                                   and path.startswith(watched.rstrip("/") + "/")):
                self._send(conn, WATCH_EVENT, 0, f"{path}\0{token}\0".encode())

    def _send(self, conn: socket.socket, op: int, rid: int, payload: bytes) -> None:
        with contextlib.suppress(OSError):
            conn.sendall(HEADER.pack(op, rid, 0, len(payload)) + payload)

    def _serve(self) -> None:
        while self.running:
            try:
                ready, _, _ = select.select([self.server, *self.conns], [], [], 0.1)
            except (OSError, ValueError):
                ready = []
                self.conns = [c for c in self.conns if c.fileno() >= 0]
            for s in ready:
                if s is self.server:
                    with contextlib.suppress(OSError):
                        conn, _ = self.server.accept()
                        self.conns.append(conn)
                    continue
                try:
                    data = s.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    self._forget(s)
                    continue
                buf = self.buffers.get(s, b"") + data
                while len(buf) >= HEADER.size:
                    op, rid, _tx, length = HEADER.unpack_from(buf)
                    if len(buf) < HEADER.size + length:
                        break
                    payload, buf = buf[HEADER.size:HEADER.size + length], \
                        buf[HEADER.size + length:]
                    with self.lock:
                        self._handle(s, op, rid, payload)
                self.buffers[s] = buf

    def _forget(self, conn: socket.socket) -> None:
        with self.lock:
            self.watches = [w for w in self.watches if w[0] is not conn]
            if conn in self.conns:
                self.conns.remove(conn)
            self.buffers.pop(conn, None)
            conn.close()

    def _handle(self, conn: socket.socket, op: int, rid: int, payload: bytes) -> None:
        args = [a.decode() for a in payload.split(b"\0")[:-1]]
        self.requests.append((op, args))
        if op == READ:
            if args[0] in self.nodes:
                self._send(conn, READ, rid, self.nodes[args[0]].encode())
            elif any(k.startswith(args[0] + "/") for k in self.nodes):
                self._send(conn, READ, rid, b"")  # a directory node has an empty value
            else:
                self._send(conn, ERROR, rid, b"ENOENT\0")
        elif op == DIRECTORY:
            prefix = args[0].rstrip("/") + "/"
            children = sorted({k[len(prefix):].split("/")[0] for k in self.nodes
                               if k.startswith(prefix)})
            if not children and args[0] not in self.nodes:
                self._send(conn, ERROR, rid, b"ENOENT\0")
            else:
                self._send(conn, DIRECTORY, rid, b"".join(c.encode() + b"\0"
                                                          for c in children))
        elif op == WATCH:
            self.watches.append((conn, args[0], args[1]))
            self._send(conn, WATCH, rid, b"OK\0")
            self._send(conn, WATCH_EVENT, 0, f"{args[0]}\0{args[1]}\0".encode())
        elif op == UNWATCH:
            self.watches = [w for w in self.watches
                            if not (w[0] is conn and w[1] == args[0] and w[2] == args[1])]
            self._send(conn, UNWATCH, rid, b"OK\0")
        else:
            self._send(conn, ERROR, rid, b"EINVAL\0")


# -- a device model's pty ----------------------------------------------------------------

_DEVICE_MODEL = r"""
import errno, fcntl, os, select, sys, termios, time, tty
args = sys.argv[1:]
if "--ctty" in args:
    os.setsid()
master, slave = os.openpty()
peer, peer_slave = os.openpty()
for fd in (slave, peer_slave):
    tty.setraw(fd)
print(os.ttyname(slave), os.ttyname(peer_slave), flush=True)
if "--ctty" in args:
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
if "--keep-slave" not in args and "--ctty" not in args:
    os.close(slave)  # as QEMU does: only the master stays open
while True:
    ready, _, _ = select.select([master, peer], [], [], 1.0)
    for src, dst in ((master, peer), (peer, master)):
        if src in ready:
            try:
                data = os.read(src, 65536)
            except OSError as exc:
                if exc.errno != errno.EIO:
                    raise
                time.sleep(0.01)  # nobody has the slave open yet
                continue
            os.write(dst, data)
"""


class DeviceModel:
    """A stand-in for a domain's device model (QEMU started by libxl with
    ``-xen-domid <domid>``) serving a ``connection=pty`` channel: a process whose argv
    carries ``-xen-domid <domid>`` (none when ``domid`` is None: any program's pty),
    holding the master of a pty (:attr:`tty`, the channel's dom0 end, its slave closed
    as QEMU closes it) and relaying it to a second pty (:attr:`domu`, the DomU's end).
    ``--keep-slave`` keeps :attr:`tty`'s slave open too; ``--ctty`` makes it the
    controlling terminal of the process's session."""

    def __init__(self, domid: int | None, *options: str) -> None:
        argv = [sys.executable, "-c", _DEVICE_MODEL]
        if domid is not None:
            argv += ["-xen-domid", str(domid)]
        self.proc = subprocess.Popen([*argv, *options], stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        if not select.select([self.proc.stdout], [], [], 30)[0]:
            self.close()
            raise TimeoutError("the device model stand-in printed no pty in 30 s")
        line = self.proc.stdout.readline().decode().split()
        assert len(line) == 2, f"the device model stand-in did not start: {line}"
        self.tty, self.domu = line

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


CHANNEL = "org.messagerie.0"
"""The name of the messaging channel's console in xenstore (the broker's default)."""


def socket_channel(path: Path) -> dict[int, dict[str, str]]:
    """A domain's console backends for :meth:`FakeXenstored.add_domain`: a first
    console that is not the channel, then the channel, a QEMU socket chardev at
    ``path``."""
    return {0: {"name": "dummy.devid0", "connection": "pty"},
            1: {"name": CHANNEL, "connection": "socket", "path": str(path)}}


def introduce_socket_domain(xenstored: FakeXenstored, domid: int, name: str,
                            path: Path) -> QemuSocket:
    """Domain ``name`` introduced as ``domid``, its channel a QEMU-like socket
    listening at ``path``; returns that socket once the broker has connected to it."""
    qemu = QemuSocket(path)
    xenstored.add_domain(domid, name, socket_channel(qemu.path))
    qemu.accept(10)
    return qemu
