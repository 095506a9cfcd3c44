"""The bridge's configuration: defaults, every error naming its key, --check-config."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pont.config import ConfigError, load, parse
from tests.support.mqtt import PONT, make_ca

ROOT = Path(__file__).resolve().parent.parent


def test_nothing_crosses_by_default() -> None:
    c = parse('[pont]\nhote = "h1"\n')
    assert (c.out_topics, c.in_topics, c.requests) == ((), (), ())
    assert c.identity == "supervision" and c.out_qos == 0 and c.in_qos == 0
    assert c.mqtt.tls is False and c.mqtt.port == 1883


def test_the_example_config_is_valid() -> None:
    c = load(ROOT / "config" / "pont.toml")
    assert c.host == "kiosque-01" and c.mqtt.tls and c.requests[0].destination == "vm-sys-usb"


@pytest.mark.parametrize(("text", "key"), [
    ("[pont]\n", "pont.hote: required"),
    ('[pont]\nhote = "a/b"\n', "pont.hote"),
    ('[pont]\nhote = "h"\nidentite = "dom0"\n', "pont.identite"),
    ('[pont]\nhote = "h"\nidentite = "tous"\n', "pont.identite"),
    ('[pont]\nhote = "h"\nidentite = "Bad Name"\n', "pont.identite"),
    ('[pont]\nhote = "h"\nsujet = 1\n', "pont.sujet: unknown key"),
    ('[pont]\nhote = "h"\n[sortie]\nqos = 2\n', "sortie.qos: 0 or 1"),
    ('[pont]\nhote = "h"\n[sortie]\nsujets = ["a/#/b"]\n', "sortie.sujets[0]"),
    ('[pont]\nhote = "h"\n[entree]\nsujets = [1]\n', "entree.sujets[0]"),
    ('[pont]\nhote = "h"\n[mqtt]\nport = 70000\n', "mqtt.port"),
    ('[pont]\nhote = "h"\n[mqtt]\nport = true\n', "mqtt.port"),
    ('[pont]\nhote = "h"\n[mqtt]\ncertificat = "c.pem"\n', "mqtt.cle"),
    ('[pont]\nhote = "h"\n[mqtt]\nmot_de_passe = "x"\n', "mqtt.mot_de_passe"),
    ('[pont]\nhote = "h"\n[tampon]\nmessages = 0\n', "tampon.messages: must be positive"),
    ('[pont]\nhote = "h"\n[reconnexion]\nmin = 5\nmax = 1\n', "reconnexion.max"),
    ('[pont]\nhote = "h"\n[[requete]]\nsujet = "a/b"\n', "requete[0].destination"),
    ('[pont]\nhote = "h"\n[[requete]]\nsujet = "a/request"\ndestination = "vm"\n'
     'commande = "c"\n', "requete[0].sujet"),
    ('[pont]\nhote = "h"\n[[requete]]\nsujet = "a/+"\ndestination = "vm"\n'
     'commande = "c"\n', "requete[0].sujet"),
    ('[pont]\nhote = "h"\n[autre]\n', "autre: unknown section"),
    ("[pont\n", "not valid TOML"),
])
def test_errors_name_the_key(text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")) as e:
        parse(text, source="pont.toml")
    assert str(e.value).startswith("pont.toml: ")


def test_relative_paths_are_from_the_file(tmp_path: Path) -> None:
    f = tmp_path / "pont.toml"
    f.write_text('[pont]\nhote = "h"\ncanal = "pont.sock"\n[mqtt]\nca = "ca.pem"\n')
    c = load(f)
    assert c.channel == str(tmp_path / "pont.sock") and c.mqtt.ca == str(tmp_path / "ca.pem")
    assert c.mqtt.tls is True


@pytest.mark.integration
def test_check_config(tmp_path: Path) -> None:
    tls = make_ca(tmp_path)
    good = tmp_path / "good.toml"
    good.write_text(f'[pont]\nhote = "h1"\n[mqtt]\nca = "{tls.ca}"\n'
                    f'certificat = "{tls.client_cert}"\ncle = "{tls.client_key}"\n'
                    '[sortie]\nsujets = ["messagerie/h1/#"]\n')
    result = subprocess.run([str(PONT), "--check-config", str(good)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "ok (host h1, identity supervision" in result.stdout and "TLS" in result.stdout
    # The key of another certificate: the TLS files are checked, and named.
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace(str(tls.client_key), str(tls.server_key)))
    result = subprocess.run([str(PONT), "--check-config", str(bad)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 2 and "mqtt TLS files" in result.stderr, result.stderr
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('[pont]\nhote = "h1"\n[sortie]\nqos = 3\n')
    result = subprocess.run([str(PONT), "--check-config", str(wrong)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 2 and "sortie.qos: 0 or 1, got 3" in result.stderr
    missing = subprocess.run([str(PONT), "--check-config", str(tmp_path / "none.toml")],
                             capture_output=True, text=True, timeout=60, check=False)
    assert missing.returncode == 2 and "cannot read" in missing.stderr


@pytest.mark.integration
def test_status_when_not_running(tmp_path: Path) -> None:
    f = tmp_path / "pont.toml"
    f.write_text(f'[pont]\nhote = "h1"\netat = "{tmp_path / "status.json"}"\n')
    result = subprocess.run([str(PONT), "status", "--config", str(f)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 3 and "not running" in result.stderr
