"""Broker configuration: every key of config/broker.toml, defaults, and errors that name
the key at fault."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from broker.config import Config, ConfigError, Limits, load_config, parse_config
from messagerie import MAX_FRAME

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "broker.toml"

MINIMAL: dict[str, Any] = {"domaines": {"vm-a": {"chemin": "/dev/pts/3"}}}


def with_(**tables: Any) -> dict[str, Any]:
    """A minimal valid document plus ``tables``."""
    doc: dict[str, Any] = {"domaines": {"vm-a": {"chemin": "/dev/pts/3"}}}
    doc.update(tables)
    return doc


def error(doc: dict[str, Any]) -> str:
    """The message of the ``ConfigError`` parsing ``doc`` raises."""
    with pytest.raises(ConfigError) as info:
        parse_config(doc)
    return str(info.value)


def load_error(path: Path) -> str:
    """The message of the ``ConfigError`` loading ``path`` raises."""
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


# -- the Debian package's default --------------------------------------------------

def test_the_packaged_default_declares_nothing_and_discovers_from_xenstore() -> None:
    """What a real dom0 gets from the package, unedited: no hard-coded channel (the
    example's vm-ui on /dev/pts/7 would open whatever pty has that number), domains
    from xenstore and the field's socket names, the policy that denies by default."""
    shipped = ROOT / "packaging" / "broker.toml"
    config = load_config(shipped)
    assert config.domains == {}
    assert config.xenstore and config.xenstore_channel == "org.messagerie.0"
    assert config.discovery_patterns == ("/var/run/*-msg.sock",)
    assert config.policy_path == "/etc/messagerie/policy.toml"
    assert config.dom0_socket == "/run/messagerie/dom0.sock"
    assert "/dev/pts" not in "".join(
        line for line in shipped.read_text().splitlines() if not line.startswith("#"))


# -- the example file ---------------------------------------------------------------

def test_example_file_every_key() -> None:
    config = load_config(EXAMPLE)
    assert config.source == str(EXAMPLE)
    assert config.log_level == "info"
    assert config.max_frame == 65536
    assert config.policy_path == "/etc/messagerie/policy.toml"
    assert config.dom0_socket == "/run/messagerie/dom0.sock"
    assert config.dom0_mode == 0o660
    assert config.dom0_group is None  # commented out in the example
    assert config.discovery_patterns == ("/var/run/*-msg.sock",)
    assert config.discovery_interval == 1.0
    assert config.spool_total_bytes == 64 * 1024 * 1024
    assert config.limits == Limits(queue_bytes=1048576, stall_timeout=1.0, rate=20000.0,
                                   burst=5000, commands_in_flight=128, command_ttl=300.0)
    assert config.reconnect_min == 0.1
    assert config.reconnect_max == 5.0
    assert set(config.domains) == {"vm-sys-usb", "vm-ui"}
    usb = config.domains["vm-sys-usb"]
    assert (usb.name, usb.path, usb.discovered) == (
        "vm-sys-usb", "/var/run/vm-sys-usb-msg.sock", False)
    assert config.domains["vm-ui"].path == "/dev/pts/7"


def test_example_defaults_are_the_code_defaults() -> None:
    """The example documents the defaults: every value it sets is the built-in one."""
    config = load_config(EXAMPLE)
    defaults = Config()
    for attr in ("log_level", "max_frame", "dom0_socket", "dom0_mode", "discovery_interval",
                 "limits", "reconnect_min", "reconnect_max"):
        assert getattr(config, attr) == getattr(defaults, attr), attr


def test_example_every_key_is_known() -> None:
    """Uncommenting the commented key still parses: it is a real key too."""
    text = EXAMPLE.read_text().replace('# groupe = "messagerie"', 'groupe = "messagerie"')
    assert parse_config(tomllib.loads(text)).dom0_group == "messagerie"


# -- defaults -------------------------------------------------------------------------

def test_defaults_with_one_domain() -> None:
    config = parse_config(MINIMAL, "mem")
    assert config.source == "mem"
    assert config.domains["vm-a"].path == "/dev/pts/3"
    assert config.log_level == "info"
    assert config.max_frame == MAX_FRAME
    assert config.policy_path is None
    assert config.dom0_socket == "/run/messagerie/dom0.sock"
    assert config.dom0_mode == 0o660
    assert config.dom0_group is None
    assert config.discovery_patterns == ()
    assert config.discovery_interval == 1.0
    assert config.limits == Limits()
    assert (config.reconnect_min, config.reconnect_max) == (0.1, 5.0)


def test_discovery_alone_is_enough() -> None:
    config = parse_config({"decouverte": {"motifs": ["/run/x/*.sock"], "intervalle": 2}})
    assert config.domains == {}
    assert config.discovery_patterns == ("/run/x/*.sock",)
    assert config.discovery_interval == 2.0


def test_no_domain_and_no_pattern() -> None:
    assert "no domain" in error({})
    assert "no domain" in error({"decouverte": {"motifs": []}})
    assert "no domain" in error({"domaines": {}})


def test_values_set() -> None:
    config = parse_config(with_(
        broker={"niveau_journal": "debug", "taille_max_trame": 256, "politique": "/p.toml"},
        dom0={"socket": "/s.sock", "mode": "600", "groupe": "g"},
        limites={"file_octets": 10, "delai_blocage": 2, "debit": 1.5, "rafale": 3,
                 "commandes_en_vol": 4, "duree_commande": 0.5},
        reconnexion={"min": 1, "max": 1}))
    assert (config.log_level, config.max_frame, config.policy_path) == ("debug", 256, "/p.toml")
    assert (config.dom0_socket, config.dom0_mode, config.dom0_group) == ("/s.sock", 0o600, "g")
    assert config.limits == Limits(10, 2.0, 1.5, 3, 4, 0.5)
    assert isinstance(config.limits.stall_timeout, float)
    assert isinstance(config.limits.burst, int)
    assert (config.reconnect_min, config.reconnect_max) == (1.0, 1.0)


def test_empty_dom0_socket_disables_it() -> None:
    assert parse_config(with_(dom0={"socket": ""})).dom0_socket is None


def test_upper_frame_bound_accepted() -> None:
    frame = 16 * 1024 * 1024
    assert parse_config(with_(broker={"taille_max_trame": frame})).max_frame == frame


# -- errors name the key ----------------------------------------------------------------

@pytest.mark.parametrize(("doc", "key"), [
    ({**MINIMAL, "extra": 1}, "extra"),
    (with_(broker={"niveau": "info"}), "broker.niveau"),
    (with_(dom0={"chemin": "/x"}), "dom0.chemin"),
    (with_(decouverte={"motif": "/x/*"}), "decouverte.motif"),
    (with_(limites={"debit_max": 1}), "limites.debit_max"),
    (with_(reconnexion={"moyen": 1}), "reconnexion.moyen"),
    ({"domaines": {"vm-a": {"chemin": "/x", "type": "pty"}}}, "domaines.vm-a.type"),
])
def test_unknown_key_at_each_level(doc: dict[str, Any], key: str) -> None:
    text = error(doc)
    assert text.startswith(f"{key}: unknown key"), text


@pytest.mark.parametrize(("doc", "key"), [
    (with_(broker=3), "broker"),
    (with_(dom0="x"), "dom0"),
    (with_(decouverte=[]), "decouverte"),
    (with_(limites=1), "limites"),
    (with_(reconnexion=True), "reconnexion"),
    ({"domaines": "vm-a"}, "domaines"),
    ({"domaines": {"vm-a": "/dev/pts/3"}}, "domaines.vm-a"),
    (with_(broker={"niveau_journal": 3}), "broker.niveau_journal"),
    (with_(broker={"taille_max_trame": "64k"}), "broker.taille_max_trame"),
    (with_(broker={"taille_max_trame": 1024.0}), "broker.taille_max_trame"),
    (with_(broker={"politique": ["a"]}), "broker.politique"),
    (with_(dom0={"socket": 1}), "dom0.socket"),
    (with_(dom0={"mode": 0o660}), "dom0.mode"),
    (with_(dom0={"groupe": 0}), "dom0.groupe"),
    (with_(decouverte={"motifs": "/x/*"}), "decouverte.motifs"),
    (with_(decouverte={"motifs": [1]}), "decouverte.motifs[0]"),
    (with_(decouverte={"intervalle": "1s"}), "decouverte.intervalle"),
    (with_(limites={"file_octets": 1.5}), "limites.file_octets"),
    (with_(limites={"debit": "vite"}), "limites.debit"),
    (with_(reconnexion={"min": "0.1"}), "reconnexion.min"),
    ({"domaines": {"vm-a": {"chemin": 7}}}, "domaines.vm-a.chemin"),
])
def test_wrong_type(doc: dict[str, Any], key: str) -> None:
    text = error(doc)
    assert text.startswith(f"{key}: expected"), text


@pytest.mark.parametrize(("table", "key"), [
    ({"broker": {"taille_max_trame": True}}, "broker.taille_max_trame"),
    ({"limites": {"file_octets": True}}, "limites.file_octets"),
    ({"limites": {"rafale": False}}, "limites.rafale"),
    ({"limites": {"commandes_en_vol": True}}, "limites.commandes_en_vol"),
    ({"limites": {"debit": True}}, "limites.debit"),
    ({"limites": {"delai_blocage": True}}, "limites.delai_blocage"),
    ({"decouverte": {"intervalle": True}}, "decouverte.intervalle"),
    ({"reconnexion": {"max": True}}, "reconnexion.max"),
])
def test_bool_is_not_a_number(table: dict[str, Any], key: str) -> None:
    text = error(with_(**table))
    assert text.startswith(f"{key}: expected"), text
    assert "bool" in text


@pytest.mark.parametrize("name", ["dom0", "tous", "vm a", "", "-vm", "a" * 65, "vm/a", "été"])
def test_invalid_domain_name(name: str) -> None:
    text = error({"domaines": {name: {"chemin": "/dev/pts/1"}}})
    assert text.startswith(f"domaines.{name}: not a valid domain name"), text


@pytest.mark.parametrize("table", [{}, {"chemin": ""}])
def test_missing_chemin(table: dict[str, Any]) -> None:
    assert error({"domaines": {"vm-a": table}}).startswith("domaines.vm-a.chemin: required")


@pytest.mark.parametrize("pattern", [
    "/var/run/msg.sock", "/var/run/*-*.sock", "/var/*/x-*.sock", "/var/run/**",
])
def test_pattern_needs_exactly_one_star_in_file_name(pattern: str) -> None:
    text = error({"decouverte": {"motifs": ["/ok/*.sock", pattern]}})
    assert text.startswith("decouverte.motifs[1]:"), text
    assert "exactly one '*'" in text


@pytest.mark.parametrize(("table", "key"), [
    ({"limites": {"file_octets": -1}}, "limites.file_octets"),
    ({"limites": {"file_octets": 0}}, "limites.file_octets"),
    ({"limites": {"delai_blocage": -0.5}}, "limites.delai_blocage"),
    ({"limites": {"debit": 0}}, "limites.debit"),
    ({"limites": {"rafale": -3}}, "limites.rafale"),
    ({"limites": {"commandes_en_vol": 0}}, "limites.commandes_en_vol"),
    ({"limites": {"duree_commande": -1}}, "limites.duree_commande"),
    ({"decouverte": {"intervalle": 0}}, "decouverte.intervalle"),
    ({"reconnexion": {"min": -1}}, "reconnexion.min"),
    ({"reconnexion": {"max": 0}}, "reconnexion.max"),
])
def test_negative_or_zero_limits(table: dict[str, Any], key: str) -> None:
    assert error(with_(**table)).startswith(f"{key}: must be positive")


@pytest.mark.parametrize("toml", ["debit = nan", "part_cpu = inf", "debit = -inf",
                                  "delai_blocage = nan"])
def test_limits_that_are_not_numbers_are_refused(tmp_path: Path, toml: str) -> None:
    # TOML has nan and inf: neither is a limit (a nan rate would throttle nothing).
    path = tmp_path / "broker.toml"
    path.write_text(f"[limites]\n{toml}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    key = toml.split(" ", maxsplit=1)[0]
    assert f": limites.{key}: must be positive, got " in str(exc.value)


def test_reconnect_max_below_min() -> None:
    text = error(with_(reconnexion={"min": 2, "max": 1}))
    assert text.startswith("reconnexion.max:")
    assert "reconnexion.min" in text


@pytest.mark.parametrize("level", ["INFO", "trace", "warn", ""])
def test_bad_log_level(level: str) -> None:
    text = error(with_(broker={"niveau_journal": level}))
    assert text.startswith("broker.niveau_journal:")
    assert "debug, info, warning, error" in text


@pytest.mark.parametrize("size", [255, 16 * 1024 * 1024 + 1, 0, -1])
def test_frame_size_out_of_range(size: int) -> None:
    assert error(with_(broker={"taille_max_trame": size})).startswith("broker.taille_max_trame:")


@pytest.mark.parametrize("mode", ["rw-rw----", "0x1b6", "0668", "66", "00660", "660 "])
def test_bad_mode(mode: str) -> None:
    assert error(with_(dom0={"mode": mode})).startswith("dom0.mode:")


@pytest.mark.parametrize(("mode", "bits"), [("0660", 0o660), ("600", 0o600), ("0770", 0o770)])
def test_good_mode(mode: str, bits: int) -> None:
    assert parse_config(with_(dom0={"mode": mode})).dom0_mode == bits


@pytest.mark.parametrize("mode", ["0777", "0666", "0661"])
def test_mode_open_to_other_users_is_refused(mode: str) -> None:
    assert "speaks as dom0" in error(with_(dom0={"mode": mode}))


# -- files ------------------------------------------------------------------------------

@pytest.mark.parametrize(("content", "message"), [
    (b'[domaines.vm-a]\nchemin = "/dev/pts/1\n', "TOML syntax error"),
    (b'[domaines."vm-\xe9"]\nchemin = "/x"\n', "not UTF-8"),
    (b'[limites]\nfile_octets = -5\n[domaines.vm-a]\nchemin = "/x"\n',
     "limites.file_octets: must be positive"),
], ids=["toml-syntax", "not-utf8", "bad-value"])
def test_file_errors_name_the_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "broker.toml"
    path.write_bytes(content)
    assert load_error(path).startswith(f"{path}: {message}")


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    assert load_error(missing).startswith(f"{missing}: cannot read")
    # A directory: also an OSError, also reported.
    assert load_error(tmp_path).startswith(f"{tmp_path}: cannot read")


def test_relative_paths_from_the_file_directory(tmp_path: Path) -> None:
    sub = tmp_path / "etc"
    sub.mkdir()
    path = sub / "broker.toml"
    path.write_text(
        '[broker]\npolitique = "policy.toml"\n'
        '[dom0]\nsocket = "run/dom0.sock"\n'
        '[decouverte]\nmotifs = ["sockets/*-msg.sock", "/abs/*.sock"]\n'
        '[domaines.vm-a]\nchemin = "pts/1"\n'
        '[domaines.vm-b]\nchemin = "/dev/pts/2"\n')
    config = load_config(path)
    assert config.policy_path == str(sub / "policy.toml")
    assert config.dom0_socket == str(sub / "run" / "dom0.sock")
    assert config.discovery_patterns == (str(sub / "sockets" / "*-msg.sock"), "/abs/*.sock")
    assert config.domains["vm-a"].path == str(sub / "pts" / "1")
    assert config.domains["vm-b"].path == "/dev/pts/2"


def test_relative_paths_kept_without_base() -> None:
    config = parse_config({"broker": {"politique": "p.toml"},
                           "domaines": {"vm-a": {"chemin": "pts/1"}}})
    assert config.policy_path == "p.toml"
    assert config.domains["vm-a"].path == "pts/1"


# -- per-domain limits ----------------------------------------------------------------

def test_every_limit_key_can_be_set_per_domain_and_by_pattern() -> None:
    config = parse_config({
        "decouverte": {"motifs": ["/run/*-msg.sock"]},
        "limites": {"debit": 1000, "rafale": 100},
        "domaines": {
            "vm-ui": {"chemin": "/dev/pts/3", "file_octets": 10, "delai_blocage": 2,
                      "debit": 1.5, "rafale": 3, "commandes_en_vol": 4,
                      "duree_commande": 0.5, "commandes_en_vol_destination": 2},
            "vm-usb-*": {"debit": 50, "commandes_en_vol": 2},
            "vm-usb-[0-9]": {"debit": 10, "rafale": 7},     # later: only its other keys
            "vm-usb-2": {"rafale": 1},                      # discovered, limits only
        }})
    assert config.limits_for("vm-ui") == Limits(10, 2.0, 1.5, 3, 4, 0.5, 2)
    assert config.limits_for("vm-usb-1") == Limits(rate=50.0, burst=7, commands_in_flight=2)
    # Its own table first, then the first pattern that sets each key, then [limites].
    assert config.limits_for("vm-usb-2") == Limits(rate=50.0, burst=1, commands_in_flight=2)
    assert config.limits_for("vm-usb-10") == Limits(rate=50.0, burst=100,
                                                    commands_in_flight=2)
    assert config.limits_for("vm-other") == config.limits == Limits(rate=1000.0, burst=100)
    assert config.limits_for("dom0") == config.limits             # never by a pattern
    assert set(config.domains) == {"vm-ui"}                       # no channel for the others
    assert isinstance(config.limits_for("vm-usb-1").rate, float)
    assert isinstance(config.limits_for("vm-ui").burst, int)


def test_without_overrides_every_domain_has_the_global_limits() -> None:
    config = parse_config(with_(limites={"debit": 5}))
    assert config.limits_for("vm-a") is config.limits


@pytest.mark.parametrize(("doc", "text"), [
    (with_(domaines={"vm-a": {"chemin": "/x", "debit": 0}}), "domaines.vm-a.debit: must be"),
    (with_(domaines={"vm-a": {"chemin": "/x", "rafale": 1.5}}),
     "domaines.vm-a.rafale: expected int"),
    (with_(domaines={"vm-a": {"chemin": "/x", "debit_max": 1}}),
     "domaines.vm-a.debit_max: unknown key"),
    ({"domaines": {"vm-*": {"chemin": "/x", "debit": 1}}},
     "domaines.vm-*.chemin: a pattern only sets limits"),
    ({**MINIMAL, "domaines": {**MINIMAL["domaines"], "vm-*": {}}},
     "domaines.vm-*: a pattern sets limits"),
    ({**MINIMAL, "domaines": {**MINIMAL["domaines"], "vm a*": {"debit": 1}}},
     "domaines.vm a*: not a domain name pattern"),
    # Limits alone name a domain discovery finds; without discovery, that is a mistake.
    ({**MINIMAL, "domaines": {**MINIMAL["domaines"], "vm-b": {"debit": 1}}},
     "domaines.vm-b.chemin: required"),
])
def test_per_domain_limit_errors_name_the_key(doc: dict[str, Any], text: str) -> None:
    assert text in error(doc)


def test_limits_alone_for_a_discovered_domain() -> None:
    config = parse_config({"decouverte": {"motifs": ["/run/*-msg.sock"]},
                           "domaines": {"vm-b": {"debit": 1}}})
    assert config.domains == {}
    assert config.limits_for("vm-b").rate == 1.0


def test_trace_socket_only_with_a_group() -> None:
    assert parse_config(MINIMAL).trace_group is None                 # no trace socket
    config = parse_config(with_(trace={"groupe": "adm", "socket": "t.sock"}),
                          base=Path("/run/x"))
    assert (config.trace_group, config.trace_socket) == ("adm", "/run/x/t.sock")
    assert "trace.mode: unknown key" in error(with_(trace={"mode": "0600"}))
    assert "trace.groupe: expected str" in error(with_(trace={"groupe": 4}))


def test_spool_defaults_global_bounds_and_per_domain_ones(tmp_path: Path) -> None:
    one = {"domaines": {"vm-a": {"chemin": "/dev/pts/1"}}}
    config = parse_config(one)
    assert (config.spool, config.spool_path) == (True, None)
    assert (config.limits.spool_messages, config.limits.spool_bytes,
            config.limits.spool_age) == (10_000, 8 * 1024 * 1024, 3600.0)
    config = parse_config({
        "spool": {"actif": False, "chemin": "state/spool.db", "messages": 50,
                  "octets": 4096, "age": 30},
        "domaines": {"vm-a": {"chemin": "/dev/pts/1", "spool_messages": 5},
                     "vm-d*": {"spool_age": 2.5}, "vm-b": {"chemin": "/dev/pts/2"}},
        "decouverte": {"motifs": ["/run/*-msg.sock"]}}, base=tmp_path)
    assert config.spool is False and config.spool_path == str(tmp_path / "state/spool.db")
    a, b, d = (config.limits_for(n) for n in ("vm-a", "vm-b", "vm-d1"))
    assert (a.spool_messages, a.spool_bytes, a.spool_age) == (5, 4096, 30.0)
    assert (b.spool_messages, b.spool_bytes, b.spool_age) == (50, 4096, 30.0)
    assert (d.spool_messages, d.spool_age) == (50, 2.5)


@pytest.mark.parametrize(("doc", "error"), [
    ({"limites": {"spool_messages": 5}}, "limites.spool_messages: unknown key"),
    ({"spool": {"messages": 0}}, "spool.messages: must be positive"),
    ({"spool": {"octets": "big"}}, "spool.octets: expected int, got str"),
    ({"spool": {"chemin": ""}}, "spool.chemin: expected a file path"),
    ({"spool": {"actif": 1}}, "spool.actif: expected bool, got int"),
    ({"spool": {"taille": 1}}, "spool.taille: unknown key"),
])
def test_spool_errors_name_the_key(doc: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        parse_config({**doc, "domaines": {"vm-a": {"chemin": "/dev/pts/1"}}})
