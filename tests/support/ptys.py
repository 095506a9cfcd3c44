"""socat pty pairs standing in for Xen pv-channels: one end for dom0 (the broker's, or
a test playing the broker), one for the DomU (the client's, or a test playing it)."""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .waiting import wait_until

SOCAT = shutil.which("socat")


class PtyPair:
    """``socat pty,raw,echo=0,link=NAME.dom0 pty,raw,echo=0,link=NAME.domu`` in
    ``directory``. Started on construction unless ``start=False``; :meth:`start` returns
    once both links exist and can be called again after :meth:`kill` or :meth:`stop`
    (a domain restarted on the same paths)."""

    def __init__(self, directory: Path, name: str = "chan", *, start: bool = True) -> None:
        assert SOCAT, "socat is required (apt-get install -y socat)"
        self.name = name
        self.dom0 = directory / f"{name}.dom0"
        self.domu = directory / f"{name}.domu"
        self.proc: subprocess.Popen[bytes] | None = None
        if start:
            self.start()

    def start(self) -> PtyPair:
        assert SOCAT
        for p in (self.dom0, self.domu):
            if p.is_symlink():
                p.unlink()
        self.proc = subprocess.Popen(
            [SOCAT, f"pty,raw,echo=0,link={self.dom0}", f"pty,raw,echo=0,link={self.domu}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: self.dom0.exists() and self.domu.exists(),
                       what=f"socat {self.name}")
        except BaseException:  # a timeout, or a benchmark stopped by a signal meanwhile
            self.kill()
            raise
        return self

    def kill(self) -> None:
        """Hang up at once (SIGKILL): a domain destroyed. The links may stay behind."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        """Hang up cleanly (SIGTERM) and wait until socat has removed its links."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        wait_until(lambda: not self.dom0.is_symlink() and not self.domu.is_symlink(),
                   what=f"socat {self.name} links removed")


@contextmanager
def pty_pairs(directory: Path, names: list[str]) -> Iterator[dict[str, PtyPair]]:
    """One started pair per name, killed on the way out."""
    made: dict[str, PtyPair] = {}
    try:
        for n in names:
            made[n] = PtyPair(directory, n)
        yield made
    finally:
        for p in made.values():
            p.kill()
