"""The test's hands inside the guest: runs there (``python guest_agent.py CONTROL``),
imports messagerie once, and does what the host asks over a control channel of its own
(a second virtconsole, never the one under test), one JSON object per line:

    host -> agent  {"id": 3, "op": "notify", "destination": "vm-b", ...}
    agent -> host  {"id": 3, "ok": true, "value": ...}   or   {"id": 3, "ok": false, "error": "..."}

Booting and importing cost seconds under TCG, so one agent serves a whole test
module. Only the standard library and messagerie are used; the agent never touches
the channel under test except through ``messagerie.Client``, the ``messagerie``
command, the holder (``systemd/messagerie-canal``) or a deliberately plain ``open()``.
"""

# ruff: noqa: ASYNC109  (the operations' timeouts come from the host, over the wire)
from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import termios
import time
import tty
from pathlib import Path
from typing import Any

from control_channel import ControlAgent

STARTED = time.monotonic()
import messagerie  # noqa: E402  (timed: the import is what a DomU application pays)
from messagerie import Client, Commande, CommandError  # noqa: E402

IMPORT_SECONDS = time.monotonic() - STARTED
ROOT = Path(__file__).resolve().parents[2]
HOLDER = ROOT / "systemd" / "messagerie-canal"


class Agent(ControlAgent):
    def __init__(self, control: str) -> None:
        super().__init__(control)
        tty.setraw(self.fd, termios.TCSANOW)
        self.client: Client | None = None
        self.inbox: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()
        self.consumer: asyncio.Task[None] | None = None
        self.stream_task: asyncio.Task[int] | None = None
        self.stream_stop = asyncio.Event()
        self.stream_sent = 0
        self.plain_fd: int | None = None
        self.holders: list[asyncio.subprocess.Process] = []

    # -- control channel --

    async def run(self) -> int:
        return await self.serve({"python": sys.version.split()[0],
                                 "import_seconds": round(IMPORT_SECONDS, 2),
                                 "messagerie": messagerie.__version__
                                 if hasattr(messagerie, "__version__") else None})

    # -- operations --

    async def op_exit(self) -> None:
        await self.op_close()
        for p in self.holders:
            p.terminate()
        self.done.set()

    async def op_hold(self, device: str, timeout: float = 60.0) -> dict[str, Any]:
        """Start the shipped holder as systemd would (Type=notify): wait for READY=1."""
        started = time.monotonic()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "notify")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(path)
            sock.setblocking(False)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(HOLDER), device, env={**os.environ, "NOTIFY_SOCKET": path})
            self.holders.append(proc)
            loop = asyncio.get_running_loop()
            got = b""
            async with asyncio.timeout(timeout):
                while b"READY=1" not in got:
                    got += await loop.sock_recv(sock, 4096)
            sock.close()
        return {"pid": proc.pid, "seconds": round(time.monotonic() - started, 2),
                "notify": got.decode()}

    async def op_plain_open(self, device: str) -> None:
        """Open the channel as a naive program does: no raw mode (echo on)."""
        self.plain_fd = os.open(device, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)

    async def op_plain_close(self, until: str, sentinel: str,
                             timeout: float = 120.0) -> dict[str, Any]:
        """Read lines (the device is in canonical mode) until one contains ``until``,
        the last thing dom0 sent: everything pending has then been received and echoed,
        so the ``sentinel`` written next cannot land inside an echoed line. Close."""
        assert self.plain_fd is not None
        fd, self.plain_fd = self.plain_fd, None
        lflag = termios.tcgetattr(fd)[3]
        loop = asyncio.get_running_loop()
        lines: list[str] = []
        try:
            async with asyncio.timeout(timeout):
                while not any(until in line for line in lines):
                    ready = loop.create_future()
                    loop.add_reader(fd, ready.set_result, None)
                    try:
                        await ready
                    finally:
                        loop.remove_reader(fd)
                    with contextlib.suppress(BlockingIOError):
                        lines.append(os.read(fd, 65536).decode(errors="replace"))
            os.write(fd, sentinel.encode() + b"\n")
        finally:
            os.close(fd)
        return {"echo_was_on": bool(lflag & termios.ECHO), "read": lines}

    async def op_open(self, name: str, device: str) -> None:
        client = Client(name, path=device, timeout=60.0, connect_timeout=60.0)

        @client.handler("identite")
        async def identite(cmd: Commande) -> dict[str, Any]:
            return {"domaine": client.name, "canal": device, "question": cmd.arguments,
                    "tty": os.ttyname(0) if os.isatty(0) else None}

        @client.handler("echouer")
        async def echouer(cmd: Commande) -> None:
            raise CommandError("disque_absent", "no such disk")

        await client.open()
        stream = client.messages()  # no await since open(): nothing read yet is missed
        self.client = client
        self.inbox.clear()

        async def consume() -> None:
            async for msg in stream:
                self.inbox.append({**msg.to_dict(), "_raw": (msg.raw or b"").decode(),
                                   "_t": time.monotonic()})
                self.arrived.set()
        self.consumer = asyncio.get_running_loop().create_task(consume())

    async def op_write(self, device: str, line: str) -> None:
        """Write one line on the channel through a descriptor of its own (the holder
        keeps the settings when it closes)."""
        fd = os.open(device, os.O_WRONLY | os.O_NOCTTY)
        try:
            os.write(fd, line.encode() + b"\n")
        finally:
            os.close(fd)

    async def op_termios(self, device: str) -> dict[str, bool]:
        """The channel's line settings, read through a second descriptor (which, the
        device being held open, resets nothing when it closes)."""
        probe = os.open(device, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            iflag, oflag, _, lflag, *_ = termios.tcgetattr(probe)
        finally:
            os.close(probe)
        return {"echo": bool(lflag & termios.ECHO), "icanon": bool(lflag & termios.ICANON),
                "icrnl": bool(iflag & termios.ICRNL), "opost": bool(oflag & termios.OPOST)}

    async def op_burst(self, destination: str, categorie: str, count: int) -> float:
        """``count`` notifications as fast as the client sends them; seconds taken."""
        assert self.client is not None
        started = time.monotonic()
        for seq in range(count):
            await self.client.notify(destination, categorie, "seq", {"seq": seq})
        return round(time.monotonic() - started, 3)

    async def op_count(self, count: int, timeout: float = 60.0, **match: Any) -> int:
        """Wait until ``count`` matching messages arrived; how many there are."""
        return len(await self.op_messages(count, timeout, **match))

    async def op_span(self, count: int, timeout: float = 60.0,
                      **match: Any) -> dict[str, Any]:
        """Wait for ``count`` matching messages; seconds from the first's arrival to
        the last's, and their ``seq`` numbers."""
        got = (await self.op_messages(count, timeout, **match))[:count]
        return {"seconds": round(got[-1]["_t"] - got[0]["_t"], 3),
                "seqs": [m["payload"]["data"].get("seq") for m in got]}

    async def op_close(self) -> None:
        if self.stream_task is not None:
            await self.op_stream_stop()
        if self.client is not None:
            await self.client.close()
            self.client = None
        if self.consumer is not None:
            self.consumer.cancel()
            self.consumer = None

    async def op_notify(self, destination: str, categorie: str, evenement: str,
                        data: dict[str, Any]) -> None:
        assert self.client is not None
        await self.client.notify(destination, categorie, evenement, data)

    async def op_commande(self, destination: str, commande: str,
                          arguments: dict[str, Any] | None = None,
                          timeout: float = 60.0) -> dict[str, Any]:
        assert self.client is not None
        started = time.monotonic()
        try:
            rep = await self.client.commande(destination, commande, arguments or {},
                                             timeout=timeout)
        except CommandError as exc:
            return {"erreur": exc.code, "message": exc.message}
        return {"resultat": rep.resultat, "source": rep.source,
                "seconds": round(time.monotonic() - started, 3)}

    async def op_messages(self, count: int, timeout: float = 60.0,
                          **match: Any) -> list[dict[str, Any]]:
        """The messages received so far that match, once there are ``count``."""
        def found() -> list[dict[str, Any]]:
            return [m for m in self.inbox
                    if all(m.get(k, m.get("payload", {}).get(k)) == v for k, v in match.items())]
        try:
            async with asyncio.timeout(timeout):
                while len(found()) < count:
                    self.arrived.clear()
                    await self.arrived.wait()
        except TimeoutError:
            got = found()
            seqs = [(m.get("payload", {}).get("data") or {}).get("seq") for m in got[-3:]]
            raise TimeoutError(f"{len(got)} of {count} matching messages in {timeout} s "
                               f"(the last seqs {seqs}; {len(self.inbox)} in all)") from None
        return found()

    async def op_stream_start(self, destination: str, categorie: str,
                              interval: float) -> None:
        """Notifications numbered 0, 1, 2... every ``interval`` s until stream_stop."""
        assert self.client is not None
        client = self.client
        self.stream_stop.clear()

        self.stream_sent = 0

        async def stream() -> int:
            while not self.stream_stop.is_set():
                await client.notify(destination, categorie, "seq", {"seq": self.stream_sent})
                self.stream_sent += 1
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval):
                        await self.stream_stop.wait()
            return self.stream_sent
        self.stream_task = asyncio.get_running_loop().create_task(stream())

    async def op_stream_sent(self) -> int:
        """How many the stream has written so far (the next one's number)."""
        return self.stream_sent

    async def op_stream_stop(self) -> int:
        assert self.stream_task is not None
        self.stream_stop.set()
        sent = await self.stream_task
        self.stream_task = None
        return sent

    async def op_run(self, argv: list[str], timeout: float = 120.0,
                     env: dict[str, str] | None = None) -> dict[str, Any]:
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})})
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
        return {"status": proc.returncode, "stdout": out.decode(errors="replace"),
                "stderr": err.decode(errors="replace"),
                "seconds": round(time.monotonic() - started, 2)}


if __name__ == "__main__":
    sys.exit(asyncio.run(Agent(sys.argv[1]).run()))
