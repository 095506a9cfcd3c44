"""The protocol model: constructors, accessors, reply()/fail(), names and payload checks."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from messagerie import (
    DOM0,
    NAME_MAX,
    TOUS,
    Categorie,
    Code,
    Commande,
    Evenement,
    FichierEtat,
    Journal,
    Message,
    MessageInvalide,
    Niveau,
    Notification,
    Reason,
    Reponse,
    Statut,
    check_name,
    is_valid_name,
    new_id,
)
from messagerie.model import (
    HORODATAGE_PATTERN,
    MESSAGE_TYPES,
    TOKEN_PATTERN,
    valid_name_or_tous,
)


def invalid(reason: Reason, field: str | None, exc: pytest.ExceptionInfo[MessageInvalide]) -> None:
    """The error has this reason, names this field, and says so in its text."""
    assert exc.value.reason is reason
    assert exc.value.field == field
    if field is not None:
        assert str(exc.value).startswith(f"{field}: ")
    assert exc.value.detail


def payload_refused(check: Callable[[dict[str, object]], object], payload: dict[str, object],
                    field: str, value: object, reason: Reason, *, missing: bool) -> None:
    """``check`` refuses ``payload`` with ``field`` set to ``value`` (removed if
    ``missing``) for ``reason``, naming ``payload.<field>``."""
    if missing:
        del payload[field]
    else:
        payload[field] = value
    with pytest.raises(MessageInvalide) as exc:
        check(payload)
    invalid(reason, f"payload.{field}", exc)


# --- names -------------------------------------------------------------------------------

VALID_NAMES = ["dom0", "vm-sys-usb", "a", "A", "0", "ui.kiosk_2", "x" * NAME_MAX, "TOUS"]
INVALID_NAMES = ["", "-vm", ".vm", "_vm", "vm a", "vm/a", "vm\n", "vm\x00", "vm\x1b",
                 "é", "vm-é", "x" * (NAME_MAX + 1), "vm:a", " vm"]


@pytest.mark.parametrize("name", VALID_NAMES)
def test_valid_names(name: str) -> None:
    assert is_valid_name(name)
    assert check_name(name, "source") == name
    assert Notification(name, name, "c", "e").source == name


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_invalid_names(name: str) -> None:
    assert not is_valid_name(name)
    with pytest.raises(MessageInvalide) as exc:
        check_name(name, "source")
    invalid(Reason.BAD_NAME, "source", exc)
    with pytest.raises(MessageInvalide) as exc:
        Notification("vm-a", name, "c", "e")
    invalid(Reason.BAD_NAME, "destination", exc)


@pytest.mark.parametrize("value", [None, 1, 1.5, True, ["vm-a"], {"vm": "a"}, b"vm-a"])
def test_name_of_wrong_type(value: object) -> None:
    with pytest.raises(MessageInvalide) as exc:
        check_name(value, "destination")
    invalid(Reason.WRONG_TYPE, "destination", exc)
    assert not valid_name_or_tous(value)


def test_dom0_is_an_ordinary_name() -> None:
    assert DOM0 == "dom0"
    msg = Commande("vm-ui", DOM0, "lister")
    assert msg.destination == "dom0"
    assert msg.reply([]).source == "dom0"


def test_tous_is_only_a_destination() -> None:
    assert not is_valid_name(TOUS)
    assert check_name(TOUS, "destination", broadcast=True) == TOUS
    with pytest.raises(MessageInvalide) as exc:
        check_name(TOUS, "source")
    invalid(Reason.BAD_NAME, "source", exc)
    with pytest.raises(MessageInvalide) as exc:
        Notification(TOUS, "vm-a", "c", "e")
    invalid(Reason.BAD_NAME, "source", exc)
    assert Notification("vm-a", TOUS, "c", "e").destination == TOUS
    assert Journal("vm-a", TOUS, Niveau.INFO, "t", "svc").destination == TOUS


def test_commande_and_reponse_never_broadcast() -> None:
    with pytest.raises(MessageInvalide) as exc:
        Commande("vm-a", TOUS, "lister")
    invalid(Reason.BAD_NAME, "destination", exc)
    with pytest.raises(MessageInvalide) as exc:
        Reponse("vm-a", TOUS, "id1", "lister")
    invalid(Reason.BAD_NAME, "destination", exc)
    assert [t for t, cls in MESSAGE_TYPES.items() if cls.broadcastable] == [
        "notification", "journal"]


def test_name_memo_is_bounded() -> None:
    for i in range(5000):
        assert valid_name_or_tous(f"memo-{i}")
    assert len(valid_name_or_tous.seen) <= 4096
    assert not valid_name_or_tous("bad name")
    assert "bad name" not in valid_name_or_tous.seen


# --- the envelope ------------------------------------------------------------------------

def test_message_is_abstract() -> None:
    with pytest.raises(TypeError):
        Message("vm-a", "vm-b", {})


def test_payload_must_be_a_mapping() -> None:
    with pytest.raises(MessageInvalide) as exc:
        Message.__init__(Notification.__new__(Notification), "vm-a", "vm-b",
                         ["categorie"])  # type: ignore[arg-type]
    invalid(Reason.WRONG_TYPE, "payload", exc)


def test_extra_envelope_keys_are_kept_and_cannot_shadow() -> None:
    payload = {"categorie": "c", "evenement": "e"}
    msg = Notification.__new__(Notification)
    Message.__init__(msg, "vm-a", "vm-b", payload, extra={"trace": "abc"})
    assert msg.extra == {"trace": "abc"}
    assert msg.to_dict()["trace"] == "abc"
    for key in ("type", "source", "destination", "payload"):
        with pytest.raises(ValueError, match=key):
            Message.__init__(msg, "vm-a", "vm-b", payload, extra={key: "x"})


def test_equality_repr_and_hash() -> None:
    a = Notification("vm-a", "vm-b", "c", "e", {"x": 1})
    b = Notification("vm-a", "vm-b", "c", "e", {"x": 1})
    assert a == b
    assert a != Notification("vm-a", "vm-b", "c", "e", {"x": 2})
    assert a != Journal("vm-a", "vm-b", "info", "t", "c", horodatage="2024-01-01T00:00:00Z")
    assert a != "not a message"
    assert "Notification(source='vm-a'" in repr(a)
    with pytest.raises(TypeError):
        hash(a)


def test_payload_is_copied() -> None:
    data = {"x": 1}
    msg = Notification("vm-a", "vm-b", "c", "e", data)
    data["x"] = 2
    assert msg.data == {"x": 1}


# --- notification --------------------------------------------------------------------------

def test_notification() -> None:
    msg = Notification("vm-sys-usb", TOUS, Categorie.DISQUE, Evenement.ETAT,
                       {"nom": "sda", "connecte": True})
    assert msg.type == "notification"
    assert (msg.categorie, msg.evenement, msg.name) == ("disque", "etat", "disque")
    assert msg.data == {"nom": "sda", "connecte": True}
    assert msg.raw is None and msg.extra == {}
    assert msg.to_dict() == {
        "type": "notification", "source": "vm-sys-usb", "destination": "tous",
        "payload": {"categorie": "disque", "evenement": "etat",
                    "data": {"nom": "sda", "connecte": True}}}


def test_notification_data_defaults_to_empty_object() -> None:
    msg = Notification("vm-a", "vm-b", "c", "e")
    assert msg.payload["data"] == {} and msg.data == {}
    for payload in ({"categorie": "c", "evenement": "e"},
                    {"categorie": "c", "evenement": "e", "data": None}):
        msg = Notification.__new__(Notification)
        Message.__init__(msg, "vm-a", "vm-b", payload)
        assert msg.data == {}


@pytest.mark.parametrize(("field", "value", "reason"), [
    ("categorie", None, Reason.MISSING_FIELD),
    ("categorie", 1, Reason.WRONG_TYPE),
    ("categorie", ["c"], Reason.WRONG_TYPE),
    ("categorie", {"c": 1}, Reason.WRONG_TYPE),
    ("categorie", "", Reason.BAD_VALUE),
    ("categorie", "a b", Reason.BAD_VALUE),
    ("categorie", "x" * 65, Reason.BAD_VALUE),
    ("categorie", "-c", Reason.BAD_VALUE),
    ("evenement", None, Reason.MISSING_FIELD),
    ("evenement", True, Reason.WRONG_TYPE),
    ("evenement", "e\n", Reason.BAD_VALUE),
    ("data", [], Reason.WRONG_TYPE),
    ("data", "x", Reason.WRONG_TYPE),
    ("data", 0, Reason.WRONG_TYPE),
])
def test_notification_payload_errors(field: str, value: object, reason: Reason) -> None:
    payload_refused(Notification.check_payload, {"categorie": "c", "evenement": "e", "data": {}},
                    field, value, reason, missing=value is None and reason is Reason.MISSING_FIELD)


def test_tokens_accept_their_whole_alphabet() -> None:
    for token in ("usb_device", "a", "x" * 64, "fichier:lire", "disque/lister", "v1.2-rc"):
        Notification.check_payload({"categorie": token, "evenement": token})


@pytest.mark.parametrize("constant", [
    *(v for k, v in vars(Categorie).items() if k.isupper()),
    *(v for k, v in vars(Evenement).items() if k.isupper()),
])
def test_vocabulary_constants_are_valid_tokens(constant: str) -> None:
    assert re.fullmatch(TOKEN_PATTERN[1:-1], constant)
    Notification("vm-a", TOUS, constant, constant)


def test_vocabulary_values() -> None:
    assert (Categorie.USB_DEVICE, Evenement.USB_CONNECT, Evenement.USB_DISCONNECT) == (
        "usb_device", "usb_connect", "usb_disconnect")
    assert {FichierEtat.DISPONIBLE, FichierEtat.ERREUR, FichierEtat.COPIE,
            FichierEtat.SUPPRIME} == {"disponible", "erreur", "copié", "supprimé"}
    codes = [v for k, v in vars(Code).items() if k.isupper()]
    assert len(codes) == len(set(codes)) >= 9
    assert all(re.fullmatch(TOKEN_PATTERN[1:-1], c) for c in codes)


# --- commande / reponse --------------------------------------------------------------------

def test_commande() -> None:
    cmd = Commande("vm-ui", "vm-sys-usb", "liste_fichiers", {"disque": "sda"}, id="req-1")
    assert cmd.type == "commande"
    assert (cmd.id, cmd.commande, cmd.name) == ("req-1", "liste_fichiers", "liste_fichiers")
    assert cmd.arguments == {"disque": "sda"}
    assert cmd.to_dict()["payload"] == {
        "id": "req-1", "commande": "liste_fichiers", "arguments": {"disque": "sda"}}


def test_commande_generates_distinct_ids() -> None:
    ids = {Commande("vm-a", "vm-b", "x").id for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch("[0-9a-f]{16}", i) for i in ids)
    assert re.fullmatch("[0-9a-f]{16}", new_id())
    assert Commande("vm-a", "vm-b", "x").arguments == {}


@pytest.mark.parametrize(("field", "value", "reason"), [
    ("id", None, Reason.MISSING_FIELD),
    ("id", 7, Reason.WRONG_TYPE),
    ("id", "", Reason.BAD_VALUE),
    ("id", "a b", Reason.BAD_VALUE),
    ("id", "é", Reason.BAD_VALUE),
    ("id", "x" * 65, Reason.BAD_VALUE),
    ("commande", None, Reason.MISSING_FIELD),
    ("commande", ["x"], Reason.WRONG_TYPE),
    ("commande", "rm -rf", Reason.BAD_VALUE),
    ("arguments", [1], Reason.WRONG_TYPE),
])
def test_commande_payload_errors(field: str, value: object, reason: Reason) -> None:
    payload_refused(Commande.check_payload, {"id": "1", "commande": "c", "arguments": {}},
                    field, value, reason, missing=value is None)


def test_reply() -> None:
    cmd = Commande("vm-ui", "vm-sys-usb", "liste_disques", id="c-42")
    rep = cmd.reply(["sda", "sdb"])
    assert isinstance(rep, Reponse)
    assert (rep.source, rep.destination) == ("vm-sys-usb", "vm-ui")
    assert (rep.id, rep.commande, rep.name) == ("c-42", "liste_disques", "liste_disques")
    assert rep.ok and rep.statut is Statut.OK
    assert rep.resultat == ["sda", "sdb"] and rep.erreur is None
    assert rep.to_dict()["payload"] == {"id": "c-42", "commande": "liste_disques",
                                        "statut": "ok", "resultat": ["sda", "sdb"]}
    assert cmd.reply().resultat is None
    assert cmd.reply(source="dom0").source == "dom0"


def test_fail() -> None:
    cmd = Commande("vm-ui", "vm-sys-usb", "lire", {"fichier": "a.txt"}, id="c-43")
    rep = cmd.fail(Code.DESTINATION_HORS_LIGNE, "vm-sys-usb is down", source=DOM0)
    assert (rep.source, rep.destination, rep.id) == ("dom0", "vm-ui", "c-43")
    assert not rep.ok and rep.statut is Statut.ERREUR
    assert rep.erreur == {"code": "destination_hors_ligne", "message": "vm-sys-usb is down"}
    assert rep.resultat is None
    assert "resultat" not in rep.payload
    assert cmd.fail("mon_code", "x").source == "vm-sys-usb"


@pytest.mark.parametrize(("payload", "reason", "field"), [
    ({"commande": "c", "statut": "ok"}, Reason.MISSING_FIELD, "payload.id"),
    ({"id": "1", "statut": "ok"}, Reason.MISSING_FIELD, "payload.commande"),
    ({"id": "1", "commande": "c"}, Reason.MISSING_FIELD, "payload.statut"),
    ({"id": "1", "commande": "c", "statut": 1}, Reason.WRONG_TYPE, "payload.statut"),
    ({"id": "1", "commande": "c", "statut": "OK"}, Reason.BAD_VALUE, "payload.statut"),
    ({"id": "1", "commande": "c", "statut": "erreur"}, Reason.MISSING_FIELD, "payload.erreur"),
    ({"id": "1", "commande": "c", "statut": "erreur", "erreur": "x"}, Reason.WRONG_TYPE,
     "payload.erreur"),
    ({"id": "1", "commande": "c", "statut": "erreur", "erreur": {"message": "m"}},
     Reason.MISSING_FIELD, "payload.erreur.code"),
    ({"id": "1", "commande": "c", "statut": "erreur", "erreur": {"code": "c"}},
     Reason.MISSING_FIELD, "payload.erreur.message"),
    ({"id": "1", "commande": "c", "statut": "erreur", "erreur": {"code": 1, "message": "m"}},
     Reason.WRONG_TYPE, "payload.erreur.code"),
    ({"id": "1", "commande": "c", "statut": "erreur", "erreur": {"code": "c", "message": None}},
     Reason.WRONG_TYPE, "payload.erreur.message"),
])
def test_reponse_payload_errors(payload: dict[str, object], reason: Reason, field: str) -> None:
    with pytest.raises(MessageInvalide) as exc:
        Reponse.check_payload(payload)
    invalid(reason, field, exc)


def test_reponse_ok_needs_no_resultat_and_keeps_any_value() -> None:
    Reponse.check_payload({"id": "1", "commande": "c", "statut": "ok"})
    for value in (None, 0, "x", [1, {"a": None}], {"k": [True]}):
        assert Reponse("vm-a", "vm-b", "1", "c", resultat=value).resultat == value


def test_reponse_constructor_refuses_unknown_statut() -> None:
    with pytest.raises(MessageInvalide) as exc:
        Reponse("vm-a", "vm-b", "1", "c", "peut-etre")
    invalid(Reason.BAD_VALUE, "payload.statut", exc)


# --- journal ---------------------------------------------------------------------------------

def test_journal() -> None:
    msg = Journal("vm-sys-usb", DOM0, Niveau.WARNING, "disque retiré", "montage",
                  horodatage="2024-05-01T12:00:00.123+02:00", data={"disque": "sda"})
    assert msg.type == "journal"
    assert msg.niveau is Niveau.WARNING
    assert (msg.texte, msg.composant, msg.name) == ("disque retiré", "montage", "montage")
    assert msg.horodatage == "2024-05-01T12:00:00.123+02:00"
    assert msg.data == {"disque": "sda"}
    assert msg.payload["niveau"] == "warning"


def test_journal_default_timestamp_is_utc_rfc3339() -> None:
    msg = Journal("vm-a", DOM0, "info", "t", "svc")
    assert re.fullmatch(HORODATAGE_PATTERN[1:-1], msg.horodatage)
    assert msg.horodatage.endswith("Z")
    assert msg.data == {}


@pytest.mark.parametrize(("field", "value", "reason"), [
    ("niveau", None, Reason.MISSING_FIELD),
    ("niveau", 3, Reason.WRONG_TYPE),
    ("niveau", "INFO", Reason.BAD_VALUE),
    ("niveau", "fatal", Reason.BAD_VALUE),
    ("texte", None, Reason.MISSING_FIELD),
    ("texte", ["t"], Reason.WRONG_TYPE),
    ("horodatage", None, Reason.MISSING_FIELD),
    ("horodatage", 1714564800, Reason.WRONG_TYPE),
    ("horodatage", "2024-05-01 12:00:00Z", Reason.BAD_VALUE),
    ("horodatage", "2024-05-01T12:00:00", Reason.BAD_VALUE),
    ("horodatage", "2024-05-01T12:00:00Z\n", Reason.BAD_VALUE),
    # Arabic-Indic digits: Python's \d matches them, JSON Schema's does not.
    ("horodatage", "٢٠٢٤-05-01T12:00:00Z", Reason.BAD_VALUE),
    ("composant", None, Reason.MISSING_FIELD),
    ("composant", "mon composant", Reason.BAD_VALUE),
    ("data", "x", Reason.WRONG_TYPE),
])
def test_journal_payload_errors(field: str, value: object, reason: Reason) -> None:
    payload: dict[str, object] = {"niveau": "info", "texte": "t",
                                  "horodatage": "2024-05-01T12:00:00Z", "composant": "svc"}
    if value is None:
        payload.pop(field, None)
    else:
        payload[field] = value
    with pytest.raises(MessageInvalide) as exc:
        Journal.check_payload(payload)
    invalid(reason, f"payload.{field}", exc)


@pytest.mark.parametrize("niveau", list(Niveau))
def test_every_niveau(niveau: Niveau) -> None:
    assert Journal("vm-a", DOM0, niveau.value, "t", "svc").niveau is niveau


@pytest.mark.parametrize("stamp", ["2024-05-01T12:00:00Z", "2024-05-01T12:00:00.1Z",
                                   "2024-05-01T12:00:00.123456789-05:30"])
def test_valid_timestamps(stamp: str) -> None:
    assert Journal("vm-a", DOM0, "info", "t", "svc", horodatage=stamp).horodatage == stamp
