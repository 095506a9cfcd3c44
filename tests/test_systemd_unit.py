"""The systemd unit: it verifies, it is hardened, its sysusers.d file works."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "systemd"
UNIT = SYSTEMD / "messagerie-broker.service"
SYSUSERS = SYSTEMD / "messagerie.sysusers.conf"
TMPFILES = SYSTEMD / "messagerie.tmpfiles.conf"
TRACE_DROP_IN = SYSTEMD / "messagerie-broker-trace.conf"

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def directives(path: Path) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file, by key, in order (comments skipped)."""
    found: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        found.setdefault(key.strip(), []).append(value.strip())
    return found


def make_testable_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart= pointing at a binary that exists here (verify checks it)."""
    broker = shutil.which("messagerie-broker", path=str(Path(sys.executable).parent))
    binary = broker or sys.executable
    text = UNIT.read_text()
    text, count = re.subn(r"^ExecStart=\S+", f"ExecStart={binary}", text, flags=re.M)
    assert count == 1
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    return copy


def exposure(unit: Path) -> float:
    """``systemd-analyze security --offline=yes`` of a unit file (its drop-in directory
    ``<unit>.d/`` beside it is read too)."""
    assert ANALYZE is not None
    result = subprocess.run([ANALYZE, "security", "--offline=yes", str(unit)],
                            capture_output=True, text=True, timeout=60, check=False)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
    if found is None:
        pytest.skip(f"this systemd-analyze has no offline security analysis: {result.stderr}")
    return float(found.group(1))


@pytest.mark.integration
@needs_analyze
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    copy = make_testable_copy(tmp_path)
    assert ANALYZE is not None
    result = subprocess.run([ANALYZE, "verify", "--man=no", str(copy)],
                            capture_output=True, text=True, timeout=60, check=False)
    output = result.stdout + result.stderr
    # Complaints about the host's own units are not ours; any line naming our unit is.
    ours = [line for line in output.splitlines() if UNIT.name in line or str(copy) in line]
    assert result.returncode == 0, output
    assert ours == [], output


@pytest.mark.integration
@needs_analyze
def test_systemd_analyze_verify_catches_errors(tmp_path: Path) -> None:
    """The verify test is not vacuous: a misspelt directive is reported."""
    copy = make_testable_copy(tmp_path)
    copy.write_text(copy.read_text().replace("ProtectHome=yes", "ProtectHomme=yes"))
    assert ANALYZE is not None
    result = subprocess.run([ANALYZE, "verify", "--man=no", str(copy)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert "ProtectHomme" in result.stdout + result.stderr


@pytest.mark.integration
@needs_analyze
def test_security_exposure() -> None:
    assert exposure(UNIT) <= 2.0


def test_the_trace_drop_in_only_adds_the_trace_group() -> None:
    """The shipped drop-in for the trace socket adds one supplementary group, which the
    package's sysusers file creates, and touches nothing else of the unit."""
    assert directives(TRACE_DROP_IN) == {"SupplementaryGroups": ["messagerie-trace"]}
    assert "[Service]" in TRACE_DROP_IN.read_text().splitlines()
    groups = [line.split()[1] for line in SYSUSERS.read_text().splitlines()
              if line.startswith("g ")]
    assert "messagerie-trace" in groups
    assert directives(UNIT)["SupplementaryGroups"] == ["xen-channels"]  # kept: it adds


@pytest.mark.integration
@needs_analyze
def test_the_trace_drop_in_keeps_the_units_exposure(tmp_path: Path) -> None:
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text())
    alone = exposure(unit)
    drop_ins = tmp_path / f"{UNIT.name}.d"
    drop_ins.mkdir()
    (drop_ins / "trace.conf").write_text(TRACE_DROP_IN.read_text())
    assert exposure(unit) == alone
    # not vacuous: a drop-in beside the unit is read in this mode
    (drop_ins / "weaker.conf").write_text("[Service]\nProtectHome=no\n")
    assert exposure(unit) > alone


def test_service_basics() -> None:
    d = directives(UNIT)
    expected = {
        "Type": ["notify"],
        "NotifyAccess": ["main"],
        "ExecReload": ["/bin/kill -HUP $MAINPID"],
        "WatchdogSec": ["10"],
        "Restart": ["on-failure"],
        "RestartSec": ["2"],
        "User": ["messagerie"],
        "Group": ["messagerie"],
        "SupplementaryGroups": ["xen-channels"],
        "RuntimeDirectory": ["messagerie"],
        "RuntimeDirectoryMode": ["0750"],
        # The spool's file, and only the service's user reads it.
        "StateDirectory": ["messagerie"],
        "StateDirectoryMode": ["0700"],
    }
    for key, value in expected.items():
        assert d.get(key) == value, key
    assert d["ExecStart"][0].startswith("/usr/local/bin/messagerie-broker --config ")
    assert "ReadWritePaths" not in d


@pytest.mark.parametrize(("key", "value"), [
    ("NoNewPrivileges", "yes"),
    ("ProtectSystem", "strict"),
    ("ProtectHome", "yes"),
    ("PrivateTmp", "yes"),
    ("PrivateDevices", "yes"),
    ("PrivateNetwork", "yes"),
    ("RestrictAddressFamilies", "AF_UNIX"),
    ("CapabilityBoundingSet", ""),
    ("AmbientCapabilities", ""),
    ("SystemCallFilter", "@system-service"),
    ("SystemCallFilter", "~@privileged @resources"),
    ("SystemCallArchitectures", "native"),
    ("MemoryDenyWriteExecute", "yes"),
    ("LockPersonality", "yes"),
    ("RestrictRealtime", "yes"),
    ("RestrictNamespaces", "yes"),
    ("RestrictSUIDSGID", "yes"),
    ("ProtectKernelTunables", "yes"),
    ("ProtectKernelModules", "yes"),
    ("ProtectKernelLogs", "yes"),
    ("ProtectControlGroups", "yes"),
    ("ProtectClock", "yes"),
    ("ProtectHostname", "yes"),
    ("ProtectProc", "invisible"),
    ("ProcSubset", "pid"),
    ("DevicePolicy", "closed"),
    ("DeviceAllow", "char-pts rw"),
    ("UMask", "0007"),
    ("MemoryMax", "256M"),
    ("TasksMax", "16"),
    ("IPAddressDeny", "any"),
])
def test_hardening_directive(key: str, value: str) -> None:
    assert value in directives(UNIT).get(key, []), f"{key}={value} missing"


def test_no_private_users() -> None:
    """PrivateUsers= would hide the xen-channels group: see the comment in the unit."""
    assert "PrivateUsers" not in directives(UNIT)
    assert "PrivateUsers= is deliberately NOT set" in UNIT.read_text()


SUPPORTED_DOMAINS = 1000
"""What docs/broker.md ("Scale") promises."""


def test_limit_nofile_fits_the_supported_domains() -> None:
    # One fd per channel (tests/test_hostile_channels.py checks it), a few for the
    # process itself, room for dom0 services and for channels being reopened.
    assert int(directives(UNIT)["LimitNOFILE"][0]) >= SUPPORTED_DOMAINS * 2 + 256
    assert "broker supports 1 000 domains" in (ROOT / "docs" / "broker.md").read_text()


@pytest.mark.integration
def test_sysusers_creates_user_and_group(tmp_path: Path) -> None:
    sysusers = shutil.which("systemd-sysusers")
    if sysusers is None:
        pytest.skip("systemd-sysusers is not installed")
    (tmp_path / "etc").mkdir()
    subprocess.run([sysusers, f"--root={tmp_path}", "-"], stdin=SYSUSERS.open("rb"),
                   capture_output=True, check=True, timeout=60)
    passwd = (tmp_path / "etc" / "passwd").read_text()
    group = (tmp_path / "etc" / "group").read_text()
    assert re.search(r"^messagerie:x:\d+:\d+:.*:/usr/s?bin/nologin$", passwd, re.M), passwd
    assert re.search(r"^messagerie:x:\d+:$", group, re.M)
    assert re.search(r"^xen-channels:x:\d+:$", group, re.M)
    tmpfiles = shutil.which("systemd-tmpfiles")
    if tmpfiles is None:
        return
    subprocess.run([tmpfiles, f"--root={tmp_path}", "--create", "-"],
                   stdin=TMPFILES.open("rb"), capture_output=True, check=True, timeout=60)
    config_dir = tmp_path / "etc" / "messagerie"
    assert config_dir.is_dir()
    assert config_dir.stat().st_mode & 0o777 == 0o750
