"""Fixtures of the guest tier (``-m guest``): a booted guest with its agent, the broker
on its channel, and the figures the tests measure (printed at the end of the run).

When QEMU or the guest kernel cannot be had (not root, no apt, no network), the tests
are skipped with the reason, unless ``MESSAGERIE_GUEST_REQUIRED=1`` (CI) makes that a
failure.
"""

from __future__ import annotations

import compileall
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from guest_lab import FIGURES, ROOT, GuestLab
from guestvm import Channel, Guest, GuestUnavailable, ensure_assets, ensure_qemu, ensure_xen
from xen_lab import XenLab


@pytest.fixture(scope="session")
def guest_ready() -> None:
    """QEMU and the guest kernel, installed and built on first use."""
    try:
        ensure_qemu()
        ensure_assets()
    except GuestUnavailable as exc:
        if os.environ.get("MESSAGERIE_GUEST_REQUIRED") == "1":
            pytest.fail(f"guest tier required but unavailable: {exc}", pytrace=False)
        pytest.skip(f"guest tier unavailable: {exc}")
    # The guest imports the project from the host's tree over 9p; compiling it here
    # spares the guest ~10 s of compiling it again at every boot (PYTHONDONTWRITEBYTECODE
    # or a read-only tree would otherwise make each run pay).
    for tree in (ROOT / "src", Path(__file__).parent):
        compileall.compile_dir(tree, quiet=1)


@pytest.fixture(scope="session")
def xen(guest_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[XenLab]:
    """Xen booted once for the whole session (~40 s to a usable dom0, under TCG), the
    broker started in dom0, vm-a created: every xen test runs in it, in order."""
    try:
        ensure_xen()
    except GuestUnavailable as exc:
        if os.environ.get("MESSAGERIE_GUEST_REQUIRED") == "1":
            pytest.fail(f"xen tier required but unavailable: {exc}", pytrace=False)
        pytest.skip(f"xen tier unavailable: {exc}")
    lab = XenLab(tmp_path_factory.mktemp("xen"))
    FIGURES["xen: QEMU start to dom0 toolstack ready (s)"] = round(lab.boot_seconds, 1)
    FIGURES["xen: dom0 toolstack copy / start (s)"] = (lab.ready.get("copy_seconds"),
                                                      lab.ready.get("toolstack_seconds"))
    yield lab
    status = lab.close()
    FIGURES.update({f"xen: {k}": v for k, v in lab.figures.items()})
    FIGURES["xen: session, start to power-off (s)"] = round(time.monotonic() - lab.started, 1)
    assert status == 0, f"dom0's agent exited {status}:\n{lab.console_tail()}"


@pytest.fixture
def run_in_guest(guest_ready: None) -> Callable[..., int]:
    """``run_in_guest(argv, channels=(), timeout=...)``: boot, run, power off; the
    command's exit status (124 timeout, 125 the guest could not run it)."""
    def run(argv: Sequence[str], channels: Sequence[Channel] = (), *,
            timeout: float = 300.0, **kwargs: Any) -> int:
        return Guest(argv, channels, **kwargs).start().wait(timeout)
    return run


@pytest.fixture(scope="module")
def lab(guest_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuestLab]:
    """One guest booted for the whole module (a boot and an import cost ~10-20 s)."""
    tmp = tmp_path_factory.mktemp("guest")
    lab = GuestLab(tmp)
    FIGURES["boot to agent ready (s)"] = round(lab.boot_seconds, 1)
    FIGURES["import messagerie in the guest (s)"] = lab.ready.get("import_seconds")
    yield lab
    status = lab.close()
    FIGURES["guest run, start to power-off (s)"] = round(time.monotonic() - lab.started, 1)
    assert status == 0, f"the guest agent exited {status}:\n{lab.console_tail()}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    funcargs = getattr(item, "funcargs", {})
    lab = funcargs.get("lab") or funcargs.get("xen")
    if report.failed and isinstance(lab, GuestLab | XenLab):
        report.sections.append(("guest lab", lab.diagnostics()))
    return report


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("guest tier: figures")
        for name, value in FIGURES.items():
            terminalreporter.write_line(f"{name}: {value}")
