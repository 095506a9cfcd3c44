"""The xen tier's hands in dom0: runs there as the guest's command (``python
xen_agent.py XEN_ROOT``) under Xen, brings the toolstack up (copies the unpacked
toolstack onto dom0's root, starts xenstored, xen-init-dom0 and xenconsoled), then
does what the host asks over a virtio serial port of its own (``/dev/vport*p1``), one
JSON object per line, as guest_agent.py does (control_channel.py serves both):

    host -> agent  {"id": 3, "op": "run", "argv": ["xl", "list"]}
    agent -> host  {"id": 3, "ok": true, "value": {...}}  or  {"id": 3, "ok": false, ...}

It also relays a DomU's own agent (guest_agent.py on the DomU's control channel, a Xen
channel whose dom0 end is a unix socket QEMU listens on): ``domu_attach`` connects to
that socket, every line the DomU agent writes comes to the host as ``{"domu": ...}``,
and ``domu_send`` writes one to it.

Standard library only: the project is not imported here (dom0's broker and helpers are
started as processes, as an administrator would).
"""

# ruff: noqa: ASYNC110, ASYNC220, ASYNC230, ASYNC240
# (a test agent: its few blocking calls are short, local and one at a time)
from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from control_channel import ControlAgent

XEN_DIRS = ("/proc/xen", "/var/run/xen", "/var/run/xenstored", "/var/lib/xen",
            "/var/lib/xenstored", "/var/log/xen/console")
XEN_BIN = "/usr/lib/xen-{version}/bin"


def uptime() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


def say(text: str) -> None:
    """Progress on dom0's console (Xen's serial: the lab's console log)."""
    print(f"xen agent [{uptime():.1f}]: {text}", flush=True)


def setup(root: str, version: str) -> dict[str, Any]:
    """The toolstack, as a Debian dom0 starts it (its init scripts, by hand)."""
    steps: dict[str, Any] = {"uptime_at_start": uptime()}
    say("copying the toolstack")
    started = time.monotonic()
    subprocess.run(["cp", "-a", f"{root}/.", "/"], check=True)
    subprocess.run(["ldconfig"], check=True)
    steps["copy_seconds"] = round(time.monotonic() - started, 2)
    for d in XEN_DIRS:
        os.makedirs(d, exist_ok=True)
    subprocess.run(["mount", "-t", "xenfs", "xenfs", "/proc/xen"], check=True)
    os.environ["PATH"] = f"{XEN_BIN.format(version=version)}:/usr/sbin:/usr/bin:/sbin:/bin:" \
                         + os.environ.get("PATH", "")
    say("starting xenstored")
    subprocess.run(["xenstored", "--pid-file", "/var/run/xenstored.pid"], check=True)
    subprocess.run(["xen-init-dom0"], check=True, timeout=60, capture_output=True)
    subprocess.run(["xenconsoled", "--pid-file=/var/run/xenconsoled.pid", "--log=guest",
                    "--log-dir=/var/log/xen/console"], check=True)
    steps["toolstack_seconds"] = round(time.monotonic() - started, 2)
    say(f"toolstack up: {steps}")
    steps["uptime_ready"] = uptime()
    return steps


class Agent(ControlAgent):
    def __init__(self, control: str) -> None:
        super().__init__(control)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.domu: asyncio.StreamWriter | None = None
        self.domu_reader: asyncio.Task[None] | None = None


    # -- operations --

    async def op_exit(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
        self.done.set()

    async def op_run(self, argv: list[str], deadline: float = 120.0,
                     env: dict[str, str] | None = None) -> dict[str, Any]:
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})})
        try:
            out, err = await asyncio.wait_for(proc.communicate(), deadline)
        except TimeoutError:
            proc.kill()
            out, err = await proc.communicate()
        return {"status": proc.returncode, "stdout": out.decode(errors="replace"),
                "stderr": err.decode(errors="replace"),
                "seconds": round(time.monotonic() - started, 2)}

    async def op_spawn(self, name: str, argv: list[str], log: str,
                       env: dict[str, str] | None = None) -> int:
        """Start a long-lived process (the broker, a dom0 service), output to ``log``."""
        out = open(log, "ab")  # noqa: SIM115  (owned by the process)
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
        out.close()
        self.procs[name] = proc
        return proc.pid

    async def op_stop(self, name: str, patience: float = 30.0) -> int | None:
        """SIGTERM, then wait: the exit status."""
        proc = self.procs.pop(name)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + patience
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
        return proc.wait()

    async def op_signal(self, name: str, signum: int) -> None:
        self.procs[name].send_signal(signum)

    async def op_poll(self, name: str) -> int | None:
        return self.procs[name].poll()

    async def op_read(self, path: str, offset: int = 0) -> str:
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    async def op_write(self, path: str, text: str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)

    async def op_wait_path(self, path: str, deadline: float = 60.0) -> float:
        started = time.monotonic()
        while not os.path.exists(path):
            if time.monotonic() - started > deadline:
                raise TimeoutError(f"{path} did not appear in {deadline} s")
            await asyncio.sleep(0.1)
        return round(time.monotonic() - started, 2)

    async def op_domu_attach(self, path: str) -> None:
        """Connect to a DomU agent's control socket and relay what it says."""
        await self.op_domu_detach()
        reader, self.domu = await asyncio.open_unix_connection(path, limit=1 << 20)

        async def relay() -> None:
            while line := await reader.readline():
                if line.strip():
                    with contextlib.suppress(ValueError):
                        self.send({"domu": json.loads(line)})
            self.send({"domu_closed": path})
        self.domu_reader = asyncio.get_running_loop().create_task(relay())

    async def op_domu_detach(self) -> None:
        if self.domu_reader is not None:
            self.domu_reader.cancel()
            self.domu_reader = None
        if self.domu is not None:
            self.domu.close()
            self.domu = None

    async def op_domu_send(self, obj: dict[str, Any]) -> None:
        assert self.domu is not None, "domu_attach first"
        self.domu.write(json.dumps(obj).encode() + b"\n")
        await self.domu.drain()


def main() -> int:
    root, version = sys.argv[1], sys.argv[2]
    ports = sorted(glob.glob("/dev/vport*p1"))
    if not ports:
        print("xen agent: no virtio serial port /dev/vport*p1", flush=True)
        return 3
    agent = Agent(ports[0])
    try:
        ready = setup(root, version)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        stderr = getattr(exc, "stderr", b"") or b""
        agent.send({"ready": False, "error": f"{exc} {stderr.decode(errors='replace')}"})
        return 4
    return asyncio.run(agent.serve(ready))


if __name__ == "__main__":
    sys.exit(main())
