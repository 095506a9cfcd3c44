"""The DomU's channel holder (systemd/messagerie-canal and its unit), on a pty: it
makes the device raw, says READY=1 like a Type=notify service, and what the other end
writes meanwhile waits unechoed for the next reader. The same on a real hvc:
tests/guest/test_guest_channel.py."""

from __future__ import annotations

import os
import re
import select
import shutil
import socket
import subprocess
import sys
import termios
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HOLDER = ROOT / "systemd" / "messagerie-canal"
UNIT = ROOT / "systemd" / "messagerie-canal@.service"
ANALYZE = shutil.which("systemd-analyze")

pytestmark = pytest.mark.integration  # a pty, a notify socket, the holder as a process


def test_holder_makes_the_channel_raw_and_keeps_it(tmp_path: Path) -> None:
    master, slave = os.openpty()
    device = os.ttyname(slave)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(30)
    holder = subprocess.Popen([sys.executable, str(HOLDER), device],
                              env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")})
    try:
        assert notify.recv(4096).startswith(b"READY=1\nSTATUS=holding ")
        os.close(slave)  # the test's descriptor: the holder's keeps the settings
        app = os.open(device, os.O_RDWR | os.O_NOCTTY)
        _, oflag, _, lflag, *_ = termios.tcgetattr(app)
        assert not lflag & (termios.ECHO | termios.ICANON) and not oflag & termios.OPOST
        os.write(master, b'{"sent":"while the application was away"}\n')
        assert os.read(app, 4096) == b'{"sent":"while the application was away"}\n'
        os.write(app, b"fin\n")  # the sentinel: anything echoed would come before it
        got = b""
        while not got.endswith(b"fin\n"):
            assert select.select([master], [], [], 10)[0], got
            got += os.read(master, 4096)
        assert got == b"fin\n"
        os.close(app)
    finally:
        holder.terminate()
        assert holder.wait(10) == 0
        os.close(master)
        notify.close()


def test_holder_reports_a_missing_device(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(HOLDER), str(tmp_path / "hvc9")],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 1
    assert "No such file or directory" in done.stderr


def test_unit_verifies(tmp_path: Path) -> None:
    assert ANALYZE is not None, "systemd-analyze is required (.ci/system-deps installs it)"
    text, count = re.subn(r"^ExecStart=\S+", f"ExecStart={sys.executable}", UNIT.read_text(),
                          flags=re.M)
    assert count == 1
    (tmp_path / UNIT.name).write_text(text)
    instance = tmp_path / "messagerie-canal@dev-hvc1.service"
    done = subprocess.run([str(ANALYZE), "verify", str(instance)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr
