"""The bridge's configuration: a TOML file, validated into frozen dataclasses.

Keys are French like the broker's. Every error names the file and the key that is
wrong. Nothing crosses by default: ``sortie.sujets``, ``entree.sujets`` and
``[[requete]]`` are empty until configured. See ``config/pont.toml``.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from messagerie import is_valid_name

from .mapping import Request, check_identity, valid_filter

LEVELS: Final = ("debug", "info", "warning", "error")
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


class ConfigError(ValueError):
    """A configuration that cannot be used; the text names the file and the key."""


@dataclass(frozen=True, slots=True)
class Mqtt:
    host: str = "localhost"
    port: int = 1883
    client_id: str | None = None
    username: str | None = None
    password: str | None = None
    ca: str | None = None
    certificate: str | None = None
    key: str | None = None
    keepalive: int = 30
    tls: bool = False


@dataclass(frozen=True, slots=True)
class Buffer:
    messages: int = 10000
    bytes: int = 4 * 1024 * 1024
    age: float = 300.0


@dataclass(frozen=True, slots=True)
class Config:
    host: str
    identity: str = "supervision"
    channel: str = "/run/messagerie-pont/pont.sock"
    channel_mode: int = 0o660
    status_path: str | None = "/run/messagerie-pont/status.json"
    log_level: str = "info"
    prefix: str = "messagerie"
    out_topics: tuple[str, ...] = ()
    out_qos: int = 0
    in_topics: tuple[str, ...] = ()
    in_qos: int = 0
    requests: tuple[Request, ...] = ()
    command_timeout: float = 30.0
    max_commands: int = 64
    mqtt: Mqtt = Mqtt()
    buffer: Buffer = Buffer()
    backoff_min: float = 0.5
    backoff_max: float = 30.0


class _Reader:
    def __init__(self, source: str, data: dict[str, Any]) -> None:
        self.source = source
        self.data = data

    def error(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key}: {msg}")

    def section(self, name: str, known: set[str]) -> dict[str, Any]:
        value = self.data.get(name, {})
        if not isinstance(value, dict):
            raise self.error(name, "expected a table")
        unknown = sorted(set(value) - known)
        if unknown:
            raise self.error(f"{name}.{unknown[0]}",
                             f"unknown key (known: {', '.join(sorted(known))})")
        return value

    def get(self, table: dict[str, Any], section: str, key: str, kind: type | tuple[type, ...],
            default: Any) -> Any:
        if key not in table:
            return default
        value = table[key]
        if isinstance(value, bool) and kind is not bool:
            raise self.error(f"{section}.{key}", f"expected {_kind(kind)}, got a boolean")
        if not isinstance(value, kind):
            raise self.error(f"{section}.{key}", f"expected {_kind(kind)}, got {value!r}")
        return value

    def path(self, table: dict[str, Any], section: str, key: str, default: str | None,
             base: Path) -> str | None:
        value = self.get(table, section, key, str, default)
        if value is None:
            return None
        return str(base / value) if not Path(value).is_absolute() else value

    def positive(self, table: dict[str, Any], section: str, key: str, default: Any,
                 kind: type | tuple[type, ...] = int) -> Any:
        value = self.get(table, section, key, kind, default)
        if value <= 0:
            raise self.error(f"{section}.{key}", f"must be positive, got {value}")
        return value

    def qos(self, table: dict[str, Any], section: str) -> int:
        value: int = self.get(table, section, "qos", int, 0)
        if value not in (0, 1):
            raise self.error(f"{section}.qos", f"0 or 1, got {value}")
        return value

    def filters(self, table: dict[str, Any], section: str) -> tuple[str, ...]:
        value = self.get(table, section, "sujets", list, [])
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise self.error(f"{section}.sujets[{i}]", f"expected a string, got {item!r}")
            why = valid_filter(item)
            if why is not None:
                raise self.error(f"{section}.sujets[{i}]", f"not a topic filter ({why}): {item!r}")
        return tuple(value)


def _kind(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
             list: "a list", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def parse(text: str, *, source: str = "<string>", base: Path | None = None) -> Config:
    """The configuration in ``text`` (TOML); relative paths are taken from ``base``."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    base = base or Path.cwd()
    r = _Reader(source, data)
    unknown = sorted(set(data) - {"pont", "mqtt", "sortie", "entree", "requete", "tampon",
                                  "reconnexion"})
    if unknown:
        raise r.error(unknown[0], "unknown section")
    pont = r.section("pont", {"hote", "identite", "canal", "mode", "etat", "niveau_journal",
                              "prefixe", "delai_commande", "commandes_en_vol"})
    host = r.get(pont, "pont", "hote", str, None)
    if host is None:
        raise r.error("pont.hote", "required: this appliance's name in the topics")
    if not _HOST.fullmatch(host):
        raise r.error("pont.hote", f"letters, digits, '.', '_' and '-' only (no '/', '+', "
                                   f"'#'), up to 63: {host!r}")
    identity = r.get(pont, "pont", "identite", str, "supervision")
    try:
        check_identity(identity)
    except ValueError as exc:
        raise r.error("pont.identite", str(exc)) from None
    prefix = r.get(pont, "pont", "prefixe", str, "messagerie")
    if valid_filter(prefix) is not None or "+" in prefix or "#" in prefix or not prefix:
        raise r.error("pont.prefixe", f"a topic without wildcards, got {prefix!r}")
    level = r.get(pont, "pont", "niveau_journal", str, "info")
    if level not in LEVELS:
        raise r.error("pont.niveau_journal", f"one of {', '.join(LEVELS)}, got {level!r}")
    mode_text = r.get(pont, "pont", "mode", str, "0660")
    try:
        mode = int(mode_text, 8)
    except ValueError:
        raise r.error("pont.mode", f"octal permission bits, got {mode_text!r}") from None
    status = r.path(pont, "pont", "etat", "/run/messagerie-pont/status.json", base)
    channel = r.path(pont, "pont", "canal", "/run/messagerie-pont/pont.sock", base)
    assert channel is not None

    m = r.section("mqtt", {"hote", "port", "identifiant", "utilisateur", "mot_de_passe", "ca",
                           "certificat", "cle", "keepalive", "tls"})
    port = r.positive(m, "mqtt", "port", 1883)
    if port > 65535:
        raise r.error("mqtt.port", f"at most 65535, got {port}")
    cert = r.path(m, "mqtt", "certificat", None, base)
    key = r.path(m, "mqtt", "cle", None, base)
    if (cert is None) != (key is None):
        raise r.error("mqtt.cle" if key is None else "mqtt.certificat",
                      "a client certificate needs both certificat and cle")
    ca = r.path(m, "mqtt", "ca", None, base)
    username = r.get(m, "mqtt", "utilisateur", str, None)
    password = r.get(m, "mqtt", "mot_de_passe", str, None)
    if password is not None and username is None:
        raise r.error("mqtt.mot_de_passe", "a password needs mqtt.utilisateur")
    mqtt = Mqtt(host=r.get(m, "mqtt", "hote", str, "localhost"), port=port,
                client_id=r.get(m, "mqtt", "identifiant", str, None),
                username=username, password=password, ca=ca, certificate=cert, key=key,
                keepalive=r.positive(m, "mqtt", "keepalive", 30),
                tls=r.get(m, "mqtt", "tls", bool, ca is not None or cert is not None))

    out = r.section("sortie", {"sujets", "qos"})
    inn = r.section("entree", {"sujets", "qos"})
    t = r.section("tampon", {"messages", "octets", "age"})
    rc = r.section("reconnexion", {"min", "max"})
    bmin = r.positive(rc, "reconnexion", "min", 0.5, (int, float))
    bmax = r.positive(rc, "reconnexion", "max", 30.0, (int, float))
    if bmax < bmin:
        raise r.error("reconnexion.max", f"below reconnexion.min ({bmin})")

    requests = []
    raw_requests = data.get("requete", [])
    if not isinstance(raw_requests, list):
        raise r.error("requete", "expected an array of tables ([[requete]])")
    for i, item in enumerate(raw_requests):
        where = f"requete[{i}]"
        if not isinstance(item, dict):
            raise r.error(where, "expected a table")
        extra = sorted(set(item) - {"sujet", "destination", "commande"})
        if extra:
            raise r.error(f"{where}.{extra[0]}",
                          "unknown key (known: commande, destination, sujet)")
        for key in ("sujet", "destination", "commande"):
            if not isinstance(item.get(key), str):
                raise r.error(f"{where}.{key}", "required, a string")
        topic = item["sujet"]
        if valid_filter(topic) is not None or "+" in topic or "#" in topic:
            raise r.error(f"{where}.sujet", f"a topic without wildcards, got {topic!r}")
        if topic.endswith("/request"):
            raise r.error(f"{where}.sujet", "without the /request suffix (the bridge adds it)")
        if not is_valid_name(item["destination"]) or item["destination"] == "tous":
            raise r.error(f"{where}.destination", f"a domain name, got {item['destination']!r}")
        if not is_valid_name(item["commande"]):
            raise r.error(f"{where}.commande", f"a command name, got {item['commande']!r}")
        requests.append(Request(topic, item["destination"], item["commande"]))

    return Config(
        host=host, identity=identity, channel=channel, channel_mode=mode,
        status_path=status, log_level=level, prefix=prefix,
        out_topics=r.filters(out, "sortie"), out_qos=r.qos(out, "sortie"),
        in_topics=r.filters(inn, "entree"), in_qos=r.qos(inn, "entree"),
        requests=tuple(requests),
        command_timeout=r.positive(pont, "pont", "delai_commande", 30.0, (int, float)),
        max_commands=r.positive(pont, "pont", "commandes_en_vol", 64),
        mqtt=mqtt,
        buffer=Buffer(messages=r.positive(t, "tampon", "messages", 10000),
                      bytes=r.positive(t, "tampon", "octets", 4 * 1024 * 1024),
                      age=r.positive(t, "tampon", "age", 300.0, (int, float))),
        backoff_min=float(bmin), backoff_max=float(bmax))


def load(path: str | Path) -> Config:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror or exc}") from None
    return parse(text, source=str(p), base=p.resolve().parent)
