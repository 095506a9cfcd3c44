"""Channel transports: the two kinds of path a pv-channel shows up as.

* a tty (``/dev/hvc1`` in a DomU; a pty in dom0 with Xen's ``connection=pty``; a socat
  pty in tests), opened in raw mode, one fd (:class:`_TtyTransport`);
* a unix socket (Xen's ``connection=socket``: QEMU listens, we connect; also the
  broker's dom0 socket).

Both give an :class:`asyncio.Transport`-like object (``write``, ``close``,
``pause_reading``/``resume_reading``, write-buffer limits) bound to the caller's
:class:`asyncio.Protocol`, so everything above this module is transport-agnostic.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import stat
import termios
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TypeVar

from .holders import busy_message

READ_SIZE: Final = 64 * 1024
"""Bytes read per wake-up on a tty. Reading 1 KiB (pyserial-asyncio's default) cost one
loop iteration per ~5 mouse moves and halved throughput on a pty."""

TTY_FULL_READ: Final = 3 * 1024
"""A tty read at least this long probably emptied the 4 KiB line-discipline buffer with
more behind it: read again at once (see ``_TtyTransport._read_ready``)."""

XEN_CHANNEL_DIR: Final = Path("/dev/xen-channel")
DEFAULT_DOMU_CHANNEL: Final = Path("/dev/hvc1")

P = TypeVar("P", bound=asyncio.BaseProtocol)


class ChannelError(OSError):
    """A channel path that cannot be opened (missing, wrong kind, busy, refused)."""


class _TtyTransport(asyncio.Transport):
    """A tty's fd as an asyncio transport: one file descriptor per channel.

    The channel's only fd, opened by :func:`open_channel` (pyserial's ports held two
    more pipes each, for cancelling blocking reads and writes that an event loop never
    does: five fds per domain, and ``EMFILE`` at 200 domains under ``LimitNOFILE=1024``).
    Reads are up to ``_max_read_size`` bytes per wake-up (see :meth:`_read_ready`);
    writes go out at once, the rest waits in a bytearray with asyncio's flow control
    (``pause_writing``/``resume_writing`` at the high/low-water marks). When a write
    or a read fails (EIO: the other side hung up), what the tty still holds is read and
    handed over first, then the channel is closed; the protocol's ``connection_lost``
    gets the error (a hang-up is an event, not a traceback).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: asyncio.BaseProtocol,
                 fd: int, path: str) -> None:
        super().__init__({"path": path})
        self._loop = loop
        self._protocol: Any = protocol
        self._fd = fd
        self._write_buffer = bytearray()
        self.unwritten: bytes | None = None
        """Once the channel failed or was aborted: what its write buffer still held (not
        written, and never to be), for a caller that keeps undelivered frames."""
        self._max_read_size = READ_SIZE
        self._closing = False
        self._failed = False
        """A write failed: nothing more is written, what remains is being read."""
        self._lost = False
        self._reading = True
        self._writing = False
        self._protocol_paused = False
        self._high = 64 * 1024
        self._low = 16 * 1024
        # As asyncio's transports: the protocol learns of us on the next iteration.
        loop.call_soon(protocol.connection_made, self)
        loop.call_soon(self._start)

    def _start(self) -> None:
        if self._reading and not self._closing:
            self._loop.add_reader(self._fd, self._read_ready)

    # -- reading ------------------------------------------------------------------
    def is_reading(self) -> bool:
        return self._reading and not self._closing

    def pause_reading(self) -> None:
        if self._closing or not self._reading:
            return
        self._reading = False
        self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if self._closing or self._failed or self._reading:
            return
        self._reading = True
        self._loop.add_reader(self._fd, self._read_ready)

    def _read_ready(self) -> None:
        # A tty hands out at most 4 KiB per read(2), its line discipline's buffer, which
        # the kernel refills behind our back. When a read drains a full buffer, read on
        # (without waiting for the loop) while the tty has more right now, up to the
        # read size, and hand it all over at once: one wake-up, one pass through the
        # protocol and one write per destination for up to 64 KiB instead of 4.
        # Measured on a 2-core machine (bench/bench_broker.py): broker CPU per mouse
        # move -10 %, throughput +10 %. A throttled peer (4 KiB read size) gets one read.
        fd = self._fd
        budget = self._max_read_size
        try:
            data = os.read(fd, budget)
        except BlockingIOError:
            return
        except OSError as exc:  # EIO: the other side of the pty hung up
            self._force_close(ChannelError(exc.errno, f"read failed: {exc.strerror}"))
            return
        if not data:  # epoll said readable, yet nothing: end of file
            self._force_close(ChannelError(errno.EPIPE, "channel hung up (end of file)"))
            return
        if TTY_FULL_READ <= len(data) < budget:
            chunks = [data]
            total = len(data)
            while total < budget:
                try:
                    more = os.read(fd, budget - total)
                except OSError:  # EAGAIN, or EIO: the next wake-up reports it
                    break
                if not more:  # VMIN=0: an empty read means "nothing yet"
                    break
                chunks.append(more)
                total += len(more)
                if len(more) < TTY_FULL_READ:
                    break
            data = b"".join(chunks)
        self._protocol.data_received(data)

    def _read_remaining(self) -> None:
        """Before closing on an error: hand over what the tty still holds (a peer's
        last frames, written just before it went away), at most a few reads."""
        for _ in range(16):
            try:
                data = os.read(self._fd, READ_SIZE)
            except OSError:
                return
            if not data:
                return
            self._protocol.data_received(data)
            if self._lost:
                return

    # -- writing ------------------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if self._failed or self._lost:
            # Written after the failure, before the protocol heard of it: not sent either.
            self.unwritten = (self.unwritten or b"") + bytes(data)
            return
        if self._closing:
            return
        if not self._write_buffer:
            # Write now, as asyncio's transports do.
            try:
                n = os.write(self._fd, data)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                self._write_buffer += data
                self._write_failed(exc)
                return
            if n == len(data):
                return
            data = memoryview(data)[n:]
            if not self._writing:
                self._writing = True
                self._loop.add_writer(self._fd, self._write_ready)
        self._write_buffer += data
        self._maybe_pause_protocol()

    def _write_ready(self) -> None:
        buffer = self._write_buffer
        if buffer:
            try:
                n = os.write(self._fd, buffer)
            except BlockingIOError:
                return
            except OSError as exc:
                self._write_failed(exc)
                return
            del buffer[:n]
            self._maybe_resume_protocol()
        if not buffer:
            self._writing = False
            self._loop.remove_writer(self._fd)
            if self._closing:
                self._force_close(None)

    def _write_failed(self, exc: OSError) -> None:
        # Writes stop now; what the peer sent before it went away is read on the next
        # iteration (not from inside the protocol's own write), then the channel closes.
        self._keep_unwritten()
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)
        self._failed = True
        self._loop.call_soon(self._close_after_failure, exc)

    def _keep_unwritten(self) -> None:
        if self._write_buffer:
            self.unwritten = (self.unwritten or b"") + bytes(self._write_buffer)
            self._write_buffer.clear()
        elif self.unwritten is None:
            self.unwritten = b""

    def _close_after_failure(self, exc: OSError) -> None:
        self._read_remaining()
        self._force_close(ChannelError(exc.errno, f"write failed: {exc.strerror}"))

    def get_write_buffer_size(self) -> int:
        # What a failed write kept (unwritten) never left either: counted until the
        # protocol hears of the failure, or the broker would take it as written out.
        return len(self._write_buffer) + len(self.unwritten or b"")

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self._low, self._high)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = 64 * 1024 if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        self._maybe_pause_protocol()

    def _maybe_pause_protocol(self) -> None:
        if not self._protocol_paused and len(self._write_buffer) > self._high:
            self._protocol_paused = True
            self._protocol.pause_writing()

    def _maybe_resume_protocol(self) -> None:
        if self._protocol_paused and len(self._write_buffer) <= self._low:
            self._protocol_paused = False
            self._protocol.resume_writing()

    def can_write_eof(self) -> bool:
        return False

    # -- closing ------------------------------------------------------------------
    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Close once the write buffer is out (never ``tcdrain()``: a domain that does
        not read would wedge the loop; ``abort()`` drops the buffer)."""
        if self._closing:
            return
        self._closing = True
        if self._reading:
            self._loop.remove_reader(self._fd)
        if not self._write_buffer:
            self._force_close(None)

    def abort(self) -> None:
        self._force_close(None)

    def _force_close(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = self._closing = True
        self._keep_unwritten()
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        self._loop.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc: Exception | None) -> None:
        try:
            self._protocol.connection_lost(exc)
        finally:
            os.close(self._fd)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol  # type: ignore[no-any-return]

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol


def _open_tty(path: str, *, exclusive: bool) -> int:
    """The tty at ``path``, non-blocking, raw (no echo, no line discipline, 8 bits,
    no flow control; VMIN=0 so an empty read is "nothing yet"), locked with
    ``flock`` when ``exclusive``. Its input is not flushed: what a domain wrote before
    the channel was (re)opened is read. Raises :class:`ChannelError`."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ChannelError(exc.errno, exc.strerror or str(exc), path) from None
    try:
        if exclusive:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # our words and the holder
                raise ChannelError(errno.EBUSY, busy_message(path), path) from None
        try:
            attrs = termios.tcgetattr(fd)
        except termios.error:
            raise ChannelError(errno.ENOTTY, "not a tty", path) from None
        iflag, oflag, cflag, lflag, _, _, cc = attrs
        iflag &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
                   | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON
                   | termios.IXOFF | termios.IXANY | termios.INPCK)
        oflag &= ~termios.OPOST
        lflag &= ~(termios.ECHO | termios.ECHOE | termios.ECHOK | termios.ECHONL
                   | termios.ICANON | termios.ISIG | termios.IEXTEN)
        cflag &= ~(termios.CSIZE | termios.PARENB | termios.CSTOPB | termios.CRTSCTS)
        cflag |= termios.CS8 | termios.CREAD | termios.CLOCAL
        cc = list(cc)
        cc[termios.VMIN] = 0
        cc[termios.VTIME] = 0
        speed = termios.B115200
        termios.tcsetattr(fd, termios.TCSANOW, [iflag, oflag, cflag, lflag, speed, speed, cc])
    except BaseException:
        os.close(fd)
        raise
    return fd


REMAINING_MAX: Final = 256 * 1024
"""At most this much is read from a failed channel before it closes (a unix socket's
receive buffer holds about 200 KiB)."""


def read_remaining(transport: asyncio.BaseTransport) -> bytes:
    """What a unix socket transport's peer sent that was not read yet, read now.

    Call it from ``connection_lost`` (asyncio closes the socket after it returns):
    when a write fails (``EPIPE``: the peer closed) asyncio closes the transport at
    once, and the frames the peer sent just before closing would be lost unread. Reads
    without blocking, at most :data:`REMAINING_MAX` bytes; ``b""`` for a transport that
    is not a socket (the tty transport reads what remains itself)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return b""
    fd = sock.fileno()
    if fd < 0:
        return b""
    chunks: list[bytes] = []
    total = 0
    while total < REMAINING_MAX:
        try:
            data = os.read(fd, min(READ_SIZE, REMAINING_MAX - total))
        except OSError:  # EAGAIN: nothing more; ECONNRESET: nothing left
            break
        if not data:
            break
        chunks.append(data)
        total += len(data)
    return b"".join(chunks)


def channel_kind(path: str | os.PathLike[str]) -> str:
    """``"tty"`` or ``"socket"``; raises :class:`ChannelError` for anything else."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ChannelError(errno.ENOENT, "no such channel", str(path)) from None
    except OSError as exc:
        raise ChannelError(exc.errno, exc.strerror, str(path)) from None
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode):
        return "tty"
    raise ChannelError(errno.EINVAL, "not a tty nor a unix socket", str(path))


async def open_channel(path: str | os.PathLike[str], protocol_factory: Callable[[], P], *,
                       exclusive: bool = False) -> tuple[asyncio.Transport, P]:
    """Connect ``protocol_factory()`` to the channel at ``path`` (tty or unix socket).

    A tty is put in raw mode (no echo, no line discipline, 8 bits), and with
    ``exclusive`` locked so that a second reader fails instead of stealing bytes.
    Raises :class:`ChannelError`.
    """
    kind = channel_kind(path)
    loop = asyncio.get_running_loop()
    if kind == "socket":
        try:
            transport, protocol = await loop.create_unix_connection(protocol_factory, str(path))
        except OSError as exc:
            raise ChannelError(exc.errno, exc.strerror or str(exc), str(path)) from None
        return transport, protocol
    fd = _open_tty(str(path), exclusive=exclusive)
    try:
        protocol = protocol_factory()
        tty_transport = _TtyTransport(loop, protocol, fd, str(path))
    except BaseException:
        os.close(fd)
        raise
    return tty_transport, protocol


def domu_channel_path(name: str | None = None) -> Path:
    """The DomU side of the channel: ``/dev/xen-channel/<name>`` when named (as
    xen-pv-channel(7) recommends), else ``/dev/hvc1`` (the spec)."""
    if name:
        return XEN_CHANNEL_DIR / name
    return DEFAULT_DOMU_CHANNEL
