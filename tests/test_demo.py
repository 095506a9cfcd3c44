"""The README's first command: the broker's embedded demo runs and exits cleanly."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from broker import demo as demo_module
from tests.support.broker_process import BROKER
from tests.support.corpus import SPEC_EXAMPLE_TEXT

pytestmark = pytest.mark.integration


def test_demo_shows_the_flows_and_exits_zero() -> None:
    run = subprocess.run([str(BROKER), "--demo"], capture_output=True,
                         text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    demo = [line for line in run.stdout.splitlines() if line.startswith("demo |")]
    text = "\n".join(demo)
    # vm-sys-usb announces the spec's example to tous; both business domains get it.
    spec = SPEC_EXAMPLE_TEXT
    assert f"vm-ui      <- {spec}" in text and f"vm-diag    <- {spec}" in text
    # The station: a stick appears, is listed, a file is read into the store, copied
    # to a second stick with its .hash, deleted from the store; every message shown.
    assert '"data":{"nom":"cle-1","connecte":true}' in text
    assert '"commande":"liste_disques","statut":"ok","resultat":["cle-1"]' in text
    assert '"resultat":["photos/plage.jpg","rapport.pdf"]' in text
    assert '"commande":"depot_ecrit"' in text
    for etat in ("disponible", "copié", "supprimé"):
        assert f'vm-ui      <- {{"type":"notification","source":"dom0","destination":"tous",' \
               f'"payload":{{"categorie":"fichier","evenement":"etat","data":' \
               f'{{"fichier":"rapport.pdf","etat":"{etat}"}}}}}}' in text
    digest = hashlib.sha256(demo_module.USB_FILES["rapport.pdf"]).hexdigest()
    assert f"cle-2/rapport.pdf.hash: {digest}  rapport.pdf" in text
    assert "error message_invalide: arguments.nom_fichier" in text  # the path escape
    # What the broker refuses is answered, and said.
    assert "error refuse: refused by the routing policy" in text
    assert "error destination_inconnue" in text
    assert "spoofed_source" in run.stdout
    assert demo[-1].endswith("stopped, exit status 0")


def test_demo_policy_embeds_the_socle_snippet() -> None:
    snippet = Path(__file__).resolve().parent.parent / "config/socle-policy.toml"
    shipped = Path(demo_module.__file__).with_name("socle-policy.toml")
    assert snippet.read_text() == shipped.read_text() == demo_module.SOCLE_POLICY
    assert demo_module.POLICY.endswith(demo_module.SOCLE_POLICY)
