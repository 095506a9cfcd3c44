"""Host side of the guest tier: one booted guest running the agent, the broker started
as users start it on the guest's channel (QEMU's unix socket) and on a simulated
domain (a socat pty), and the link to the agent.

Layout of a lab::

    guest (QEMU, TCG)            host
    /dev/hvc1 (org.messagerie.0) <-> vm-msg.sock  <- messagerie-broker --config broker.toml
    /dev/hvc2 (controle)         <-> control.sock <- AgentLink (the test)
                                      vm-b.dom0    <- broker;  vm-b.domu <- Domu (the test)
                                      dom0.sock    <- Client.dom0() services (the test)
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from guestvm import Channel, Guest

from tests.support.broker_process import BrokerProcess, write_config
from tests.support.peers import Domu
from tests.support.ptys import PtyPair
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
AGENT = Path(__file__).resolve().parent / "guest_agent.py"
VM = "vm"
VM_B = "vm-b"
GUEST_CHANNEL = "/dev/hvc1"
CONTROL_DEVICE = "/dev/hvc2"
FIGURES: dict[str, Any] = {}
"""What the guest tests measured, by name (printed in pytest's terminal summary)."""


class AgentError(AssertionError):
    """The agent reported a failure (or did not answer in time)."""


class AgentLink:
    """The host end of the control channel: requests out, answers and events in."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.answers: dict[int, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.next_id = 0
        self.closed = False
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                with self.cond:
                    self.closed = True
                    self.cond.notify_all()
                return
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            with self.cond:
                for line in lines:
                    if not line.strip():
                        continue
                    obj = json.loads(line)
                    if "id" in obj:
                        self.answers[obj["id"]] = obj
                    else:
                        self.events.append(obj)
                self.cond.notify_all()

    def _wait(self, what: str, predicate: Any, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                value = predicate()
                if value:
                    return value
                if self.closed:
                    raise AgentError(f"the agent went away while waiting for {what}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AgentError(f"timed out after {timeout:g} s waiting for {what}")
                self.cond.wait(left)

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        ready: dict[str, Any] = self._wait(
            "the agent to start", lambda: next((e for e in self.events if e.get("ready")), None),
            timeout)
        return ready

    def call(self, op: str, timeout: float = 120.0, **args: Any) -> Any:
        with self.cond:
            self.next_id += 1
            rid = self.next_id
        self.sock.sendall(json.dumps({"id": rid, "op": op, **args}).encode() + b"\n")
        answer = self._wait(f"the agent's answer to {op}", lambda: self.answers.pop(rid, None),
                            timeout)
        if not answer["ok"]:
            raise AgentError(f"agent {op}: {answer['error']}")
        return answer["value"]

    def close(self) -> None:
        self.sock.close()


class BootedLab:
    """What both labs share: a guest booted under QEMU with its console logged to a
    file and an agent on a control channel; stopped whole, also when the start fails.
    A lab sets ``guest``, ``console`` and ``console_path``, names its link in
    :meth:`link` and what else it started in :meth:`_stop_started`."""

    guest: Guest
    console: IO[bytes]
    console_path: Path

    def link(self) -> AgentLink | None:
        """The link to the agent that answers ``exit`` (None before it exists)."""
        raise NotImplementedError

    def _boot(self, start: Callable[[], None]) -> None:
        """Start the guest and run ``start``; whatever fails, stop what was started."""
        self.guest.start()
        try:
            start()
        except BaseException:
            self._teardown()
            raise

    def console_tail(self, lines: int = 40) -> str:
        self.console.flush()
        text = self.console_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def _before_exit(self) -> None:
        """What to undo inside the guest before its agent exits."""

    def close(self) -> int | None:
        """Ask the agent to exit, power the guest off; the command's exit status."""
        status = None
        try:
            link = self.link()
            if link is not None and not link.closed:
                self._before_exit()
                link.call("exit", timeout=60)
            status = self.guest.wait(timeout=60)
        finally:
            self._teardown()
        return status

    def _stop_started(self) -> None:
        """Stop what the lab started on the host besides the guest and the link."""

    def _teardown(self) -> None:
        """Stop everything this lab started (also after a failed start)."""
        self.guest.kill()
        link = self.link()
        if link is not None:
            link.close()
        self._stop_started()
        self.console.close()


class GuestLab(BootedLab):
    """See the module docstring. ``brokers`` keeps every broker started (restarts)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started = time.monotonic()
        self.vm_socket = tmp / "vm-msg.sock"
        self.control = tmp / "control.sock"
        self.console_path = tmp / "guest-console.log"
        self.console: IO[bytes] = self.console_path.open("wb")
        self.pty = PtyPair(tmp, VM_B)
        self.guest = Guest([sys.executable, str(AGENT), CONTROL_DEVICE],
                           [Channel(self.vm_socket, "org.messagerie.0"),
                            Channel(self.control, "controle")],
                           cwd=ROOT, console=self.console)
        self.brokers: list[BrokerProcess] = []
        self._boot(self._start)
        self.boot_seconds = time.monotonic() - self.started

    def _start(self) -> None:
        self.agent = AgentLink(self.control)
        self.config = write_config(self.tmp / "broker.toml",
                                   {VM: self.vm_socket, VM_B: self.pty.dom0},
                                   extra='[broker]\nniveau_journal = "debug"\n',
                                   dom0_socket=self.tmp / "dom0.sock")
        self.start_broker()
        self.vm_b = Domu(self.pty.domu)
        try:
            self.ready = self.agent.wait_ready(timeout=300)
        except AssertionError:
            raise AssertionError(f"no agent in the guest:\n{self.console_tail()}\n"
                                 f"{self.guest.kernel_log()}") from None

    def link(self) -> AgentLink | None:
        agent: AgentLink | None = getattr(self, "agent", None)
        return agent

    @property
    def broker(self) -> BrokerProcess:
        return self.brokers[-1]

    def start_broker(self) -> BrokerProcess:
        broker = BrokerProcess(self.config)
        self.brokers.append(broker)
        broker.wait_event("broker.ready", timeout=30)
        return broker

    def events(self, event: str, **match: Any) -> list[dict[str, Any]]:
        return [e for b in self.brokers for e in b.find(event, **match)]

    def vm_refusals(self) -> list[dict[str, Any]]:
        """What the broker refused or could not parse on the guest's channel."""
        return [e for b in self.brokers for e in b.events
                if e.get("domain") == VM and e.get("event") in ("message.refused",
                                                                "frame.invalid")]

    def vm_echoes(self) -> int:
        """Frames from the guest's channel the broker recognised as its own echo."""
        return sum(e.get("count", 1) for e in self.events("frame.echoed", domain=VM))

    def diagnostics(self) -> str:
        """The end of the broker's log and of the guest's console, for a failure."""
        broker = "\n".join(self.broker.tail(25)) if self.brokers else ""
        return (f"--- broker log (last lines) ---\n{broker}\n"
                f"--- guest console (last lines) ---\n{self.console_tail(25)}")

    def _stop_started(self) -> None:
        for b in self.brokers:
            b.stop()
        vm_b: Domu | None = getattr(self, "vm_b", None)
        if vm_b is not None:
            vm_b.close()
        self.pty.kill()


def wait_vm_b(lab: GuestLab, count: int, timeout: float = 60.0, **match: Any) -> list[Any]:
    """Messages received by vm-b (notifications from dom0 excluded) matching ``match``
    on the message's attributes, once there are ``count``."""
    def found() -> list[Any]:
        lab.vm_b.pump(0.05)
        return [m for m in lab.vm_b.messages()
                if all(getattr(m, k, None) == v for k, v in match.items())]
    got: list[Any] = wait_until(lambda: len(found()) >= count and found(), timeout,
                                f"{count} messages {match} at vm-b")
    return got
