"""The routing policy: parsing (with line numbers), matching, the example, the CLI."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import timeit
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.cli import policy_main
from broker.policy import (
    CACHE_SIZE,
    Action,
    Policy,
    PolicyError,
    Verdict,
    load_policy,
    parse_policy,
)
from messagerie.model import Commande, Notification

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "policy.toml"


def policy(text: str) -> Policy:
    return parse_policy(textwrap.dedent(text), origin="test.toml")


def rule(source: str, destination: str, type: str = "*", action: str = "allow",
         nom: str | list[str] | None = None) -> str:
    nom_line = "" if nom is None else f"nom = {nom!r}\n".replace("'", '"')
    return (f'[[regle]]\nsource = "{source}"\ndestination = "{destination}"\n'
            f'type = "{type}"\n{nom_line}action = "{action}"\n')


# --- Matching ----------------------------------------------------------------

def test_first_match_wins() -> None:
    p = policy(rule("vm-a", "vm-b", "commande", "deny") + rule("vm-a", "vm-b"))
    d = p.decide("vm-a", "vm-b", "commande", "x")
    assert not d.allowed
    assert d.rule is not None and d.rule.index == 1 and d.rule.action is Action.DENY
    assert p.decide("vm-a", "vm-b", "notification", "x").rule.index == 2  # type: ignore[union-attr]


def test_default_deny() -> None:
    p = policy(rule("vm-a", "vm-b"))
    d = p.decide("vm-b", "vm-a", "notification", "x")
    assert d == Verdict(False, None, "default deny (no rule matched)")
    assert not d
    assert d.describe() == "deny: default deny (no rule matched)"


def test_star_never_matches_dom0() -> None:
    p = policy(rule("*", "*"))
    assert p.decide("vm-a", "vm-b", "commande", "x").allowed
    assert not p.decide("dom0", "vm-b", "commande", "x").allowed
    assert not p.decide("vm-a", "dom0", "commande", "x").allowed
    p = policy(rule("*", "dom0") + rule("dom0", "*"))
    assert p.decide("vm-a", "dom0", "journal", "x").allowed
    assert p.decide("dom0", "vm-a", "journal", "x").allowed
    assert not p.decide("dom0", "dom0", "journal", "x").allowed


def test_groups() -> None:
    p = policy('[groupes]\nmetier = ["vm-ui", "vm-diag"]\nsys = ["dom0"]\n'
               + rule("@metier", "@sys", "commande"))
    assert p.decide("vm-ui", "dom0", "commande", "x").allowed
    assert p.decide("vm-diag", "dom0", "commande", "x").allowed
    assert not p.decide("vm-sys-usb", "dom0", "commande", "x").allowed
    assert p.groups["metier"] == frozenset({"vm-ui", "vm-diag"})


def test_names_and_globs() -> None:
    p = policy(rule("vm-ui", "vm-sys-usb", "commande", nom=["liste_*", "lit_fichier"]))
    assert p.decide("vm-ui", "vm-sys-usb", "commande", "liste_disques").allowed
    assert p.decide("vm-ui", "vm-sys-usb", "commande", "liste_fichiers").allowed
    assert p.decide("vm-ui", "vm-sys-usb", "commande", "lit_fichier").allowed
    assert not p.decide("vm-ui", "vm-sys-usb", "commande", "supprime_fichier").allowed
    assert not p.decide("vm-ui", "vm-sys-usb", "commande", "Lister_disques").allowed
    assert not p.decide("vm-ui", "vm-sys-usb", "commande", None).allowed
    p = policy(rule("vm-ui", "vm-sys-usb", "commande", nom="lit_?ichier"))
    assert p.decide("vm-ui", "vm-sys-usb", "commande", "lit_fichier").allowed
    assert not p.decide("vm-ui", "vm-sys-usb", "commande", "lit_fichiers").allowed
    # nom "*" or absent: any name, no name included.
    for p in (policy(rule("vm-a", "vm-b", nom="*")), policy(rule("vm-a", "vm-b"))):
        assert p.decide("vm-a", "vm-b", "notification", None).allowed
        assert p.decide("vm-a", "vm-b", "notification", "n").allowed


def test_type_matching() -> None:
    p = policy(rule("vm-a", "vm-b", "journal"))
    assert p.decide("vm-a", "vm-b", "journal", "c").allowed
    assert not p.decide("vm-a", "vm-b", "notification", "c").allowed


def test_broadcast_tous_rule_matches_every_recipient() -> None:
    p = policy(rule("vm-sys-usb", "tous", "notification", nom="disque"))
    for recipient in ("vm-ui", "vm-diag", "dom0"):
        assert p.decide("vm-sys-usb", recipient, "notification", "disque",
                        broadcast=True).allowed
        # The same destination as a unicast is not covered by a tous rule.
        assert not p.decide("vm-sys-usb", recipient, "notification", "disque").allowed
    assert not p.decide("vm-sys-usb", "vm-ui", "notification", "entree",
                        broadcast=True).allowed
    # "May it broadcast at all?"
    assert p.decide("vm-sys-usb", "tous", "notification", "disque").allowed


def test_broadcast_filtered_per_recipient_by_name() -> None:
    p = policy(rule("vm-sys-usb", "vm-ui", "notification", nom="entree"))
    assert p.decide("vm-sys-usb", "vm-ui", "notification", "entree", broadcast=True).allowed
    assert not p.decide("vm-sys-usb", "vm-diag", "notification", "entree",
                        broadcast=True).allowed
    # "*" matches the DomU recipients of a broadcast, but neither dom0 nor "tous" itself.
    p = policy(rule("vm-a", "*", "notification"))
    assert p.decide("vm-a", "vm-b", "notification", "n", broadcast=True).allowed
    assert not p.decide("vm-a", "dom0", "notification", "n", broadcast=True).allowed
    assert not p.decide("vm-a", "tous", "notification", "n").allowed


def test_reponse_follows_its_commande() -> None:
    p = policy(rule("vm-ui", "vm-sys-usb", "commande", nom="liste_disques"))
    assert Policy.allows_reponses
    ok = p.decide("vm-sys-usb", "vm-ui", "reponse", "liste_disques")
    assert ok.allowed and ok.rule is not None and ok.rule.index == 1
    assert ok.reason.startswith("reponse follows its commande: rule 1")
    assert not p.decide("vm-sys-usb", "vm-ui", "reponse", "autre").allowed
    assert not p.decide("vm-ui", "vm-sys-usb", "reponse", "liste_disques").allowed


def test_decide_message() -> None:
    p = policy(rule("vm-ui", "vm-sys-usb", "commande", nom="liste_disques")
               + rule("vm-sys-usb", "tous", "notification", nom="disque"))
    assert p.decide_message(Commande("vm-ui", "vm-sys-usb", "liste_disques")).allowed
    assert not p.decide_message(Commande("vm-ui", "vm-sys-usb", "formater")).allowed
    n = Notification("vm-sys-usb", "tous", "disque", "etat", {"nom": "sdb", "connecte": True})
    assert p.decide_message(n, "vm-ui").allowed
    assert p.decide_message(n, "dom0").allowed


def test_describe() -> None:
    p = policy('[groupes]\nmetier = ["vm-ui"]\n\n' + rule("vm-sys-usb", "@metier", "commande",
                                                          "deny"))
    d = p.decide("vm-sys-usb", "vm-ui", "commande", "x")
    assert d.reason == "rule 1 (line 4): deny vm-sys-usb -> @metier commande *"
    assert d.describe() == "deny: rule 1 (line 4): deny vm-sys-usb -> @metier commande *"
    assert str(p.rules[0]) == d.reason


def test_allow_all() -> None:
    p = Policy.allow_all()
    for source in ("dom0", "vm-a"):
        for destination in ("dom0", "vm-b"):
            for type_ in ("notification", "commande", "journal", "reponse"):
                assert p.decide(source, destination, type_, "n").allowed
                assert p.decide(source, destination, type_, "n", broadcast=True).allowed
        assert p.decide(source, "tous", "notification", "n").allowed


def test_cache_is_bounded() -> None:
    p = policy(rule("*", "*"))
    for i in range(CACHE_SIZE + 10):
        p.decide(f"vm-{i}", "vm-b", "notification", "n")
    assert len(p._cache) <= CACHE_SIZE


def test_decide_is_fast() -> None:
    """A 20-rule policy, the deciding rule last: well under 2 µs per cached call."""
    rules = "".join(rule(f"vm-{i}", "vm-ui", "commande", nom=f"c{i}") for i in range(19))
    p = policy(rules + rule("vm-sys-usb", "vm-ui", "notification", nom="entree"))
    assert p.decide("vm-sys-usb", "vm-ui", "notification", "entree").allowed
    n = 20_000
    per_call = min(timeit.repeat(
        lambda: p.decide("vm-sys-usb", "vm-ui", "notification", "entree"),
        number=n, repeat=3)) / n
    assert per_call < 2e-6, f"{per_call * 1e6:.2f} µs per decision"


# --- Errors, with their line -------------------------------------------------

@pytest.mark.parametrize(("text", "line", "key", "fragment"), [
    ("", None, None, "empty"),
    ("  \n# only a comment\n", None, None, "no [[regle]]"),
    ("[groupes]\na = []\n", None, None, "no [[regle]]"),
    ("[[regle]]\nsource = \n", 2, None, "TOML syntax error"),
    ('version = 1\n' + rule("a", "b"), 1, "version", "unknown key"),
    (rule("a", "b") + "\n[autre]\nx = 1\n", 7, "autre", "unknown key"),
    (rule("a", "b") + rule("a", "b").replace("action", "acton"), 10, "regle[2].acton",
     "unknown key"),
    (rule("a", "b", action="alow"), 5, "regle[1].action", "not 'allow' or 'deny'"),
    (rule("a", "b", type="notif"), 4, "regle[1].type", "is not one of"),
    (rule("a", "b", type="reponse"), 4, "regle[1].type", "commande it answers"),
    (rule("@inconnu", "b"), 2, "regle[1].source", "unknown group '@inconnu'"),
    (rule("a", "@inconnu"), 3, "regle[1].destination", "unknown group"),
    (rule("tous", "b"), 2, "regle[1].source", "only valid as a destination"),
    (rule("vm a", "b"), 2, "regle[1].source", "is not a domain name"),
    (rule("a", "-b"), 3, "regle[1].destination", "is not a domain name"),
    (rule("a", "b", nom="a b"), 5, "regle[1].nom", "is not a name or a glob"),
    (rule("a", "b", nom=["_x"]), 5, "regle[1].nom", "can never match"),
    (rule("a", "b", nom=[]), 5, "regle[1].nom", "empty list"),
    (rule("a", "b") + '[[regle]]\nsource = "a"\ndestination = "b"\naction = "allow"\n',
     6, "regle[2].type", "required key is missing"),
    ('[[regle]]\nsource = 3\ndestination = "b"\ntype = "*"\naction = "allow"\n', 2,
     "regle[1].source", "must be a string"),
    ('[groupes]\nmetier = "vm-ui"\n' + rule("a", "b"), 2, "groupes.metier",
     "list of domain names"),
    ('[groupes]\nmetier = ["vm-ui", "@x"]\n' + rule("a", "b"), 2, "groupes.metier",
     "is not a domain name"),
    ('[groupes]\ntous = ["vm-ui"]\n' + rule("a", "b"), 2, "groupes.tous",
     "not a valid group name"),
    ('groupes = 1\n' + rule("a", "b"), 1, "groupes", "must be a table"),
    ('regle = 1\n', 1, "regle", "array of tables"),
])
def test_policy_errors(text: str, line: int | None, key: str | None, fragment: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, origin="bad.toml")
    error = info.value
    assert isinstance(error, ValueError)
    assert error.line == line, str(error)
    assert error.key == key, str(error)
    assert fragment in str(error)
    where = "bad.toml" if line is None else f"bad.toml:{line}"
    assert str(error).startswith(where + ": " + (f"{key}: " if key else "")), str(error)


def test_toml_syntax_error_keeps_tomllib_position() -> None:
    with pytest.raises(PolicyError, match=r"at line 2, column \d+") as info:
        parse_policy("[[regle]]\nsource = \n", origin="bad.toml")
    assert info.value.line == 2


def test_load_policy_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "absent.toml")


def test_load_policy_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(rule("a", "b", action="peut-etre"))
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(info.value).startswith(f"{path}:5: regle[1].action: ")
    assert info.value.path == str(path)


# --- The example -------------------------------------------------------------

def test_example_policy_decisions() -> None:
    p = load_policy(EXAMPLE)
    assert len(p) >= 10

    def allowed(s: str, d: str, t: str, n: str | None, broadcast: bool = False) -> bool:
        return p.decide(s, d, t, n, broadcast=broadcast).allowed

    # vm-sys-usb notifies devices, disks and input, to tous and to vm-ui.
    for cat in ("usb_device", "disque", "entree"):
        for recipient in ("vm-ui", "vm-diag", "dom0"):
            assert allowed("vm-sys-usb", recipient, "notification", cat, True)
        assert allowed("vm-sys-usb", "vm-ui", "notification", cat)
        assert not allowed("vm-sys-usb", "vm-diag", "notification", cat)
    # ... but may not forge file states nor command anyone.
    assert not allowed("vm-sys-usb", "vm-ui", "notification", "fichier", True)
    assert not allowed("vm-sys-usb", "vm-ui", "notification", "fichier")
    for dest in ("vm-ui", "vm-diag", "dom0"):
        assert not allowed("vm-sys-usb", dest, "commande", "liste_disques")
    # vm-ui commands vm-sys-usb's disk operations and dom0's file deletion.
    for cmd in ("liste_disques", "liste_fichiers", "lit_fichier", "copie_fichier",
                "supprime_fichier"):
        assert allowed("vm-ui", "vm-sys-usb", "commande", cmd)
        assert allowed("vm-sys-usb", "vm-ui", "reponse", cmd)
        assert not allowed("vm-diag", "vm-sys-usb", "commande", cmd)
    assert not allowed("vm-ui", "vm-sys-usb", "commande", "formater")
    assert allowed("vm-ui", "dom0", "commande", "supprime_fichier")
    assert not allowed("vm-ui", "dom0", "commande", "lit_fichier")
    assert not allowed("vm-ui", "vm-diag", "commande", "x")
    # dom0 does anything.
    for dest in ("vm-ui", "vm-sys-usb", "dom0"):
        assert allowed("dom0", dest, "commande", "n")
        assert allowed("dom0", dest, "notification", "fichier", True)
    # Every DomU logs to dom0 and announces its state.
    for domu in ("vm-ui", "vm-diag", "vm-sys-usb", "vm-nouvelle"):
        assert allowed(domu, "dom0", "journal", "scanner")
        assert allowed(domu, "vm-ui", "notification", "domaine", True)
        assert not allowed(domu, "vm-diag", "journal", "scanner")
    d = p.decide("vm-sys-usb", "vm-ui", "commande", "liste_disques")
    assert d.rule is not None and d.rule.action is Action.DENY


# --- The explain CLI ---------------------------------------------------------

def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    # The console script, as users run it (pyproject.toml: broker.cli:policy_main).
    return subprocess.run([str(Path(sys.executable).parent / "messagerie-policy"), *args],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.integration
def test_explain_cli_allowed() -> None:
    r = run_cli(str(EXAMPLE), "--source", "vm-ui", "--destination", "vm-sys-usb",
                "--type", "commande", "--nom", "liste_disques")
    assert r.returncode == 0, r.stderr
    assert "vm-ui -> vm-sys-usb: commande liste_disques" in r.stdout
    assert "allow: rule " in r.stdout and "allow vm-ui -> vm-sys-usb commande" in r.stdout


@pytest.mark.integration
def test_explain_cli_denied_by_rule_and_by_default() -> None:
    r = run_cli(str(EXAMPLE), "-s", "vm-sys-usb", "-d", "vm-ui", "-t", "commande", "-n", "x")
    assert r.returncode == 1
    assert "deny: rule " in r.stdout and "deny vm-sys-usb -> * commande *" in r.stdout
    r = run_cli(str(EXAMPLE), "-s", "vm-sys-usb", "-d", "dom0", "-t", "notification",
                "-n", "fichier", "--broadcast")
    assert r.returncode == 1
    assert "recipient of a broadcast" in r.stdout
    assert "deny: default deny" in r.stdout


@pytest.mark.integration
def test_explain_cli_broadcast_allowed() -> None:
    r = run_cli(str(EXAMPLE), "-s", "vm-sys-usb", "-d", "vm-diag", "-t", "notification",
                "-n", "disque", "--broadcast")
    assert r.returncode == 0
    assert "allow vm-sys-usb -> tous notification" in r.stdout


@pytest.mark.integration
def test_explain_cli_bad_policy(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(rule("a", "b", action="alow"))
    r = run_cli(str(bad), "-s", "a", "-d", "b", "-t", "commande")
    assert r.returncode == 2
    assert f"{bad}:5: regle[1].action" in r.stderr
    assert r.stdout == ""


def test_policy_main_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert policy_main([str(EXAMPLE), "-s", "vm-ui", "-d", "dom0", "-t", "journal",
                        "-n", "ui"]) == 0
    assert "allow: rule" in capsys.readouterr().out


# --- Properties ----------------------------------------------------------------

DOMAINS = st.sampled_from(["dom0", "vm-a", "vm-b", "vm-sys-usb", "vm-ui"])
TYPES = st.sampled_from(["notification", "commande", "journal", "reponse"])
NAMES = st.sampled_from([None, "liste_disques", "disque", "entree", "x"])
Query = tuple[str, str, str, str | None, bool]
QUERIES = st.tuples(DOMAINS, DOMAINS, TYPES, NAMES, st.booleans())
PATTERNS = st.sampled_from(["*", "dom0", "vm-a", "vm-b", "@g"])


@st.composite
def rule_texts(draw: st.DrawFn) -> str:
    return rule(draw(PATTERNS), draw(st.one_of(PATTERNS, st.just("tous"))),
                draw(st.sampled_from(["*", "notification", "commande", "journal"])),
                draw(st.sampled_from(["allow", "deny"])),
                draw(st.sampled_from([None, "*", "liste_*", ["disque", "x"]])))


ALLOW_EVERYTHING = "".join(rule(s, d) for s in ("*", "dom0") for d in ("*", "dom0", "tous"))


@settings(max_examples=150, deadline=None)
@given(rules=st.lists(rule_texts(), max_size=8), query=QUERIES)
def test_property_final_allow_all_never_denies_when_nothing_denies(
        rules: list[str], query: Query) -> None:
    source, dest, type_, name, broadcast = query
    allows = [r for r in rules if 'action = "allow"' in r]
    p = policy('[groupes]\ng = ["vm-a", "dom0"]\n' + "".join(allows) + ALLOW_EVERYTHING)
    assert p.decide(source, dest, type_, name, broadcast=broadcast).allowed


@settings(max_examples=150, deadline=None)
@given(rules=st.lists(rule_texts(), max_size=8),
       queries=st.lists(QUERIES, min_size=1, max_size=20))
def test_property_cache_changes_nothing(rules: list[str], queries: list[Query]) -> None:
    p = policy('[groupes]\ng = ["vm-a", "dom0"]\n' + "".join(rules) + rule("vm-b", "*"))
    for s, d, t, n, b in queries + queries:  # the second pass hits the cache
        assert p.decide(s, d, t, n, broadcast=b) == p.evaluate(s, d, t, n, broadcast=b)


@settings(max_examples=150, deadline=None)
@given(rules=st.lists(rule_texts(), min_size=1, max_size=8), query=QUERIES)
def test_property_decision_is_first_matching_rule(rules: list[str], query: Query) -> None:
    source, dest, type_, name, broadcast = query
    if type_ == "reponse":
        return  # follows its commande: test_reponse_follows_its_commande
    p = policy('[groupes]\ng = ["vm-a", "dom0"]\n' + "".join(rules))
    d = p.decide(source, dest, type_, name, broadcast=broadcast)
    matching = [r for r in p.rules if r.matches(source, dest, type_, name, broadcast)]
    if matching:
        assert d.rule is matching[0]
        assert d.allowed == (matching[0].action is Action.ALLOW)
    else:
        assert d.rule is None and not d.allowed
    # dom0 is only matched where named: "dom0", group g (which lists it), or "tous".
    for r in matching:
        if source == "dom0":
            assert r.source.text in ("dom0", "@g")
        if dest == "dom0":
            assert r.destination.text in ("dom0", "@g", "tous")
            assert r.destination.text != "tous" or broadcast


def test_explain_tous_decides_per_recipient_as_the_broker(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The broker decides a broadcast per recipient (broadcast=True): a rule naming the
    # recipient lets it through, with no rule naming "tous". The explanation must agree.
    path = tmp_path / "p.toml"
    path.write_text(rule("vm-a", "vm-b", "notification") + rule("*", "*", action="deny"))
    loaded = load_policy(path)
    assert loaded.decide("vm-a", "vm-b", "notification", "x", broadcast=True).allowed
    assert policy_main([str(path), "-s", "vm-a", "-d", "tous", "-t", "notification",
                        "-n", "x"]) == 0
    out = capsys.readouterr().out
    assert "vm-a -> tous: notification x" in out
    assert "  vm-b: allow: rule 1" in out
    assert "  any other domain: deny: rule 2" in out
    assert "  dom0: deny: default deny" in out
    assert "delivered to 1 of 3 recipients" in out
    # The recipients given: only those; the source is never its own recipient.
    assert policy_main([str(path), "-s", "vm-a", "-d", "tous", "-t", "notification",
                        "--destinataires", "vm-a,vm-c"]) == 1
    out = capsys.readouterr().out
    assert "vm-a:" not in out and "  vm-c: deny: rule 2" in out
    assert "delivered to 0 of 2 recipients" in out
