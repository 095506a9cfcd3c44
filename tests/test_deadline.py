"""Commands that carry their deadline: the ``delai`` field on the wire, the pending
table's deadlines and abandoned commands, the router's rules for late answers and the
broker's reserved category, and the client (over a socat pty, the test playing the
broker): the delai it sends, the slots it keeps until the broker frees its own, the
handler it cancels."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from structlog.testing import capture_logs

from broker.pending import ABANDONED_MAX, ABANDONED_PER_SLOT, ABANDONED_TTL, PendingCommands
from broker.policy import Policy
from broker.router import LATE, RESERVED, UNSOLICITED, Deliver, Refuse, StaticView, route
from messagerie import DOM0, Code, MessageInvalide, Reason, decode, encode
from messagerie.client import Client, CommandError, CommandTimeout
from messagerie.envelope import decode_envelope
from messagerie.model import Commande, Message, Notification, Reponse
from messagerie.schema import json_schema
from messagerie.wire import DELAI_MAX
from tests.support.peers import PtyPeer, is_sentinel
from tests.support.ptys import PtyPair
from tests.support.waiting import async_wait_until


def frame(delai: str) -> bytes:
    return (b'{"type":"commande","source":"vm-a","destination":"vm-b","payload":'
            b'{"id":"1","commande":"x","arguments":{},"delai":' + delai.encode() + b'}}')


# -- the wire -------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["5.0", "5", "0.001", "86400", "86400.0", "1e-3"])
def test_a_valid_delai_is_kept_by_both_decoders(text: str) -> None:
    line = frame(text)
    msg = decode(line)
    assert isinstance(msg, Commande) and msg.delai == float(text)
    assert decode_envelope(line).raw == line


@pytest.mark.parametrize(("text", "reason", "detail"), [
    ("0", Reason.BAD_VALUE, "must be a number > 0, got 0"),
    ("-1.5", Reason.BAD_VALUE, "must be a number > 0, got -1.5"),
    ("-0.0", Reason.BAD_VALUE, "must be a number > 0"),
    ("86400.5", Reason.BAD_VALUE, "must be a number <= 86400, got 86400.5"),
    ("1e9", Reason.BAD_VALUE, "must be a number <= 86400"),
    ('"5"', Reason.WRONG_TYPE, "expected a number, got a string"),
    ("true", Reason.WRONG_TYPE, "expected a number, got a boolean"),
    ("null", Reason.WRONG_TYPE, "expected a number, got null"),
    ("[5]", Reason.WRONG_TYPE, "expected a number, got an array"),
    ("NaN", Reason.INVALID_JSON, "invalid JSON"),
    ("Infinity", Reason.INVALID_JSON, "invalid JSON"),
])
def test_a_bad_delai_is_refused_with_its_reason_by_both_decoders(
        text: str, reason: Reason, detail: str) -> None:
    for decoder in (decode, decode_envelope):
        with pytest.raises(MessageInvalide) as info:
            decoder(frame(text))
        assert info.value.reason == reason, decoder
        assert info.value.detail.startswith(detail), (decoder, info.value.detail)
        if reason != Reason.INVALID_JSON:
            assert info.value.field == "payload.delai"


def test_a_bad_delai_is_refused_in_any_key_order_and_spacing() -> None:
    # Not canonical: the exact paths, not the fast ones, judge it.
    line = (b'{"payload": {"delai": -1, "commande": "x", "id": "1"}, "type": "commande",'
            b' "source": "vm-a", "destination": "vm-b"}')
    for decoder in (decode, decode_envelope):
        with pytest.raises(MessageInvalide) as info:
            decoder(line)
        assert (info.value.reason, info.value.field) == (Reason.BAD_VALUE, "payload.delai")


@pytest.mark.parametrize("value", [0, -1, DELAI_MAX * 2, math.nan, math.inf, "5", True])
def test_the_model_refuses_a_bad_delai(value: Any) -> None:
    with pytest.raises(MessageInvalide) as info:
        Commande("vm-a", "vm-b", "x", delai=value)
    assert info.value.field == "payload.delai"


def test_the_model_writes_a_delai_that_reencodes_to_itself() -> None:
    cmd = Commande("vm-a", "vm-b", "x", id="1", delai=5)
    line = encode(cmd)
    assert line.endswith(b',"delai":5.0}}\n')  # a float, as the wire's Struct reads it
    assert decode(line).delai == 5.0
    assert Commande("vm-a", "vm-b", "x").delai is None
    assert b"delai" not in encode(Commande("vm-a", "vm-b", "x"))


def test_the_schema_states_the_bounds() -> None:
    delai = json_schema()["$defs"]["commande_payload"]["properties"]["delai"]
    assert (delai["type"], delai["exclusiveMinimum"], delai["maximum"]) == (
        "number", 0, DELAI_MAX)


# -- the pending table ------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def table(ttl: float = 300.0) -> tuple[PendingCommands[str], Clock]:
    clock = Clock()
    return PendingCommands[str](limit=64, ttl=ttl, clock=clock), clock


def test_a_command_is_due_at_its_delai_or_the_ttl_whichever_is_first() -> None:
    pending, clock = table(ttl=10.0)
    short = pending.add("vm-a", "1", "vm-b", "x", asker="a", target="b", delai=2.0)
    long = pending.add("vm-a", "2", "vm-b", "x", asker="a", target="b", delai=50.0)
    none = pending.add("vm-a", "3", "vm-b", "x", asker="a", target="b")
    assert (short.deadline, long.deadline, none.deadline) == (102.0, 110.0, 110.0)
    assert pending.next_deadline() == 102.0
    clock.now = 101.9
    assert pending.expire() == [] and pending.in_flight("a") == 3
    clock.now = 102.0
    assert pending.expire() == [short]
    # Its slots are free at once, and its late answer is known for what it is.
    assert pending.in_flight("a") == 2 and pending.in_flight_to("a", "b") == 2
    assert pending.abandoned("vm-a", "1", "vm-b")
    assert not pending.abandoned("vm-a", "1", "vm-c")  # only from the one asked
    assert not pending.abandoned("vm-a", "2", "vm-b")  # still in flight
    assert pending.next_deadline() == 110.0
    clock.now = 110.0
    assert pending.expire() == [long, none]
    assert pending.next_deadline() is None and len(pending) == 0


def test_an_answered_command_never_expires_and_the_heap_stays_bounded() -> None:
    pending, clock = table(ttl=300.0)
    for i in range(10_000):
        pending.add("vm-a", str(i), "vm-b", "x", asker="a", target="b", delai=1.0)
        pending.close("vm-a", str(i))
    assert len(pending._deadlines) <= 2 * len(pending) + 65
    assert pending.next_deadline() is None
    clock.now += 5
    assert pending.expire() == []
    assert not pending.abandoned("vm-a", "0", "vm-b")  # answered, not abandoned


def test_a_commanders_departure_abandons_its_commands() -> None:
    pending, _ = table()
    pending.add("vm-a", "1", "vm-b", "x", asker="a", target="b")
    waited = pending.add("vm-b", "2", "vm-a", "y", asker="b", target="a")
    abandoned: list[Any] = []
    orphans = pending.fail("a", abandoned)
    assert orphans == [waited] and [p.id for p in abandoned] == ["1"]
    assert pending.abandoned("vm-a", "1", "vm-b")
    assert not pending.abandoned("vm-b", "2", "vm-a")  # answered for: not abandoned


def test_abandoned_commands_are_remembered_for_a_bounded_time_and_count() -> None:
    pending, clock = table(ttl=1.0)
    mine = ABANDONED_PER_SLOT * pending.limit  # per commander
    for i in range(mine + 10):
        pending.add("vm-a", str(i), "vm-b", "x", asker="a", target="b")
    clock.now += 1
    assert len(pending.expire()) == mine + 10
    assert len(pending._abandoned) == mine
    assert not pending.abandoned("vm-a", "9", "vm-b")  # its oldest went first
    assert pending.abandoned("vm-a", "10", "vm-b")
    clock.now += ABANDONED_TTL
    pending.expire()
    assert len(pending._abandoned) == 0


def test_the_abandoned_memo_has_a_global_cap_past_the_commanders_bounds() -> None:
    pending, clock = table(ttl=1.0)
    mine = ABANDONED_PER_SLOT * pending.limit
    commanders = ABANDONED_MAX // mine + 1
    for c in range(commanders):
        for i in range(mine):
            pending.add(f"vm-{c}", str(i), "vm-b", "x", asker=f"a{c}", target="b")
    clock.now += 1
    pending.expire()
    assert len(pending._abandoned) == ABANDONED_MAX
    assert not pending.abandoned("vm-0", "0", "vm-b")  # anyone's oldest, last resort
    assert pending.abandoned(f"vm-{commanders - 1}", str(mine - 1), "vm-b")


def test_one_commander_s_flood_of_expired_commands_evicts_only_its_own() -> None:
    """A commander that lets thousands of its commands expire (``delai`` 0.001, 64 at a
    time) forgets its own abandoned commands, not another's: that one's late answer
    is still late (info), not a forgery (security)."""
    pending, clock = table()
    view = StaticView(Policy.allow_all(), known=frozenset({"vm-honest", "vm-hostile", "vm-b"}),
                      up=frozenset({"vm-honest", "vm-hostile", "vm-b"}), pending=pending)
    pending.add("vm-honest", "h1", "vm-b", "lire", asker="h", target="b", delai=1.0)
    clock.now += 2
    pending.expire()
    late = decode_envelope(b'{"type":"reponse","source":"vm-b","destination":"vm-honest",'
                           b'"payload":{"id":"h1","commande":"lire","statut":"ok",'
                           b'"resultat":1}}')
    decision = route(late, "vm-b", view)
    assert isinstance(decision, Refuse) and decision.kind == LATE
    flood = 8192  # twice what the memo held in all when it was one LRU
    for i in range(flood):
        pending.add("vm-hostile", f"x{i}", "vm-b", "lire", asker="x", target="b",
                    delai=0.001)
        if i % 64 == 63:
            clock.now += 0.01
            pending.expire()
    clock.now += 0.01
    pending.expire()
    decision = route(late, "vm-b", view)
    assert isinstance(decision, Refuse) and decision.kind == LATE
    assert not decision.security
    assert len(pending._abandoned) == 1 + ABANDONED_PER_SLOT * pending.limit


# -- the router -------------------------------------------------------------------------

def view() -> StaticView:
    names = frozenset({"vm-a", "vm-b"})
    return StaticView(Policy.allow_all(), known=names, up=names)


def reponse(source: str, destination: str, id: str) -> Reponse:
    return Reponse(source, destination, id, "x", resultat=1)


def test_a_late_answer_is_late_not_unsolicited() -> None:
    v = view()
    v.pending.ttl = 1.0
    v.expect("vm-a", "c1", "vm-b")
    assert type(route(reponse("vm-b", "vm-a", "c1"), "vm-b", v)) is Deliver
    v.pending.clock = lambda: 1e12  # past every deadline
    v.pending.expire()
    late = route(reponse("vm-b", "vm-a", "c1"), "vm-b", v)
    assert type(late) is Refuse and (late.kind, late.security) == (LATE, False)
    # Anyone else answering that id is still a forgery.
    forged = route(reponse("vm-a", "vm-a", "c1"), "vm-a", v)
    assert type(forged) is Refuse and forged.kind in {UNSOLICITED, "spoofed_source"}
    other = route(reponse("vm-b", "vm-a", "c2"), "vm-b", v)
    assert type(other) is Refuse and (other.kind, other.security) == (UNSOLICITED, True)


@pytest.mark.parametrize("origin", ["vm-a", DOM0])
@pytest.mark.parametrize("destination", ["vm-b", DOM0, "tous"])
def test_nobody_may_send_the_brokers_abandonment(origin: str, destination: str) -> None:
    if origin == destination:
        return
    msg = Notification(origin, destination, "commande", "abandonnee",
                       {"source": "vm-b", "id": "1", "commande": "x"})
    decision = route(msg, origin, view())
    assert type(decision) is Refuse and (decision.kind, decision.security) == (RESERVED, True)


# -- the client, the test playing the broker ------------------------------------------------

async def test_the_client_sends_what_is_left_of_its_timeout(pair: PtyPair,
                                                            peer: PtyPeer) -> None:
    async with Client("vm-a", path=pair.domu) as c:
        task = asyncio.create_task(c.commande("vm-b", "x", timeout=7.5))
        cmd = await peer.recv()
        assert isinstance(cmd, Commande) and cmd.delai is not None
        assert 7.0 < cmd.delai <= 7.5
        peer.send(cmd.reply(1))
        await task
        task = asyncio.create_task(c.commande("vm-b", "x", timeout=DELAI_MAX * 10))
        cmd = await peer.recv()
        assert isinstance(cmd, Commande) and cmd.delai == DELAI_MAX
        peer.send(cmd.reply(1))
        await task
    async with Client("vm-a", path=pair.domu, timeout=None) as c:
        task = asyncio.create_task(c.commande("vm-b", "x"))
        cmd = await peer.recv()
        assert isinstance(cmd, Commande) and cmd.delai is None  # waits for ever
        peer.send(cmd.reply(1))
        await task


async def test_a_timed_out_command_keeps_its_slot_until_the_broker_frees_its_own(
        pair: PtyPair, peer: PtyPeer) -> None:
    """One slot: the second command waits in the client until the broker's
    delai_depasse for the first, however long after the client's own timeout it comes
    (the broker's deadline counts from its receipt, after the client's write)."""
    async with Client("vm-a", path=pair.domu, max_in_flight=1) as c:
        with pytest.raises(CommandTimeout):
            await c.commande("vm-b", "x", timeout=0.2)
        first = await peer.recv()
        assert isinstance(first, Commande)
        second = asyncio.create_task(c.commande("vm-b", "y", timeout=10))
        await async_wait_until(lambda: c._destination_slots["vm-b"][1] == [2],
                               what="the second command waiting for a slot")
        # The broker has not freed the first's slot: the second is not sent.
        await c.notify("vm-b", "sentinelle", "sentinelle")
        got = await peer.until_sentinel(is_sentinel)
        assert not [m for m in got if isinstance(m, Commande)]
        assert c._slots.locked() and c._pending.keys() == {first.id}
        peer.send(first.fail(Code.DELAI_DEPASSE, "vm-b did not answer", source=DOM0))
        cmd = await peer.recv()
        assert isinstance(cmd, Commande) and cmd.commande == "y"
        peer.send(cmd.reply(2))
        assert (await second).resultat == 2
        assert c._pending == {} and c._destination_slots == {}


async def test_a_timed_out_commands_slot_is_freed_by_a_reset(pair: PtyPair,
                                                             peer: PtyPeer) -> None:
    async with Client("vm-a", path=pair.domu, max_in_flight=1) as c:
        with pytest.raises(CommandTimeout):
            await c.commande("vm-b", "x", timeout=0.2)
        await peer.recv()
        assert c._slots.locked()
    assert not c._slots.locked() and c._pending == {}


async def test_a_timed_out_commands_slot_is_freed_after_a_grace_without_answer(
        pair: PtyPair, peer: PtyPeer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A broker that never says delai_depasse (it could not queue it, or does not know
    delai): the slot is freed RELEASE_GRACE after the command's deadline there."""
    from messagerie import client as client_module
    monkeypatch.setattr(client_module, "RELEASE_GRACE", 0.3)
    async with Client("vm-a", path=pair.domu, max_in_flight=1) as c:
        with pytest.raises(CommandTimeout):
            await c.commande("vm-b", "x", timeout=0.2)
        await peer.recv()
        second = asyncio.create_task(c.commande("vm-b", "y", timeout=10))
        cmd = await peer.recv()
        assert isinstance(cmd, Commande) and cmd.commande == "y"
        peer.send(cmd.reply(2))
        assert (await second).resultat == 2


async def test_the_brokers_abandonment_cancels_the_handler_and_nothing_is_answered(
        pair: PtyPair, peer: PtyPeer) -> None:
    started: list[str] = []
    cancelled: list[str] = []

    def until_cancelled(*, swallows_cancellation: bool) -> Callable[[Commande], Awaitable[str]]:
        """A handler that runs until it is cancelled, noting the ids it started and
        was cancelled for; one that swallows its cancellation returns an answer."""
        async def handler(cmd: Commande) -> str:
            started.append(cmd.id)
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.append(cmd.id)
                if not swallows_cancellation:
                    raise
            return "fini"
        return handler

    c = Client("vm-b", path=pair.domu)
    c.add_handler("lent", until_cancelled(swallows_cancellation=False))
    # Swallows its cancellation and returns: its answer must not go out either.
    c.add_handler("tetu", until_cancelled(swallows_cancellation=True))
    c.add_handler("vite", lambda cmd: "vite")
    async with c:
        one = Commande("vm-a", "vm-b", "lent", id="c1")
        two = Commande("vm-a", "vm-b", "tetu", id="c2")
        kept = Commande("vm-c", "vm-b", "lent", id="c1")  # same id, another commander
        for cmd in (one, two, kept):
            peer.send(cmd)
        await async_wait_until(lambda: len(started) == 3, what="three handlers running")
        # From another source than dom0: not the broker's, ignored.
        peer.send(Notification("vm-a", "vm-b", "commande", "abandonnee",
                               {"source": "vm-c", "id": "c1", "commande": "lent"}))
        for cmd in (one, two):
            peer.send(Notification(DOM0, "vm-b", "commande", "abandonnee",
                                   {"source": cmd.source, "id": cmd.id,
                                    "commande": cmd.commande}))
        await async_wait_until(lambda: sorted(cancelled) == ["c1", "c2"],
                               what="both abandoned handlers cancelled")
        peer.send(Commande("vm-a", "vm-b", "vite", id="c3"))
        got = await peer.until_sentinel(lambda m: isinstance(m, Reponse) and m.id == "c3")
        assert [m.id for m in got if isinstance(m, Reponse)] == ["c3"]
        assert len(c._handler_tasks) == 1  # vm-c's still runs
        assert list(c._serving) == [("vm-c", "c1")]


async def test_the_brokers_delai_depasse_before_the_timeout_is_a_timeout(
        pair: PtyPair, peer: PtyPeer) -> None:
    """The broker's own duree_commande was shorter than the client's timeout: the
    caller gets a CommandTimeout at once, carrying the broker's delai_depasse answer
    (the same exception as the client's own timeout, whichever fires first), and
    nothing stays held."""
    async with Client("vm-a", path=pair.domu) as c:
        task = asyncio.create_task(c.commande("vm-b", "x", timeout=30))
        cmd = await peer.recv()
        assert isinstance(cmd, Commande)
        peer.send(cmd.fail(Code.DELAI_DEPASSE, "vm-b did not answer in 1 s", source=DOM0))
        with pytest.raises(CommandTimeout) as info:
            await task
        assert info.value.reponse is not None
        assert info.value.reponse.erreur == {"code": Code.DELAI_DEPASSE,
                                             "message": "vm-b did not answer in 1 s"}
        assert info.value.timeout == pytest.approx(30, abs=0.1)  # the delai it carried
        assert str(info.value).endswith(": vm-b did not answer in 1 s")  # the broker's why
        assert c._pending == {} and c._destination_slots == {}


async def test_a_destinations_own_delai_depasse_is_its_error_reply(
        pair: PtyPair, peer: PtyPeer) -> None:
    """Only the broker's delai_depasse is the command's timeout: a destination that
    answers that code itself (its own backend timed out) gives a CommandError."""
    async with Client("vm-a", path=pair.domu) as c:
        task = asyncio.create_task(c.commande("vm-b", "x", timeout=30))
        cmd = await peer.recv()
        assert isinstance(cmd, Commande)
        peer.send(cmd.fail(Code.DELAI_DEPASSE, "the disk did not answer"))  # from vm-b
        with pytest.raises(CommandError) as info:
            await task
        assert (info.value.code, info.value.message) == (Code.DELAI_DEPASSE,
                                                         "the disk did not answer")


async def test_a_handler_whose_own_command_timed_out_answers_delai_depasse(
        pair: PtyPair, peer: PtyPeer) -> None:
    """A handler that relays a command and lets its CommandTimeout out answers
    delai_depasse (not erreur_interne with a traceback)."""
    c = Client("vm-b", path=pair.domu)

    async def relais(cmd: Commande) -> Any:
        return (await c.commande("vm-c", "loin", timeout=5)).resultat

    c.add_handler("relais", relais)
    async with c:
        with capture_logs() as logs:
            peer.send(Commande("vm-a", "vm-b", "relais", id="r1"))
            inner = await peer.recv()
            assert isinstance(inner, Commande) and inner.commande == "loin"
            peer.send(inner.fail(Code.DELAI_DEPASSE, "vm-c did not answer in 5 s",
                                 source=DOM0))
            rep = await peer.recv()
        assert isinstance(rep, Reponse) and rep.id == "r1"
        assert rep.erreur is not None and rep.erreur["code"] == Code.DELAI_DEPASSE
        assert "vm-c did not answer in 5 s" in rep.erreur["message"]
        assert not [e for e in logs if e["event"] == "handler.failed"]


async def test_the_socles_typed_calls_send_their_timeout_too(pair: PtyPair,
                                                              peer: PtyPeer) -> None:
    from messagerie import socle
    async with Client("vm-ui", path=pair.domu) as c:
        task = asyncio.create_task(socle.liste_disques(c, timeout=3.0))
        cmd = await peer.recv()
        assert isinstance(cmd, Commande) and cmd.commande == "liste_disques"
        assert cmd.delai is not None and 2.5 < cmd.delai <= 3.0
        peer.send(cmd.reply(["sda"]))
        assert await task == ["sda"]


async def test_a_socle_file_call_whose_command_times_out_says_so(pair: PtyPair,
                                                                 peer: PtyPeer) -> None:
    """lit_fichier waits for its command's answer, then for a FICHIER: the broker's
    delai_depasse on the command is the command's timeout, not a missing FICHIER."""
    from messagerie import socle
    async with Client("vm-ui", path=pair.domu) as c:
        task = asyncio.create_task(socle.lit_fichier(c, "cle", "a.txt", timeout=30))
        cmd = await peer.recv()
        assert isinstance(cmd, Commande) and cmd.commande == "lit_fichier"
        peer.send(cmd.fail(Code.DELAI_DEPASSE, "vm-sys-usb did not answer", source=DOM0))
        with pytest.raises(CommandTimeout) as info:
            await task
        assert info.value.reponse is not None and info.value.reponse.source == DOM0
        assert c._pending == {}


async def test_a_socle_file_call_whose_fichier_never_comes_times_out(
        pair: PtyPair, peer: PtyPeer) -> None:
    """The command answered, the FICHIER that completes it never sent: the same
    CommandTimeout, saying what was waited for."""
    from messagerie import socle
    async with Client("vm-ui", path=pair.domu) as c:
        task = asyncio.create_task(socle.lit_fichier(c, "cle", "a.txt", timeout=1.0))
        cmd = await peer.recv()
        assert isinstance(cmd, Commande) and cmd.commande == "lit_fichier"
        peer.send(cmd.reply({"taille": 3}, source="vm-sys-usb"))
        with pytest.raises(CommandTimeout) as info:
            await task
        assert "no FICHIER" in str(info.value) and "'a.txt'" in str(info.value)
        assert info.value.reponse is None


async def test_a_handlers_slot_is_free_once_its_answer_is_on_its_way(
        pair: PtyPair, peer: PtyPeer) -> None:
    """max_handlers counts handlers running, not answers waiting for flow control: the
    commander may have the answer and send its next command before the write is done
    (a new process's burst met `limite` that way)."""
    c = Client("vm-b", path=pair.domu, max_handlers=1)
    c.add_handler("echo", lambda cmd: cmd.arguments)
    gate = asyncio.Event()
    send = c.send

    async def slow_send(msg: Message) -> None:  # flow control holds every write
        await gate.wait()
        await send(msg)

    c.send = slow_send  # type: ignore[method-assign]
    async with c:
        peer.send(Commande("vm-a", "vm-b", "echo", {"n": 1}, id="e1"))
        await async_wait_until(lambda: not c._handler_tasks and c._tasks,
                               what="the first answer waiting to be written")
        peer.send(Commande("vm-a", "vm-b", "echo", {"n": 2}, id="e2"))
        await async_wait_until(lambda: len(c._tasks) >= 2, what="the second one too")
        gate.set()
        got = [await peer.recv(), await peer.recv()]
    assert [(m.id, m.ok) for m in got if isinstance(m, Reponse)] == [("e1", True),
                                                                     ("e2", True)]
