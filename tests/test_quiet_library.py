"""``messagerie`` as a library is silent until its application configures logging.

An application process (a subprocess here, so that nothing the test runner configured
leaks in) connects a ``BlockingClient`` to a pty, receives a garbled frame (a warning
event) and a notification, and closes: connect, invalid frame and close events all
happen. Without any logging configuration its stdout holds only what it printed itself
and its stderr is empty; with ``logging.basicConfig`` the same events appear on stderr
as standard ``logging`` records under ``messagerie.client``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import structlog
from structlog.testing import capture_logs

from messagerie.codec import encode
from messagerie.log import EventLogger, get_logger
from messagerie.model import Notification
from tests.support.ptys import PtyPair

APP = textwrap.dedent("""
    import logging, sys
    if sys.argv[2] == "logging":
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr,
                            format="%(name)s %(levelname)s %(message)s")
    from messagerie import BlockingClient
    with BlockingClient("vm-a", path=sys.argv[1]) as c:
        print("ready", flush=True)
        msg = c.receive(timeout=20)
        print("got", msg.categorie if msg else None, flush=True)
""")


def _run_app(pair: PtyPair, mode: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESSAGERIE")}
    proc = subprocess.Popen([sys.executable, "-c", APP, str(pair.domu), mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"      # the client holds its end
    fd = os.open(pair.dom0, os.O_RDWR | os.O_NOCTTY)
    try:
        os.write(fd, b'{"type":"notification"\n')   # invalid: a warning event
        os.write(fd, encode(Notification("vm-b", "vm-a", "disque", "etat", {})))
        out, err = proc.communicate(timeout=30)
    finally:
        os.close(fd)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "ready\n" + out, err)


@pytest.mark.integration
def test_unconfigured_application_sees_nothing(pair: PtyPair) -> None:
    done = _run_app(pair, "silent")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "ready\ngot disque\n"
    assert done.stderr == ""


@pytest.mark.integration
def test_configured_logging_gets_the_events(pair: PtyPair) -> None:
    done = _run_app(pair, "logging")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "ready\ngot disque\n"     # events never go to stdout
    lines = done.stderr.splitlines()
    assert any(line.startswith("messagerie.client INFO channel.connected domain='vm-a'")
               for line in lines), lines
    assert any(line.startswith("messagerie.client WARNING frame.invalid")
               and "reason=" in line for line in lines), lines
    assert any(line.startswith("messagerie.client INFO client.closed") for line in lines)


def test_events_are_stdlib_records_when_structlog_is_not_configured(
        caplog: pytest.LogCaptureFixture) -> None:
    was_configured, old = structlog.is_configured(), structlog.get_config()
    structlog.reset_defaults()
    try:
        log = get_logger("messagerie.client").bind(domain="vm-a")
        with caplog.at_level(logging.DEBUG, logger="messagerie"):
            log.warning("frame.invalid", reason="invalid_json")
            log.debug("channel.reconnect_failed", attempt=2)
    finally:
        if was_configured:
            structlog.configure(**old)
    records = [r for r in caplog.records if r.name == "messagerie.client"]
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.WARNING, "frame.invalid domain='vm-a' reason='invalid_json'"),
        (logging.DEBUG, "channel.reconnect_failed domain='vm-a' attempt=2"),
    ]
    assert records[0].event == "frame.invalid"                    # type: ignore[attr-defined]
    assert records[0].context == {"domain": "vm-a", "reason": "invalid_json"}  # type: ignore[attr-defined]


def test_the_package_logger_has_a_null_handler() -> None:
    # Without it, Python's last-resort handler prints warnings to stderr.
    handlers = logging.getLogger("messagerie").handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers)


def test_structlog_gets_the_events_once_the_application_configures_it() -> None:
    log: EventLogger = get_logger("messagerie.client").bind(domain="vm-a")
    with capture_logs() as logs:
        log.info("channel.connected", kind="tty")
    assert logs == [{"event": "channel.connected", "domain": "vm-a", "kind": "tty",
                     "log_level": "info"}]
