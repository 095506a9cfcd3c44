"""encode() / decode() / from_dict(): the wire format of each message type and every Reason."""

from __future__ import annotations

import json
from typing import Any

import pytest

from messagerie import (
    DOM0,
    TOUS,
    Commande,
    FichierEtat,
    Journal,
    Message,
    MessageInvalide,
    Notification,
    Reason,
    Reponse,
    decode,
    encode,
    from_dict,
)
from messagerie.envelope import decode_envelope
from tests.support.corpus import SPEC_EXAMPLE

SAMPLES: list[Message] = [
    Notification("vm-sys-usb", TOUS, "disque", "etat", {"nom": "sda", "connecte": True}),
    Notification(DOM0, TOUS, "fichier", "etat",
                 {"fichier": "rapport.pdf", "etat": FichierEtat.COPIE}),
    Notification("vm-sys-usb", "vm-ui", "entree", "souris",
                 {"entree": "souris", "position": {"x": 10, "y": 20},
                  "boutons": {"gauche": 1, "milieu": 0, "droit": 0}}),
    Commande("vm-ui", "vm-sys-usb", "liste_fichiers", {"disque": "sda"}, id="c1"),
    Commande("vm-ui", "vm-sys-usb", "liste_disques", id="c2").reply(["sda"]),
    Commande("vm-ui", DOM0, "supprimer", id="c3").fail("refuse", "non"),
    Journal("vm-sys-usb", DOM0, "error", "échec du montage", "montage",
            horodatage="2024-05-01T12:00:00Z", data={"disque": "sdb"}),
]


def envelope(kind: str = "notification", **payload: Any) -> dict[str, Any]:
    return {"type": kind, "source": "vm-a", "destination": "vm-b",
            "payload": payload or {"categorie": "c", "evenement": "e"}}


def frame(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


VALID = frame(envelope())


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: f"{m.type}-{m.name}")
def test_round_trip(msg: Message) -> None:
    line = encode(msg)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert b" " not in line.replace(b"\xc3\xa9chec du montage", b"")  # compact
    back = decode(line)
    assert type(back) is type(msg)
    assert back == msg
    assert back.raw == line[:-1]
    assert encode(back) == line
    assert json.loads(line) == msg.to_dict()


def test_spec_example_decodes_byte_exact() -> None:
    msg = decode(SPEC_EXAMPLE)
    assert isinstance(msg, Notification)
    assert (msg.source, msg.destination, msg.categorie, msg.evenement) == (
        "vm-sys-usb", "tous", "device", "connect")
    assert msg.payload["chemin"] == "/mnt/usb_in"
    assert msg.data == {}
    assert encode(msg) == SPEC_EXAMPLE + b"\n"


def test_non_ascii_is_utf8_not_escaped() -> None:
    line = encode(SAMPLES[1])
    assert "copié".encode() in line


@pytest.mark.parametrize("line", [
    VALID, VALID + b"\n", VALID + b"\r\n", bytearray(VALID), memoryview(VALID),
    VALID.decode(), b"  " + VALID + b"  ", frame(envelope()).replace(b",", b", "),
])
def test_decode_accepts(line: Any) -> None:
    assert decode(line) == from_dict(envelope())


def test_decoded_raw_is_the_frame_without_newline() -> None:
    assert decode(VALID + b"\r\n").raw == VALID
    assert decode(VALID + b"\n").raw == VALID


def test_unknown_keys_survive() -> None:
    obj = envelope(categorie="c", evenement="e", chemin="/mnt", data={"k": [1, None]})
    obj["trace"] = {"hop": 2}
    msg = decode(frame(obj))
    assert msg.extra == {"trace": {"hop": 2}}
    assert msg.payload["chemin"] == "/mnt"
    assert json.loads(encode(msg)) == obj
    assert from_dict(obj) == msg
    assert from_dict(obj).raw is None


def test_from_dict_validates() -> None:
    assert isinstance(from_dict(envelope("commande", id="1", commande="c")), Commande)
    with pytest.raises(MessageInvalide) as exc:
        from_dict(envelope("commande", id="1"))
    assert (exc.value.reason, exc.value.field) == (Reason.MISSING_FIELD, "payload.commande")


def test_decode_keeps_type_classes() -> None:
    kinds = {type(decode(encode(m))).__name__ for m in SAMPLES}
    assert kinds == {"Notification", "Commande", "Reponse", "Journal"}
    assert isinstance(decode(encode(SAMPLES[4])), Reponse)


# Every Reason, reached by decode(), with the field it must name (None: the whole frame).
NOTIF = envelope()
REASONS: list[tuple[str, bytes, Reason, str | None]] = [
    ("bad utf-8", VALID.replace(b'"e"', b'"\xff"'), Reason.INVALID_UTF8, None),
    ("truncated", VALID[:-1], Reason.INVALID_JSON, None),
    ("empty", b"", Reason.INVALID_JSON, None),
    ("array", b"[1,2]", Reason.NOT_AN_OBJECT, None),
    ("string", b'"x"', Reason.NOT_AN_OBJECT, None),
    ("null", b"null", Reason.NOT_AN_OBJECT, None),
    ("no type", frame({k: v for k, v in NOTIF.items() if k != "type"}),
     Reason.MISSING_FIELD, "type"),
    ("no source", frame({k: v for k, v in NOTIF.items() if k != "source"}),
     Reason.MISSING_FIELD, "source"),
    ("no destination", frame({k: v for k, v in NOTIF.items() if k != "destination"}),
     Reason.MISSING_FIELD, "destination"),
    ("no payload", frame({k: v for k, v in NOTIF.items() if k != "payload"}),
     Reason.MISSING_FIELD, "payload"),
    ("no categorie", frame(envelope(evenement="e")), Reason.MISSING_FIELD, "payload.categorie"),
    ("type int", frame({**NOTIF, "type": 1}), Reason.WRONG_TYPE, "type"),
    ("type list", frame({**NOTIF, "type": ["notification"]}), Reason.WRONG_TYPE, "type"),
    ("source int", frame({**NOTIF, "source": 1}), Reason.WRONG_TYPE, "source"),
    ("source list", frame({**NOTIF, "source": ["vm-a"]}), Reason.WRONG_TYPE, "source"),
    ("destination object", frame({**NOTIF, "destination": {}}), Reason.WRONG_TYPE,
     "destination"),
    ("payload list", frame({**NOTIF, "payload": []}), Reason.WRONG_TYPE, "payload"),
    ("categorie list", frame(envelope(categorie=["c"], evenement="e")), Reason.WRONG_TYPE,
     "payload.categorie"),
    ("evenement object", frame(envelope(categorie="c", evenement={"e": 1})), Reason.WRONG_TYPE,
     "payload.evenement"),
    ("data list", frame(envelope(categorie="c", evenement="e", data=[])), Reason.WRONG_TYPE,
     "payload.data"),
    ("unknown type", frame({**NOTIF, "type": "evenement"}), Reason.UNKNOWN_TYPE, "type"),
    ("bad source", frame({**NOTIF, "source": "vm a"}), Reason.BAD_NAME, "source"),
    ("tous as source", frame({**NOTIF, "source": "tous"}), Reason.BAD_NAME, "source"),
    ("bad destination", frame({**NOTIF, "destination": "-x"}), Reason.BAD_NAME, "destination"),
    ("commande to tous", frame({**envelope("commande", id="1", commande="c"),
                                "destination": "tous"}), Reason.BAD_NAME, "destination"),
    ("reponse to tous", frame({**envelope("reponse", id="1", commande="c", statut="ok"),
                               "destination": "tous"}), Reason.BAD_NAME, "destination"),
    ("bad categorie", frame(envelope(categorie="c c", evenement="e")), Reason.BAD_VALUE,
     "payload.categorie"),
    ("bad id", frame(envelope("commande", id="a b", commande="c")), Reason.BAD_VALUE,
     "payload.id"),
    ("bad statut", frame(envelope("reponse", id="1", commande="c", statut="bof")),
     Reason.BAD_VALUE, "payload.statut"),
    ("bad niveau", frame(envelope("journal", niveau="x", texte="t", composant="c",
                                  horodatage="2024-01-01T00:00:00Z")),
     Reason.BAD_VALUE, "payload.niveau"),
    ("duplicate", VALID.replace(b'"source":"vm-a"', b'"source":"vm-a","source":"vm-c"'),
     Reason.DUPLICATE_KEY, None),
]


@pytest.mark.parametrize(("line", "reason", "field"), [r[1:] for r in REASONS],
                         ids=[r[0] for r in REASONS])
def test_reasons(line: bytes, reason: Reason, field: str | None) -> None:
    with pytest.raises(MessageInvalide) as exc:
        decode(line)
    assert exc.value.reason is reason
    assert exc.value.field == field
    if field is not None:
        assert str(exc.value).startswith(f"{field}: ")
    assert exc.value.detail


def test_every_reason_is_reached() -> None:
    # TOO_LARGE belongs to the frame decoder (test_frame_decoder.py).
    assert {r[2] for r in REASONS} | {Reason.TOO_LARGE} == set(Reason)


def test_decode_of_a_str_with_a_lone_surrogate() -> None:
    with pytest.raises(MessageInvalide) as exc:
        decode(VALID.decode().replace('"e"', '"\ud800"'))
    assert exc.value.reason is Reason.INVALID_UTF8


def test_message_invalide_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="payload"):
        decode(frame({**NOTIF, "payload": 3}))


AMBIGUOUS = [
    # (frame, field): keys that parsers matching keys ignoring case (Go's encoding/json,
    # Java's equalsIgnoreCase, some Jackson / System.Text.Json settings) read as a second
    # protocol field.
    (b'{"type":"notification","source":"vm-a","destination":"vm-b","payload":'
     b'{"categorie":"entree","evenement":"souris","data":{}},"Source":"dom0"}', "Source"),
    (b'{"type":"notification","source":"vm-a","destination":"vm-b","payload":'
     b'{"categorie":"entree","evenement":"souris","data":{}},"DESTINATION":"vm-c"}',
     "DESTINATION"),
    ('{"type":"notification","source":"vm-a","destination":"vm-b","payload":'
     '{"categorie":"entree","evenement":"souris","data":{}},"\u017fource":"dom0"}'.encode(),
     "\u017fource"),  # the long s folds to s
    (b'{"type":"commande","source":"vm-a","destination":"vm-b","payload":{"id":"1",'
     b'"commande":"lire","arguments":{},"Commande":"effacer_tout","ID":"2"}}',
     "payload.Commande"),
    (b'{"type":"reponse","source":"vm-a","destination":"vm-b","payload":{"id":"1",'
     b'"commande":"lire","statut":"erreur","erreur":{"code":"x","message":"y","Code":"z"}}}',
     "payload.erreur.Code"),
    # A dotless i is I to Java's equalsIgnoreCase and .NET's OrdinalIgnoreCase (upper
    # case), though it folds to itself; a dotted capital I is i to Java (simple lower
    # case mapping), though Python lower-cases it to "i" plus a combining dot.
    ('{"type":"notification","source":"vm-a","destination":"vm-b","payload":'
     '{"categorie":"entree","evenement":"souris","data":{}},"dest\u0131nat\u0131on":"vm-c"}'
     .encode(), "dest\u0131nat\u0131on"),
    ('{"type":"reponse","source":"vm-b","destination":"vm-a","payload":{"id":"1",'
     '"\u0131d":"2","commande":"lire","statut":"ok","resultat":1}}'.encode(),
     "payload.\u0131d"),
    ('{"type":"commande","source":"vm-a","destination":"vm-b","payload":{"id":"1",'
     '"commande":"lire","arguments":{},"\u0130D":"2"}}'.encode(), "payload.\u0130D"),
    ('{"type":"notification","source":"vm-a","destination":"vm-b","payload":'
     '{"categorie":"entree","evenement":"souris","data":{}},"de\u017ft\u0130nat\u0131on":1}'
     .encode(), "de\u017ft\u0130nat\u0131on"),  # the three at once
    ('{"type":"notification","source":"vm-a","destination":"vm-b","payload":'
     '{"categorie":"entree","evenement":"souris","data":{},"categor\u0131e":"admin"}}'
     .encode(), "payload.categor\u0131e"),
]


@pytest.mark.parametrize(("frame", "field"), AMBIGUOUS, ids=[f for _, f in AMBIGUOUS])
def test_keys_equal_to_a_field_ignoring_case_are_refused(frame: bytes, field: str) -> None:
    from messagerie.envelope import decode_envelope

    for fn in (decode, decode_envelope):
        with pytest.raises(MessageInvalide) as exc:
            fn(frame)
        assert (exc.value.reason, exc.value.field) == (Reason.DUPLICATE_KEY, field), fn


def test_case_differences_inside_contents_or_elsewhere_are_kept() -> None:
    # Inside data (contents) and for unknown keys that match no field, nothing to refuse.
    line = (b'{"type":"notification","source":"vm-a","destination":"vm-b","payload":'
            b'{"categorie":"entree","evenement":"souris","data":{"Source":1,"source":2},'
            b'"Chemin":"x"},"Extra":1}')
    msg = decode(line)
    assert msg.extra == {"Extra": 1} and msg.payload["Chemin"] == "x"
    for key in ("SOURCE", "dest\u0131nat\u0131on", "dest\u0130nation"):
        with pytest.raises(ValueError, match="shadows"):
            Message.__init__(Notification.__new__(Notification), "vm-a", "vm-b",
                             {"categorie": "c", "evenement": "e"}, extra={key: "dom0"})
    with pytest.raises(MessageInvalide):  # built locally: the same rule
        Reponse("vm-a", "vm-b", "1", "lire", "erreur",
                erreur={"code": "x", "message": "y", "CODE": "z"})


@pytest.mark.parametrize(("payload", "reason", "field"), [
    (b'"categorie":"c","evenement":"e","Categorie":"x"', Reason.DUPLICATE_KEY,
     "payload.Categorie"),
    (b'"categorie":"c","evenement":"e","data":[1]', Reason.WRONG_TYPE, "payload.data"),
    (b'"categorie":"c","evenement":"e","data":"x"', Reason.WRONG_TYPE, "payload.data"),
    (b'"categorie":"c","evenement":"e","data":"}"', Reason.WRONG_TYPE, "payload.data"),
    (b'"categorie":"c","evenement":"e","data":[{}]', Reason.WRONG_TYPE, "payload.data"),
    (b'"categorie":"c"', Reason.MISSING_FIELD, "payload.evenement"),
    (b'"categorie":"c","evenement":["e"]', Reason.WRONG_TYPE, "payload.evenement"),
])
def test_known_names_do_not_spare_the_other_checks(payload: bytes, reason: Reason,
                                                   field: str) -> None:
    # Once a source, destination and tokens have passed together, a compact frame with
    # them is judged from that memo: every other field is still checked, as when cold.
    def frame(p: bytes) -> bytes:
        return (b'{"type":"notification","source":"vm-k","destination":"vm-l","payload":{'
                + p + b"}}")
    for check in (decode, decode_envelope):
        check(frame(b'"categorie":"c","evenement":"e","data":{}'))
        check(frame(b'"categorie":"c","evenement":"e","data":null'))
        check(frame(b'"categorie":"c","evenement":"e"'))
        with pytest.raises(MessageInvalide) as exc:
            check(frame(payload))
        assert (exc.value.reason, exc.value.field) == (reason, field)


def test_known_names_do_not_spare_a_commandes_id() -> None:
    def frame(id_: bytes) -> bytes:
        return (b'{"type":"commande","source":"vm-k","destination":"vm-l","payload":'
                b'{"id":' + id_ + b',"commande":"c","arguments":{}}}')
    for check in (decode, decode_envelope):
        check(frame(b'"1"'))
        for bad, reason in ((b'"a b"', Reason.BAD_VALUE), (b"1", Reason.WRONG_TYPE)):
            with pytest.raises(MessageInvalide) as exc:
                check(frame(bad))
            assert (exc.value.reason, exc.value.field) == (reason, "payload.id")


def test_unknown_payload_keys_passed_once_do_not_let_a_case_variant_through() -> None:
    # Unknown payload keys that passed the case rule are remembered per type (a subset
    # test instead of folding them in every frame); a variant of a field next to them
    # is still refused, by both decoders, memo warm or cold.
    from messagerie.envelope import decode_envelope
    from messagerie.wire import clear_memos

    def frame(extra: str) -> bytes:
        return ('{"type":"notification","source":"vm-k","destination":"tous","payload":'
                '{"categorie":"c","evenement":"e",' + extra + '}}').encode()
    for check in (decode, decode_envelope):
        clear_memos()
        for _ in range(2):
            assert check(frame('"chemin":"/mnt"')).type == "notification"
        for variant in ("Categorie", "\u017fource", "evenement\u0130"[:-1].upper(),
                        "categor\u0131e"):
            if variant.casefold() == "source":  # a top-level field: not the payload's
                line = frame('"chemin":"/mnt","' + variant + '":"x"')
                assert check(line).type == "notification"
                continue
            with pytest.raises(MessageInvalide) as exc:
                check(frame('"chemin":"/mnt","' + variant + '":"x"'))
            assert (exc.value.reason, exc.value.field) == (Reason.DUPLICATE_KEY,
                                                           f"payload.{variant}")
