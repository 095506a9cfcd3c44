"""The control channel both guest-side agents serve (guest_agent.py in a guest or a
DomU, xen_agent.py in dom0): one JSON object per line over a device opened
non-blocking, each request ``{"id": N, "op": NAME, ...}`` answered by the agent's
``op_NAME(...)`` as ``{"id": N, "ok": true, "value": ...}`` or ``{"id": N, "ok": false,
"error": "..."}``. The agents run as scripts from the host's tree (shared over 9p), so
this module, beside them, is what ``import control_channel`` finds.

Standard library only: dom0's agent does not import the project.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
from typing import Any


class ControlAgent:
    """Serves ``op_*`` coroutines on ``device`` until :attr:`done` is set."""

    def __init__(self, device: str) -> None:
        self.fd = os.open(device, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        self.buffer = b""
        self.done = asyncio.Event()

    def send(self, obj: dict[str, Any]) -> None:
        """Write one line, waiting for room when the channel is full."""
        data = memoryview(json.dumps(obj, ensure_ascii=False).encode() + b"\n")
        while data:
            try:
                n = os.write(self.fd, data)
            except BlockingIOError:
                select.select([], [self.fd], [], 1.0)
                continue
            data = data[n:]

    def readable(self) -> None:
        try:
            chunk = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        self.buffer += chunk
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            if line.strip():
                asyncio.get_running_loop().create_task(self.handle(json.loads(line)))

    async def handle(self, req: dict[str, Any]) -> None:
        op = req.pop("op")
        rid = req.pop("id")
        try:
            value = await getattr(self, f"op_{op}")(**req)
        except Exception as exc:
            self.send({"id": rid, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
        else:
            self.send({"id": rid, "ok": True, "value": value})

    async def serve(self, ready: dict[str, Any]) -> int:
        """Say ``{"ready": true, **ready}``, then answer until an op sets :attr:`done`."""
        loop = asyncio.get_running_loop()
        loop.add_reader(self.fd, self.readable)
        self.send({"ready": True, **ready})
        await self.done.wait()
        loop.remove_reader(self.fd)
        return 0
