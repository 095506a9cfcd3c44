"""atheris target: decode then decide, the broker's whole decision path, sans IO.

    .venv/bin/python fuzz/fuzz_route.py fuzz/corpus/route -max_total_time=600

The first five bytes choose the channel the frames arrive on, the policy (allow-all,
deny-all, config/policy.toml), which domains are known and connected, and flags:
whether each answer was solicited, whether the frames come from a stale endpoint of
that name (a domain re-added, another dom0 service), whether dom0 services serve the
commands; the rest is a byte stream fed to the FrameDecoder. Every decoded message is
decided (``broker.router.decide``) and the decision applied to the table of commands
in flight as the broker applies it (limit: 2 per endpoint). ``route`` must:

* not raise, and return a Deliver or a Refuse with a known code and a detail;
* refuse a message whose ``source`` is not the channel's domain (``spoofed_source``);
* never send a broadcast back to its origin, and decide every recipient once;
* only deliver to connected domains or dom0;
* deliver a unicast exactly when the policy allows it (answers: when solicited);

and ``decide`` must:

* leave notifications and journals to the route, and keep what it refused refused;
* forward a command only if its id is not in flight and its sender is under the
  limit, to its domain or to the dom0 service that serves it; answer built-ins itself;
* accept an answer only from the endpoint the command went to, and only once.

See docs/fuzzing.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))

with atheris.instrument_imports():
    from _common import DOMAINS, NAMES, POLICIES, View

    from broker.router import (
        BUILTINS,
        DISPATCHED,
        SPOOFED,
        Answer,
        Builtin,
        Deliver,
        Forward,
        Refuse,
        decide,
        route,
    )
    from messagerie import DOM0, TOUS, Code, FrameDecoder, Message

CODES = {v for k, v in vars(Code).items() if k.isupper()}


def check(msg: Message, origin: str, view: View) -> None:
    decision = route(msg, origin, view)
    if type(decision) is Refuse:
        assert decision.code in CODES and decision.detail
    else:
        assert type(decision) is Deliver
        for t in decision.targets:
            assert t == DOM0 or t in view.up
    if msg.source != origin:
        assert type(decision) is Refuse and decision.kind == SPOOFED
        return
    if msg.destination == TOUS:
        assert type(decision) is Deliver
        denied = {d for d, _ in decision.denied}
        expected = {t for t in view.up if t != origin} | ({DOM0} if origin != DOM0 else set())
        assert origin not in decision.targets and origin not in denied
        assert set(decision.targets) | denied == expected
        assert not set(decision.targets) & denied
        return
    if msg.destination != DOM0 and msg.destination not in view.up:
        assert type(decision) is Refuse
        return
    if msg.type == "reponse":
        solicited = view.pending.expects(msg.destination, msg.payload["id"], msg.source)
        assert (type(decision) is Deliver) == solicited
        return
    allowed = view.policy.decide(msg.source, msg.destination, msg.type, msg.name).allowed
    assert (type(decision) is Deliver) == allowed


def check_decision(msg: Message, origin: str, sender: str, view: View) -> None:
    """Decide as the broker does, check, and apply to the commands in flight."""
    routed = route(msg, origin, view)
    decision = decide(msg, origin, sender, view)
    if type(routed) is Refuse or msg.type not in DISPATCHED:
        assert decision == routed
        return
    if type(decision) is Refuse:
        assert decision.code in CODES and decision.detail
    elif type(decision) is Builtin:
        assert msg.destination == DOM0 and decision.name in BUILTINS
    elif type(decision) is Forward:
        id, name = msg.payload["id"], msg.payload["commande"]
        assert (msg.source, id) not in view.pending
        assert view.pending.in_flight(sender) < view.pending.limit
        assert decision.server == (view.services.get(name) if msg.destination == DOM0
                                   else msg.destination)
        view.pending.add(msg.source, id, msg.destination, name, asker=sender,
                         target=decision.server)
    else:
        assert type(decision) is Answer
        command = decision.command
        assert command.target == sender and command.replier == msg.source
        assert view.pending.close(*command.key) is command  # answered once


HEADER = 5


def test_one_input(data: bytes) -> None:
    # Header: origin, policy, known domains (bits), connected domains (bits), flags
    # (bit 0: answers are solicited; bit 1: max_frame 256 instead of 65 536; bit 2:
    # the frames come from a stale endpoint of that name; bit 3: one dom0 service
    # serves every command name, bit 4: another one asked the solicited answers); then
    # the stream. A fixed header rather than atheris.FuzzedDataProvider, which takes
    # integers from the end of the input and would cut the seeds' frames.
    if len(data) < HEADER:
        return
    origin = NAMES[data[0] % len(NAMES)]
    policy = POLICIES[data[1] % len(POLICIES)]
    known = frozenset(d for i, d in enumerate(DOMAINS) if data[2] >> i & 1)
    up = frozenset(d for i, d in enumerate(DOMAINS) if data[3] >> i & 1 and d in known)
    solicit = bool(data[4] & 1)
    sender = f"{origin}#stale" if data[4] & 4 else origin
    view = View(policy, known, up)
    view.pending.limit = 2
    decoder = FrameDecoder(256 if data[4] & 2 else 65536)
    stream = data[HEADER:]
    for item in decoder.feed(stream + b"\n"):
        if not isinstance(item, Message):
            continue
        if data[4] & 8 and item.type == "commande":
            view.services.setdefault(item.payload["commande"], "svc")
        if solicit and item.type == "reponse":
            key = (item.destination, item.payload["id"])
            if not view.pending.expects(*key, item.source):
                view.pending.close(*key)
                view.expect(*key, item.source,
                            target="svc-other" if data[4] & 16 else item.source)
        check(item, origin, view)
        check_decision(item, origin, sender, view)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
