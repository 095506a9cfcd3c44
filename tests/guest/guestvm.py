"""Boot a throw-away Linux guest under QEMU with pv-channel-like consoles and run one
command in it: the project's real-guest test tier.

The guest is Debian's own kernel (``apt-get download``, unpacked into a cache, never
installed) with a small initramfs built here (a static busybox and the virtio, 9p and
overlay modules). Its root filesystem is this host's ``/``, shared read-only over
virtio-9p with a tmpfs overlay on top, so the command finds the host's Python and the
project's venv where they are; what it writes outside the run directory is lost.

Each channel is a ``virtconsole`` port whose host end is a unix socket QEMU listens on
(``-chardev socket,server=on,wait=off``), as Xen's device model does for
``channel = ['connection=socket,path=...']``: the first is the guest's ``/dev/hvc1``,
the next ``/dev/hvc2``... (``/dev/hvc0`` is the guest's console, the command's stdout).
A named channel also gets ``/dev/xen-channel/<name>``.

Under TCG (the only accelerator that works on every CI machine) a boot to the command
takes 3-6 s and CPU-bound Python runs 12-25x slower than on the host.

    python3 tests/guest/guestvm.py [-c SOCK[,name=N]]... [-t SECONDS] [-X] -- COMMAND...
    tools/run-guest ...                       (the same)

With ``-X`` the guest kernel boots as the PV dom0 of Debian's Xen (``xen-hypervisor-*``
and the toolstack, fetched with ``apt-get download`` and unpacked into the cache): the
command runs in dom0, where tests/guest/xen_agent.py starts xenstored, xenconsoled and
creates DomUs with ``xl`` (the xen tier). ~20 s to dom0's command under TCG.

Exit status: the command's; 124 on timeout; 125 when the guest could not run it.
Cache: ``$MESSAGERIE_GUEST_CACHE`` (default ``~/.cache/messagerie-guest``), ~140 MB.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import lzma
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

CACHE_ENV: Final = "MESSAGERIE_GUEST_CACHE"
TIMEOUT_STATUS: Final = 124
INFRA_STATUS: Final = 125
QEMU: Final = "qemu-system-x86_64"
QBOOT: Final = Path("/usr/share/qemu/qboot.rom")
MODULES: Final = ("virtio_pci", "virtio_console", "9pnet_virtio", "9p", "overlay",
                  "9pnet_xen", "xen_evtchn", "xenfs", "xen_privcmd", "xen_gntdev",
                  "xen_gntalloc")
"""What the initramfs loads (their dependencies are found from each module's
``depends=``): the virtio transport, the consoles, the 9p root and the overlay; and for
Xen (they refuse to load elsewhere, quietly): 9p over Xen for a DomU's root, and what
dom0's toolstack opens (/dev/xen/evtchn, privcmd, gntdev, xenfs)."""
XEN_LIBS: Final = ("xen-utils-common", "xenstore-utils", "libxenstore4", "libxencall1",
                   "libxenevtchn1", "libxenforeignmemory1", "libxengnttab1",
                   "libxentoollog1", "libxentoolcore1", "libxendevicemodel1",
                   "libxenhypfs1", "libyajl2", "qemu-system-xen")
"""Xen's toolstack as dom0 needs it (with xen-utils-X and libxenmiscX of the
hypervisor's version X): unpacked into the cache, copied into dom0 at boot."""
KERNEL_OPTIONS: Final = "quiet loglevel=3 mitigations=off i8042.noaux i8042.nokbd"
# Host variables that describe the host's terminal or session, not the command's needs.
ENV_SKIP: Final = frozenset({"PWD", "OLDPWD", "SHLVL", "_", "TERM", "HOSTNAME", "DISPLAY",
                             "SSH_AUTH_SOCK", "SSH_CONNECTION", "SSH_CLIENT", "SSH_TTY",
                             "TMUX", "TMUX_PANE", "NOTIFY_SOCKET", "JOURNAL_STREAM",
                             "INVOCATION_ID", "LISTEN_FDS", "LISTEN_PID"})

# PID 1 of the guest. It mounts the host's root (9p, read-only) under a tmpfs overlay,
# names the channels, then runs the command chrooted there and powers off. The
# parameters come from the kernel command line (mg.run=) and files in the run
# directory, which is shared read-write.
INIT: Final = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /bin
/bin/busybox --install -s /bin
export PATH=/bin
fail() {
  echo "guest init: $*" >/dev/console
  echo 125 >"/newroot$RUN/status" 2>/dev/null; sync; poweroff -f
}
mount -t devtmpfs dev /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
# the xen modules do not load outside Xen, nor virtio ones in a Xen DomU
while read -r m; do insmod "/lib/modules/$m.ko" 2>/dev/null; done </lib/modules/order
RUN=
TRANS=virtio
for a in $(cat /proc/cmdline); do
  case "$a" in mg.run=*) RUN=${a#mg.run=};; mg.trans=*) TRANS=${a#mg.trans=};; esac
done
[ -n "$RUN" ] || fail "no mg.run= on the kernel command line"
O=trans=virtio,version=9p2000.L,msize=512000
[ "$TRANS" = xen ] && O=trans=xen,version=9p2000.L
mount -t 9p -o "$O,ro,cache=loose" hostroot /lower || fail "cannot mount the host's root"
mount -t tmpfs -o mode=755 rw /rw
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work root /newroot \
  || fail "overlay"
R=/newroot
mount -t proc proc $R/proc
mount -t sysfs sys $R/sys
mount -t devtmpfs dev $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o ptmxmode=666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 shm $R/dev/shm
mount -t tmpfs -o mode=755 run $R/run
mkdir -p "$R$RUN"
mount -t 9p -o "$O,cache=none" rundir "$R$RUN" || fail "cannot mount the run directory"
i=0
while read -r p; do
  if [ -n "$p" ]; then
    mkdir -p "$R$p"; mount -t 9p -o "$O,cache=none" "share$i" "$R$p" || fail "share $p"
  fi
  i=$((i + 1))
done <"$R$RUN/shares"
mkdir -p $R/dev/xen-channel
while read -r n name; do
  [ -n "$name" ] && ln -s "/dev/hvc$n" "$R/dev/xen-channel/$name"
done <"$R$RUN/channels"
hostname guest
ip link set lo up 2>/dev/null
exec 3<>/dev/hvc0
stty -F /dev/hvc0 -opost -echo
cut -d' ' -f1 /proc/uptime >"$R$RUN/booted"
chroot $R /bin/sh "$RUN/command.sh" </dev/null >&3 2>&3
echo $? >"$R$RUN/status"
sync
poweroff -f
"""


class GuestUnavailable(RuntimeError):
    """Something the guest needs is missing and cannot be installed here; the text says
    what and how to get it."""


@dataclass(frozen=True)
class Assets:
    kernel: Path
    initrd: Path
    bios: Path | None


@dataclass(frozen=True)
class XenAssets:
    hypervisor: Path
    """Xen itself, uncompressed (QEMU boots it as a multiboot kernel)."""
    root: Path
    """The toolstack, unpacked: dom0 copies it onto its root at boot."""
    version: str


@dataclass(frozen=True)
class Channel:
    """One pv-channel: ``socket`` is its host end (QEMU listens), ``name`` its
    ``/dev/xen-channel/<name>`` in the guest."""

    socket: Path
    name: str | None = None

    @classmethod
    def parse(cls, text: str) -> Channel:
        path, _, rest = text.partition(",")
        name = rest.removeprefix("name=") if rest.startswith("name=") else None
        if rest and name is None:
            raise ValueError(f"channel {text!r}: expected PATH[,name=NAME]")
        return cls(Path(path).absolute(), name)


def cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "messagerie-guest"


def _log(text: str) -> None:
    print(f"guestvm: {text}", file=sys.stderr, flush=True)


def _apt(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(["apt-get", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, check=False)


def _can_apt() -> bool:
    return shutil.which("apt-get") is not None and shutil.which("dpkg-deb") is not None


def ensure_qemu(install: bool = True) -> str:
    """The path of qemu-system-x86_64, installed with apt-get when missing (as root)."""
    found = shutil.which(QEMU)
    if found:
        return found
    how = "apt-get update && apt-get install -y --no-install-recommends qemu-system-x86"
    if not install or not _can_apt() or os.geteuid() != 0:
        raise GuestUnavailable(f"{QEMU} is not installed; as root: {how}")
    _log("installing qemu-system-x86 (apt-get, once)")
    for attempt in ("install", "update-then-install"):
        if attempt == "update-then-install":
            _apt("update", "-qq")
        done = _apt("install", "-y", "-qq", "--no-install-recommends", "qemu-system-x86")
        if done.returncode == 0 and shutil.which(QEMU):
            return shutil.which(QEMU) or QEMU
    raise GuestUnavailable(f"could not install qemu-system-x86 ({done.stderr.strip()[-300:]});"
                           f" try: {how}")


def _download(package: str, into: Path) -> Path:
    """``apt-get download PACKAGE`` into ``into`` (reused when already there)."""
    have = sorted(into.glob(f"{package}_*.deb"))
    if have:
        return have[-1]
    done = _apt("download", package, cwd=into)
    if done.returncode != 0:
        _apt("update", "-qq")
        done = _apt("download", package, cwd=into)
    have = sorted(into.glob(f"{package}_*.deb"))
    if done.returncode != 0 or not have:
        raise GuestUnavailable(f"apt-get download {package} failed: "
                               f"{done.stderr.strip()[-300:]} (is there an apt source "
                               f"for Debian? run apt-get update)")
    return have[-1]


def _depends(package: str, pattern: str, hint: str) -> str:
    """The first group of ``pattern`` in ``apt-cache depends package``, asked again
    once after an ``apt-get update`` when the lists do not know it yet."""
    for attempt in range(2):
        out = subprocess.run(["apt-cache", "depends", package],
                             capture_output=True, text=True, check=False).stdout
        m = re.search(pattern, out)
        if m:
            return m.group(1)
        if attempt == 0:
            _apt("update", "-qq")
    raise GuestUnavailable(f"apt-cache knows no {package}: run apt-get update ({hint})")


def _kernel_package() -> str:
    """The versioned package linux-image-amd64 depends on (linux-image-6.1.0-NN-amd64)."""
    return _depends("linux-image-amd64", r"Depends: (linux-image-\d\S*)",
                    "a Debian or Ubuntu apt source is needed")


def _stamp() -> str:
    """Changes when what goes into the initramfs changes: the cache is rebuilt then."""
    return hashlib.sha256((INIT + "\n".join(MODULES)).encode()).hexdigest()[:16]


def ensure_assets(cache: Path | None = None, install: bool = True) -> Assets:
    """The guest kernel and initramfs, built into the cache on first use."""
    cache = cache or cache_dir()
    kernel, initrd, stamp = cache / "vmlinux", cache / "initrd.gz", cache / "stamp"
    bios = QBOOT if QBOOT.exists() else None
    if kernel.exists() and initrd.exists() and stamp.exists() \
            and stamp.read_text().strip() == _stamp():
        return Assets(kernel, initrd, bios)
    if not install or not _can_apt():
        raise GuestUnavailable(
            f"no guest kernel in {cache}: it is built there with apt-get download and "
            f"dpkg-deb (Debian/Ubuntu) on first use")
    started = time.monotonic()
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    _log(f"building the guest kernel and initramfs in {cache} (once, ~20 s)")
    kdeb = _download(_kernel_package(), debs)
    bdeb = _download("busybox-static", debs)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        unpacked = Path(tmp)
        for deb in (kdeb, bdeb):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
        vmlinuz = next((unpacked / "boot").glob("vmlinuz-*"))
        moddir = next((unpacked / "lib" / "modules").iterdir())
        busybox = unpacked / "bin" / "busybox"
        _extract_vmlinux(vmlinuz, kernel.with_suffix(".tmp"))
        build_initramfs(initrd.with_suffix(".tmp"), busybox, INIT, moddir, MODULES)
    kernel.with_suffix(".tmp").replace(kernel)
    initrd.with_suffix(".tmp").replace(initrd)
    stamp.write_text(_stamp() + "\n")
    _log(f"guest kernel ready ({time.monotonic() - started:.0f} s)")
    return Assets(kernel, initrd, bios)


def _xen_version() -> str:
    """The hypervisor's version Debian's xen-system-amd64 depends on (``4.17``)."""
    return _depends("xen-system-amd64", r"Depends: xen-hypervisor-(\d+\.\d+)-amd64",
                    "Debian's main archive has it")


def ensure_xen(cache: Path | None = None, install: bool = True) -> XenAssets:
    """Xen's hypervisor and toolstack, fetched with apt-get download and unpacked into
    the cache on first use (~30 MB, a few seconds)."""
    cache = cache or cache_dir()
    hypervisor, root, stamp = cache / "xen", cache / "xen-root", cache / "xen-stamp"
    if hypervisor.exists() and root.is_dir() and stamp.exists():
        return XenAssets(hypervisor, root, stamp.read_text().strip())
    if not install or not _can_apt():
        raise GuestUnavailable(f"no Xen in {cache}: it is fetched there with apt-get "
                               "download and dpkg-deb (Debian/Ubuntu) on first use")
    version = _xen_version()
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    _log(f"fetching Xen {version} into {cache} (once)")
    hv = _download(f"xen-hypervisor-{version}-amd64", debs)
    tools = [_download(p, debs) for p in (f"xen-utils-{version}", f"libxenmisc{version}",
                                          *XEN_LIBS)]
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        subprocess.run(["dpkg-deb", "-x", str(hv), tmp], check=True)
        image = next((Path(tmp) / "boot").glob("xen-*.gz"))
        hypervisor.with_suffix(".tmp").write_bytes(gzip.decompress(image.read_bytes()))
    shutil.rmtree(root, ignore_errors=True)
    staging = cache / "xen-root.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    for deb in tools:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(staging)], check=True)
    shutil.rmtree(staging / "usr" / "share" / "doc", ignore_errors=True)
    staging.replace(root)
    hypervisor.with_suffix(".tmp").replace(hypervisor)
    stamp.write_text(version + "\n")
    return XenAssets(hypervisor, root, version)


def _extract_vmlinux(vmlinuz: Path, out: Path) -> None:
    """The uncompressed ELF kernel inside a bzImage. QEMU boots it through its PVH
    entry point: no real-mode setup and no in-guest xz decompression, which alone
    takes ~8 s under TCG."""
    data = vmlinuz.read_bytes()
    start = data.find(b"\xfd7zXZ\x00")
    if start < 0:
        raise GuestUnavailable(f"{vmlinuz}: no xz payload found")
    out.write_bytes(lzma.LZMADecompressor().decompress(data[start:]))


def _module_blob(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True,
                              check=True).stdout
    return data


def build_initramfs(out: Path, busybox: Path, init: str, moddir: Path,
                    modules: Iterable[str]) -> list[str]:
    """A gzip'd newc cpio: busybox, ``/init`` and ``modules`` with what they depend on,
    in load order (read from each module's ``depends=``: no depmod needed). A module
    built into the kernel is skipped. Returns the load order."""
    index: dict[str, Path] = {}
    for p in (moddir / "kernel").rglob("*.ko*"):
        index[p.name.split(".ko")[0].replace("-", "_")] = p
    builtin = set()
    with contextlib.suppress(OSError):
        for line in (moddir / "modules.builtin").read_text().splitlines():
            builtin.add(Path(line).name.split(".ko")[0].replace("-", "_"))
    order: list[str] = []
    blobs: dict[str, bytes] = {}

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in blobs or name in builtin:
            return
        if name not in index:
            raise GuestUnavailable(f"kernel module {name} not found in {moddir}")
        data = _module_blob(index[name])
        m = re.search(rb"\x00depends=([^\x00]*)\x00", data)
        for dep in (m.group(1).decode().split(",") if m else []):
            if dep:
                visit(dep)
        blobs[name] = data
        order.append(name)

    for name in modules:
        visit(name)
    entries: list[tuple[str, int, bytes]] = [
        (d, 0o040755, b"") for d in ("bin", "dev", "proc", "sys", "lower", "newroot", "rw",
                                     "lib", "lib/modules")]
    entries.append(("bin/busybox", 0o100755, busybox.read_bytes()))
    entries.append(("init", 0o100755, init.encode()))
    entries += [(f"lib/modules/{n}.ko", 0o100644, blobs[n]) for n in order]
    entries.append(("lib/modules/order", 0o100644, "".join(f"{n}\n" for n in order).encode()))

    def record(ino: int, name: str, mode: int, data: bytes) -> bytes:
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        head = b"070701" + "".join(f"{v:08x}" for v in fields).encode() + encoded
        head += b"\0" * (-len(head) % 4)
        return head + data + b"\0" * (-len(data) % 4)

    body = b"".join(record(i + 1, *e) for i, e in enumerate(entries))
    body += record(0, "TRAILER!!!", 0, b"")
    with gzip.open(out, "wb", compresslevel=6) as f:
        f.write(body)
    return order


def command_script(argv: Sequence[str], cwd: Path, env: Mapping[str, str]) -> str:
    """The shell script the guest runs: the environment, the directory, the command."""
    lines: list[str] = []
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())
              if k not in ENV_SKIP and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)]
    lines.append("export TERM=dumb HOSTNAME=guest")
    lines.append(f"cd {shlex.quote(str(cwd))} || exit {INFRA_STATUS}")
    lines.append("exec " + " ".join(shlex.quote(a) for a in argv))
    return "\n".join(lines) + "\n"


@dataclass
class Guest:
    """One guest run: ``start()`` returns once QEMU listens on every channel socket,
    ``wait()`` gives the command's exit status."""

    command: Sequence[str]
    channels: Sequence[Channel] = ()
    shares: Sequence[Path] = ()
    """Host directories shared read-write at the same path in the guest."""
    cwd: Path = field(default_factory=Path.cwd)
    env: Mapping[str, str] | None = None
    cpus: int = 2
    memory_mib: int = 1024
    console: IO[Any] | int | None = None
    """Where the command's output goes (a file, ``subprocess.PIPE``...; default: ours)."""
    install: bool = True
    xen: bool = False
    """Boot Xen with the guest as its PV dom0: the command runs in dom0; its output
    is Xen's serial console (``console``); channels are virtio serial ports there
    (``/dev/vport*p<N>``, not ttys: the lab's own control links)."""
    run_dir: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0

    def xen_args(self, assets: Assets, xen: XenAssets, run_dir: Path) -> list[str]:
        dom0_mib = self.memory_mib // 2
        args = [
            # -cpu max makes dom0 crash at its first instruction under TCG
            "-machine", "q35", "-accel", "tcg", "-cpu", "qemu64",
            "-smp", str(self.cpus), "-m", str(self.memory_mib),
            "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none",
            "-no-reboot",
            "-kernel", str(xen.hypervisor),
            "-append", f"console=com1 com1=115200,8n1 dom0_mem={dom0_mib}M,max:{dom0_mib}M "
                       "dom0_max_vcpus=1 noreboot loglvl=warning guest_loglvl=warning",
            # multiboot modules: dom0's kernel with its command line, its initramfs
            "-initrd", f"{assets.kernel} console=hvc0 {KERNEL_OPTIONS} panic=-1 "
                       f"mg.run={run_dir},{assets.initrd}",
            "-serial", "stdio",
            "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,"
                       "multidevs=remap",
            "-virtfs", f"local,path={run_dir},mount_tag=rundir,security_model=none,"
                       "multidevs=remap",
        ]
        for i, share in enumerate(self.shares):
            args += ["-virtfs", f"local,path={share},mount_tag=share{i},"
                                "security_model=none,multidevs=remap"]
        if self.channels:
            args += ["-device", "virtio-serial-pci,id=vser0"]
        for n, ch in enumerate(self.channels, start=1):
            args += ["-chardev", f"socket,id=ch{n},path={ch.socket},server=on,wait=off",
                     "-device", f"virtserialport,chardev=ch{n},id=port{n},nr={n}"
                                + (f",name={ch.name}" if ch.name else "")]
        return args

    def qemu_args(self, assets: Assets, run_dir: Path) -> list[str]:
        args = [
            "-machine", "q35", "-accel", "tcg", "-cpu", "max",
            "-smp", str(self.cpus), "-m", str(self.memory_mib),
            "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none",
            "-no-reboot",
            "-kernel", str(assets.kernel), "-initrd", str(assets.initrd),
            "-append", f"console=ttyS0 {KERNEL_OPTIONS} panic=-1 mg.run={run_dir}",
            "-serial", f"file:{run_dir / 'kernel.log'}",
            "-device", "virtio-serial-pci,id=vser0",
            "-chardev", "stdio,id=con0,signal=off",
            "-device", "virtconsole,chardev=con0,id=hvc0",
            "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,"
                       "multidevs=remap",
            "-virtfs", f"local,path={run_dir},mount_tag=rundir,security_model=none,"
                       "multidevs=remap",
        ]
        if assets.bios is not None:
            args += ["-bios", str(assets.bios)]
        for i, share in enumerate(self.shares):
            args += ["-virtfs", f"local,path={share},mount_tag=share{i},"
                                "security_model=none,multidevs=remap"]
        for n, ch in enumerate(self.channels, start=1):
            args += ["-chardev", f"socket,id=ch{n},path={ch.socket},server=on,wait=off",
                     "-device", f"virtconsole,chardev=ch{n},id=hvc{n}"
                                + (f",name={ch.name}" if ch.name else "")]
        return args

    def start(self, timeout: float = 30.0) -> Guest:
        qemu = ensure_qemu(self.install)
        assets = ensure_assets(install=self.install)
        xen = ensure_xen(install=self.install) if self.xen else None
        self.run_dir = Path(tempfile.mkdtemp(prefix="messagerie-guest."))
        run = self.run_dir
        env = dict(os.environ if self.env is None else self.env)
        (run / "command.sh").write_text(command_script(self.command, self.cwd, env))
        (run / "shares").write_text("".join(f"{Path(s).resolve()}\n" for s in self.shares))
        (run / "channels").write_text("".join(f"{n} {ch.name or ''}\n"
                                              for n, ch in enumerate(self.channels, 1)))
        for ch in self.channels:
            ch.socket.parent.mkdir(parents=True, exist_ok=True)
            ch.socket.unlink(missing_ok=True)
        self.started_at = time.monotonic()
        args = self.xen_args(assets, xen, run) if xen else self.qemu_args(assets, run)
        self.proc = subprocess.Popen([qemu, *args],
                                     stdin=subprocess.DEVNULL, stdout=self.console,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while not all(ch.socket.exists() for ch in self.channels):
            if self.proc.poll() is not None:
                raise GuestUnavailable(f"{QEMU} exited at once: {self._stderr()}")
            if time.monotonic() > deadline:
                raise GuestUnavailable(f"{QEMU} did not create its channel sockets")
            time.sleep(0.01)
        return self

    def _stderr(self) -> str:
        if self.proc is None or self.proc.stderr is None or self.proc.poll() is None:
            return ""
        return self.proc.stderr.read().decode(errors="replace").strip()[-800:]

    def booted(self) -> float | None:
        """Seconds from the guest kernel's start to the command, once it started."""
        try:
            return float((self.run_dir / "booted").read_text()) if self.run_dir else None
        except (OSError, ValueError):
            return None

    def kernel_log(self, lines: int = 30) -> str:
        try:
            text = (self.run_dir / "kernel.log").read_text(errors="replace") \
                if self.run_dir else ""
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait(self, timeout: float | None = None) -> int:
        """The command's exit status (124 when it did not finish in time, 125 when the
        guest died without one). Powers the guest off and removes the run directory."""
        assert self.proc is not None and self.run_dir is not None, "start() first"
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            # Where it stood (booting, or running the command) is what tells a hang
            # from a slow command.
            _log(f"timed out after {timeout} s; the guest's console, last lines:\n"
                 f"{self.kernel_log()}")
            self._cleanup()
            return TIMEOUT_STATUS
        try:
            status = int((self.run_dir / "status").read_text())
        except (OSError, ValueError):
            _log(f"the guest died without a status (qemu exit {code}): {self._stderr()}\n"
                 f"{self.kernel_log()}")
            status = INFRA_STATUS
        self._cleanup()
        return status

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def _cleanup(self) -> None:
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        if self.run_dir is not None and not os.environ.get("MESSAGERIE_GUEST_KEEP"):
            shutil.rmtree(self.run_dir, ignore_errors=True)
        for ch in self.channels:
            ch.socket.unlink(missing_ok=True)


def run(command: Sequence[str], channels: Sequence[Channel] = (), *,
        timeout: float = 600.0, **kwargs: Any) -> int:
    """Boot, run ``command`` in the guest, power off; its exit status."""
    try:
        guest = Guest(command, channels, **kwargs).start()
    except GuestUnavailable as exc:
        _log(str(exc))
        return INFRA_STATUS
    return guest.wait(timeout)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="run-guest", description=__doc__.split("\n\n")[0],
        epilog="exit status: the command's; 124 timeout; 125 the guest could not run it")
    parser.add_argument("-c", "--channel", action="append", default=[], type=Channel.parse,
                        metavar="SOCK[,name=NAME]",
                        help="add a channel: guest /dev/hvcN (N = 1, 2... in order), host "
                             "end the unix socket SOCK, QEMU listening")
    parser.add_argument("-w", "--share", action="append", default=[], type=Path,
                        metavar="DIR", help="share host DIR read-write at the same path")
    parser.add_argument("-t", "--timeout", type=float, default=600.0, metavar="SECONDS")
    parser.add_argument("-p", "--cpus", type=int, default=2)
    parser.add_argument("-m", "--memory", type=int, default=1024, metavar="MiB")
    parser.add_argument("-X", "--xen", action="store_true",
                        help="boot Debian's Xen with the guest as its PV dom0; the command "
                             "runs in dom0 (channels become virtio serial ports there, "
                             "/dev/vport*pN); the toolstack is unpacked in the cache "
                             "(tests/guest/xen_agent.py shows how to start it)")
    parser.add_argument("--prepare", action="store_true",
                        help="only install QEMU and build the guest kernel (cache)")
    parser.add_argument("command", nargs="*")
    args = parser.parse_args(argv)
    if args.prepare:
        try:
            ensure_qemu()
            assets = ensure_assets()
            xen = ensure_xen() if args.xen else None
        except GuestUnavailable as exc:
            _log(str(exc))
            return INFRA_STATUS
        print(f"{assets.kernel}\n{assets.initrd}")
        if xen is not None:
            print(f"{xen.hypervisor}\n{xen.root}")
        return 0
    if not args.command:
        parser.error("no command")
    return run(args.command, args.channel, timeout=args.timeout, shares=args.share,
               cpus=args.cpus, memory_mib=2048 if args.xen and args.memory == 1024
               else args.memory, xen=args.xen)


if __name__ == "__main__":
    sys.exit(main())
