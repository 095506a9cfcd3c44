"""The Debian package, built by packaging/build-deb, linted, installed on this machine
with apt as an operator would, used from its installed paths, then purged.

It needs root (apt), debhelper and lintian (.ci/system-deps installs them) and the
network once for the wheels. Installing touches the machine itself: the test holds a
lock so that two test runs on one machine take turns, and it refuses to run over an
installation it did not make.
"""

from __future__ import annotations

import fcntl
import grp
import os
import shlex
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import messagerie

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.package]

ROOT = Path(__file__).resolve().parents[1]
PKG = "messagerie-xen"
PREFIX = Path("/usr/lib/messagerie-xen")
COMMANDS = ("messagerie", "messagerie-broker", "messagerie-policy", "messagerie-pont")
LOCK = Path("/run/lock/messagerie-xen-package-test.lock")
STATE = Path("/var/lib/messagerie")


def _sudo() -> list[str]:
    if os.geteuid() == 0:
        return []
    assert shutil.which("sudo"), "the package test installs with apt: run it as root"
    return ["sudo", "-n"]


def run(*cmd: str | Path, root: bool = False, timeout: float = 300,
        check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    argv = [*(_sudo() if root else []), *map(str, cmd)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          check=False, **kw)  # type: ignore[call-overload]
    if check:
        assert done.returncode == 0, (f"{shlex.join(argv)}: exit {done.returncode}\n"
                                      f"{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return done


def _installed() -> bool:
    done = run("dpkg-query", "-W", "-f=${db:Status-Status}", PKG, check=False)
    return done.stdout.strip() not in ("", "not-installed", "config-files")


APT = ("apt-get", "-y", "-q", "-o", "DPkg::Lock::Timeout=300")
ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    done = run(ROOT / "packaging" / "build-deb", out, timeout=900)
    path = Path(done.stdout.strip().splitlines()[-1])
    assert path.name == f"{PKG}_{messagerie.__version__}_{_arch()}.deb"
    return path


def _arch() -> str:
    return run("dpkg", "--print-architecture").stdout.strip()


@pytest.fixture(scope="module")
def installed(deb: Path) -> Iterator[Path]:
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)       # another suite on this machine waits
        assert not _installed(), (f"{PKG} is installed on this machine already; the "
                                  f"test installs and purges it: remove it first")
        assert not STATE.exists(), f"{STATE} exists already: the purge would remove it"
        try:
            run(*APT, "install", f"./{deb.name}", root=True, cwd=deb.parent, env=ENV)
            # What the service leaves once it has run: systemd makes its StateDirectory,
            # the broker its spool there.
            run("install", "-d", "-m", "0700", STATE, root=True)
            run("touch", STATE / "spool.sqlite3", root=True)
            yield deb
        finally:
            run(*APT, "purge", PKG, root=True, env=ENV, check=False)
    assert not _installed()
    for gone in (Path("/usr/bin/messagerie"), Path("/etc/messagerie"), PREFIX, STATE):
        assert not gone.exists(), f"{gone} left behind by apt-get purge"


def test_lintian_finds_no_error(deb: Path) -> None:
    done = run("lintian", "--fail-on", "error", "--no-tag-display-limit", deb, check=False)
    lines = done.stdout.splitlines()
    print("lintian:", *lines, sep="\n")
    assert done.returncode == 0 and not [x for x in lines if x.startswith("E:")], \
        done.stdout + done.stderr


def test_commands_on_path_run_from_the_private_venv(installed: Path, tmp_path: Path) -> None:
    for name in COMMANDS:
        assert shutil.which(name, path="/usr/bin:/bin") == f"/usr/bin/{name}"
        assert "examples:" in run(f"/usr/bin/{name}", "--help").stdout
    where = run(PREFIX / "bin" / "python3", "-c",
                "import messagerie, broker, msgspec, structlog; "
                "print(messagerie.__file__, broker.__file__, structlog.__version__)").stdout
    assert all(path.startswith(f"{PREFIX}/lib/") for path in where.split()[:2]), where
    # Another `broker` package, on $PYTHONPATH and in the current directory, is not
    # the one the commands import.
    (tmp_path / "broker").mkdir()
    (tmp_path / "broker" / "__init__.py").write_text('raise SystemExit("wrong broker")\n')
    done = run("/usr/bin/messagerie-policy", "/etc/messagerie/policy.toml", "-s", "vm-ui",
               "-d", "vm-sys-usb", "-t", "commande", "-n", "liste_disques",
               cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.stdout.startswith("vm-ui -> vm-sys-usb: commande liste_disques\nallow")


def test_check_config_and_the_demo_from_the_installed_paths(installed: Path) -> None:
    done = run("/usr/bin/messagerie-broker", "--check-config", "/etc/messagerie/broker.toml")
    assert done.stdout.startswith("/etc/messagerie/broker.toml: ok (")
    assert "policy: /etc/messagerie/policy.toml" in done.stdout
    demo = run("/usr/bin/messagerie-broker", "--demo", timeout=120)
    lines = [line for line in demo.stdout.splitlines() if line.startswith("demo |")]
    assert lines and lines[-1].endswith("stopped, exit status 0"), demo.stdout[-2000:]
    assert '"commande":"liste_disques","statut":"ok","resultat":["cle-1"]' in demo.stdout


def test_the_mqtt_bridge_from_the_installed_paths(installed: Path, tmp_path: Path) -> None:
    """messagerie-pont runs from the private venv (its MQTT client there too), checks a
    configuration, and its unit points at it."""
    where = run(PREFIX / "bin" / "python3", "-c",
                "import pont, aiomqtt, paho.mqtt; print(pont.__file__, aiomqtt.__file__)").stdout
    assert all(path.startswith(f"{PREFIX}/lib/") for path in where.split()), where
    config = tmp_path / "pont.toml"
    config.write_text('[pont]\nhote = "h1"\n[mqtt]\nhote = "127.0.0.1"\nport = 1883\n')
    done = run("/usr/bin/messagerie-pont", "--check-config", config)
    assert done.stdout.startswith(f"{config}: ok (host h1, identity supervision"), done.stdout
    text = Path("/lib/systemd/system/messagerie-pont.service").read_text()
    [exec_start] = [x for x in text.splitlines() if x.startswith("ExecStart=")]
    assert shlex.split(exec_start.removeprefix("ExecStart=")) == [
        "/usr/bin/messagerie-pont", "--config", "/etc/messagerie/pont.toml"]
    [doc] = [x for x in text.splitlines() if x.startswith("Documentation=file:")]
    assert Path(doc.removeprefix("Documentation=file:")).is_file()
    if shutil.which("systemd-analyze"):
        run("systemd-analyze", "verify", "/lib/systemd/system/messagerie-pont.service")


def test_unit_users_and_directories(installed: Path) -> None:
    unit = Path("/lib/systemd/system/messagerie-broker.service")
    text = unit.read_text()
    [exec_start] = [x for x in text.splitlines() if x.startswith("ExecStart=")]
    argv = shlex.split(exec_start.removeprefix("ExecStart="))
    assert argv == ["/usr/bin/messagerie-broker", "--config", "/etc/messagerie/broker.toml"]
    assert os.access(argv[0], os.X_OK)
    [doc] = [x for x in text.splitlines() if x.startswith("Documentation=file:")]
    assert Path(doc.removeprefix("Documentation=file:")).is_file()
    if shutil.which("systemd-analyze"):
        run("systemd-analyze", "verify", unit)
    assert Path("/lib/systemd/system/messagerie-canal@.service").is_file()
    # The broker's unit is enabled on install; the MQTT bridge's is not (it needs a
    # pont.toml of the admin's, and the broker a domain for it).
    wants = Path("/etc/systemd/system/multi-user.target.wants")
    assert (wants / "messagerie-broker.service").exists()
    assert not (wants / "messagerie-pont.service").exists()
    assert os.access("/usr/libexec/messagerie/messagerie-canal", os.X_OK)
    # sysusers and tmpfiles were applied by the maintainer scripts.
    assert run("getent", "passwd", "messagerie").stdout.split(":")[6].strip() \
        in ("/usr/sbin/nologin", "/sbin/nologin")
    run("getent", "group", "xen-channels")
    run("getent", "group", "messagerie-trace")
    assert "messagerie" in run("id", "-nG", "messagerie-pont").stdout.split()
    st = os.stat("/etc/messagerie")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, grp.getgrgid(st.st_gid).gr_name) \
        == (0o750, 0, "messagerie")


def test_conffiles_man_pages_and_docs(installed: Path) -> None:
    conffiles = run("dpkg-query", "-W", "-f=${Conffiles}", PKG).stdout.split()
    assert "/etc/messagerie/broker.toml" in conffiles
    assert "/etc/messagerie/policy.toml" in conffiles
    # the package's own default (no domain declared), the socle's policy; the
    # repository's commented examples among the docs
    assert Path("/etc/messagerie/broker.toml").read_text() == \
        (ROOT / "packaging" / "broker.toml").read_text()
    assert Path("/etc/messagerie/policy.toml").read_text() == \
        (ROOT / "config" / "socle-policy.toml").read_text()
    for page in ("messagerie", "messagerie-policy", "messagerie-broker", "messagerie-pont"):
        path = run("man", "-w", page).stdout.strip()
        assert path.startswith("/usr/share/man/man"), path
    assert "EXAMPLES" in run("man", "-P", "cat", "messagerie-broker",
                            env={**os.environ, "MANWIDTH": "80"}).stdout.upper()
    doc = Path("/usr/share/doc") / PKG
    for name in ("README.md", "copyright", "changelog.gz", "docs/broker.md",
                 "docs/install.md", "examples/policy.toml", "examples/broker.toml",
                 "examples/messagerie-broker-trace.conf", "examples/pont.toml",
                 "docs/bridge.md"):
        assert (doc / name).is_file(), name
    # Bytecode is compiled at install time (none in the package itself).
    listed = run("dpkg", "-L", PKG).stdout
    assert "__pycache__" not in listed
    assert any(PREFIX.rglob("__pycache__/cli.cpython-*.pyc"))
