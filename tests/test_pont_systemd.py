"""messagerie-pont's systemd unit: it verifies, it is hardened (exposure <= 2.0), its
sysusers.d file makes a user in the broker's group."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_systemd_unit import ANALYZE, directives, needs_analyze

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "messagerie-pont.service"
SYSUSERS = ROOT / "systemd" / "messagerie-pont.sysusers.conf"


@pytest.mark.integration
@needs_analyze
def test_verify(tmp_path: Path) -> None:
    binary = shutil.which("messagerie-pont", path=str(Path(sys.executable).parent))
    text, count = re.subn(r"^ExecStart=\S+", f"ExecStart={binary or sys.executable}",
                          UNIT.read_text(), flags=re.M)
    assert count == 1
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    assert ANALYZE is not None
    result = subprocess.run([ANALYZE, "verify", "--man=no", str(copy)],
                            capture_output=True, text=True, timeout=60, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert [ln for ln in output.splitlines() if UNIT.name in ln] == [], output


@pytest.mark.integration
@needs_analyze
def test_security_exposure() -> None:
    assert ANALYZE is not None
    result = subprocess.run([ANALYZE, "security", "--offline=yes", str(UNIT)],
                            capture_output=True, text=True, timeout=60, check=False)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
    assert found is not None, result.stdout + result.stderr
    assert float(found.group(1)) <= 2.0, result.stdout


def test_service_basics() -> None:
    d = directives(UNIT)
    for key, value in {"Type": ["notify"], "NotifyAccess": ["main"], "WatchdogSec": ["10"],
                       "User": ["messagerie-pont"], "Group": ["messagerie"],
                       "RuntimeDirectory": ["messagerie-pont"],
                       "RestrictAddressFamilies": ["AF_UNIX AF_INET AF_INET6"],
                       "ProtectSystem": ["strict"], "NoNewPrivileges": ["yes"],
                       "CapabilityBoundingSet": [""], "PrivateDevices": ["yes"],
                       "MemoryDenyWriteExecute": ["yes"]}.items():
        assert d.get(key) == value, key
    assert d["ExecStart"][0].startswith("/usr/local/bin/messagerie-pont --config ")
    assert "PrivateNetwork" not in d  # it needs TCP to the MQTT broker
    assert d["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]


@pytest.mark.integration
def test_sysusers_creates_the_user_in_the_brokers_group(tmp_path: Path) -> None:
    sysusers = shutil.which("systemd-sysusers")
    assert sysusers is not None, "systemd-sysusers is installed by .ci/system-deps"
    (tmp_path / "etc").mkdir()
    both = (ROOT / "systemd" / "messagerie.sysusers.conf").read_bytes() + SYSUSERS.read_bytes()
    subprocess.run([sysusers, f"--root={tmp_path}", "-"], input=both,
                   capture_output=True, check=True, timeout=60)
    passwd = (tmp_path / "etc" / "passwd").read_text()
    group = (tmp_path / "etc" / "group").read_text()
    assert re.search(r"^messagerie-pont:x:\d+:\d+:", passwd, re.M), passwd
    assert re.search(r"^messagerie:x:\d+:messagerie-pont$", group, re.M), group
