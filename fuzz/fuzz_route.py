"""atheris target: decode then route, the broker's whole decision path, sans IO.

    .venv/bin/python fuzz/fuzz_route.py fuzz/corpus/route -max_total_time=600

The first five bytes choose the channel the frames arrive on, the policy (allow-all,
deny-all, config/policy.toml), which domains are known and connected, and whether
each answer was solicited; the rest is a byte stream fed to the FrameDecoder. For
every decoded message ``broker.router.route`` must:

* not raise, and return a Deliver or a Refuse with a known code and a detail;
* refuse a message whose ``source`` is not the channel's domain (``spoofed_source``);
* never send a broadcast back to its origin, and decide every recipient once;
* only deliver to connected domains or dom0;
* deliver a unicast exactly when the policy allows it (answers: when solicited).

See docs/fuzzing.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))

with atheris.instrument_imports():
    from _common import DOMAINS, NAMES, POLICIES, View

    from broker.router import SPOOFED, Deliver, Refuse, route
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
        solicited = view.expects_reponse(msg.destination, msg.payload["id"], msg.source)
        assert (type(decision) is Deliver) == solicited
        return
    allowed = view.policy.decide(msg.source, msg.destination, msg.type, msg.name).allowed
    assert (type(decision) is Deliver) == allowed


HEADER = 5


def test_one_input(data: bytes) -> None:
    # Header: origin, policy, known domains (bits), connected domains (bits), flags
    # (bit 0: answers are solicited; bit 1: max_frame 256 instead of 65 536); then the
    # stream. A fixed header rather than atheris.FuzzedDataProvider, which takes
    # integers from the end of the input and would cut the seeds' frames.
    if len(data) < HEADER:
        return
    origin = NAMES[data[0] % len(NAMES)]
    policy = POLICIES[data[1] % len(POLICIES)]
    known = frozenset(d for i, d in enumerate(DOMAINS) if data[2] >> i & 1)
    up = frozenset(d for i, d in enumerate(DOMAINS) if data[3] >> i & 1 and d in known)
    solicit = bool(data[4] & 1)
    view = View(policy, known, up)
    decoder = FrameDecoder(256 if data[4] & 2 else 65536)
    stream = data[HEADER:]
    for item in decoder.feed(stream + b"\n"):
        if not isinstance(item, Message):
            continue
        if solicit and item.type == "reponse":
            view.pending.add((item.destination, item.payload["id"], item.source))
        check(item, origin, view)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
