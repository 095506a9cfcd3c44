"""Who holds a busy channel: the text of the "one reader at a time" error.

A tty channel is opened with an exclusive ``flock`` (a second reader would steal
bytes). When that lock is taken, the operator wants to know by whom: the lock's owner
is in ``/proc/locks`` (``FLOCK ADVISORY WRITE <pid> <major>:<minor>:<inode>``), and
failing that (a lock taken in another pid namespace shows no usable pid) any process
whose ``/proc/<pid>/fd`` points at the same inode, among those we may read. Both are
best effort: Linux only, and only what our permissions show; the message says so when
it cannot name anyone.
"""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")


def _command_line(pid: int) -> str:
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return ""
    words = [w.decode(errors="replace") for w in raw.split(b"\0") if w]
    if not words:
        try:
            return (PROC / str(pid) / "comm").read_text().strip()
        except OSError:
            return ""
    if os.path.basename(words[0]).startswith("python"):
        # "python3 /usr/bin/messagerie listen" or "python3 -I -m messagerie.cli listen":
        # what runs is the script or the module, not the interpreter.
        rest = words[1:]
        while rest and rest[0].startswith("-") and rest[0] not in ("-m", "-c"):
            rest = rest[1:]
        if rest[:1] == ["-m"] and len(rest) > 1:
            words = rest[1:]
        elif rest and not rest[0].startswith("-"):
            words = rest
    words[0] = os.path.basename(words[0])
    line = " ".join(words)
    return line if len(line) <= 80 else line[:77] + "..."


def _lock_owners(st: os.stat_result) -> list[int]:
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        lines = (PROC / "locks").read_text().splitlines()
    except OSError:
        return []
    owners = []
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 00:19:7 0 EOF" (blocked waiters have "->")
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == wanted \
                and fields[4].isdigit() and int(fields[4]) > 0:
            owners.append(int(fields[4]))
    return owners


def _fd_holders(st: os.stat_result) -> list[int]:
    me = os.getpid()
    holders = []
    try:
        pids = [int(p.name) for p in PROC.iterdir() if p.name.isdigit()]
    except OSError:
        return []
    for pid in sorted(pids):
        if pid == me:
            continue
        try:
            fds = list((PROC / str(pid) / "fd").iterdir())
        except OSError:  # not ours to read, or gone
            continue
        for fd in fds:
            try:
                other = os.stat(fd)
            except OSError:
                continue
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                holders.append(pid)
                break
    return holders


def channel_holders(path: str | os.PathLike[str]) -> list[tuple[int, str]]:
    """``(pid, command line)`` of the processes that hold ``path``: the owner of its
    lock if ``/proc/locks`` names one, else every process with it open that we may
    see. Empty when nobody can be named."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    pids = [p for p in _lock_owners(st) if p != os.getpid()] or _fd_holders(st)
    return [(pid, _command_line(pid)) for pid in dict.fromkeys(pids)]


def busy_message(path: str | os.PathLike[str]) -> str:
    """``busy: held by pid 1234 (messagerie listen); ...``: the one-reader error."""
    holders = channel_holders(path)
    if holders:
        who = ", ".join(f"pid {pid} ({cmd})" if cmd else f"pid {pid}" for pid, cmd in holders)
        return f"busy: held by {who}; a channel has one reader at a time"
    return ("busy: another process holds it (not one we may see); a channel has one "
            "reader at a time")

