"""The socle's catalogue (messagerie.socle): wire names, validation that names the
field, typed handlers, the JSON Schema, and the policy snippet that allows exactly its
flows."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from messagerie import Commande, CommandError, Notification, decode, encode, socle
from messagerie.model import MessageInvalide
from tests.support.broker_process import BIN

ROOT = Path(__file__).resolve().parent.parent


def test_wire_names_follow_the_fields_table() -> None:
    assert [c.commande for c in socle.COMMANDS] == [
        "liste_disques", "liste_fichiers", "lit_fichier", "copie_fichier", "supprime_fichier"]
    assert [(n.ident, n.categorie) for n in socle.NOTIFICATIONS] == [
        ("ETAT_DOMU", "etat_domu"), ("DISQUE", "disque"), ("FICHIER", "fichier"),
        ("INPUT", "entree")]
    assert socle.FORMER_NAMES["lister_disques"] == "liste_disques"
    assert socle.command_spec("lit_fichier") is socle.LIT_FICHIER


def test_destinations_follow_the_handled_by_column() -> None:
    assert socle.LIT_FICHIER.command("vm-ui", socle.LitFichier("cle", "a.pdf")).destination \
        == "vm-sys-usb"
    assert socle.SUPPRIME_FICHIER.command("vm-ui", socle.SupprimeFichier("a.pdf")).destination \
        == "dom0"
    assert socle.SUPPRIME_FICHIER.command(
        "vm-ui", socle.SupprimeFichier("a.pdf", "cle")).destination == "vm-sys-usb"
    cmd = socle.COPIE_FICHIER.command("vm-ui", socle.CopieFichier("d/a.pdf", "cle-2"))
    assert decode(encode(cmd)).payload["arguments"] == {  # type: ignore[attr-defined]
        "nom_fichier": "d/a.pdf", "nom_disque_destination": "cle-2"}
    assert socle.LIT_FICHIER.follows == (socle.FICHIER, ("disponible", "erreur"))


@pytest.mark.parametrize(("arguments", "field", "said"), [
    ({"nom_fichier": "a.pdf"}, "arguments.nom_disque", "missing required field"),
    ({"nom_disque": 3, "nom_fichier": "a.pdf"}, "arguments.nom_disque", "got `int`"),
    ({"nom_disque": "cle", "nom_fichier": "../etc/passwd"}, "arguments.nom_fichier", "'..'"),
    ({"nom_disque": "cle", "nom_fichier": "a/../../b"}, "arguments.nom_fichier", "'..'"),
    ({"nom_disque": "cle", "nom_fichier": "/etc/passwd"}, "arguments.nom_fichier", "leading"),
    ({"nom_disque": "..", "nom_fichier": "a"}, "arguments.nom_disque", "disk"),
    ({"nom_disque": "c/d", "nom_fichier": "a"}, "arguments.nom_disque", "disk"),
    ({"nom_disque": "cle", "nom_fichier": "a\nb"}, "arguments.nom_fichier", "control"),
])
def test_bad_arguments_name_the_field(arguments: dict[str, Any], field: str, said: str) -> None:
    with pytest.raises(MessageInvalide) as err:
        socle.LIT_FICHIER.parse_arguments(arguments)
    assert err.value.field == field
    assert said in str(err.value)


def test_good_arguments_and_defaults() -> None:
    assert socle.LIT_FICHIER.parse_arguments({"nom_disque": "Mon disque", "nom_fichier":
                                              "rapports/été.pdf"}) == \
        socle.LitFichier("Mon disque", "rapports/été.pdf")
    assert socle.SUPPRIME_FICHIER.parse_arguments({"nom_fichier": "a"}).nom_disque == "local"


def test_input_has_three_shapes_told_apart_by_entree() -> None:
    tap = socle.INPUT.build("vm-sys-usb", socle.Tactile(socle.Position(10, 20), 1))
    assert (tap.categorie, tap.evenement) == ("entree", "tactile")
    assert tap.data == {"entree": "tactile", "position": {"x": 10, "y": 20}, "touche": 1}
    assert socle.INPUT.parse(decode(encode(tap))) == socle.Tactile(socle.Position(10, 20), 1)  # type: ignore[arg-type]
    souris = Notification("vm-sys-usb", "tous", "entree", "souris", {
        "entree": "souris", "position": {"x": 0, "y": 0},
        "boutons": {"gauche": 1, "milieu": 0, "droit": 0}})
    assert isinstance(socle.INPUT.parse(souris), socle.Souris)
    with pytest.raises(MessageInvalide) as err:
        socle.INPUT.parse(Notification("vm-sys-usb", "tous", "entree", "clavier",
                                       {"entree": "clavier", "touche": "é"}))
    assert err.value.field == "payload.data.touche"
    with pytest.raises(MessageInvalide) as err:
        socle.INPUT.parse(Notification("vm-sys-usb", "tous", "entree", "souris", {
            "entree": "souris", "position": {"x": 0, "y": 0},
            "boutons": {"gauche": 2, "milieu": 0, "droit": 0}}))
    assert err.value.field == "payload.data.boutons.gauche"


def test_fichier_and_disque_notifications() -> None:
    n = socle.FICHIER.build("dom0", socle.Fichier("a.pdf", "disponible"))
    assert n.payload == {"categorie": "fichier", "evenement": "etat",
                         "data": {"fichier": "a.pdf", "etat": "disponible"}}
    with pytest.raises(MessageInvalide):
        socle.FICHIER.parse(Notification("dom0", "tous", "fichier", "etat",
                                         {"fichier": "a.pdf", "etat": "perdu"}))
    assert socle.DISQUE.parse(Notification("vm-sys-usb", "tous", "disque", "etat",
                                           {"nom": "cle", "connecte": True})).connecte is True


async def test_typed_handler_validates_and_checks_its_result() -> None:
    seen: list[socle.LitFichier] = []

    @socle.sert(socle.LIT_FICHIER)
    async def lit(args: socle.LitFichier, cmd: Commande) -> None:
        seen.append(args)

    served = lit.served  # type: ignore[attr-defined]
    assert served.commande == "lit_fichier"
    assert await served(Commande("vm-ui", "vm-sys-usb", "lit_fichier",
                                 {"nom_disque": "cle", "nom_fichier": "a.pdf"})) is None
    assert seen == [socle.LitFichier("cle", "a.pdf")]
    with pytest.raises(CommandError) as err:
        await served(Commande("vm-ui", "vm-sys-usb", "lit_fichier", {"nom_disque": "cle"}))
    assert err.value.code == "message_invalide"
    assert "arguments.nom_fichier" in err.value.message
    assert len(seen) == 1  # not called with bad arguments

    @socle.sert(socle.LISTE_DISQUES)
    def wrong(args: socle.ListeDisques, cmd: Commande) -> object:
        return [1, 2]

    with pytest.raises(CommandError) as err:
        await wrong.served(Commande("vm-ui", "vm-sys-usb", "liste_disques"))  # type: ignore[attr-defined]
    assert err.value.code == "erreur_interne"


def test_schema_is_checked_in_and_validates_the_wire() -> None:
    assert (ROOT / "docs/schema/socle.schema.json").read_text() == socle.render()
    doc = socle.schemas()
    jsonschema.Draft202012Validator.check_schema(doc)

    def validator(name: str) -> jsonschema.Draft202012Validator:
        return jsonschema.Draft202012Validator({**doc, "$ref": f"#/$defs/{name}"})

    assert validator("lit_fichier.arguments").is_valid({"nom_disque": "cle",
                                                        "nom_fichier": "a/b.pdf"})
    assert not validator("lit_fichier.arguments").is_valid({"nom_disque": "cle",
                                                            "nom_fichier": "a/../../b"})
    assert not validator("lit_fichier.arguments").is_valid({"nom_disque": "cle"})
    assert validator("liste_disques.resultat").is_valid(["cle-1", "cle-2"])
    assert not validator("liste_disques.resultat").is_valid([3])
    assert validator("entree.data").is_valid({"entree": "clavier", "touche": "a"})
    assert not validator("entree.data").is_valid({"entree": "clavier", "touche": "ab"})
    assert not validator("fichier.data").is_valid({"fichier": "a", "etat": "perdu"})


POLICY = ROOT / "config/socle-policy.toml"
ALLOWED = [
    ("vm-ui", "vm-sys-usb", "commande", "liste_disques"),
    ("vm-diag", "vm-sys-usb", "commande", "lit_fichier"),
    ("vm-ui", "vm-sys-usb", "commande", "copie_fichier"),
    ("vm-ui", "vm-sys-usb", "commande", "supprime_fichier"),
    ("vm-ui", "dom0", "commande", "supprime_fichier"),
    ("vm-sys-usb", "dom0", "commande", "depot_ecrit"),
]
DENIED = [
    ("vm-sys-usb", "vm-ui", "commande", "liste_disques"),   # vm-sys-usb asks nobody
    ("vm-ui", "vm-diag", "commande", "liste_disques"),      # DomUs do not serve
    ("vm-ui", "vm-sys-usb", "commande", "lister_disques"),  # the former name
    ("vm-ui", "dom0", "commande", "depot_ecrit"),           # only vm-sys-usb feeds the store
    ("vm-ui", "dom0", "commande", "lit_fichier"),
]


@pytest.mark.integration
@pytest.mark.parametrize(("source", "destination", "type", "nom"), ALLOWED + DENIED)
def test_policy_snippet_allows_exactly_the_socles_flows(source: str, destination: str,
                                                        type: str, nom: str) -> None:
    run = subprocess.run([str(BIN / "messagerie-policy"), str(POLICY), "-s", source, "-d",
                          destination, "-t", type, "-n", nom], capture_output=True, text=True,
                         timeout=60, check=False)
    assert run.returncode == (0 if (source, destination, type, nom) in ALLOWED else 1), \
        run.stdout + run.stderr


@pytest.mark.integration
@pytest.mark.parametrize(("source", "nom", "delivered"), [
    ("vm-sys-usb", "disque", True), ("vm-sys-usb", "entree", True),
    ("vm-sys-usb", "fichier", False),   # only dom0 announces file states
    ("dom0", "fichier", True), ("vm-ui", "etat_domu", True), ("vm-ui", "disque", False),
])
def test_policy_snippet_broadcasts(source: str, nom: str, delivered: bool) -> None:
    run = subprocess.run([str(BIN / "messagerie-policy"), str(POLICY), "-s", source, "-d",
                          "tous", "-t", "notification", "-n", nom], capture_output=True,
                         text=True, timeout=60, check=False)
    assert run.returncode == (0 if delivered else 1), run.stdout + run.stderr


@pytest.mark.integration
def test_messagerie_schema_socle_prints_it() -> None:
    run = subprocess.run([str(BIN / "messagerie"), "schema", "--socle"], capture_output=True,
                         text=True, timeout=60, check=True)
    assert run.stdout == socle.render()
    assert "lit_fichier.arguments" in json.loads(run.stdout)["$defs"]
