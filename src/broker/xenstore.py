"""Channels bound through xenstore: which domain is behind which channel, now.

Xen's toolstack publishes every domain's consoles and channels in xenstore. For a
channel ``channel = ['name=org.messagerie.0,connection=socket,path=...']`` of domain
``<domid>``, ``xl`` writes (Xen 4.17):

* ``/local/domain/<domid>/name``: the domain's name (written by the toolstack, read-only
  for the domain);
* ``/local/domain/0/backend/console/<domid>/<devid>/{name, connection, path}``: the
  channel's name, ``socket`` or ``pty``, and the socket path (dom0's backend nodes: only
  dom0 writes them);
* ``/local/domain/<domid>/device/console/<devid>/tty``: the pty that the device model
  allocated, for ``connection=pty`` (a *frontend* node: the domain itself can write it,
  so a pty path is only taken when it looks like one, is the first value seen there
  for that domid, no other domain claims it, and :func:`pty_problem` proves from
  ``/proc`` that the domain's own device model holds its master).

Three layers, sans-IO first as in h11:

* the wire (:class:`PacketDecoder`, :func:`encode`): xenstore's ``xsd_sockmsg`` packets,
  bytes in, packets out, no I/O;
* the binding (:func:`bind`): a snapshot of those nodes -> ``{domain: Binding}`` and the
  problems seen, pure;
* the edges: :class:`XenstoreClient` (asyncio, over ``/var/run/xenstored/socket`` or
  ``/dev/xen/xenbus``) and :class:`XenstoreDiscovery`, which watches (one watch per
  subtree, no polling), reads again the domains a burst of events names, binds, and
  tells the daemon.

Why not ``pyxs``: its newest release (0.4.1, 2016) is blocking, delivers watches on a
router thread, carries a Python 2 layer and has no type hints; the protocol is six
message types of a 16-byte header and NUL-separated strings.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import itertools
import os
import re
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import structlog

from messagerie import DOM0, is_valid_name

HEADER: Final = struct.Struct("<IIII")
"""type, req_id, tx_id, len (xen/io/xs_wire.h ``struct xsd_sockmsg``; x86 is
little-endian)."""
MAX_PAYLOAD: Final = 4096
"""``XENSTORE_PAYLOAD_MAX``: a longer packet is a protocol error."""
SOCKET_PATHS: Final = ("/var/run/xenstored/socket", "/run/xenstored/socket",
                       "/dev/xen/xenbus")
"""Where a dom0 finds xenstore, in order (``decouverte.xenstore_chemin`` overrides)."""
DEFAULT_CHANNEL: Final = "org.messagerie.0"
PTY_PATH: Final = re.compile(r"/dev/pts/[0-9]{1,6}")
PTY_SLAVE_MAJORS: Final = range(136, 144)
"""``UNIX98_PTY_SLAVE_MAJOR`` and the seven after it (Linux's devices.txt)."""
BACKEND: Final = "/local/domain/0/backend/console"


class Op(enum.IntEnum):
    DIRECTORY = 1
    READ = 2
    WATCH = 4
    UNWATCH = 5
    WATCH_EVENT = 15
    ERROR = 16


class XenstoreError(OSError):
    """xenstore answered an error (``ENOENT``, ``EACCES``...) or broke the protocol."""


@dataclass(frozen=True, slots=True)
class Packet:
    op: int
    req_id: int
    payload: bytes
    tx_id: int = 0


def encode(packet: Packet) -> bytes:
    if len(packet.payload) > MAX_PAYLOAD:
        raise XenstoreError(errno.E2BIG, f"xenstore payload over {MAX_PAYLOAD} bytes")
    return HEADER.pack(packet.op, packet.req_id, packet.tx_id,
                       len(packet.payload)) + packet.payload


def request(op: Op, req_id: int, *args: str) -> bytes:
    """A request whose arguments are NUL-terminated strings (all the ones used here)."""
    return encode(Packet(op, req_id, b"".join(a.encode() + b"\0" for a in args)))


class PacketDecoder:
    """xenstore's byte stream -> packets, in any fragmentation. Raises
    :class:`XenstoreError` on a length over :data:`MAX_PAYLOAD` (the stream is then
    unusable: the caller reconnects)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Packet]:
        buf = self._buffer
        buf += data
        out: list[Packet] = []
        while len(buf) >= HEADER.size:
            op, req_id, tx_id, length = HEADER.unpack_from(buf)
            if length > MAX_PAYLOAD:
                raise XenstoreError(errno.EPROTO, f"xenstore packet of {length} bytes")
            end = HEADER.size + length
            if len(buf) < end:
                break
            out.append(Packet(op, req_id, bytes(buf[HEADER.size:end]), tx_id))
            del buf[:end]
        return out


def strings(payload: bytes) -> list[str]:
    """NUL-separated strings (a directory listing, a watch event's path and token)."""
    return [s.decode(errors="replace") for s in payload.split(b"\0") if s]


def error_of(payload: bytes) -> XenstoreError:
    name = payload.rstrip(b"\0").decode(errors="replace")
    return XenstoreError(getattr(errno, name, errno.EIO), name)


# -- the binding (pure) ------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Console:
    """One console device of a domain as xenstore shows it."""

    devid: int
    name: str
    """Backend ``name`` (the channel's name in the ``xl`` configuration)."""
    connection: str
    """``socket`` or ``pty`` (backend)."""
    path: str = ""
    """The socket's path (backend ``path``), for ``connection=socket``."""
    tty: str = ""
    """The pty (frontend ``tty``), for ``connection=pty``."""


@dataclass(frozen=True, slots=True)
class XenDomain:
    domid: int
    name: str
    consoles: tuple[Console, ...] = ()


@dataclass(frozen=True, slots=True)
class Binding:
    """A domain's messaging channel: where the broker connects, and to whom it is."""

    domain: str
    domid: int
    devid: int
    path: str
    connection: str


@dataclass(frozen=True, slots=True)
class Problem:
    """Something in xenstore that is not bound, and why (for the log)."""

    why: str
    domid: int
    domain: str
    detail: str


@dataclass(frozen=True, slots=True)
class Bound:
    bindings: dict[str, Binding] = field(default_factory=dict)
    problems: tuple[Problem, ...] = ()


def channel_name(template: str, domain: str) -> str:
    """The channel name to look for in ``domain``: the template, ``{domaine}`` replaced."""
    return template.replace("{domaine}", domain)


def bind(domains: Iterable[XenDomain], template: str = DEFAULT_CHANNEL,
         previous: Mapping[str, Binding] | None = None,
         first_ttys: Mapping[tuple[int, int], str] | None = None,
         pty_proofs: Mapping[tuple[int, int, str], str] | None = None) -> Bound:
    """Which channel path belongs to which domain, from a snapshot of xenstore.

    A domain is bound when it has a valid messagerie name and a console whose backend
    name is ``channel_name(template, name)`` with a usable path: a socket path from the
    backend, or a ``/dev/pts/N`` from the frontend for a pty. Never bound: dom0
    (domid 0), a name that is invalid, a channel not (yet) there, and a path that two
    domains claim (a pty one of them wrote in its own frontend, or a socket path
    configured twice): none gets it, except the one ``previous`` already had bound to
    it (a domain writing another's pty into its own frontend cannot unbind it). Of two
    domains with one name (the old one of a reboot still dying), the newer domid
    wins. A pty path is taken only if it is the first one seen for that domid and
    device (``first_ttys``): the device model writes it before the domain runs, so a
    later change is the domain's own doing and the channel stays unbound until the
    domain is recreated. And a pty is taken only once its ownership is proven:
    ``pty_proofs[(domid, devid, path)]`` is ``""`` (what :func:`pty_problem` says when
    the domain's device model holds it); a pty without a proof (not checked, or a
    reason why not) is refused (``pty_not_owned``), so a domain cannot make the broker
    open a dom0 terminal by naming it in its frontend."""
    candidates: dict[str, Binding] = {}
    problems: list[Problem] = []
    for dom in sorted(domains, key=lambda d: d.domid):
        if dom.domid == 0:
            continue
        if not is_valid_name(dom.name) or dom.name == DOM0:
            problems.append(Problem("bad_name", dom.domid, dom.name,
                                    "not a valid messagerie domain name"))
            continue
        wanted = channel_name(template, dom.name)
        console = next((c for c in dom.consoles if c.name == wanted), None)
        if console is None:
            problems.append(Problem("no_channel", dom.domid, dom.name,
                                    f"no channel named {wanted!r}"))
            continue
        if console.connection == "socket":
            path = console.path
            if not path.startswith("/"):
                problems.append(Problem("no_path", dom.domid, dom.name,
                                        f"socket channel {wanted!r} without a path"))
                continue
        elif console.connection == "pty":
            path = console.tty
            if not path:
                problems.append(Problem("no_path", dom.domid, dom.name,
                                        f"pty channel {wanted!r} has no tty yet"))
                continue
            if not PTY_PATH.fullmatch(path):
                problems.append(Problem("bad_path", dom.domid, dom.name,
                                        f"tty {path!r} is not a /dev/pts/N path"))
                continue
            first = (first_ttys or {}).get((dom.domid, console.devid), path)
            if path != first:
                problems.append(Problem("tty_changed", dom.domid, dom.name,
                                        f"tty changed from {first} to {path} after the "
                                        "device model wrote it"))
                continue
            why = (pty_proofs or {}).get((dom.domid, console.devid, path),
                                         f"{path}: its ownership was not checked")
            if why:
                problems.append(Problem("pty_not_owned", dom.domid, dom.name, why))
                continue
        else:
            problems.append(Problem("bad_connection", dom.domid, dom.name,
                                    f"channel {wanted!r}: connection {console.connection!r}"))
            continue
        old = candidates.get(dom.name)
        if old is not None:
            problems.append(Problem("superseded", old.domid, dom.name,
                                    f"domid {dom.domid} has the same name"))
        candidates[dom.name] = Binding(dom.name, dom.domid, console.devid, path,
                                       console.connection)
    claims: dict[str, list[Binding]] = {}
    for b in candidates.values():
        claims.setdefault(b.path, []).append(b)
    bindings: dict[str, Binding] = {}
    held = {b.path: b for b in (previous or {}).values()}
    for path, claimants in claims.items():
        if len(claimants) == 1:
            bindings[claimants[0].domain] = claimants[0]
            continue
        names = ", ".join(f"{b.domain} (domid {b.domid})" for b in claimants)
        for b in claimants:
            if held.get(path) == b:
                bindings[b.domain] = b
            else:
                problems.append(Problem("path_conflict", b.domid, b.domain,
                                        f"{path} is claimed by {names}"))
    return Bound(dict(sorted(bindings.items())), tuple(problems))


# -- who holds a pty (blocking: /proc) ------------------------------------------------

def is_device_model(argv: list[str], domid: int) -> bool:
    """Whether ``argv`` is a device model's for ``domid``: QEMU as libxl starts it for a
    domain (``qemu-system-i386 -xen-domid <domid> ...``), which allocates a channel's
    pty and writes its path into the domain's frontend."""
    want = str(domid)
    return any(a in ("-xen-domid", "--xen-domid") and b == want
               for a, b in itertools.pairwise(argv))


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def pty_problem(path: str, domid: int, *, proc: str = "/proc") -> str:
    """Why the pty ``path`` cannot be proven to be ``domid``'s channel, or ``""`` when
    it is: a pty slave (``/dev/pts/N``, a character device of a pty slave major whose
    index is N), whose master (a ``/dev/ptmx`` descriptor whose fdinfo says
    ``tty-index: N``) is held only by device models of ``domid`` (:func:`is_device_model`),
    which is no session's controlling terminal and which no other process has open
    (QEMU closes its slave; this process's own descriptors do not count). Fails closed:
    a master that no readable process holds is not proven (the broker must be able to
    read ``/proc/<pid>/fd`` of the device model: root or ``CAP_SYS_PTRACE``)."""
    if not PTY_PATH.fullmatch(path):
        return f"{path!r} is not a /dev/pts/N path"
    index = int(path.rsplit("/", 1)[1])
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    if (not stat.S_ISCHR(st.st_mode) or major not in PTY_SLAVE_MAJORS
            or (major - PTY_SLAVE_MAJORS[0]) * 256 + minor != index):
        return f"{path} is not a pty slave"
    me = os.getpid()
    masters: list[int] = []
    try:
        pids = [int(e) for e in os.listdir(proc) if e.isdigit()]
    except OSError as exc:
        return f"{proc}: {exc.strerror}: cannot find who holds {path}"
    for pid in pids:
        base = f"{proc}/{pid}"
        try:
            fields = _read(f"{base}/stat").rsplit(b")", 1)[1].split()
            tty_nr = int(fields[4])  # state ppid pgrp session tty_nr
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if pid != me and tty_nr and (os.major(tty_nr), os.minor(tty_nr)) == (major, minor):
            return f"{path} is the controlling terminal of pid {pid}'s session"
        try:
            fds = os.listdir(f"{base}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{base}/fd/{fd}")
            except OSError:
                continue
            if target == path and pid != me:
                return f"{path} is open in pid {pid}, not only its device model's master"
            if target in ("/dev/ptmx", "/dev/pts/ptmx"):
                try:
                    info = _read(f"{base}/fdinfo/{fd}").split(b"\n")
                except OSError:
                    continue
                if f"tty-index:\t{index}".encode() in info:
                    masters.append(pid)
    if not masters:
        return (f"no process this broker can inspect holds {path}'s master "
                f"(not proven to be domid {domid}'s device model)")
    for pid in sorted(set(masters)):
        try:
            raw = _read(f"{proc}/{pid}/cmdline")
            argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
        except OSError:
            argv = []
        if not is_device_model(argv, domid):
            what = argv[0] if argv else "?"
            return (f"{path}'s master is held by pid {pid} ({what}), not by a device "
                    f"model of domid {domid} (-xen-domid {domid})")
    return ""


# -- the client (asyncio) ------------------------------------------------------------

def default_path() -> str:
    for path in SOCKET_PATHS:
        if os.path.exists(path):
            return path
    return SOCKET_PATHS[0]


class XenstoreClient:
    """One connection to xenstore: requests answered in any order, watch events
    counted into :attr:`changed`. ``async with XenstoreClient(path) as xs: ...``"""

    def __init__(self, path: str | None = None) -> None:
        self.path = path or default_path()
        self.changed = asyncio.Event()
        """Set by every watch event; whoever consumes it clears it."""
        self.events = 0
        self.touched: set[int] = set()
        """The domids named by the watch events' paths since :meth:`take_touched`."""
        self.touched_all = False
        """Whether an event named no single domain (``@introduceDomain``, a watch's
        root...) since :meth:`take_touched`."""
        self._decoder = PacketDecoder()
        self._pending: dict[int, asyncio.Future[Packet]] = {}
        self._next_id = 0
        self._fd = -1
        self._sock: socket.socket | None = None
        self._closed: asyncio.Future[None] | None = None
        self._write_lock = asyncio.Lock()

    async def __aenter__(self) -> XenstoreClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        self._closed = loop.create_future()
        try:
            mode = os.stat(self.path).st_mode
        except OSError as exc:
            raise XenstoreError(exc.errno, f"{self.path}: {exc.strerror}") from None
        if stat.S_ISSOCK(mode):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, self.path)
            except OSError as exc:
                sock.close()
                raise XenstoreError(exc.errno, f"{self.path}: {exc.strerror}") from None
            self._sock = sock
            self._fd = sock.fileno()
        else:  # /dev/xen/xenbus: the kernel's xenbus device speaks the same packets
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                raise XenstoreError(exc.errno, f"{self.path}: {exc.strerror}") from None
        loop.add_reader(self._fd, self._readable)

    @property
    def closed(self) -> asyncio.Future[None]:
        """Done when the connection is gone (xenstored restarted, device closed)."""
        assert self._closed is not None, "connect() first"
        return self._closed

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail(XenstoreError(exc.errno, f"{self.path}: {exc.strerror}"))
            return
        if not data:
            self._fail(XenstoreError(errno.ECONNRESET, f"{self.path}: closed"))
            return
        try:
            packets = self._decoder.feed(data)
        except XenstoreError as exc:
            self._fail(exc)
            return
        for packet in packets:
            if packet.op == Op.WATCH_EVENT:
                self.events += 1
                path = next(iter(strings(packet.payload)), "")
                domid = domid_of(path)
                if domid is None:
                    self.touched_all = True
                else:
                    self.touched.add(domid)
                self.changed.set()
                continue
            future = self._pending.pop(packet.req_id, None)
            if future is not None and not future.done():
                future.set_result(packet)

    def take_touched(self) -> set[int] | None:
        """The domids events named since the last call, None for "any domain"; and
        clears :attr:`changed`."""
        touched = None if self.touched_all else self.touched
        self.touched, self.touched_all = set(), False
        self.changed.clear()
        return touched

    def _fail(self, exc: XenstoreError) -> None:
        if self._closed is not None and not self._closed.done():
            self._closed.set_exception(exc)
            self._closed.exception()  # retrieved: waiting on it is optional
        self.close()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(exc)
        self._pending.clear()

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self._fd)
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            else:
                os.close(self._fd)
            self._fd = -1
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    async def _call(self, op: Op, *args: str) -> bytes:
        if self._fd < 0:
            raise XenstoreError(errno.ENOTCONN, f"{self.path}: not connected")
        loop = asyncio.get_running_loop()
        self._next_id = self._next_id % 0x7FFFFFFF + 1
        rid = self._next_id
        future: asyncio.Future[Packet] = loop.create_future()
        self._pending[rid] = future
        data = request(op, rid, *args)
        async with self._write_lock:  # one packet per write: the xenbus device wants it
            await self._write(data)
        answer = await future
        if answer.op == Op.ERROR:
            raise error_of(answer.payload)
        return answer.payload

    async def _write(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        if self._sock is not None:
            await loop.sock_sendall(self._sock, data)
            return
        while data:
            try:
                n = os.write(self._fd, data)
            except BlockingIOError:
                await asyncio.sleep(0.01)
                continue
            data = data[n:]

    async def read(self, path: str) -> str | None:
        """The node's value, None when it does not exist."""
        try:
            return (await self._call(Op.READ, path)).decode(errors="replace")
        except XenstoreError as exc:
            if exc.errno in (errno.ENOENT, errno.EACCES):
                return None
            raise

    async def directory(self, path: str) -> list[str]:
        """The node's children, [] when it does not exist."""
        try:
            return strings(await self._call(Op.DIRECTORY, path))
        except XenstoreError as exc:
            if exc.errno in (errno.ENOENT, errno.EACCES):
                return []
            raise

    async def watch(self, path: str, token: str) -> None:
        """Watch ``path`` and everything below it (``@introduceDomain`` and
        ``@releaseDomain`` for domains coming and going). xenstore fires once at once."""
        await self._call(Op.WATCH, path, token)

    async def unwatch(self, path: str, token: str) -> None:
        with contextlib.suppress(XenstoreError):
            await self._call(Op.UNWATCH, path, token)


def domid_of(path: str) -> int | None:
    """The domain a node belongs to (``/local/domain/<domid>/...``, dom0's
    ``backend/console/<domid>/...``), None for anything else."""
    for prefix in (BACKEND + "/", "/local/domain/"):
        if path.startswith(prefix):
            head = path[len(prefix):].split("/", 1)[0]
            if head.isdigit() and head != "0":
                return int(head)
            return None
    return None


async def read_domain(xs: XenstoreClient, domid: int,
                      known_ttys: Mapping[tuple[int, int], str] | None = None
                      ) -> XenDomain | None:
    """One domain as :func:`bind` needs it (its name, its console backends, and the
    frontend ``tty`` of its pty ones), None when it has no name (being created or
    destroyed). A tty in ``known_ttys`` (the first value seen) is not read again."""
    name = await xs.read(f"/local/domain/{domid}/name")
    if name is None:
        return None
    consoles: list[Console] = []
    for dev in await xs.directory(f"{BACKEND}/{domid}"):
        if not dev.isdigit():
            continue
        back = f"{BACKEND}/{domid}/{dev}"
        cname = await xs.read(f"{back}/name") or ""
        connection = await xs.read(f"{back}/connection") or ""
        path = tty = ""
        if connection == "socket":
            path = await xs.read(f"{back}/path") or ""
        elif connection == "pty":
            tty = (known_ttys or {}).get((domid, int(dev))) or await xs.read(
                f"/local/domain/{domid}/device/console/{dev}/tty") or ""
        consoles.append(Console(int(dev), cname, connection, path, tty))
    return XenDomain(domid, name, tuple(consoles))


async def snapshot(xs: XenstoreClient,
                   known_ttys: Mapping[tuple[int, int], str] | None = None
                   ) -> list[XenDomain]:
    """Every domain, read now (:func:`read_domain`)."""
    domains: list[XenDomain] = []
    for entry in await xs.directory("/local/domain"):
        if not entry.isdigit() or entry == "0":
            continue
        dom = await read_domain(xs, int(entry), known_ttys)
        if dom is not None:
            domains.append(dom)
    return domains


Apply = Callable[[Bound], None]


class XenstoreDiscovery:
    """Watch xenstore and hand every new :class:`Bound` to ``apply``.

    Watches: ``@introduceDomain``, ``@releaseDomain``, the console backends (dom0's),
    and the ``device/console`` of a domain whose pty channel has no tty yet (where the
    device model writes it; unwatched once the first value is recorded, which is then
    never read again). A burst of events costs one rescan, at most every
    ``min_interval`` seconds, of the domains the events' paths name (all of them only
    for an event naming none: a domain coming or going), so a domain writing its own
    nodes in a loop costs a read of itself, and only until its tty is known. If
    xenstore goes
    away the last bindings stay as they are (their channels are still open) and the
    client reconnects with backoff."""

    def __init__(self, apply: Apply, *, path: str | None = None,
                 template: str = DEFAULT_CHANNEL, min_interval: float = 0.1,
                 retry_max: float = 5.0) -> None:
        self.apply = apply
        self.path = path
        self.template = template
        self.min_interval = min_interval
        self.retry_max = retry_max
        self.current = Bound()
        self.domains: dict[int, XenDomain] = {}
        """The last reading of every domain."""
        self.client: XenstoreClient | None = None
        self.connected = asyncio.Event()
        self.log = structlog.get_logger("broker").bind()
        self._frontends: set[int] = set()
        self.first_ttys: dict[tuple[int, int], str] = {}
        """The first pty path seen per (domid, devid): the device model's."""
        self.pty_proofs: dict[tuple[int, int, str], str] = {}
        """(domid, devid, path) -> :func:`pty_problem`'s answer ("" when proven)."""
        self._reported: set[tuple[str, int, str]] = set()

    async def run(self) -> None:
        delay = self.min_interval
        failing = ""
        while True:
            xs = XenstoreClient(self.path)
            try:
                await xs.connect()
                self.client = xs
                self._frontends = set()
                for node in ("@introduceDomain", "@releaseDomain", BACKEND):
                    await xs.watch(node, "messagerie")
                self.log.info("xenstore.connected", path=xs.path)
                failing = ""
                delay = self.min_interval
                await self._serve(xs)
            except XenstoreError as exc:
                reason = str(exc)
                if reason != failing:
                    self.log.warning("xenstore.unavailable", path=xs.path, error=reason,
                                     retry_in=round(delay, 3))
                    failing = reason
            finally:
                self.connected.clear()
                self.client = None
                xs.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.retry_max)

    async def _serve(self, xs: XenstoreClient) -> None:
        xs.take_touched()
        await self.rescan(xs)
        while True:
            self.connected.set()
            changed: asyncio.Future[Any] = asyncio.ensure_future(xs.changed.wait())
            closed: asyncio.Future[Any] = xs.closed
            try:
                await asyncio.wait([changed, closed], return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()
            if xs.closed.done():
                xs.closed.result()  # raises the XenstoreError that closed it
                raise XenstoreError(errno.ECONNRESET, f"{xs.path}: closed")
            await asyncio.sleep(self.min_interval)  # let the burst finish
            await self.rescan(xs, xs.take_touched())

    async def rescan(self, xs: XenstoreClient, only: set[int] | None = None) -> None:
        """Read again the domains ``only`` names (all when None), bind, apply."""
        if only is None:
            self.domains = {d.domid: d for d in await snapshot(xs, self.first_ttys)}
            touched = set(self.domains) | self._frontends
        else:
            for domid in sorted(only):
                dom = await read_domain(xs, domid, self.first_ttys)
                if dom is None:
                    self.domains.pop(domid, None)
                else:
                    self.domains[domid] = dom
            touched = set(only)
        domains = [self.domains[k] for k in sorted(self.domains)]
        self._note_ttys(domains)
        for domid in sorted(touched):
            dom = self.domains.get(domid)
            wanted = dom is not None and self._awaits_tty(dom)
            if wanted and domid not in self._frontends:
                await xs.watch(f"/local/domain/{domid}/device/console", "messagerie")
                self._frontends.add(domid)
            elif not wanted and domid in self._frontends:
                await xs.unwatch(f"/local/domain/{domid}/device/console", "messagerie")
                self._frontends.discard(domid)
        await self._prove_ttys(domains)
        bound = bind(domains, self.template, self.current.bindings, self.first_ttys,
                     self.pty_proofs)
        reported = set()
        for p in bound.problems:
            key = (p.why, p.domid, p.detail)
            reported.add(key)
            if key not in self._reported:  # said once while it lasts
                log = self.log.warning if p.why in ("path_conflict", "bad_path",
                                                    "bad_name", "tty_changed",
                                                    "pty_not_owned") \
                    else self.log.info
                log("xenstore.unbound", why=p.why, domid=p.domid, domain=p.domain,
                    detail=p.detail)
        self._reported = reported
        self.current = bound
        self.apply(bound)

    def _awaits_tty(self, dom: XenDomain) -> bool:
        """Whether the domain's channel is a pty whose path is not known yet."""
        wanted = channel_name(self.template, dom.name)
        return any(c.name == wanted and c.connection == "pty"
                   and (dom.domid, c.devid) not in self.first_ttys for c in dom.consoles)

    def _note_ttys(self, domains: list[XenDomain]) -> None:
        ids = {d.domid for d in domains}
        for key in [k for k in self.first_ttys if k[0] not in ids]:
            del self.first_ttys[key]  # that domid is gone; a new one starts afresh
        for proof in [k for k in self.pty_proofs if k[0] not in ids]:
            del self.pty_proofs[proof]
        for d in domains:
            for c in d.consoles:
                if c.connection == "pty" and c.tty:
                    self.first_ttys.setdefault((d.domid, c.devid), c.tty)

    async def _prove_ttys(self, domains: list[XenDomain],
                          again: Binding | None = None) -> None:
        """Ask :func:`pty_problem` (in a thread: it reads /proc) about each pty channel
        not asked about yet, and about ``again``'s path anew."""
        for d in domains:
            wanted = channel_name(self.template, d.name)
            for c in d.consoles:
                key = (d.domid, c.devid, c.tty)
                if (c.name != wanted or c.connection != "pty" or not c.tty
                        or self.first_ttys.get(key[:2]) != c.tty):
                    continue
                fresh = again is not None and (again.domid, again.devid, again.path) == key
                if fresh or key not in self.pty_proofs:
                    self.pty_proofs[key] = await asyncio.to_thread(pty_problem, c.tty,
                                                                   d.domid)

    async def still_bound(self, binding: Binding) -> bool:
        """Whether xenstore still gives ``binding.path`` to that domain (the same domid,
        name and channel), read now, and for a pty whether its device model still holds
        it (:func:`pty_problem`, asked anew): asked before every (re)connection. Without
        xenstore, no: a path xenstore cannot confirm is not trusted."""
        xs = self.client
        if xs is None:
            return False
        try:
            domains = await snapshot(xs, self.first_ttys)
        except XenstoreError:
            return False
        self._note_ttys(domains)
        await self._prove_ttys(domains, again=binding if binding.connection == "pty"
                               else None)
        now = bind(domains, self.template, self.current.bindings,
                   self.first_ttys, self.pty_proofs).bindings.get(binding.domain)
        return now == binding


def verifier(discovery: XenstoreDiscovery,
             binding: Binding) -> Callable[[], Awaitable[bool]]:
    """The check a bound endpoint runs before each connection attempt."""
    return lambda: discovery.still_bound(binding)


def changes(old: Mapping[str, Binding], new: Mapping[str, Binding]
            ) -> tuple[list[str], list[Binding]]:
    """(names to unbind, bindings to make): a domain whose domid, channel or path
    changed is unbound and bound again (a new endpoint: nothing of the old one's
    connection is kept)."""
    gone = [name for name, b in old.items() if new.get(name) != b]
    made = [b for name, b in new.items() if old.get(name) != b]
    return gone, made
