"""The harness itself, in one short boot (a shell, no Python): the command's exit
status comes back, channels are /dev/hvc1, hvc2... in order with their Xen names, a
shared directory is writable, the kernel is Debian's, and a fresh hvc starts with echo
and canonical mode on (the defaults docs/xen.md is about)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from guestvm import Channel

pytestmark = [pytest.mark.guest, pytest.mark.integration, pytest.mark.slow,
              pytest.mark.timeout(600)]

CHECKS = r"""
set -e
test "$(readlink /dev/xen-channel/org.messagerie.0)" = /dev/hvc1
test "$(readlink /dev/xen-channel/second)" = /dev/hvc2
test -c /dev/hvc2
stty -a </dev/hvc1 >"$OUT/stty"
uname -r >"$OUT/uname"
exit 7
"""


def test_status_channels_and_shares(run_in_guest: Callable[..., int], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    channels = [Channel(tmp_path / "a.sock", "org.messagerie.0"),
                Channel(tmp_path / "b.sock", "second")]
    status = run_in_guest(["sh", "-c", CHECKS], channels, shares=[out],
                          env={"OUT": str(out), "PATH": "/usr/bin:/bin"})
    assert status == 7, "the command's own exit status"
    stty = (out / "stty").read_text().split()
    assert {"echo", "icanon", "icrnl", "onlcr"} <= set(stty)
    assert (out / "uname").read_text().strip().endswith("-amd64")
    assert not (tmp_path / "a.sock").exists(), "the harness removes its sockets"
