"""The broker started as users start it: ``messagerie-broker --config FILE``, its
console script, as a subprocess; its JSON log events read from its stdout.

:class:`BrokerSystem` puts it together with domains on socat ptys and their DomU ends.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from .peers import Domu
from .process import LoggedProcess
from .ptys import PtyPair
from .waiting import wait_until

BIN = Path(sys.executable).parent
BROKER = BIN / "messagerie-broker"
CLI = BIN / "messagerie"


class BrokerProcess(LoggedProcess):
    """``messagerie-broker --config FILE`` as a subprocess; its JSON log events are
    collected from stdout by a thread. ``command`` starts the broker (the benchmarks
    run another source tree's, to compare two commits in one run)."""

    def __init__(self, config: Path, *args: str, env: dict[str, str] | None = None,
                 command: Sequence[str] = (str(BROKER),)) -> None:
        self.config = config
        super().__init__([*command, "--config", str(config), *args], env=env)

    def wait_ready(self, timeout: float = 10.0) -> None:
        """``broker.ready``: the dom0 socket listens and every channel had its first
        attempt. Fails at once, with the output, if the broker exits instead."""
        wait_until(lambda: self.find("broker.ready") or self.proc.poll() is not None,
                   timeout, lambda: f"broker.ready (have: {self.tail()})")
        assert self.proc.poll() is None, f"the broker exited: {self.tail(20)}"


def write_config(path: Path, domains: dict[str, Path], *, extra: str = "",
                 dom0_socket: Path | None = None) -> Path:
    lines = [f'[dom0]\nsocket = "{dom0_socket or path.parent / "dom0.sock"}"\n']
    if extra:
        lines.append(extra)
    for name, chemin in domains.items():
        lines.append(f'[domaines.{name}]\nchemin = "{chemin}"\n')
    path.write_text("\n".join(lines))
    return path


class BrokerSystem:
    """Domains on socat ptys, the broker started on them as users start it, and each
    domain's DomU end. ``missing`` domains are configured with a path that does not
    exist (offline); ``paths`` adds domains on paths of the caller's (a unix socket, a
    regular file...)."""

    def __init__(self, tmp: Path, names: tuple[str, ...], *, extra: str = "",
                 missing: tuple[str, ...] = (), paths: dict[str, Path] | None = None,
                 dom0_socket: Path | None = None, wait_connected: bool = False,
                 env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.pairs = {n: PtyPair(tmp, n) for n in names}
        self.paths = {n: p.dom0 for n, p in self.pairs.items()}
        self.paths.update({n: tmp / f"{n}.absent" for n in missing})
        self.paths.update(paths or {})
        self.dom0_socket = dom0_socket or tmp / "dom0.sock"
        self.extra = extra
        self.config = write_config(tmp / "broker.toml", self.paths, extra=extra,
                                   dom0_socket=self.dom0_socket)
        self.env = env
        self.broker = BrokerProcess(self.config, env=env)
        self.broker.wait_event("broker.ready")
        if wait_connected:
            wait_until(lambda: len(self.broker.find("domain.connected")) >= len(names),
                       what=f"{len(names)} domains connected")
        self.previous: list[BrokerProcess] = []
        """The brokers :meth:`restart` stopped, oldest first (their logs stay)."""
        self.domus = {n: Domu(p.domu) for n, p in self.pairs.items()}

    def restart(self, how: int = signal.SIGTERM) -> int:
        """Stop the broker with the signal ``how`` (SIGTERM: it drains and exits 0;
        SIGKILL: a crash) and start it again as users do, same configuration and
        environment; return the old one's exit status once the new one is ready
        (its channels had their first attempt)."""
        old = self.broker
        old.signal(how)
        code = old.proc.wait(15)
        old._reader.join(5)
        self.previous.append(old)
        self.broker = BrokerProcess(self.config, env=self.env)
        self.broker.wait_ready()
        return code

    def reconfigure(self, paths: dict[str, Path]) -> None:
        """Rewrite the configuration with these domains (same dom0 socket and extra
        keys); send SIGHUP to apply it."""
        write_config(self.config, paths, extra=self.extra, dom0_socket=self.dom0_socket)

    def close(self) -> int:
        code = self.broker.stop()
        for d in self.domus.values():
            d.close()
        for p in self.pairs.values():
            p.kill()
        return code
