"""A real mosquitto on loopback, a test CA made with openssl, and ``messagerie-pont``
started as users start it (its console script), its JSON log events read from stdout.

mosquitto is the Debian package's binary run as a plain process with a generated
configuration (never the package's service); it can be stopped and started again on
the same port, to cut the bridge's uplink mid-flow.
"""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .broker_process import BIN
from .process import LoggedProcess
from .waiting import wait_until

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"
PONT = BIN / "messagerie-pont"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class Tls:
    """Files of a test PKI: a CA, a server certificate for 127.0.0.1/localhost, a
    client certificate, all signed by the CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str | Path) -> None:
    subprocess.run([OPENSSL, *map(str, args)], check=True, capture_output=True, timeout=60)


def make_ca(directory: Path, name: str = "ca") -> Tls:
    """A fresh CA (``name``) and a server and client certificate it signs."""
    d = directory / name
    d.mkdir(parents=True, exist_ok=True)
    ca_key, ca = d / "ca.key", d / "ca.pem"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", f"/CN=test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    out = {}
    for who, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                "extendedKeyUsage=serverAuth"),
                     ("client", "extendedKeyUsage=clientAuth")):
        key, csr, cert, extfile = (d / f"{who}.key", d / f"{who}.csr", d / f"{who}.pem",
                                   d / f"{who}.ext")
        extfile.write_text(ext + "\n")
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", key, "-out", csr, "-subj", f"/CN={who}")
        _openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
                 "-out", cert, "-days", "2", "-extfile", extfile)
        out[who] = (cert, key)
    return Tls(ca, out["server"][0], out["server"][1], out["client"][0], out["client"][1])


class Mosquitto:
    """``mosquitto -c FILE`` on 127.0.0.1:``port`` (plain, or TLS requiring a client
    certificate when ``tls`` is given)."""

    def __init__(self, directory: Path, *, tls: Tls | None = None, port: int | None = None,
                 start: bool = True, users: dict[str, str] | None = None) -> None:
        self.port = port or free_port()
        self.tls = tls
        self.conf = directory / f"mosquitto-{self.port}.conf"
        # Started as root, mosquitto would switch to the user "mosquitto", who cannot
        # read the test's files: it stays who runs the tests.
        lines = [f"user {getpass.getuser()}",
                 f"listener {self.port} 127.0.0.1", "allow_anonymous true",
                 "persistence false", "log_dest stderr", "log_type error",
                 "log_type warning", "max_queued_messages 100000", "max_inflight_messages 100"]
        if users:
            passwords = directory / f"passwords-{self.port}"
            passwords.touch(mode=0o600)
            for user, password in users.items():
                subprocess.run([MOSQUITTO_PASSWD, "-b", str(passwords), user, password],
                               check=True, capture_output=True, timeout=30)
            lines[2] = "allow_anonymous false"
            lines.append(f"password_file {passwords}")
        if tls is not None:
            lines += [f"cafile {tls.ca}", f"certfile {tls.server_cert}",
                      f"keyfile {tls.server_key}", "require_certificate true"]
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None
        if start:
            self.start()

    def start(self) -> Mosquitto:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        def listening() -> bool:
            assert self.proc is not None
            assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0
        wait_until(listening, what=f"mosquitto on port {self.port}")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


class PontProcess(LoggedProcess):
    """``messagerie-pont --config FILE`` as a subprocess; its JSON events collected."""

    def __init__(self, config: Path, *args: str) -> None:
        super().__init__([str(PONT), "--config", str(config), *args])

    def wait_event(self, event: str, timeout: float = 15.0, count: int = 1,
                   **match: Any) -> dict[str, Any]:
        return super().wait_event(event, timeout, count, **match)

    def tail(self, n: int = 12) -> list[str]:
        return super().tail(n)


def pont_config(path: Path, *, host: str, port: int, channel: Path, extra: str = "",
                tls: Tls | None = None, ca: Path | None = None,
                login: tuple[str, str] | None = None) -> Path:
    lines = ["[pont]", f'hote = "{host}"', f'canal = "{channel}"',
             f'etat = "{path.parent / (host + "-status.json")}"', "",
             "[mqtt]", 'hote = "127.0.0.1"', f"port = {port}"]
    if tls is not None:
        lines += [f'ca = "{ca or tls.ca}"', f'certificat = "{tls.client_cert}"',
                  f'cle = "{tls.client_key}"']
    if login is not None:
        lines += [f'utilisateur = "{login[0]}"', f'mot_de_passe = "{login[1]}"']
    lines += ["", "[reconnexion]", "min = 0.1", "max = 0.5", "", extra]
    path.write_text("\n".join(lines) + "\n")
    return path
