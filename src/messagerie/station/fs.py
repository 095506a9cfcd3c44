"""Files beneath a root, safe against hostile names: every path a peer sends is opened
one component at a time with ``O_NOFOLLOW`` from a directory descriptor of the root, so
neither ``..`` nor a symbolic link anywhere on the way can lead out of it (a stick's
content is hostile by assumption, its names too). Blocking, no asyncio: the services
run these calls in a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Final

CHUNK: Final = 32 * 1024
"""Bytes per transfer message: 32 KiB is 44 KiB of base64, well under a 64 KiB frame."""
MAX_FILE: Final = 64 * 1024 * 1024
"""Largest file read from a disk or into the store, by default."""
MAX_FILES: Final = 10_000
"""Most files listed on one disk (a stick of a million empty files stays bounded)."""
MAX_DEPTH: Final = 16
"""Deepest directory listed."""

_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePath(ValueError):
    """A path that would leave its root, or names something other than a file."""


def _parts(rel: str) -> list[str]:
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts) \
            or "\x00" in rel:
        raise UnsafePath(f"{rel[:80]!r} is not a relative path without '..'")
    return parts


@contextlib.contextmanager
def directory(root: Path, rel_parts: list[str], *, create: bool = False) -> Iterator[int]:
    """A descriptor of directory ``root/rel_parts...``, reached without following any
    symbolic link (``create``: making missing directories)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in rel_parts:
            try:
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(part, 0o755, dir_fd=fd)
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:  # ELOOP, ENOTDIR: a link or a file on the way
                raise UnsafePath(f"{part!r} is not a directory") from exc
            os.close(fd)
            fd = nfd
        yield fd
    finally:
        os.close(fd)


def open_file(root: Path, rel: str, *, write: bool = False, create_dirs: bool = False) -> int:
    """A descriptor of the regular file ``root/rel`` (read, or written truncated)."""
    parts = _parts(rel)
    with directory(root, parts[:-1], create=create_dirs) as dfd:
        flags = (os.O_WRONLY | os.O_CREAT | os.O_TRUNC) if write else os.O_RDONLY
        try:
            fd = os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                         0o644, dir_fd=dfd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # a symbolic link
                raise UnsafePath(f"{rel[:80]!r} is a symbolic link") from exc
            raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafePath(f"{rel[:80]!r} is not a regular file")
    os.set_blocking(fd, True)
    return fd


def remove(root: Path, rel: str) -> None:
    """Delete the regular file ``root/rel`` (``FileNotFoundError`` when absent)."""
    parts = _parts(rel)
    with directory(root, parts[:-1]) as dfd:
        st = os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePath(f"{rel[:80]!r} is not a regular file")
        os.unlink(parts[-1], dir_fd=dfd)


def rename_into(src: Path, root: Path, rel: str) -> None:
    """Move file ``src`` to ``root/rel`` (same file system), making its directories."""
    parts = _parts(rel)
    with directory(root, parts[:-1], create=True) as dfd:
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                raise UnsafePath(f"{rel[:80]!r} exists and is not a regular file")
        os.rename(src, parts[-1], dst_dir_fd=dfd)


def write_file(root: Path, rel: str, data: bytes) -> None:
    fd = open_file(root, rel, write=True, create_dirs=True)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def digest(root: Path, rel: str, max_size: int = MAX_FILE) -> tuple[str, int]:
    """The SHA-256 (hex) and size of ``root/rel``, read beneath ``root``."""
    fd = open_file(root, rel)
    h = hashlib.sha256()
    size = 0
    with os.fdopen(fd, "rb") as f:
        while block := f.read(CHUNK):
            size += len(block)
            if size > max_size:
                raise UnsafePath(f"{rel[:80]!r} is larger than {max_size} bytes")
            h.update(block)
    return h.hexdigest(), size


def list_files(root: Path, *, max_files: int = MAX_FILES, max_depth: int = MAX_DEPTH
               ) -> list[str]:
    """The regular files beneath ``root`` as sorted relative paths; symbolic links,
    devices and what is deeper than ``max_depth`` are left out, and the list stops at
    ``max_files``."""
    found: list[str] = []

    def walk(fd: int, prefix: str, depth: int) -> None:
        with os.scandir(fd) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if len(found) >= max_files:
                    return
                rel = f"{prefix}{entry.name}"
                if "\n" in entry.name or "\x00" in entry.name:
                    continue
                if entry.is_file(follow_symlinks=False):
                    found.append(rel)
                elif entry.is_dir(follow_symlinks=False) and depth < max_depth:
                    try:
                        sub = os.open(entry.name, _DIR_FLAGS, dir_fd=fd)
                    except OSError:
                        continue
                    try:
                        walk(sub, rel + "/", depth + 1)
                    finally:
                        os.close(sub)

    with directory(root, []) as top:
        walk(top, "", 1)
    return found
