"""Channel transports: the two kinds of path a pv-channel shows up as.

* a tty (``/dev/hvc1`` in a DomU; a pty in dom0 with Xen's ``connection=pty``; a socat
  pty in tests), opened with pyserial-asyncio in raw mode;
* a unix socket (Xen's ``connection=socket``: QEMU listens, we connect; also the
  broker's dom0 socket).

Both give an :class:`asyncio.Transport`-like object (``write``, ``close``,
``pause_reading``/``resume_reading``, write-buffer limits) bound to the caller's
:class:`asyncio.Protocol`, so everything above this module is transport-agnostic.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TypeVar

import serial
import serial_asyncio

from .holders import busy_message, is_busy

READ_SIZE: Final = 64 * 1024
"""Bytes read per wake-up on a tty. pyserial-asyncio reads 1 KiB by default, which
costs one loop iteration per ~5 mouse moves and halves throughput on a pty."""

TTY_FULL_READ: Final = 3 * 1024
"""A tty read at least this long probably emptied the 4 KiB line-discipline buffer with
more behind it: read again at once (see ``_SerialTransport._read_ready``)."""

XEN_CHANNEL_DIR: Final = Path("/dev/xen-channel")
DEFAULT_DOMU_CHANNEL: Final = Path("/dev/hvc1")

P = TypeVar("P", bound=asyncio.BaseProtocol)


class ChannelError(OSError):
    """A channel path that cannot be opened (missing, wrong kind, busy, refused)."""


class _NonBlockingSerial(serial.Serial):
    """pyserial's port, written one system call at a time.

    pyserial's ``write`` retries forever on EAGAIN when non-blocking (a busy loop that
    would wedge the event loop on a full tty). The asyncio transport only calls us when
    the fd is ready, and reads the fd itself (``_SerialTransport._read_ready``).
    """

    def flush(self) -> None:
        # tcdrain() blocks until the other side has read everything: a domain that
        # stopped reading would wedge the event loop when its channel closes.
        pass

    def _reset_input_buffer(self) -> None:
        # pyserial flushes the tty's input when it opens the port: whatever the
        # domain wrote before we (re)opened its channel would be lost. Keep it.
        pass

    def write(self, data: bytes, /) -> int:  # type: ignore[override]
        assert self.fd is not None
        try:
            return os.write(self.fd, data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise serial.SerialException(f"write failed: {exc}") from exc


class _SerialTransport(serial_asyncio.SerialTransport):  # type: ignore[misc]
    """pyserial-asyncio's transport with 64 KiB reads, immediate writes and an O(1)
    write buffer.

    Upstream reads 1 KiB per wake-up, defers every write to the next loop iteration,
    and keeps a list of chunks whose lengths it sums on every ``write`` (twice): with
    a slow reader and small messages that is quadratic. Here the buffer is a
    bytearray, as in asyncio's own transports.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: asyncio.BaseProtocol,
                 serial_instance: serial.Serial) -> None:
        super().__init__(loop, protocol, serial_instance)
        self._write_buffer = bytearray()
        self._max_read_size = READ_SIZE

    def get_write_buffer_size(self) -> int:
        return len(self._write_buffer)

    def _read_ready(self) -> None:
        # A tty hands out at most 4 KiB per read(2), its line discipline's buffer, which
        # the kernel refills behind our back. When a read drains a full buffer, read on
        # (without waiting for the loop) while the tty has more right now, up to the
        # read size, and hand it all over at once: one wake-up, one pass through the
        # protocol and one write per destination for up to 64 KiB instead of 4.
        # Measured on a 2-core machine (bench/bench_broker.py): broker CPU per mouse
        # move -10 %, throughput +10 %. A throttled peer (4 KiB read size) gets one read.
        fd = self._serial.fd
        budget = self._max_read_size
        try:
            data = os.read(fd, budget)
        except BlockingIOError:
            return
        except OSError as exc:  # EIO: the other side of the pty hung up
            self._close(exc=serial.SerialException(f"read failed: {exc}"))
            return
        if not data:  # epoll said readable, yet nothing: end of file
            self._close(exc=serial.SerialException("channel hung up (end of file)"))
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

    def _fatal_error(self, exc: BaseException, message: str = "") -> None:
        # A hung-up channel (EIO) is an event, not a bug: close and let the protocol's
        # connection_lost() report it, instead of the loop's "Fatal error" traceback.
        self._abort(exc)

    def write(self, data: bytes) -> None:
        if self._closing or not data:
            return
        if not self._write_buffer:
            # Write now, as asyncio's transports do: upstream always defers to the
            # next loop iteration, which costs two epoll_ctl calls per message.
            try:
                n = self._serial.write(data)
            except serial.SerialException as exc:
                self._fatal_error(exc, "Fatal write error on serial transport")
                return
            if n == len(data):
                return
            data = data[n:]
            self._ensure_writer()
        self._write_buffer += data
        self._maybe_pause_protocol()

    def _write_ready(self) -> None:
        buffer = self._write_buffer
        if not buffer:
            self._remove_writer()
            return
        try:
            n = self._serial.write(buffer)
        except serial.SerialException as exc:
            buffer.clear()
            self._fatal_error(exc, "Fatal write error on serial transport")
            return
        if n:
            del buffer[:n]
        self._maybe_resume_protocol()
        if not buffer:
            self._remove_writer()
            if self._closing:
                self._close()


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

    A tty is put in raw mode (no echo, no line discipline, 8 bits) by pyserial, and
    with ``exclusive`` locked so that a second reader fails instead of stealing bytes.
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
    try:
        port = _NonBlockingSerial(str(path), baudrate=115200, exclusive=exclusive or None)
    except (serial.SerialException, OSError) as exc:
        if is_busy(exc):  # our words and the holder, not pyserial's "Could not lock"
            raise ChannelError(errno.EBUSY, busy_message(path), str(path)) from None
        raise ChannelError(getattr(exc, "errno", None) or errno.EIO, str(exc), str(path)) \
            from None
    try:
        protocol = protocol_factory()
        tty_transport: Any = _SerialTransport(loop, protocol, port)
    except BaseException:
        port.close()
        raise
    return tty_transport, protocol


def domu_channel_path(name: str | None = None) -> Path:
    """The DomU side of the channel: ``/dev/xen-channel/<name>`` when named (as
    xen-pv-channel(7) recommends), else ``/dev/hvc1`` (the spec)."""
    if name:
        return XEN_CHANNEL_DIR / name
    return DEFAULT_DOMU_CHANNEL
