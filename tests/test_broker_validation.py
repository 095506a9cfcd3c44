"""broker.validation, runs of notifications and the route cache, in process.

Built like test_broker_core.py: a Broker and its endpoints over fake transports, bytes
fed with ``data_received``. ``enveloppe`` (the default) checks what routing decides on
and forwards the frame's exact bytes; ``complete`` also refuses a key repeated inside
the contents. A run (consecutive notifications with one envelope, decoded at once) must
be routed exactly as its frames would be one by one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

import pytest
from structlog.testing import capture_logs

from broker import hub
from broker.config import Config, ConfigError, DomainConfig, parse_config
from broker.hub import Broker
from broker.policy import parse_policy
from broker.router import PolicyLike
from messagerie import DOM0, TOUS, Code, Commande, Journal, Notification, Reponse, encode
from messagerie.envelope import Run, decode_envelope
from messagerie.wire import clear_memos
from tests.support.corpus import mouse
from tests.test_broker_core import FakeTransport, Setup, error_of


class VSetup(Setup):
    """test_broker_core's Setup with a chosen configuration (broker.validation)."""

    def __init__(self, *names: str, validation: str = "", config: Config | None = None,
                 policy: PolicyLike | None = None) -> None:
        names = names or ("vm-a", "vm-b")
        if config is None:
            extra = {"validation": validation} if validation else {}
            config = Config(domains={n: DomainConfig(n, f"/dev/null/{n}") for n in names},
                            dom0_socket=None, **extra)
        self.broker = Broker(config, policy)
        self.hub = self.broker.dom0
        self.eps = {}
        self.t = {}
        for name in names:
            self.eps[name] = self.connect(name)
        self.runs: list[int] = []
        """The count of every run that reached Broker.receive_run."""
        receive_run = self.broker.receive_run

        def spy(peer: Any, run: Run) -> None:
            self.runs.append(run.count)
            receive_run(peer, run)

        self.broker.receive_run = spy  # type: ignore[method-assign]

    def feed(self, name: str, *lines: bytes) -> None:
        """The lines, newline-terminated, in one read on ``name``'s channel."""
        self.eps[name].data_received(b"".join(line + b"\n" for line in lines))
        self.settle(self.eps[name])


def moves(source: str, dest: str, n: int, categorie: str = "entree") -> list[bytes]:
    return [mouse(source, dest, i, categorie) for i in range(n)]


def warm(*lines: bytes) -> None:
    """Put the lines' names and tokens in the memo the fast paths read."""
    for line in lines:
        decode_envelope(line)


@pytest.fixture
def cold() -> Iterator[None]:
    clear_memos()
    yield
    clear_memos()


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


NOTE: Final = encode(Notification("vm-a", "vm-b", "disque", "etat", {"nom": "sda"}))[:-1]
REPEATED: Final = NOTE.replace(b'{"nom":"sda"}', b'{"nom":"sda","nom":"sdb"}')
REPEATED_SPACED: Final = NOTE.replace(b'{"nom":"sda"}', b'{ "nom" : "sda" , "nom" : "sdb" }')
REPEATED_DEEP: Final = NOTE.replace(b'{"nom":"sda"}', b'{"a":[{"k":1,"k":2}]}')


# -- broker.validation ----------------------------------------------------------------

@pytest.mark.parametrize("line", [REPEATED, REPEATED_SPACED, REPEATED_DEEP],
                         ids=["compact", "spaced", "deep"])
async def test_enveloppe_forwards_a_repeat_in_data_unchanged(line: bytes) -> None:
    s = VSetup()
    assert s.broker.config.validation == "enveloppe"  # the default
    warm(NOTE)
    with capture_logs() as logs:
        s.feed("vm-a", line)
        s.feed("vm-a", line, line, line)  # a run of them: one read
    assert s.t["vm-b"].take() == (line + b"\n") * 4
    a, b = s.eps["vm-a"], s.eps["vm-b"]
    assert (a.stats.received, a.stats.invalid, a.stats.refused, b.stats.sent) == (4, 0, 0, 4)
    assert events(logs, "frame.invalid") == []


@pytest.mark.parametrize("line", [REPEATED, REPEATED_SPACED, REPEATED_DEEP],
                         ids=["compact", "spaced", "deep"])
async def test_complete_refuses_a_repeat_in_data(line: bytes) -> None:
    s = VSetup(validation="complete")
    warm(NOTE)
    with capture_logs() as logs:
        s.feed("vm-a", line)
        s.feed("vm-a", NOTE, line, NOTE)
    assert s.t["vm-b"].take() == (NOTE + b"\n") * 2  # the valid ones, in order
    a = s.eps["vm-a"]
    assert (a.stats.received, a.stats.invalid, s.eps["vm-b"].stats.sent) == (2, 2, 2)
    invalid = events(logs, "frame.invalid")
    assert len(invalid) == 2
    assert all(e["reason"] == "duplicate_key" and e["log_level"] == "warning"
               for e in invalid)
    assert s.t["vm-a"].take() == b""  # an invalid frame has no usable id: not answered


async def test_complete_validation_from_the_configuration_file_keys() -> None:
    config = parse_config({"broker": {"validation": "complete"}, "dom0": {"socket": ""},
                           "domaines": {n: {"chemin": f"/dev/null/{n}"}
                                        for n in ("vm-a", "vm-b")}})
    s = VSetup(config=config)
    with capture_logs() as logs:
        s.feed("vm-a", *moves("vm-a", "vm-b", 3), REPEATED)
    assert s.t["vm-b"].take() == b"".join(m + b"\n" for m in moves("vm-a", "vm-b", 3))
    assert [e["reason"] for e in events(logs, "frame.invalid")] == ["duplicate_key"]


async def test_complete_still_refuses_envelope_repeats_and_forwards_odd_valid_frames() -> None:
    s = VSetup(validation="complete")
    spaced = NOTE.replace(b'":', b'": ')
    with capture_logs() as logs:
        s.feed("vm-a", NOTE.replace(b'"source":"vm-a"', b'"source":"vm-a","source":"vm-a"'),
               spaced)
    assert s.t["vm-b"].take() == spaced + b"\n"
    assert [e["reason"] for e in events(logs, "frame.invalid")] == ["duplicate_key"]


BUILTINS: Final = ["ping", "domaines", "statistiques", "enregistrer"]


@pytest.mark.parametrize("name", BUILTINS)
async def test_builtin_with_a_repeat_in_arguments_is_answered(name: str) -> None:
    s = VSetup()
    line = encode(Commande("vm-a", DOM0, name, {"x": 1}, id="b1"))[:-1]
    bad = line.replace(b'{"x":1}', b'{"x":1,"x":2}')
    assert bad != line
    ep = s.eps["vm-a"]
    ep.bucket.rate = 0.0  # no refill: the tokens count what the frame spent
    before = ep.bucket.tokens
    with capture_logs() as logs:
        s.feed("vm-a", bad)
    assert before - ep.bucket.tokens == 1, "one frame spends one token, invalid or not"
    (answer,) = s.out("vm-a")
    assert error_of(answer) == ("b1", Code.MESSAGE_INVALIDE)
    assert isinstance(answer, Reponse) and answer.commande == name
    assert (answer.source, answer.destination) == (DOM0, "vm-a")
    assert s.eps["vm-a"].stats.invalid == 1
    assert [e["reason"] for e in events(logs, "frame.invalid")] == ["duplicate_key"]
    assert len(s.broker.pending) == 0 and s.broker.pending.in_flight(s.eps["vm-a"]) == 0
    assert s.hub.services == {}
    # The same command without the repeat is served.
    s.feed("vm-a", line)
    (answer,) = s.out("vm-a")
    assert isinstance(answer, Reponse) and answer.id == "b1"
    assert answer.ok == (name != "enregistrer")  # a domain may not register


async def test_journal_with_a_repeat_in_data_is_not_logged() -> None:
    s = VSetup()
    line = encode(Journal("vm-a", DOM0, "error", "disk", "usbd", data={"x": 1}))[:-1]
    with capture_logs() as logs:
        s.feed("vm-a", line.replace(b'{"x":1}', b'{"x":1,"x":2}'))
    assert events(logs, "domain.journal") == []
    assert [e["reason"] for e in events(logs, "frame.invalid")] == ["duplicate_key"]
    with capture_logs() as logs:
        s.feed("vm-a", line)
    assert [e["data"] for e in events(logs, "domain.journal")] == [{"x": 1}]


# -- runs -------------------------------------------------------------------------------

async def test_a_run_of_mouse_moves_is_forwarded_byte_identical() -> None:
    s = VSetup()
    lines = moves("vm-a", "vm-b", 100)
    warm(lines[0])
    s.feed("vm-a", *lines)
    assert s.runs == [100]  # one run: the batch path
    assert s.t["vm-b"].take() == b"".join(line + b"\n" for line in lines)
    assert s.t["vm-b"].writes == 1
    assert s.eps["vm-a"].stats.received == 100
    assert s.eps["vm-b"].stats.sent == 100
    assert s.t["vm-a"].take() == b""


async def test_a_run_with_a_cold_memo_is_forwarded_the_same(cold: None) -> None:
    s = VSetup()
    lines = moves("vm-a", "vm-b", 100)
    s.feed("vm-a", *lines[:50])  # cold: the batch path checks the patterns and fills the memo
    s.feed("vm-a", *lines[50:])  # warm: the batch path again
    assert s.runs == [50, 50]
    assert s.t["vm-b"].take() == b"".join(line + b"\n" for line in lines)
    assert (s.eps["vm-a"].stats.received, s.eps["vm-b"].stats.sent) == (100, 100)


async def test_runs_keep_order_across_destinations_and_categories() -> None:
    s = VSetup("vm-a", "vm-b", "vm-c")
    _, tsvc = s.service()
    to_b, to_c = moves("vm-a", "vm-b", 30), moves("vm-a", "vm-c", 20)
    keys = moves("vm-a", "vm-b", 10, "clavier")
    to_all = encode(Notification("vm-a", TOUS, "entree", "souris"))[:-1]
    to_dom0 = encode(Notification("vm-a", DOM0, "entree", "souris"))[:-1]
    cmd = encode(Commande("vm-a", "vm-b", "lister", id="c1"))[:-1]
    stream = [*to_b[:10], *to_c[:10], *keys, to_all, to_all, *to_b[10:20], cmd, to_dom0,
              *to_b[20:], *to_c[10:]]
    warm(*stream)
    s.feed("vm-a", *stream)
    assert s.runs == [10] * 6
    assert s.t["vm-b"].take() == b"".join(line + b"\n" for line in (
        *to_b[:10], *keys, to_all, to_all, *to_b[10:20], cmd, *to_b[20:]))
    assert s.t["vm-c"].take() == b"".join(line + b"\n" for line in (
        *to_c[:10], to_all, to_all, *to_c[10:]))
    assert tsvc.take() == b"".join(line + b"\n" for line in (to_all, to_all, to_dom0))
    assert s.eps["vm-a"].stats.received == len(stream)


@pytest.mark.parametrize("forged", ["vm-b", "vm-c"])
async def test_a_run_with_a_forged_source_is_refused_entirely(forged: str) -> None:
    s = VSetup("vm-a", "vm-b", "vm-c")
    lines = moves(forged, "vm-b" if forged == "vm-c" else "vm-c", 100)
    warm(lines[0])
    with capture_logs() as logs:
        s.feed("vm-a", *lines)
    assert s.runs == [100]  # checked as a run, and refused as one
    assert all(t.take() == b"" for t in s.t.values())
    a = s.eps["vm-a"]
    assert (a.stats.received, a.stats.refused) == (100, 100)
    assert sum(ep.stats.sent for ep in s.eps.values()) == 0
    refused = events(logs, "message.refused")
    assert refused and all(e["why"] == "spoofed_source" and e["security"] for e in refused)
    assert {e["source"] for e in refused} == {forged}


def _split(frame: bytes, at: bytes) -> list[bytes]:
    cut = frame.index(at)
    return [frame[:cut], frame[cut + 1:]]


async def test_a_frame_cut_over_two_lines_cannot_carry_a_forged_source() -> None:
    """Each line of a read is one frame: a frame cut over two lines is two invalid
    frames, and what follows keeps its own envelope (at ad0cebc, decode_runs decoded
    the lines joined with commas and the forged frame below rode on the honest one's
    run to vm-c)."""
    s = VSetup("vm-a", "vm-b", "vm-c")
    honest, forged, cut = mouse("vm-a", "vm-c", 1), mouse("vm-b", "vm-c", 2), \
        mouse("vm-a", "vm-b", 3)
    warm(honest, forged, cut)
    s.feed("vm-a", *_split(cut, b',"destination"'), forged, honest)
    assert s.t["vm-c"].take() == honest + b"\n"
    assert s.t["vm-b"].take() == b""
    a = s.eps["vm-a"]
    assert (a.stats.invalid, a.stats.refused) == (2, 1)


async def test_a_denied_commande_cannot_ride_on_an_allowed_run() -> None:
    """As many elements as lines, but misaligned: a cut frame, then a denied commande,
    then two allowed frames on one line."""
    policy = parse_policy(
        '[[regle]]\nsource = "vm-a"\ndestination = "*"\ntype = "notification"\n'
        'action = "allow"\n', origin="p.toml")
    s = VSetup("vm-a", "vm-b", "vm-c", policy=policy)
    denied = encode(Commande("vm-a", "vm-c", "effacer", id="x1"))[:-1]
    allowed, cut = mouse("vm-a", "vm-c", 1), mouse("vm-a", "vm-b", 3)
    warm(denied, allowed, cut)
    s.feed("vm-a", *_split(cut, b',"payload"'), denied, allowed + b"," + allowed)
    assert s.t["vm-c"].take() == b""
    assert s.t["vm-b"].take() == b""
    (answer,) = s.out("vm-a")
    assert error_of(answer) == ("x1", Code.REFUSE)
    assert s.eps["vm-a"].stats.invalid == 3


# -- the route cache -------------------------------------------------------------------

def disconnect(s: VSetup, name: str) -> None:
    """What the supervisor does when a channel goes away."""
    ep = s.eps[name]
    ep.connection_lost(None)
    ep.connected_since = None


async def test_disconnect_invalidates_cached_routes() -> None:
    s = VSetup()
    a, b = s.eps["vm-a"], s.eps["vm-b"]
    cmd = encode(Commande("vm-a", "vm-b", "lister", id="c1"))[:-1]
    lines = moves("vm-a", "vm-b", 10)
    warm(NOTE, cmd, *lines)
    s.feed("vm-a", NOTE, cmd)
    s.feed("vm-a", *lines)
    assert s.out("vm-b")  # delivered: the decisions are cached now
    assert ("vm-a", "vm-b", "notification", "disque") in s.broker._routes
    s.feed("vm-b", encode(Reponse("vm-b", "vm-a", "c1", "lister", resultat=1))[:-1])
    s.t["vm-a"].take()
    disconnect(s, "vm-b")
    old = s.t["vm-b"]
    with capture_logs() as logs:
        s.feed("vm-a", NOTE)
        s.feed("vm-a", *lines)
        s.feed("vm-a", cmd.replace(b'"c1"', b'"c2"'))
    assert old.take() == b""
    assert b.stats.dropped == 0  # refused as offline, not queued for a dead channel
    assert a.stats.refused == 12
    (answer,) = s.out("vm-a")
    assert error_of(answer) == ("c2", Code.DESTINATION_HORS_LIGNE)
    assert len(s.broker.pending) == 0 and s.broker.pending.in_flight(a) == 0
    assert {e["why"] for e in events(logs, "message.refused")} == {"offline_destination"}
    # It comes back (the supervisor: connection_made, connected_since, domain_up).
    transport = FakeTransport()
    b.connection_made(transport)  # type: ignore[arg-type]
    b.connected_since = 1.0
    s.broker.domain_up(b)
    s.t["vm-b"] = transport
    s.flush()
    transport.take()  # the "connecte" notification
    s.t["vm-a"].take()
    s.feed("vm-a", NOTE, *lines)
    s.feed("vm-a", cmd.replace(b'"c1"', b'"c3"'))
    assert transport.take() == b"".join(x + b"\n" for x in (
        NOTE, *lines, cmd.replace(b'"c1"', b'"c3"')))
    assert a.stats.refused == 12


async def test_policy_change_invalidates_cached_routes() -> None:
    s = VSetup()
    a = s.eps["vm-a"]
    cmd = encode(Commande("vm-a", "vm-b", "lister", id="c1"))[:-1]
    lines = moves("vm-a", "vm-b", 10)
    warm(NOTE, cmd, *lines)
    s.feed("vm-a", NOTE, *lines)
    s.feed("vm-a", cmd)
    assert s.t["vm-b"].take() == b"".join(x + b"\n" for x in (NOTE, *lines, cmd))
    s.feed("vm-b", encode(Reponse("vm-b", "vm-a", "c1", "lister", resultat=1))[:-1])
    s.t["vm-a"].take()
    s.broker.policy = parse_policy(
        '[[regle]]\nsource = "vm-a"\ndestination = "vm-b"\ntype = "notification"\n'
        'nom = "entree"\naction = "deny"\n'
        '[[regle]]\nsource = "vm-a"\ndestination = "vm-b"\ntype = "commande"\n'
        'action = "deny"\n'
        '[[regle]]\nsource = "*"\ndestination = "*"\ntype = "*"\naction = "allow"\n',
        origin="p.toml")
    with capture_logs() as logs:
        s.feed("vm-a", *lines)
        s.feed("vm-a", NOTE)  # disque: still allowed
        s.feed("vm-a", cmd.replace(b'"c1"', b'"c2"'))
    assert s.t["vm-b"].take() == NOTE + b"\n"
    assert a.stats.refused == 11
    (answer,) = s.out("vm-a")
    assert error_of(answer) == ("c2", Code.REFUSE)
    refused = events(logs, "message.refused")
    assert {(e["why"], e["security"]) for e in refused} == {("policy_denied", True)}


async def test_traffic_counts_survive_invalidation() -> None:
    s = VSetup("vm-a", "vm-b", "vm-c")
    lines = moves("vm-a", "vm-b", 10)
    warm(NOTE, *lines)
    s.feed("vm-a", NOTE, NOTE, NOTE)            # 3, frame by frame
    s.feed("vm-a", *lines)                      # 10, one run
    s.feed("vm-b", mouse("vm-b", "vm-a", 0))    # 1
    disconnect(s, "vm-c")                       # invalidates
    s.feed("vm-a", NOTE)                        # 1
    s.broker.policy = s.broker.policy           # invalidates
    s.feed("vm-a", *lines[:5])                  # 5, one run
    s.feed("vm-a", mouse("vm-a", "vm-c", 0))    # refused (offline): not counted
    with capture_logs() as logs:
        s.broker.log_traffic(10.0)
        s.broker.log_traffic(10.0)
    (event,) = events(logs, "traffic.summary")
    assert event["messages"] == 20
    assert event["flows"] == [
        {"source": "vm-a", "destination": "vm-b", "type": "notification", "messages": 19},
        {"source": "vm-b", "destination": "vm-a", "type": "notification", "messages": 1}]


async def test_traffic_counts_survive_the_cache_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub, "ROUTE_CACHE_MAX", 3)
    s = VSetup()
    categories = [f"cat{i}" for i in range(7)]
    frames = [mouse("vm-a", "vm-b", 0, c) for c in categories]
    warm(*frames)
    for _ in range(3):
        for frame in frames:
            s.feed("vm-a", frame, frame)  # a run of two
    assert len(s.broker._routes) <= 3
    with capture_logs() as logs:
        s.broker.log_traffic(1.0)
    (event,) = events(logs, "traffic.summary")
    assert event["messages"] == 42
    assert s.eps["vm-b"].stats.sent == 42


# -- configuration -----------------------------------------------------------------------

def doc(**broker: Any) -> dict[str, Any]:
    return {"broker": broker, "domaines": {"vm-a": {"chemin": "/dev/pts/3"}}}


def test_config_validation_default_and_values() -> None:
    assert parse_config({"domaines": {"vm-a": {"chemin": "/dev/pts/3"}}}).validation == \
        "enveloppe"
    assert Config().validation == "enveloppe"
    assert parse_config(doc(validation="enveloppe")).validation == "enveloppe"
    assert parse_config(doc(validation="complete")).validation == "complete"


@pytest.mark.parametrize("value", ["Complete", "envelope", "complète", "", " complete",
                                   "aucune", 1, True, ["complete"], {"a": 1}])
def test_config_validation_refuses_anything_else(value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(doc(validation=value))
    assert "broker.validation" in str(info.value)
    if isinstance(value, str):
        assert repr(value) in str(info.value)
