"""docs/protocol.md cannot rot: its message examples decode, its refused examples fail with
the documented reason, and the specification's example is there verbatim."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from messagerie import Code, Message, MessageInvalide, Notification, Reason, decode, encode
from tests.support.corpus import SPEC_EXAMPLE_TEXT as SPEC_EXAMPLE

PROTOCOL = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
FENCE = re.compile(r"^```(json[^\n]*)\n(.*?)^```\s*$", re.M | re.S)


def blocks() -> list[tuple[str, str]]:
    return [(m.group(1).strip(), m.group(2)) for m in FENCE.finditer(PROTOCOL.read_text("utf-8"))]


def lines(info: str) -> list[str]:
    return [line for tag, body in blocks() if tag == info
            for line in body.splitlines() if line.strip()]


MESSAGES = lines("json message")
REFUSED = [(tag.split(":", 1)[1], line) for tag, body in blocks()
           if tag.startswith("json invalid:") for line in body.splitlines() if line.strip()]


def test_blocks_are_found() -> None:
    assert len(MESSAGES) >= 12
    assert len(REFUSED) >= 4
    assert {tag for tag, _ in blocks()} <= {"json", "json message",
                                            *(f"json invalid:{r}" for r in Reason)}


@pytest.mark.parametrize("line", MESSAGES)
def test_message_examples_decode(line: str) -> None:
    msg = decode(line.encode())
    assert isinstance(msg, Message)
    # Written as they travel: compact, so they re-encode byte for byte.
    assert encode(msg) == line.encode() + b"\n"


@pytest.mark.parametrize(("reason", "line"), REFUSED)
def test_refused_examples_fail_as_documented(reason: str, line: str) -> None:
    with pytest.raises(MessageInvalide) as exc:
        decode(line.encode())
    assert exc.value.reason == reason


def test_other_json_blocks_are_json() -> None:
    plain = [body for tag, body in blocks() if tag == "json"]
    assert plain
    for body in plain:
        json.loads(body)


def test_spec_example_is_there_verbatim() -> None:
    assert SPEC_EXAMPLE in MESSAGES


def test_every_type_has_an_example() -> None:
    kinds = {decode(line.encode()).type for line in MESSAGES}
    assert kinds == {"notification", "commande", "reponse", "journal"}


def test_every_reason_and_code_is_documented() -> None:
    text = PROTOCOL.read_text("utf-8")
    for reason in Reason:
        assert f"| `{reason.value}` |" in text, reason
    for name, code in vars(Code).items():
        if name.isupper():
            assert f"| `{code}` |" in text, code


def test_broker_notifications_are_documented() -> None:
    events = {(m.source, m.destination, m.categorie, m.evenement, str(m.data))
              for m in map(decode, (line.encode() for line in MESSAGES))
              if isinstance(m, Notification)}
    for event in ("connecte", "deconnecte"):
        assert ("dom0", "tous", "domaine", event, "{'domaine': 'vm-sys-usb'}") in events
