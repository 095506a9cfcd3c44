"""The bridge's pure parts: topics, filters, what comes in from MQTT, the uplink buffer."""

from __future__ import annotations

import json

import pytest

from messagerie.codec import decode, encode
from messagerie.model import Commande, Journal, Notification, Reponse
from pont.buffer import Item, UplinkBuffer
from pont.mapping import (
    Inject,
    Refuse,
    ReplyTo,
    Request,
    check_identity,
    inbound,
    matches,
    topic_for,
    valid_filter,
)

KW = {"prefix": "messagerie", "host": "h1", "identity": "supervision", "requests": (),
      "response_topic": None, "correlation": None}


def test_topic_for_each_type() -> None:
    n = Notification("vm-a", "tous", "disque", "ajout", {})
    c = Commande("vm-a", "vm-b", "liste_disques")
    r = c.reply(["sda"])
    j = Journal("vm-a", "dom0", "info", "hello", "scanner")
    assert topic_for("messagerie", "h1", n) == "messagerie/h1/vm-a/notification/disque"
    assert topic_for("messagerie", "h1", c) == "messagerie/h1/vm-a/commande/liste_disques"
    assert topic_for("messagerie", "h1", r) == "messagerie/h1/vm-b/reponse/liste_disques"
    assert topic_for("m", "h2", j) == "m/h2/vm-a/journal/scanner"


@pytest.mark.parametrize(("flt", "topic", "ok"), [
    ("a/b/c", "a/b/c", True),
    ("a/+/c", "a/x/c", True),
    ("a/+/c", "a/x/y/c", False),
    ("a/#", "a", True),
    ("a/#", "a/b/c", True),
    ("a/b", "a/b/c", False),
    ("a/b/c", "a/b", False),
    ("+/+", "a/b", True),
    ("#", "anything/at/all", True),
])
def test_matches(flt: str, topic: str, ok: bool) -> None:
    assert matches(flt, topic) is ok


@pytest.mark.parametrize("bad", ["", "a/#/b", "a/b#", "a+/b"])
def test_invalid_filters_say_why(bad: str) -> None:
    assert valid_filter(bad) is not None
    assert valid_filter("a/+/#") is None


def test_identity_is_never_dom0_or_tous() -> None:
    assert check_identity("supervision") == "supervision"
    for name in ("dom0", "tous"):
        with pytest.raises(ValueError, match="reserved"):
            check_identity(name)


def cmd(source: str = "supervision", id: str = "0123456789abcdef") -> bytes:
    return encode(Commande(source, "vm-a", "liste_disques", {"x": 1}, id=id)).rstrip(b"\n")


def test_a_command_is_injected_with_its_exact_bytes_and_reply_topic() -> None:
    payload = b'{"type":"commande", "source":"supervision","destination":"vm-a",' \
              b'"payload":{"id":"00000000000000aa","commande":"liste_disques"}}'
    d = inbound("messagerie/h1/supervision/commande/liste_disques", payload,
                **{**KW, "response_topic": "r/1", "correlation": b"\x01"})
    assert isinstance(d, Inject)
    assert d.frame == payload
    assert d.reply_to == ReplyTo("r/1", b"\x01")


def test_without_response_topic_the_reply_goes_to_the_out_mapping() -> None:
    d = inbound("messagerie/h1/supervision/commande/liste_disques", cmd(), **KW)
    assert isinstance(d, Inject)
    assert d.reply_to == ReplyTo("messagerie/h1/vm-a/reponse/liste_disques", None)


@pytest.mark.parametrize(("source", "reason"), [("dom0", "source"), ("vm-b", "source")])
def test_nothing_from_mqtt_claims_another_source(source: str, reason: str) -> None:
    d = inbound("messagerie/h1/supervision/commande/liste_disques", cmd(source),
                **{**KW, "response_topic": "r/1", "correlation": b"c"})
    assert isinstance(d, Refuse) and d.reason == reason
    assert d.answer is not None
    reply_to, body = d.answer
    assert reply_to == ReplyTo("r/1", b"c")
    rep = decode(body)
    assert isinstance(rep, Reponse) and rep.erreur is not None
    assert rep.erreur["code"] == "refuse" and rep.id == "0123456789abcdef"


def test_the_topic_must_agree_with_the_payload() -> None:
    # A filter on .../commande/liste_disques cannot let in another command.
    d = inbound("messagerie/h1/supervision/commande/autre", cmd(), **KW)
    assert isinstance(d, Refuse) and d.reason == "topic"
    d = inbound("messagerie/h2/supervision/commande/liste_disques", cmd(), **KW)
    assert isinstance(d, Refuse) and d.reason == "topic"


def test_an_id_already_in_flight_is_refused() -> None:
    d = inbound("messagerie/h1/supervision/commande/liste_disques", cmd(),
                **{**KW, "in_flight": frozenset({"0123456789abcdef"})})
    assert isinstance(d, Refuse) and d.reason == "duplicate_id" and d.answer is not None


@pytest.mark.parametrize("payload", [b"", b"not json", b"[1]", b'{"type":"x"}',
                                     b"\xff\xfe", b"{" * 10000])
def test_garbage_is_refused_never_raised(payload: bytes) -> None:
    d = inbound("messagerie/h1/supervision/commande/x", payload, **KW)
    assert isinstance(d, Refuse) and d.reason == "invalid" and d.detail


def test_a_notification_from_mqtt() -> None:
    n = encode(Notification("supervision", "tous", "consigne", "maj", {"v": 2})).rstrip(b"\n")
    d = inbound("messagerie/h1/supervision/notification/consigne", n, **KW)
    assert isinstance(d, Inject) and d.reply_to is None and d.frame == n


REQ = (Request("system/disks/list_disks", "vm-sys-usb", "liste_disques"),)


def test_the_fields_request_form() -> None:
    d = inbound("system/disks/list_disks/request", b'{"disque": "sdb"}',
                **{**KW, "requests": REQ})
    assert isinstance(d, Inject)
    assert isinstance(d.message, Commande)
    assert (d.message.source, d.message.destination, d.message.commande) == \
        ("supervision", "vm-sys-usb", "liste_disques")
    assert d.message.arguments == {"disque": "sdb"}
    assert d.reply_to == ReplyTo("system/disks/list_disks/response/supervision", None)
    assert json.loads(d.frame)["payload"]["id"] == d.message.id
    empty = inbound("system/disks/list_disks/request", b"", **{**KW, "requests": REQ})
    assert isinstance(empty, Inject) and empty.message.payload["arguments"] == {}


@pytest.mark.parametrize("payload", [b"[1, 2]", b"nope", b'"text"'])
def test_a_bad_field_request_is_answered_message_invalide(payload: bytes) -> None:
    d = inbound("system/disks/list_disks/request", payload, **{**KW, "requests": REQ})
    assert isinstance(d, Refuse) and d.answer is not None
    reply_to, body = d.answer
    assert reply_to.topic == "system/disks/list_disks/response/supervision"
    rep = decode(body)
    assert isinstance(rep, Reponse) and rep.erreur is not None
    assert rep.erreur["code"] == "message_invalide" and "JSON object" in rep.erreur["message"]


def item(n: int, size: int = 10, since: float = 0.0) -> Item:
    return Item(f"t/{n}", b"x" * size, 0, None, since)


def test_buffer_drops_the_oldest_beyond_its_count() -> None:
    b = UplinkBuffer(max_messages=3, max_bytes=1000, max_age=60)
    dropped = sum(b.put(item(n)) for n in range(5))
    assert dropped == 2 and b.dropped.count == 2
    assert [i.topic for i in b.take(10)] == ["t/2", "t/3", "t/4"]
    assert b.size == 0


def test_buffer_bytes_bound_and_an_item_too_large() -> None:
    b = UplinkBuffer(max_messages=100, max_bytes=25, max_age=60)
    b.put(item(0))
    b.put(item(1))
    b.put(item(2))                    # 30 bytes: the oldest goes
    assert [i.topic for i in b.items] == ["t/1", "t/2"] and b.size == 20
    assert b.put(item(3, size=26)) == 1  # never fits: itself dropped
    assert b.dropped.bytes == 2 and len(b) == 2


def test_buffer_age_and_requeue_keep_order_and_bounds() -> None:
    b = UplinkBuffer(max_messages=4, max_bytes=1000, max_age=5.0)
    for n in range(3):
        b.put(item(n, since=float(n)))
    assert b.expire(6.5) == 2 and b.dropped.age == 2
    sent = b.take(1)
    b.put(item(3, since=7.0))
    b.put(item(4, since=7.0))
    b.put(item(5, since=7.0))
    assert b.requeue(sent) == 0
    assert [i.topic for i in b.items] == ["t/2", "t/3", "t/4", "t/5"]
    assert b.requeue([item(9)]) == 1  # over the count: the oldest (the requeued) goes
    assert [i.topic for i in b.items] == ["t/2", "t/3", "t/4", "t/5"]
