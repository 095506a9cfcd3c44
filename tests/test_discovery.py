"""Discovery by pattern: ``scan()`` over real files and unix sockets."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.discovery import name_from_path, scan


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    held: list[socket.socket] = []
    yield held
    for sock in held:
        sock.close()


def bind(path: Path, held: list[socket.socket]) -> str:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()
    held.append(sock)
    return str(path)


def test_name_from_path() -> None:
    assert name_from_path("/var/run/*-msg.sock", "/var/run/vm-sys-usb-msg.sock") == "vm-sys-usb"
    assert name_from_path("/x/*", "/x/vm-ui") == "vm-ui"
    assert name_from_path("/x/msg-*", "/x/msg-vm.1") == "vm.1"
    assert name_from_path("/x/*.sock", "/x/.sock") == ""


@pytest.mark.integration
def test_scan_sockets_and_files(tmp_path: Path, sockets: list[socket.socket]) -> None:
    usb = bind(tmp_path / "vm-sys-usb-msg.sock", sockets)
    ui = bind(tmp_path / "vm-ui-msg.sock", sockets)
    plain = tmp_path / "vm-plain-msg.sock"
    plain.write_text("")  # a plain file still matches: connecting will tell
    (tmp_path / "other.sock").write_text("")
    (tmp_path / "vm-x-msg.sock.bak").write_text("")
    found, rejected = scan([str(tmp_path / "*-msg.sock")])
    assert found == {"vm-plain": str(plain), "vm-sys-usb": usb, "vm-ui": ui}
    assert rejected == []


def test_scan_nothing(tmp_path: Path) -> None:
    assert scan([str(tmp_path / "*-msg.sock")]) == ({}, [])
    assert scan([str(tmp_path / "absent" / "*-msg.sock")]) == ({}, [])
    assert scan([]) == ({}, [])


@pytest.mark.integration
def test_invalid_names_rejected(tmp_path: Path, sockets: list[socket.socket]) -> None:
    good = bind(tmp_path / "vm-a-msg.sock", sockets)
    bad = []
    for stem in ("dom0", "tous", "vm a", "-vm", "", "a" * 65, "vm#1"):
        path = tmp_path / f"{stem}-msg.sock"
        path.write_text("")
        bad.append(str(path))
    found, rejected = scan([str(tmp_path / "*-msg.sock")])
    assert found == {"vm-a": good}
    assert rejected == sorted(bad)


@pytest.mark.integration
def test_first_pattern_wins(tmp_path: Path, sockets: list[socket.socket]) -> None:
    first = tmp_path / "first"
    second = tmp_path / "second"
    first.mkdir()
    second.mkdir()
    a1 = bind(first / "vm-a-msg.sock", sockets)
    a2 = bind(second / "vm-a.sock", sockets)
    b2 = bind(second / "vm-b.sock", sockets)
    found, _ = scan([str(first / "*-msg.sock"), str(second / "*.sock")])
    assert found == {"vm-a": a1, "vm-b": b2}
    found, _ = scan([str(second / "*.sock"), str(first / "*-msg.sock")])
    assert found == {"vm-a": a2, "vm-b": b2}


def test_sorted(tmp_path: Path) -> None:
    names = ["vm-c", "vm-a", "vm-b", "alpha", "zeta"]
    for name in names:
        (tmp_path / f"{name}.sock").write_text("")
    found, _ = scan([str(tmp_path / "*.sock")])
    assert list(found) == sorted(names)
    assert list(found.values()) == sorted(str(tmp_path / f"{n}.sock") for n in names)

