"""The broker's log rendering: what a domain puts in a frame never drives the
operator's terminal, and the JSON lines decode back to what was logged."""

from __future__ import annotations

import io
import json
import types

import pytest
import structlog

from broker import logs
from broker.hub import Broker
from broker.ratelimit import LogBudget
from messagerie import FrameError

HOSTILE = b"\x1b]0;owned\x07\x1b[2J\x9b6n\x7fX"
"""An OSC title change, a clear-screen, a C1 CSI and DEL (and no space or quote: the
terminal renderer would have quoted it with ``repr``)."""


@pytest.fixture(autouse=True)
def _restore_logging() -> object:
    yield
    structlog.reset_defaults()


def _invalid_frame_line(stream: io.StringIO, excerpt: bytes) -> str:
    # The very event a DomU's junk line makes (Broker.invalid -> frame.invalid).
    peer = types.SimpleNamespace(log_budget=LogBudget(),
                                 log=structlog.get_logger("broker").bind(domain="vm-x"))
    error = FrameError("not_json", "bad", len(excerpt), None, excerpt)
    Broker._log_invalid(peer, error)  # type: ignore[arg-type]
    return stream.getvalue()


def test_terminal_rendering_escapes_control_characters() -> None:
    stream = io.StringIO()
    logs.configure(stream=stream, force_json=False)  # the terminal renderer
    out = _invalid_frame_line(stream, HOSTILE)
    assert "frame.invalid" in out
    body = out.rstrip("\n")
    assert not any(ord(c) < 0x20 or 0x7f <= ord(c) <= 0x9f for c in body), repr(body)
    assert "excerpt='\\x1b]0;owned\\x07\\x1b[2J" in body  # shown, inert


def test_terminal_rendering_escapes_a_journal_text_and_keeps_tracebacks() -> None:
    stream = io.StringIO()
    logs.configure(stream=stream, force_json=False)
    log = structlog.get_logger("broker")
    log.info("domain.journal", text="line1\nfake.event level=error\x1b[31m")
    log.info("domain.journal", text="\x1b[2J\x1b]0;owned\x07", component="\x9b2J")
    out = stream.getvalue()
    assert out.count("\n") == 2 and "\x1b" not in out  # no forged line
    assert "\x9b" not in out
    assert "text='line1\\nfake.event level=error\\x1b[31m'" in out
    assert "text='\\x1b[2J\\x1b]0;owned\\x07'" in out and "component='\\x9b2J'" in out
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("broker.failed")
    assert "Traceback" in stream.getvalue()
    assert "ValueError: boom" in stream.getvalue()


def test_json_rendering_is_inert_and_decodes_back() -> None:
    stream = io.StringIO()
    logs.configure(stream=stream, force_json=True)
    out = _invalid_frame_line(stream, HOSTILE)
    line = out.rstrip("\n")
    assert "\n" not in line
    assert not any(ord(c) < 0x20 or 0x7f <= ord(c) <= 0x9f for c in line), repr(line)
    event = json.loads(line)
    assert event["event"] == "frame.invalid"
    # The excerpt is the bytes as ASCII with the rest backslash-escaped: the C0
    # controls are there, decoded back, but the line itself never carried them raw.
    assert event["excerpt"].startswith("\x1b]0;owned\x07\x1b[2J")


def test_json_rendering_escapes_c1_controls_in_any_string() -> None:
    stream = io.StringIO()
    logs.configure(stream=stream, force_json=True)
    structlog.get_logger("broker").info("domain.journal", text="a\x9b2Jb\x85c\x7f")
    line = stream.getvalue().rstrip("\n")
    assert "\\u009b" in line and "\x9b" not in line and "\x85" not in line
    assert json.loads(line)["text"] == "a\x9b2Jb\x85c\x7f"
