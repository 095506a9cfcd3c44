"""Broker configuration: a TOML file, validated into frozen dataclasses.

Keys are French like the wire protocol and the form integrators already use::

    [domaines.vm-sys-usb]
    chemin = "/var/run/vm-sys-usb-msg.sock"

Every error names the key that is wrong (``domaines.vm-ui.chemin: expected a string``).
See ``config/broker.toml`` for every key with its default and meaning.
"""

from __future__ import annotations

import fnmatch
import math
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from messagerie import DOM0, MAX_FRAME, is_valid_name

LEVELS: Final = ("debug", "info", "warning", "error")


VALIDATIONS: Final = ("enveloppe", "complete")
"""How much of each frame the broker checks (``broker.validation``)."""


class ConfigError(ValueError):
    """A configuration that cannot be used; the text names the file and the key."""


@dataclass(frozen=True, slots=True)
class DomainConfig:
    name: str
    path: str
    discovered: bool = False
    """Found by a discovery pattern rather than declared."""


@dataclass(frozen=True, slots=True)
class Limits:
    queue_bytes: int = 1024 * 1024
    """Outbound bytes held for one destination before its messages are dropped."""
    stall_timeout: float = 1.0
    """How long a destination that stopped reading may hold back its senders."""
    rate: float = 20000.0
    """Messages per second a domain may send, sustained (token bucket). The field's
    busiest flow, mouse input, peaks around 8 500/s."""
    burst: int = 5000
    """Messages a domain may send at once above the rate."""
    commands_in_flight: int = 128
    """Commands a domain may have waiting for an answer."""
    command_ttl: float = 300.0
    """After this long without an answer, a command is forgotten (and answered
    ``delai_depasse`` on behalf of its destination)."""
    commands_per_destination: int = 64
    """Of those, how many may wait on one destination: one that never answers cannot
    take all of its commanders' slots (``limites.commandes_en_vol_destination``; the
    client's defaults, 64 in all and 16 to one destination, never meet it)."""
    queues_memory: int | None = None
    """Bytes all the outbound queues together may hold (``limites.memoire_files``);
    None: 30 % of the cgroup's memory.max (``broker.memory``)."""
    spool_messages: int = 10_000
    """Messages the spool keeps for this domain while it is offline (``spool.messages``;
    ``spool_messages`` under ``[domaines.NAME]``)."""
    spool_bytes: int = 8 * 1024 * 1024
    """Bytes the spool keeps for it (``spool.octets``; ``spool_octets``)."""
    spool_age: float = 3600.0
    """Seconds a message waits in its spool at most (``spool.age``; ``spool_age``)."""
    cpu_share: float = 0.1
    """Of one core, the share a domain's input may cost the broker, sustained
    (``limites.part_cpu``): measured per read turn, a long turn charged more than its
    time (``Endpoint._process``). Honest mouse input at 8 500/s costs about 2 %."""
    cpu_burst: float = 0.1
    """CPU seconds a domain may spend at once above its share (``limites.rafale_cpu``)."""


LIMIT_KEYS: Final[dict[str, tuple[str, type]]] = {
    "file_octets": ("queue_bytes", int), "delai_blocage": ("stall_timeout", float),
    "debit": ("rate", float), "rafale": ("burst", int),
    "part_cpu": ("cpu_share", float), "rafale_cpu": ("cpu_burst", float),
    "commandes_en_vol": ("commands_in_flight", int),
    "commandes_en_vol_destination": ("commands_per_destination", int),
    "duree_commande": ("command_ttl", float),
    "spool_messages": ("spool_messages", int), "spool_octets": ("spool_bytes", int),
    "spool_age": ("spool_age", float)}
"""``[limites]`` keys (the same under ``[domaines.NAME]``), and the spool's bounds of
one domain (``spool_*``, whose broker-wide defaults are in ``[spool]``): the
:class:`Limits` field each sets, and its type."""
SPOOL_KEYS: Final[dict[str, tuple[str, type]]] = {
    "messages": ("spool_messages", int), "octets": ("spool_bytes", int),
    "age": ("spool_age", float)}
"""``[spool]`` bounds: every domain's, unless its ``[domaines.NAME]`` sets ``spool_*``."""
GLOBAL_LIMIT_KEYS: Final[dict[str, tuple[str, type]]] = {
    **{k: v for k, v in LIMIT_KEYS.items() if not k.startswith("spool_")},
    "memoire_files": ("queues_memory", int)}
"""``[limites]`` keys, those of the whole broker included (``memoire_files``: one
budget for every queue, so never per domain)."""

_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.*?\[\]!-]{1,64}")


@dataclass(frozen=True, slots=True)
class DomainLimits:
    """``[limites]`` keys set under ``[domaines.NAME]``: for the domain called ``NAME``,
    or, when ``NAME`` has ``*``, ``?`` or ``[...]`` (``[domaines."vm-usb-*"]``), for
    every domain whose name matches (declared or discovered)."""

    name: str
    values: dict[str, Any]
    """:class:`Limits` field -> value."""

    @property
    def is_pattern(self) -> bool:
        return any(c in self.name for c in "*?[")

    def matches(self, domain: str) -> bool:
        if self.is_pattern:
            return fnmatch.fnmatchcase(domain, self.name)
        return domain == self.name


@dataclass(frozen=True, slots=True)
class Config:
    domains: dict[str, DomainConfig] = field(default_factory=dict)
    discovery_patterns: tuple[str, ...] = ()
    discovery_interval: float = 1.0
    xenstore: bool = False
    """Bind domains to their channels from xenstore (``decouverte.xenstore``)."""
    xenstore_channel: str = "org.messagerie.0"
    """The channel's ``name`` in each domain's xl configuration; ``{domaine}`` stands
    for the domain's name (``decouverte.canal``)."""
    xenstore_path: str | None = None
    """xenstored's socket or ``/dev/xen/xenbus``; None: the first that exists."""
    dom0_socket: str | None = "/run/messagerie/dom0.sock"
    dom0_mode: int = 0o660
    dom0_group: str | None = None
    trace_socket: str = "/run/messagerie/trace.sock"
    trace_group: str | None = None
    """``[trace] groupe``: the group whose members may watch the traffic
    (``messagerie trace``); None: no trace socket."""
    log_level: str = "info"
    max_frame: int = MAX_FRAME
    validation: str = "enveloppe"
    """``enveloppe``: check what routing decides on (the envelope) and the JSON syntax
    of the whole frame; ``complete``: also refuse a key repeated inside ``data``, as
    :func:`messagerie.decode` does (slower)."""
    policy_path: str | None = None
    limits: Limits = field(default_factory=Limits)
    """``[limites]``: every domain's, and dom0's services', unless overridden below."""
    domain_limits: tuple[DomainLimits, ...] = ()
    """Per-domain overrides, in file order (:meth:`limits_for`)."""
    reconnect_min: float = 0.1
    reconnect_max: float = 5.0
    spool: bool = True
    """Keep messages for offline declared domains (``spool.actif``)."""
    spool_total_bytes: int = 64 * 1024 * 1024
    """Bytes the spool keeps for all domains together (``spool.octets_total``)."""
    spool_path: str | None = None
    """The spool's SQLite file (``spool.chemin``); None: ``$STATE_DIRECTORY/spool.sqlite3``
    under systemd, else a temporary file that lasts as long as the process."""
    source: str = "<defaults>"
    """Where this configuration came from, for logs."""

    def limits_for(self, domain: str) -> Limits:
        """The limits of ``domain``, key by key: its own ``[domaines.NAME]`` table,
        else the first pattern table (in file order) that matches it and sets the key,
        else ``[limites]``. dom0's services always get ``[limites]``."""
        if domain == DOM0 or not self.domain_limits:
            return self.limits
        values: dict[str, Any] = {}
        exact = [d for d in self.domain_limits if not d.is_pattern and d.matches(domain)]
        patterns = [d for d in self.domain_limits if d.is_pattern and d.matches(domain)]
        for entry in (*exact, *patterns):
            for attr, value in entry.values.items():
                values.setdefault(attr, value)
        return replace(self.limits, **values) if values else self.limits


def _table(data: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}{key}: expected a table")
    return value


def _get(table: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str,
         default: Any) -> Any:
    if key not in table:
        return default
    value = table[key]
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"{where}{key}: expected {names}, got {type(value).__name__}")
    return value


def _positive(value: float, key: str) -> float:
    # nan and inf (TOML has both) are no limits: a nan rate would unthrottle a domain.
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{key}: must be positive, got {value}")
    return value


def _unknown(table: dict[str, Any], known: set[str], where: str) -> None:
    for key in table:
        if key not in known:
            raise ConfigError(f"{where}{key}: unknown key (known: {', '.join(sorted(known))})")


def parse_config(data: dict[str, Any], source: str = "<string>", *,
                 base: Path | None = None) -> Config:
    """Validate a parsed TOML document. Relative paths are taken from ``base``."""
    _unknown(data, {"broker", "dom0", "trace", "decouverte", "limites", "reconnexion",
                    "spool", "domaines"}, "")

    def path_of(value: str) -> str:
        p = Path(value)
        return str(base / p) if base is not None and not p.is_absolute() else value

    broker = _table(data, "broker", "")
    _unknown(broker, {"niveau_journal", "taille_max_trame", "politique", "validation"},
             "broker.")
    level = _get(broker, "niveau_journal", str, "broker.", "info")
    if level not in LEVELS:
        raise ConfigError(f"broker.niveau_journal: {level!r} is not one of {', '.join(LEVELS)}")
    max_frame = _get(broker, "taille_max_trame", int, "broker.", MAX_FRAME)
    if not 256 <= max_frame <= 16 * 1024 * 1024:
        raise ConfigError(f"broker.taille_max_trame: {max_frame} is not within 256..16777216")
    policy = _get(broker, "politique", str, "broker.", None)
    validation = _get(broker, "validation", str, "broker.", "enveloppe")
    if validation not in VALIDATIONS:
        raise ConfigError(f"broker.validation: {validation!r} is not one of "
                          f"{', '.join(VALIDATIONS)}")

    dom0 = _table(data, "dom0", "")
    _unknown(dom0, {"socket", "mode", "groupe"}, "dom0.")
    socket_path = _get(dom0, "socket", str, "dom0.", "/run/messagerie/dom0.sock") or None
    mode_text = _get(dom0, "mode", str, "dom0.", "0660")
    if not re.fullmatch(r"0?[0-7]{3}", mode_text):
        raise ConfigError(f"dom0.mode: {mode_text!r} is not an octal mode like \"0660\"")
    if int(mode_text, 8) & 0o007:
        raise ConfigError(f"dom0.mode: {mode_text!r} gives other users access: whoever can "
                          "connect speaks as dom0 (use 0660 and dom0.groupe)")
    group = _get(dom0, "groupe", str, "dom0.", None)

    trace = _table(data, "trace", "")
    _unknown(trace, {"socket", "groupe"}, "trace.")
    trace_socket = _get(trace, "socket", str, "trace.", "/run/messagerie/trace.sock")
    if not trace_socket:
        raise ConfigError("trace.socket: expected a path (leave trace.groupe out to have "
                          "no trace socket)")
    trace_group = _get(trace, "groupe", str, "trace.", None) or None

    disc = _table(data, "decouverte", "")
    _unknown(disc, {"motifs", "intervalle", "xenstore", "canal", "xenstore_chemin"},
             "decouverte.")
    patterns = _get(disc, "motifs", list, "decouverte.", [])
    for i, pattern in enumerate(patterns):
        if not isinstance(pattern, str):
            raise ConfigError(f"decouverte.motifs[{i}]: expected str")
        if Path(pattern).name.count("*") != 1 or "*" in str(Path(pattern).parent):
            raise ConfigError(
                f"decouverte.motifs[{i}]: {pattern!r} must have exactly one '*' in its file "
                "name, which becomes the domain name (e.g. /var/run/*-msg.sock)")
    interval = _positive(float(_get(disc, "intervalle", (int, float), "decouverte.", 1.0)),
                         "decouverte.intervalle")
    xenstore = _get(disc, "xenstore", bool, "decouverte.", False)
    xs_channel = _get(disc, "canal", str, "decouverte.", "org.messagerie.0")
    if not re.fullmatch(r"(?:[A-Za-z0-9_.-]|\{domaine\})+", xs_channel):
        raise ConfigError(f"decouverte.canal: {xs_channel!r} is not a channel name (letters, "
                          "digits, - _ . and {domaine} for the domain's name)")
    xs_path = _get(disc, "xenstore_chemin", str, "decouverte.", None)

    lim = _table(data, "limites", "")
    _unknown(lim, set(GLOBAL_LIMIT_KEYS), "limites.")
    spool = _table(data, "spool", "")
    _unknown(spool, {"actif", "chemin", "octets_total", *SPOOL_KEYS}, "spool.")
    spool_on = _get(spool, "actif", bool, "spool.", True)
    spool_path = _get(spool, "chemin", str, "spool.", None)
    spool_total = _get(spool, "octets_total", int, "spool.", 64 * 1024 * 1024)
    if spool_total < 1:
        raise ConfigError("spool.octets_total: expected a positive number of bytes")
    if spool_path == "":
        raise ConfigError("spool.chemin: expected a file path (spool.actif = false turns "
                          "the spool off)")
    limits = Limits(**_limit_values(lim, "limites.", GLOBAL_LIMIT_KEYS),
                    **_limit_values(spool, "spool.", SPOOL_KEYS))

    rec = _table(data, "reconnexion", "")
    _unknown(rec, {"min", "max"}, "reconnexion.")
    rmin = _positive(float(_get(rec, "min", (int, float), "reconnexion.", 0.1)),
                     "reconnexion.min")
    rmax = _positive(float(_get(rec, "max", (int, float), "reconnexion.", 5.0)),
                     "reconnexion.max")
    if rmax < rmin:
        raise ConfigError("reconnexion.max: must be at least reconnexion.min")

    domains: dict[str, DomainConfig] = {}
    domain_limits: list[DomainLimits] = []
    discovering = bool(patterns) or xenstore
    for name, table in _table(data, "domaines", "").items():
        where = f"domaines.{name}."
        entry = DomainLimits(name, {})
        if entry.is_pattern:
            if isinstance(table, dict) and "chemin" in table:
                raise ConfigError(f"{where}chemin: a pattern only sets limits (a channel "
                                  "belongs to one domain)")
            if not _NAME_PATTERN.fullmatch(name):
                raise ConfigError(f"domaines.{name}: not a domain name pattern (1-64 of "
                                  "A-Z a-z 0-9 - _ . and * ? [...])")
        elif not is_valid_name(name) or name == DOM0:
            raise ConfigError(f"domaines.{name}: not a valid domain name (1-64 of A-Z a-z 0-9 "
                              "- _ ., not 'dom0' nor 'tous'; or a pattern with * ? [...])")
        if not isinstance(table, dict):
            raise ConfigError(f"domaines.{name}: expected a table with a 'chemin' key")
        _unknown(table, ({"chemin"} if not entry.is_pattern else set()) | set(LIMIT_KEYS),
                 where)
        values = _limit_values(table, where)
        if values:
            domain_limits.append(DomainLimits(name, values))
        if entry.is_pattern:
            if not values:
                raise ConfigError(f"domaines.{name}: a pattern sets limits (keys of "
                                  f"[limites]: {', '.join(LIMIT_KEYS)}); it has none")
            continue
        chemin = _get(table, "chemin", str, where, None)
        if chemin:
            domains[name] = DomainConfig(name, path_of(chemin))
        elif not (values and discovering):
            # Limits alone are for a domain that discovery finds: say so if none can.
            raise ConfigError(f"{where}chemin: required (the channel's tty or unix socket "
                              "path; without it, the table only sets limits for a domain "
                              "found by [decouverte])")

    if not domains and not patterns and not xenstore:
        raise ConfigError("no domain: declare [domaines.<name>] chemin = ..., "
                          "[decouverte] motifs = [...] or [decouverte] xenstore = true")
    return Config(
        domains=domains, discovery_patterns=tuple(path_of(p) for p in patterns),
        discovery_interval=interval, xenstore=xenstore, xenstore_channel=xs_channel,
        xenstore_path=path_of(xs_path) if xs_path else None,
        dom0_socket=path_of(socket_path) if socket_path else None,
        dom0_mode=int(mode_text, 8), dom0_group=group, trace_socket=path_of(trace_socket),
        trace_group=trace_group, log_level=level, max_frame=max_frame,
        validation=validation,
        policy_path=path_of(policy) if policy else None, limits=limits,
        domain_limits=tuple(domain_limits), reconnect_min=rmin, reconnect_max=rmax,
        spool=spool_on, spool_total_bytes=spool_total,
        spool_path=path_of(spool_path) if spool_path else None,
        source=source)


def _limit_values(table: dict[str, Any], where: str,
                  keys: dict[str, tuple[str, type]] = LIMIT_KEYS) -> dict[str, Any]:
    """The :class:`Limits` fields that ``table``'s ``[limites]`` keys set, validated."""
    values: dict[str, Any] = {}
    for key, (attr, kind) in keys.items():
        if key in table:
            raw = _get(table, key, (int, float) if kind is float else int, where, None)
            values[attr] = kind(_positive(raw, f"{where}{key}"))
    return values


def load_config(path: str | Path) -> Config:
    """Read and validate a configuration file; raise :class:`ConfigError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: TOML syntax error: {exc}") from None
    try:
        return parse_config(data, str(path), base=path.parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
