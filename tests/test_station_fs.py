"""messagerie.station.fs: hostile names never lead out of their root."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from messagerie.station import fs


@pytest.fixture
def root(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    disk = tmp_path / "disk"
    (disk / "docs").mkdir(parents=True)
    (disk / "docs/a.txt").write_bytes(b"a")
    (disk / "top.txt").write_bytes(b"top")
    (disk / "lien").symlink_to(outside)                 # a directory link
    (disk / "fuite").symlink_to(outside / "secret")     # a file link
    (disk / "docs/rel").symlink_to("../../outside")     # a relative one, deeper
    os.mkfifo(disk / "tube")
    return disk


def read(root: Path, rel: str) -> bytes:
    with os.fdopen(fs.open_file(root, rel), "rb") as f:
        return f.read()


def test_reads_beneath_the_root(root: Path) -> None:
    assert read(root, "docs/a.txt") == b"a"
    assert fs.digest(root, "top.txt") == (hashlib.sha256(b"top").hexdigest(), 3)


@pytest.mark.parametrize("rel", ["../outside/secret", "docs/../../outside/secret", "/etc/passwd",
                                 "", "docs//a.txt", "./top.txt", "docs/a.txt/", "a\x00b"])
def test_names_that_leave_are_refused(root: Path, rel: str) -> None:
    with pytest.raises(fs.UnsafePath):
        fs.open_file(root, rel)


@pytest.mark.parametrize("rel", ["lien/secret", "fuite", "docs/rel/secret", "tube", "docs"])
def test_links_and_non_files_are_refused(root: Path, rel: str) -> None:
    with pytest.raises((fs.UnsafePath, IsADirectoryError)):
        fs.open_file(root, rel)


def test_writing_never_follows_a_link(root: Path) -> None:
    with pytest.raises(fs.UnsafePath):
        fs.write_file(root, "lien/secret", b"overwritten")
    with pytest.raises(fs.UnsafePath):
        fs.write_file(root, "fuite", b"overwritten")
    assert (root.parent / "outside/secret").read_bytes() == b"secret"
    fs.write_file(root, "new/dir/b.txt", b"b")           # directories made beneath
    assert (root / "new/dir/b.txt").read_bytes() == b"b"


def test_remove_deletes_files_only(root: Path) -> None:
    with pytest.raises(fs.UnsafePath):
        fs.remove(root, "fuite")          # a link is not a file of the disk
    with pytest.raises(fs.UnsafePath):
        fs.remove(root, "lien/secret")
    assert (root.parent / "outside/secret").exists()
    with pytest.raises(FileNotFoundError):
        fs.remove(root, "absent")
    fs.remove(root, "docs/a.txt")
    assert not (root / "docs/a.txt").exists()


def test_listing_leaves_out_links_and_is_bounded(root: Path) -> None:
    assert fs.list_files(root) == ["docs/a.txt", "top.txt"]
    assert fs.list_files(root, max_files=1) == ["docs/a.txt"]
    assert fs.list_files(root, max_depth=1) == ["top.txt"]


def test_digest_stops_at_the_size_cap(root: Path) -> None:
    (root / "big").write_bytes(b"x" * 100)
    with pytest.raises(fs.UnsafePath):
        fs.digest(root, "big", max_size=99)
