"""The broker with a spool, as users start it, and what the spool tests do to its
domains: take one down (its socat killed) and bring it back on the same paths, send it
numbered frames and commands, read what is spooled for it (``messagerie status``);
domains found by socket discovery that go away and come back under the same name.

:func:`spool_system` starts the broker with a real SQLite spool and quick
reconnection; the rest works on a :class:`~.broker_process.BrokerSystem`.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .broker_process import CLI, BrokerSystem
from .peers import Domu, QemuSocket
from .waiting import wait_until

RECONNECT = "[reconnexion]\nmin = 0.05\nmax = 0.2\n"
"""A domain that comes back is found again within 0.2 s (the default backoff reaches 5 s
while it is down)."""


def spool_system(tmp: Path, names: tuple[str, ...] = ("vm-a", "vm-b", "vm-c"), *,
                 spool_file: Path | None = None, spool_keys: str = "", extra: str = "",
                 wait_connected: bool = True, **kw: Any) -> BrokerSystem:
    """A :class:`BrokerSystem` on ``names`` whose spool is ``spool_file``
    (``tmp/spool.sqlite3`` unless given), with ``spool_keys`` more lines of its
    ``[spool]`` section, ``extra`` more configuration after it and :data:`RECONNECT`;
    every domain connected before it returns unless ``wait_connected=False``. Other
    keywords go to :class:`BrokerSystem`."""
    chemin = spool_file or tmp / "spool.sqlite3"
    return BrokerSystem(tmp, names, wait_connected=wait_connected, extra=(
        RECONNECT + f'[spool]\nchemin = "{chemin}"\n' + spool_keys + extra), **kw)


def frame(src: str, dst: str, i: int) -> bytes:
    """Test notification number ``i`` as one frame."""
    # Sizes vary (a few bytes to ~1 KiB) so that frames cross write boundaries.
    body = {"type": "notification", "source": src, "destination": dst,
            "payload": {"categorie": "test", "evenement": "seq",
                        "data": {"i": i, "pad": "x" * (i * 37 % 1000)}}}
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


def cmd(src: str, dst: str, id: str) -> dict[str, object]:
    """A ``liste_disques`` command (a dict for :meth:`Domu.send`)."""
    return {"type": "commande", "source": src, "destination": dst,
            "payload": {"id": id, "commande": "liste_disques", "arguments": {}}}


def answers(domu: Domu, n: int) -> dict[str, Any]:
    """The first ``n`` answers ``domu`` got, by command id."""
    got = domu.wait_messages(n, timeout=10)
    return {m.payload["id"]: m.payload for m in got if m.type == "reponse"}


def status(system: BrokerSystem) -> dict[str, Any]:
    """The broker's statistics, as ``messagerie status --json`` tells them."""
    out = subprocess.run([str(CLI), "--path", str(system.dom0_socket), "status", "--json"],
                         capture_output=True, text=True, timeout=20, check=True).stdout
    stats: dict[str, Any] = json.loads(out)["statistiques"]
    return stats


def spooled(system: BrokerSystem, name: str) -> int:
    """How many messages are spooled for domain ``name``."""
    depth: int = status(system)["domaines"][name]["spool"]["messages"]
    return depth


def reconnect(system: BrokerSystem, name: str) -> Domu:
    """Start the domain's socat again on the same paths; its new DomU end."""
    system.pairs[name].start()
    domu = Domu(system.pairs[name].domu)
    system.domus[name] = domu  # closed with the system
    return domu


def kill(system: BrokerSystem, name: str) -> None:
    """SIGKILL the domain's socat and remove the links it leaves: a stale link would
    lead the broker's retries to the next pty the kernel hands out under that number
    (another domain's)."""
    pair = system.pairs[name]
    pair.kill()
    for link in (pair.dom0, pair.domu):
        link.unlink(missing_ok=True)


def down(system: BrokerSystem, name: str) -> None:
    """Kill the domain's socat (its channel hangs up) and wait until the broker saw it."""
    before = len(system.broker.find("domain.disconnected", domain=name))
    kill(system, name)
    wait_until(lambda: len(system.broker.find("domain.disconnected", domain=name)) > before,
               what=f"{name} disconnected")


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs of its own at ``path`` (``mount -o OPTIONS``): a real read-only or small
    file system. Mounting needs root (sudo otherwise, as the package test does)."""
    path.mkdir(parents=True, exist_ok=True)
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    subprocess.run([*sudo, "mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                   check=True, capture_output=True, timeout=30)
    try:
        yield path
    finally:
        subprocess.run([*sudo, "umount", "-l", str(path)], check=False, timeout=30)


# -- domains found by socket discovery, that go and come back ----------------------------

def system_with_discovery(tmp: Path, extra: str = "") -> BrokerSystem:
    """:func:`spool_system` on vm-a (a pty) that also discovers the sockets
    ``tmp/run/*-msg.sock`` (rescanned every 0.1 s); its spool in ``tmp/state``."""
    sockets = tmp / "run"
    sockets.mkdir()
    return spool_system(tmp, ("vm-a",), spool_file=tmp / "state" / "spool.sqlite3", extra=(
        f'[decouverte]\nmotifs = ["{sockets}/*-msg.sock"]\nintervalle = 0.1\n' + extra))


def appear(s: BrokerSystem, name: str, count: int = 1) -> QemuSocket:
    """Domain ``name`` appears: its socket is created in the discovered directory and
    the broker connects to it (its ``count``-th connection)."""
    domu = QemuSocket(s.tmp / "run" / f"{name}-msg.sock")
    domu.accept()
    s.broker.wait_event("domain.connected", domain=name, count=count)
    return domu


def leave(s: BrokerSystem, domu: QemuSocket, name: str, count: int = 1) -> None:
    """The domain goes: its end closes and its socket file is removed."""
    domu.close()
    s.broker.wait_event("domain.departed", domain=name, count=count)


def domain_stats(s: BrokerSystem, name: str) -> dict[str, Any] | None:
    """The statistics of domain ``name``; None once the broker has forgotten it."""
    d: dict[str, Any] | None = status(s)["domaines"].get(name)
    return d
