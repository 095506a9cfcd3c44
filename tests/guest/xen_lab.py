"""Host side of the xen tier: Debian's Xen booted under QEMU (TCG) with the guest
kernel as its PV dom0, the toolstack started there (xen_agent.py), the broker run in
dom0 as users run it, bound to its domains through the real xenstore, and a PV DomU
created with ``xl create`` whose channel is a real Xen pv-channel. The DomU runs
guest_agent.py on a second channel of its own; dom0's agent relays it.

Layout::

    host (pytest)         dom0 (Xen PV, under QEMU)            DomU vm-a (PV)
    XenLab.dom0 <-vport-> xen_agent.py
                          messagerie-broker (xenstore = true)
                            <-> /var/run/vm-a-msg-<boot>.sock <-> /dev/hvc1 (messaging)
    XenLab.domu <-relay-> xen_agent.py
                            <-> /var/run/vm-a-ctl-<boot>.sock <-> /dev/hvc2 guest_agent.py
                          xen_peer.py (dom0 services: Client.dom0)
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import IO, Any

from guest_lab import AgentError, AgentLink, BootedLab
from guestvm import KERNEL_OPTIONS, Channel, Guest, cache_dir, command_script, ensure_xen

from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
DOMU = "vm-a"
CHANNEL = "org.messagerie.0"
BIN = Path(sys.executable).parent
BROKER_LOG = "/var/log/messagerie-broker.log"
DOM0_SOCKET = "/run/messagerie/dom0.sock"
BROKER_CONFIG = f"""\
[broker]
niveau_journal = "debug"
[dom0]
socket = "{DOM0_SOCKET}"
[decouverte]
xenstore = true
canal = "{CHANNEL}"
[reconnexion]
min = 0.1
max = 1.0
"""
"""dom0's broker, on the shipped limits. Under nested TCG every instruction costs
tens of times more than on real hardware, so the DomU's honest bursts cost more than
the default CPU share (10 % of a core): they still run at the loop's full speed, the
CPU budget binding only while another channel within its share wants the loop."""


def domu_config(boot: int, run_dir: str) -> str:
    cache = cache_dir()
    return f"""\
name = "{DOMU}"
type = "pv"
kernel = "{cache / 'vmlinux'}"
ramdisk = "{cache / 'initrd.gz'}"
extra = "console=hvc0 {KERNEL_OPTIONS} panic=-1 mg.trans=xen mg.run={run_dir}"
memory = 320
vcpus = 1
# Debian 12's xl 4.17.7 gives a single channel devid 0 (the primary console's): a
# dummy first entry makes ours devid 1 (/dev/hvc1), the control one devid 2 (hvc2).
channel = [ 'name=dummy.devid0,connection=pty',
            'name={CHANNEL},connection=socket,path=/var/run/{DOMU}-msg-{boot}.sock',
            'name=controle,connection=socket,path=/var/run/{DOMU}-ctl-{boot}.sock' ]
p9 = [ 'tag=hostroot,security_model=none,path=/',
       'tag=rundir,security_model=none,path={run_dir}' ]
on_poweroff = "destroy"
on_crash = "destroy"
on_reboot = "destroy"
"""


class DomuLink:
    """The DomU agent, through dom0's relay: same calls as :class:`AgentLink`."""

    def __init__(self, dom0: AgentLink) -> None:
        self.dom0 = dom0
        self.next_id = 0

    def _events(self) -> list[dict[str, Any]]:
        return [e["domu"] for e in self.dom0.events if "domu" in e]

    def wait_ready(self, timeout: float, after: int = 0) -> dict[str, Any]:
        ready: dict[str, Any] = self.dom0._wait(
            "the DomU agent to start",
            lambda: next((e for e in self._events()[after:] if "ready" in e), None), timeout)
        return ready

    def call(self, op: str, timeout: float = 180.0, **args: Any) -> Any:
        self.next_id += 1
        rid = self.next_id
        self.dom0.call("domu_send", obj={"id": rid, "op": op, **args})
        answer = self.dom0._wait(
            f"the DomU agent's answer to {op}",
            lambda: next((e for e in self._events() if e.get("id") == rid), None), timeout)
        if not answer["ok"]:
            raise AgentError(f"DomU agent {op}: {answer['error']}")
        return answer["value"]


class XenLab(BootedLab):
    """See the module docstring. One per test session (a boot costs ~40 s)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started = time.monotonic()
        self.figures: dict[str, Any] = {}
        xen = ensure_xen()
        self.control = tmp / "dom0-control.sock"
        self.console_path = tmp / "xen-console.log"
        self.console: IO[bytes] = self.console_path.open("wb")
        self.guest = Guest([sys.executable, str(HERE / "xen_agent.py"), str(xen.root),
                            xen.version], [Channel(self.control, "controle")], cwd=ROOT,
                           console=self.console, xen=True, memory_mib=2048, cpus=2)
        self.boots = 0
        self.domid: int | None = None
        self._boot(self._start)
        self.boot_seconds = time.monotonic() - self.started

    def _start(self) -> None:
        self.dom0 = AgentLink(self.control)
        ready = self.dom0._wait("dom0's agent", lambda: next(
            (e for e in self.dom0.events if "ready" in e), None), 300)
        if not ready["ready"]:
            raise AgentError(f"dom0 setup failed: {ready.get('error')}")
        self.ready = ready
        self.domu = DomuLink(self.dom0)

    def link(self) -> AgentLink | None:
        dom0: AgentLink | None = getattr(self, "dom0", None)
        return dom0

    # -- dom0 --------------------------------------------------------------------------

    def run(self, *argv: str, timeout: float = 120.0, check: bool = True) -> dict[str, Any]:
        # the agent's own deadline is ``timeout``; the link waits a little longer
        done: dict[str, Any] = self.dom0.call("run", timeout + 30, argv=list(argv),
                                              deadline=timeout)
        if check and done["status"] != 0:
            raise AgentError(f"dom0: {' '.join(argv)} exited {done['status']}: "
                             f"{done['stderr'][-800:]}")
        return done

    def xenstore(self, *args: str) -> str:
        out: str = self.run(*args)["stdout"]
        return out

    def start_broker(self) -> None:
        self.dom0.call("write", path="/etc/messagerie/broker.toml", text=BROKER_CONFIG)
        self.broker_mark = len(self.broker_events())
        self.dom0.call("spawn", name="broker", log=BROKER_LOG,
                       argv=[str(BIN / "messagerie-broker"), "--config",
                             "/etc/messagerie/broker.toml"])
        self.wait_event("broker.ready", timeout=120, since=self.broker_mark)

    def stop_broker(self) -> int:
        status: int = self.dom0.call("stop", name="broker")
        return status

    def broker_events(self) -> list[dict[str, Any]]:
        text: str = self.dom0.call("read", path=BROKER_LOG)
        events = []
        for line in text.splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    def find(self, event: str, since: int = 0, **match: Any) -> list[dict[str, Any]]:
        return [e for e in self.broker_events()[since:] if e.get("event") == event
                and all(e.get(k) == v for k, v in match.items())]

    def wait_event(self, event: str, timeout: float = 120.0, since: int = 0,
                   **match: Any) -> dict[str, Any]:
        found: list[dict[str, Any]] = wait_until(
            lambda: self.find(event, since, **match), timeout,
            lambda: f"broker event {event} {match} (log: {self.broker_tail()})",
            interval=0.5)
        return found[0]

    def broker_tail(self, lines: int = 15) -> str:
        return "\n".join(self.dom0.call("read", path=BROKER_LOG).splitlines()[-lines:])

    def broker_summary(self, tail: int = 10, lines: int = 25) -> str:
        """For a failure: the broker log's last lines, how many of each event it holds,
        and its last lines but the per-message ones (``message.routed``, debug), which
        would hide the rest. The log is read once."""
        log = self.dom0.call("read", path=BROKER_LOG).splitlines()
        counts: dict[str, int] = {}
        kept: list[str] = []
        for line in log:
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None
            event = str(obj.get("event")) if isinstance(obj, dict) else "(not an object)"
            counts[event] = counts.get(event, 0) + 1
            if event != "message.routed":
                kept.append(line)
        return "\n".join([*log[-tail:], "--- the same, but message.routed ---",
                          f"events: {counts}", *kept[-lines:]])

    def peer(self, *args: str, timeout: float = 300.0) -> dict[str, Any]:
        """Run xen_peer.py in dom0 (a dom0 service on the broker's socket); its JSON."""
        done = self.run(sys.executable, str(HERE / "xen_peer.py"), DOM0_SOCKET, *args,
                        timeout=timeout)
        result: dict[str, Any] = json.loads(done["stdout"].strip().splitlines()[-1])
        return result

    def spawn_peer(self, name: str, *args: str) -> str:
        out = f"/tmp/{name}.out"
        self.dom0.call("spawn", name=name, log=out,
                       argv=[sys.executable, str(HERE / "xen_peer.py"), DOM0_SOCKET, *args])
        return out

    def peer_result(self, name: str, timeout: float = 300.0) -> dict[str, Any]:
        out = f"/tmp/{name}.out"
        wait_until(lambda: self.dom0.call("poll", name=name) is not None, timeout,
                   lambda: f"dom0 peer {name} to finish: "
                           f"{self.dom0.call('read', path=out)[-500:]}", interval=0.5)
        status = self.dom0.call("stop", name=name)
        text = self.dom0.call("read", path=out)
        assert status == 0, f"dom0 peer {name} exited {status}: {text[-800:]}"
        result: dict[str, Any] = json.loads(text.strip().splitlines()[-1])
        return result

    # -- the DomU ------------------------------------------------------------------------

    def create_domu(self, timeout: float = 600.0, shell: str | None = None) -> int:
        """``xl create`` vm-a (boot number ``self.boots``): new channel sockets, a new
        domid. It runs the agent (returns once it is ready) or, with ``shell``, that
        shell script (with ``$OUT`` a file in the DomU's run directory,
        :meth:`domu_output`; returns once the domain exists): no Python to import,
        a much shorter boot."""
        self.boots += 1
        boot = self.boots
        started = time.monotonic()
        run_dir = f"/var/lib/messagerie-domu/{boot}"
        env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_CURRENT_TEST",)}
        argv = ([sys.executable, str(HERE / "guest_agent.py"), "/dev/hvc2"] if shell is None
                else ["/bin/bash", "-c", shell])
        env["OUT"] = f"{run_dir}/out"
        script = command_script(argv, ROOT, env)
        self.dom0.call("write", path=f"{run_dir}/command.sh", text=script)
        self.dom0.call("write", path=f"{run_dir}/shares", text="")
        self.dom0.call("write", path=f"{run_dir}/channels",
                       text=f"1 {CHANNEL}\n2 controle\n")
        cfg = f"/etc/xen/{DOMU}-{boot}.cfg"
        self.dom0.call("write", path=cfg, text=domu_config(boot, run_dir))
        relayed = len([e for e in self.dom0.events if "domu" in e])
        created = self.run("xl", "create", cfg, timeout=300)
        self.figures[f"DomU boot {boot}: xl create (s)"] = created["seconds"]
        self.domid = int(self.run("xl", "domid", DOMU)["stdout"].strip())
        if shell is not None:
            return self.domid
        ctl = f"/var/run/{DOMU}-ctl-{boot}.sock"
        self.dom0.call("wait_path", 150, path=ctl, deadline=120)
        self.dom0.call("domu_attach", path=ctl)
        self.domu.next_id = 0
        self.domu_ready = self.domu.wait_ready(timeout, after=relayed)
        self.figures[f"DomU boot {boot}: xl create to agent ready (s)"] = \
            round(time.monotonic() - started, 1)
        self.figures[f"DomU boot {boot}: import messagerie in the DomU (s)"] = \
            self.domu_ready.get("import_seconds")
        return self.domid

    def domu_output(self, timeout: float = 300.0) -> str:
        """What the DomU's shell script wrote to ``$OUT``, once the DomU is gone."""
        wait_until(lambda: self.run("xl", "domid", DOMU, check=False)["status"] != 0,
                   timeout, "the DomU to finish", interval=1.0)
        self.domid = None
        text: str = self.dom0.call("read", path=f"/var/lib/messagerie-domu/{self.boots}/out")
        return text

    def destroy_domu(self) -> None:
        self.dom0.call("domu_detach")
        self.run("xl", "destroy", DOMU, timeout=120)
        self.domid = None

    def msg_socket(self, boot: int | None = None) -> str:
        return f"/var/run/{DOMU}-msg-{boot or self.boots}.sock"

    # -- the end ---------------------------------------------------------------------------

    def diagnostics(self) -> str:
        try:
            broker = self.broker_summary()
        except AgentError as exc:
            broker = f"(unavailable: {exc})"
        return (f"--- broker log in dom0 (last lines) ---\n{broker}\n"
                f"--- Xen serial console (last lines) ---\n{self.console_tail(30)}")

    def _before_exit(self) -> None:
        if self.domid is not None:
            self.destroy_domu()
