"""messagerie.envelope: decode_envelope() against decode(), decode_runs(), and the
FrameDecoder's batch path.

The reference is :func:`messagerie.decode`: decode_envelope() must accept exactly the
frames it accepts, except those whose only defect is a key repeated *inside* the
contents (``data``, ``arguments``, ``resultat``), which it leaves to the receiver; and
when both refuse, they must say the same thing. The fast paths read memo sets of
strings known valid (messagerie.wire): every property runs with a cold memo (cleared
before each call) and a warm one.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
from collections.abc import Iterator
from typing import Any, Final

import msgspec
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from messagerie import (
    DOM0,
    MAX_DEPTH,
    TOUS,
    Commande,
    FrameDecoder,
    Journal,
    Message,
    MessageInvalide,
    Notification,
    Reason,
    Reponse,
    decode,
    encode,
    from_dict,
)
from messagerie import envelope as envelope_module
from messagerie.codec import nesting_depth
from messagerie.envelope import Envelope, Run, decode_envelope, decode_runs
from messagerie.wire import clear_memos
from tests.support.corpus import CORPUS, mouse
from tests.support.corpus import notif as hostile_notif
from tests.support.strategies import garbage, ids, json_objects, json_values, wire_objects

SETTINGS = settings(max_examples=120, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])


# -- the memo -----------------------------------------------------------------------

def clear_memo() -> None:
    clear_memos()


class Memo:
    """Cold: the memo sets are emptied before every call under test (slow paths).
    Warm: the frames were seen before (fast paths)."""

    def __init__(self, warm: bool) -> None:
        self.warm = warm

    def prepare(self, lines: list[bytes]) -> None:
        clear_memo()
        if self.warm:
            for line in lines:
                with contextlib.suppress(MessageInvalide):
                    decode_envelope(line)

    def before_call(self) -> None:
        if not self.warm:
            clear_memo()

    def __repr__(self) -> str:
        return "warm" if self.warm else "cold"


@pytest.fixture(params=["cold", "warm"])
def memo(request: pytest.FixtureRequest) -> Iterator[Memo]:
    clear_memo()
    yield Memo(request.param == "warm")
    clear_memo()


# -- outcomes and the reference -----------------------------------------------------

Outcome = tuple[Any, ...]


def bare(line: bytes) -> bytes:
    if line.endswith(b"\r\n"):
        return line[:-2]
    return line[:-1] if line.endswith(b"\n") else line


def fields(item: Envelope | Message, raw: bytes | None) -> Outcome:
    return ("ok", item.type, item.source, item.destination, item.name, item.id, raw)


def envelope_outcome(line: bytes) -> Outcome:
    try:
        env = decode_envelope(line)
    except MessageInvalide as exc:
        return ("refused", exc.reason, exc.field)
    assert type(env) is Envelope
    return fields(env, env.raw)


class Pairs(list[tuple[str, Any]]):
    """A JSON object as its (key, value) pairs, repeats kept."""


def _first_repeat(pairs: Pairs) -> str | None:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            return key[:40]
        seen.add(key)
    return None


def _last(pairs: Any, key: str) -> Any:
    if not isinstance(pairs, Pairs):
        return None
    found = None
    for k, v in pairs:
        if k == key:
            found = v
    return found


def envelope_level_repeat(line: bytes) -> str | None:
    """The field of the first key repeated at the envelope's levels (top, payload,
    and a reponse's payload.erreur: docs/protocol.md), computed independently with the
    stdlib parser."""
    top = json.loads(line, object_pairs_hook=Pairs)
    payload = _last(top, "payload")
    erreur = _last(payload, "erreur") if _last(top, "type") == "reponse" else None
    for prefix, obj in (("", top), ("payload.", payload), ("payload.erreur.", erreur)):
        if isinstance(obj, Pairs):
            key = _first_repeat(obj)
            if key is not None:
                return prefix + key
    return None


def expected(line: bytes) -> Outcome:
    """What decode_envelope(line) must give, from decode(line)."""
    try:
        msg = decode(line)
    except MessageInvalide as exc:
        if exc.reason is not Reason.DUPLICATE_KEY:
            return ("refused", exc.reason, exc.field)
    else:
        assert msg.raw == bare(line)
        return fields(msg, msg.raw)
    field = envelope_level_repeat(bare(line))
    if field is not None:
        # decode() does not say where; decode_envelope() names the field.
        return ("refused", Reason.DUPLICATE_KEY, field)
    # A key repeated inside the contents only: judged as if it were not repeated.
    try:
        msg = from_dict(msgspec.json.decode(bare(line)))
    except MessageInvalide as exc:
        return ("refused", exc.reason, exc.field)
    return fields(msg, bare(line))


def out_of_range_number(line: bytes) -> bool:
    """A number the JSON grammar allows but decode() refuses (a float beyond the double
    range): the subject of test_numbers_out_of_range_in_contents_are_the_receivers_call,
    kept out of the properties so that they check everything else."""
    found = False

    def parse_float(text: str) -> float:
        nonlocal found
        value = float(text)
        found = found or math.isinf(value)
        return value

    def parse_int(text: str) -> int:
        nonlocal found
        found = found or len(text.lstrip("-")) > 4000
        return 0

    with contextlib.suppress(ValueError, RecursionError):
        json.loads(line, parse_float=parse_float, parse_int=parse_int)
    return found


def check_equivalent(line: bytes, memo: Memo) -> Outcome:
    memo.before_call()
    want = expected(line)
    memo.before_call()
    got = envelope_outcome(line)
    assert got == want, (line, memo)
    return got


# -- frames on the wire: canonical, re-encoded, mutated --------------------------------

PLACEHOLDER: Final = "@@RAW@@"


def dumps(value: Any, *, compact: bool = True, ascii: bool = False) -> bytes:
    """JSON text of ``value`` where :class:`Pairs` may repeat keys. Compact without
    ascii: msgspec's bytes, i.e. messagerie.encode()'s (the fast path's form)."""
    if isinstance(value, dict):
        value = Pairs(value.items())
    sep, colon = (b",", b":") if compact else (b", ", b": ")
    if isinstance(value, Pairs):
        return b"{" + sep.join(dumps(k, compact=compact, ascii=ascii) + colon
                               + dumps(v, compact=compact, ascii=ascii)
                               for k, v in value) + b"}"
    if isinstance(value, list):
        return b"[" + sep.join(dumps(v, compact=compact, ascii=ascii) for v in value) + b"]"
    if compact and not ascii:
        return msgspec.json.encode(value)
    return json.dumps(value, ensure_ascii=ascii).encode()


def tree(value: Any) -> Any:
    if isinstance(value, dict):
        return Pairs((k, tree(v)) for k, v in value.items())
    if isinstance(value, list):
        return [tree(v) for v in value]
    return value


NAMES: Final = ["vm-a", "vm-b", "vm-c"]
CATEGORIES: Final = ["entree", "disque"]


@st.composite
def clean_messages(draw: st.DrawFn, journal: bool = True) -> Message:
    """Valid messages built by the library (canonical once encoded), with few names
    and categories so that runs happen."""
    kinds = ["notification"] * 4 + ["commande", "reponse"] + (["journal"] if journal else [])
    kind = draw(st.sampled_from(kinds))
    source = draw(st.sampled_from([*NAMES, DOM0]))
    unicast = st.sampled_from([*NAMES, DOM0])
    if kind == "notification":
        data = draw(st.none() | json_objects | st.just({"entree": "souris", "x": 1}))
        return Notification(source, draw(st.sampled_from([*NAMES, NAMES[1], DOM0, TOUS])),
                            draw(st.sampled_from(CATEGORIES)),
                            draw(st.sampled_from(["souris", "etat"])), data)
    if kind == "commande":
        return Commande(source, draw(unicast), draw(st.sampled_from(["ping", "lister"])),
                        draw(json_objects), id=draw(ids))
    if kind == "reponse":
        if draw(st.booleans()):
            return Reponse(source, draw(unicast), draw(ids), "lister",
                           resultat=draw(json_values))
        return Reponse(source, draw(unicast), draw(ids), "lister", "erreur",
                       erreur={"code": draw(st.text(max_size=8)), "message": "non"})
    return Journal(source, draw(st.sampled_from([DOM0, TOUS])), "info",
                   draw(st.text(max_size=20)), "usbd", horodatage="2024-05-01T10:00:00Z")


BAD_BYTES: Final = [b"\xff", b"\xc0\xaf", b"\xe2\x82", b"\xed\xa0\x80", b"copi\xe9"]
BAD_JSON: Final = [b"NaN", b"[1,]", b"01", b'"\\ud800"', b'"a\tb"', b"tru", b"{", b'"\\x"',
                   b'{"a" 1}', b"Infinity"]
FIELD_VALUES: Final[list[Any]] = [
    "tous", "dom0", "vm-x", "", " vm-a", "-x", "a" * 65, "a" * 64, "x y", "é", "\x7f", "ok",
    "erreur", "notification", "commande", "reponse", "journal", "Notification", 5, 1.5, None,
    True, [], {}, ["vm-a"], {"k": 1},
]
TOP_KEYS: Final = ["type", "source", "destination", "payload", "extension"]
PAYLOAD_KEYS: Final = ["categorie", "evenement", "data", "id", "commande", "arguments",
                       "statut", "resultat", "erreur", "niveau", "texte", "horodatage",
                       "composant", "zz"]
CONTENTS: Final = {"notification": "data", "commande": "arguments", "reponse": "resultat",
                   "journal": "data"}


def _payload(top: Pairs) -> Pairs | None:
    for i, (k, v) in enumerate(top):
        if k == "payload" and isinstance(v, Pairs):
            return v
        if k == "payload" and isinstance(v, dict):
            top[i] = (k, tree(v))
            return top[i][1]  # type: ignore[no-any-return]
    return None


def _set(pairs: Pairs, key: str, value: Any) -> None:
    for i, (k, _) in enumerate(pairs):
        if k == key:
            pairs[i] = (key, value)
            return
    pairs.append((key, value))


def _repeat(draw: st.DrawFn, pairs: Pairs, keys: list[str]) -> None:
    """Repeat a key of ``pairs`` (or a new one), before or after the original."""
    existing = [k for k, _ in pairs]
    key = draw(st.sampled_from(existing or keys))
    value = draw(st.sampled_from([*(v for k, v in pairs if k == key), *FIELD_VALUES[:6]]))
    where = draw(st.integers(0, len(pairs)))
    if key not in existing:
        pairs.insert(where, (key, value))
    pairs.insert(where, (key, value))


@st.composite
def frames(draw: st.DrawFn) -> tuple[bytes, str]:
    """A frame and how it was made: valid messages encoded canonically or not, then
    mutated (or not) in the envelope, in the contents, or as bytes."""
    if draw(st.sampled_from([True, True, False])):
        obj: dict[str, Any] = draw(clean_messages()).to_dict()
    else:
        obj = draw(wire_objects())
    kind = obj["type"]
    top = tree(obj)
    payload = _payload(top)
    assert payload is not None
    how: list[str] = []
    raw_bytes: bytes | None = None
    for _ in range(draw(st.integers(0, 2))):
        mutation = draw(st.sampled_from([
            "shuffle", "extra", "repeat_top", "repeat_payload", "repeat_erreur",
            "repeat_contents", "set_top", "set_payload", "set_erreur", "remove",
            "bad_bytes", "bad_json", "contents_kind"]))
        how.append(mutation)
        if mutation == "shuffle":
            top[:] = draw(st.permutations(top))
            payload[:] = draw(st.permutations(payload))
        elif mutation == "extra":
            target = draw(st.sampled_from([top, payload]))
            for k, v in draw(json_objects).items():
                if k not in (key for key, _ in target):
                    target.append((k, tree(v)))
        elif mutation == "repeat_top":
            _repeat(draw, top, TOP_KEYS)
        elif mutation == "repeat_payload":
            _repeat(draw, payload, PAYLOAD_KEYS)
        elif mutation == "repeat_erreur":
            erreur = _last(payload, "erreur")
            if isinstance(erreur, Pairs):
                _repeat(draw, erreur, ["code", "message"])
        elif mutation == "repeat_contents":
            contents = _last(payload, CONTENTS[kind])
            if not isinstance(contents, Pairs):
                contents = Pairs([("k", 1)])
                _set(payload, CONTENTS[kind], contents)
            _repeat(draw, contents, ["k"])
        elif mutation == "set_top":
            _set(top, draw(st.sampled_from(TOP_KEYS)), tree(draw(st.sampled_from(FIELD_VALUES))))
        elif mutation == "set_payload":
            _set(payload, draw(st.sampled_from(PAYLOAD_KEYS)),
                 tree(draw(st.sampled_from(FIELD_VALUES))))
        elif mutation == "set_erreur":
            erreur = _last(payload, "erreur")
            if isinstance(erreur, Pairs):
                _set(erreur, draw(st.sampled_from(["code", "message"])),
                     tree(draw(st.sampled_from(FIELD_VALUES))))
        elif mutation == "remove":
            target = draw(st.sampled_from([top, payload]))
            if target:
                del target[draw(st.integers(0, len(target) - 1))]
        elif mutation == "bad_bytes":
            _set(payload, CONTENTS[kind], Pairs([("v", PLACEHOLDER)]))
            raw_bytes = b'"' + draw(st.sampled_from(BAD_BYTES)) + b'"'
        elif mutation == "bad_json":
            _set(payload, CONTENTS[kind], Pairs([("v", PLACEHOLDER)]))
            raw_bytes = draw(st.sampled_from(BAD_JSON))
        else:  # contents_kind: an array, a string, a number, null where an object goes
            _set(payload, CONTENTS[kind], draw(st.sampled_from([[], [1], "s", 3, None, True])))
    compact = draw(st.sampled_from([True, True, False]))
    ascii = draw(st.booleans()) if not compact else draw(st.sampled_from([False] * 3 + [True]))
    line = dumps(top, compact=compact, ascii=ascii)
    if raw_bytes is not None:
        line = line.replace(b'"' + PLACEHOLDER.encode() + b'"', raw_bytes)
    if draw(st.sampled_from([False] * 7 + [True])):  # byte-level damage
        how.append("bytes")
        i = draw(st.integers(0, len(line) - 1))
        if draw(st.booleans()):
            line = line[:i]
        else:
            line = line[:i] + bytes([line[i] ^ draw(st.integers(1, 255))]) + line[i + 1:]
    return line, "+".join(how) or ("canonical" if compact and not ascii else "re-encoded")


# -- equivalence with decode() ---------------------------------------------------------

CONTENTS_REPEATS: Final = {"duplicate in data", "duplicate deep in data",
                           "duplicate hidden in data", "duplicate with spaces"}
ENVELOPE_REPEATS: Final = {
    "duplicate source": "source", "duplicate with same value": "source",
    "duplicate type": "type", "duplicate in payload": "payload.categorie",
    "duplicate hidden by an escape": "source", "duplicate hidden by escapes": "payload"}
OUT_OF_RANGE: Final = {"float overflow", "huge integer"}
"""Numbers decode() cannot hold (a double, Python's int digits limit): valid JSON syntax,
so inside the contents the envelope check leaves them to the receiver, like repeated
keys (docs/broker.md, "Validation")."""


def _corpus_params() -> list[Any]:
    return [pytest.param(line, reason, field, name, warm,
                         id=f"{name}-{'warm' if warm else 'cold'}")
            for name, line, reason, field in CORPUS for warm in (False, True)]


@pytest.mark.parametrize(("line", "reason", "field", "name", "warm"), _corpus_params())
def test_hostile_corpus(line: bytes, reason: Reason, field: str | None, name: str,
                        warm: bool) -> None:
    memo = Memo(warm)
    memo.prepare([hostile_notif()])  # the corpus's names and tokens, when warm
    if name in OUT_OF_RANGE:  # decode() refuses; the envelope check leaves it to receivers
        memo.before_call()
        assert envelope_outcome(line) == fields(decode(hostile_notif()), line)
        return
    got = check_equivalent(line, memo)
    if name in CONTENTS_REPEATS:
        assert got == fields(decode(hostile_notif()), line)
    elif name in ENVELOPE_REPEATS:
        assert got == ("refused", Reason.DUPLICATE_KEY, ENVELOPE_REPEATS[name])
    else:
        assert got == ("refused", reason, field)


@pytest.mark.parametrize(("kind", "payload", "want"), [
    ("reponse", '"id":"0","commande":"0","statut":"erreur","erreur":{"code":"","code":""}',
     ("refused", Reason.DUPLICATE_KEY, "payload.erreur.code")),
    # erreur is an envelope level of a reponse only: of an unknown type, the type
    # decides; of a notification or a commande, it is contents.
    ("tous", '"id":"0","statut":"erreur","erreur":{"code":"","code":""}',
     ("refused", Reason.UNKNOWN_TYPE, "type")),
    ("tous", '"id":"0","id":"1"', ("refused", Reason.DUPLICATE_KEY, "payload.id")),
])
def test_a_reponses_erreur_is_an_envelope_level(memo: Memo, kind: str, payload: str,
                                                want: Outcome) -> None:
    line = (f'{{"type":"{kind}","source":"vm-a","destination":"vm-b",'
            f'"payload":{{{payload}}}}}').encode()
    assert expected(line) == want  # the reference agrees
    memo.prepare([line])
    check_equivalent(line, memo)


@pytest.mark.slow
@SETTINGS
@given(frames(), st.sampled_from([b"", b"\n", b"\r\n"]))
def test_equivalent_to_decode(memo: Memo, frame: tuple[bytes, str], ending: bytes) -> None:
    line, _how = frame
    assume(not out_of_range_number(line))
    memo.prepare([line])
    check_equivalent(line + ending, memo)


@SETTINGS
@given(clean_messages(), st.booleans(), st.booleans(), st.data())
def test_valid_messages_in_any_form(memo: Memo, msg: Message, ascii: bool, shuffle: bool,
                                    data: st.DataObject) -> None:
    """Canonical, spaced, ascii-escaped, reordered, with unknown keys: all accepted, with
    the message's envelope and the exact bytes."""
    top = tree(msg.to_dict())
    if shuffle:
        top[:] = data.draw(st.permutations(top))
        top.append(("extension", {"k": [1, "é"]}))
        payload = _payload(top)
        assert payload is not None
        payload[:] = data.draw(st.permutations(payload))
        payload.append(("zz", None))
    for line in (encode(msg)[:-1], dumps(top, compact=False, ascii=ascii),
                 dumps(top, compact=True, ascii=ascii)):
        memo.prepare([line])
        memo.before_call()
        env = decode_envelope(line)
        assert fields(env, env.raw) == fields(msg, line)


@pytest.mark.parametrize("kind", ["notification", "commande", "reponse", "journal"])
def test_repeat_inside_contents_is_left_to_the_receiver(memo: Memo, kind: str) -> None:
    msg = {"notification": Notification("vm-a", "vm-b", "entree", "souris", {"x": 1}),
           "commande": Commande("vm-a", "vm-b", "lister", {"x": 1}, id="c1"),
           "reponse": Reponse("vm-a", "vm-b", "c1", "lister", resultat={"x": 1}),
           "journal": Journal("vm-a", DOM0, "info", "t", "usbd", data={"x": 1},
                              horodatage="2024-05-01T10:00:00Z")}[kind]
    canonical = encode(msg)[:-1]
    inner = b'{"x":1}'
    for repeated in (b'{"x":1,"x":2}', b'{"x":{"y":1,"y":2}}', b'{"k\\u00e9":1,"k\xc3\xa9":2}',
                     b'{ "x" : 1 , "x" : 2 }'):
        line = canonical.replace(inner, repeated)
        assert line != canonical
        with pytest.raises(MessageInvalide) as exc:
            decode(line)
        assert exc.value.reason is Reason.DUPLICATE_KEY
        memo.prepare([canonical])
        memo.before_call()
        env = decode_envelope(line)
        assert fields(env, env.raw) == fields(msg, line)


# -- repeated keys in the envelope ----------------------------------------------------

NOTE: Final = encode(Notification("vm-a", "vm-b", "entree", "souris", {"x": 1}))[:-1]
CMD: Final = encode(Commande("vm-a", "vm-b", "lister", {"x": 1}, id="c1"))[:-1]
OK_REP: Final = encode(Reponse("vm-a", "vm-b", "c1", "lister", resultat=[1]))[:-1]
ERR_REP: Final = encode(Reponse("vm-a", "vm-b", "c1", "lister", "erreur",
                                erreur={"code": "refuse", "message": "non"}))[:-1]
JOURNAL: Final = encode(Journal("vm-a", DOM0, "info", "t", "usbd",
                                horodatage="2024-05-01T10:00:00Z"))[:-1]

ENVELOPE_DUPLICATES: Final = [
    # (frame, what is repeated (inserted after the original), field)
    (NOTE, b'"type":"notification"', "type"),
    (NOTE, b'"source":"vm-a"', "source"),
    (NOTE, b'"destination":"vm-b"', "destination"),
    (NOTE, b'"categorie":"entree"', "payload.categorie"),
    (NOTE, b'"evenement":"souris"', "payload.evenement"),
    (NOTE, b'"data":{"x":1}', "payload.data"),
    (CMD, b'"id":"c1"', "payload.id"),
    (CMD, b'"commande":"lister"', "payload.commande"),
    (CMD, b'"arguments":{"x":1}', "payload.arguments"),
    (OK_REP, b'"statut":"ok"', "payload.statut"),
    (OK_REP, b'"resultat":[1]', "payload.resultat"),
    (ERR_REP, b'"erreur":{"code":"refuse","message":"non"}', "payload.erreur"),
    (ERR_REP, b'"code":"refuse"', "payload.erreur.code"),
    (ERR_REP, b'"message":"non"', "payload.erreur.message"),
    (JOURNAL, b'"composant":"usbd"', "payload.composant"),
]


@pytest.mark.parametrize("spaced", [False, True], ids=["compact", "spaced"])
@pytest.mark.parametrize(("frame", "pair", "field"), ENVELOPE_DUPLICATES,
                         ids=[f for _, _, f in ENVELOPE_DUPLICATES])
def test_repeat_in_envelope_refused(memo: Memo, frame: bytes, pair: bytes, field: str,
                                    spaced: bool) -> None:
    assert frame.count(pair) == 1
    line = frame.replace(pair, pair + b"," + pair)
    if spaced:
        line = line.replace(b'":', b'": ').replace(b',"', b', "')
    memo.prepare([frame])
    memo.before_call()
    with pytest.raises(MessageInvalide) as exc:
        decode_envelope(line)
    assert (exc.value.reason, exc.value.field) == (Reason.DUPLICATE_KEY, field)
    check_equivalent(line, memo)


@pytest.mark.parametrize(("line", "field"), [
    (b'{"sourc\\u0065":"vm-b",' + NOTE[1:], "source"),
    (NOTE[:-1] + b',"extension":1,"extension":2}', "extension"),
    (NOTE.replace(b'"data"', b'"zz":1,"zz":2,"data"'), "payload.zz"),
    (NOTE.replace(b'"payload":', b'"payload":{},"payload":'), "payload"),
])
def test_repeat_in_envelope_odd_forms(memo: Memo, line: bytes, field: str) -> None:
    memo.prepare([NOTE])
    memo.before_call()
    with pytest.raises(MessageInvalide) as exc:
        decode_envelope(line)
    assert (exc.value.reason, exc.value.field) == (Reason.DUPLICATE_KEY, field)


# -- unparsable bytes anywhere ---------------------------------------------------------

def _with_contents(frame: bytes, contents: bytes, raw: bytes) -> bytes:
    assert frame.count(contents) == 1
    return frame.replace(contents, raw)


UNPARSABLE: Final = (
    [(b'{"v":"' + b + b'"}', Reason.INVALID_UTF8) for b in BAD_BYTES]
    + [(b'{"v":' + b + b"}", Reason.INVALID_JSON) for b in BAD_JSON]
    + [(b'{"v":1}x', Reason.INVALID_JSON), (b'{"v":1', Reason.INVALID_JSON),
       (b'{"v":"\\ud800\\u0041"}', Reason.INVALID_JSON),
       (b'{"v":' + b"[" * 3000 + b"]" * 3000 + b"}", Reason.INVALID_JSON)])


@pytest.mark.parametrize("where", ["data", "arguments", "resultat"])
@pytest.mark.parametrize(("raw", "reason"), UNPARSABLE,
                         ids=[str(i) for i in range(len(UNPARSABLE))])
def test_unparsable_contents_refused(memo: Memo, where: str, raw: bytes,
                                     reason: Reason) -> None:
    frame = {"data": NOTE, "arguments": CMD, "resultat": OK_REP}[where]
    contents = b'[1]' if where == "resultat" else b'{"x":1}'
    line = _with_contents(frame, contents, raw)
    memo.prepare([frame])
    for decoder in (decode_envelope, decode):
        memo.before_call()
        with pytest.raises(MessageInvalide) as exc:
            decoder(line)
        assert (exc.value.reason, exc.value.field) == (reason, None)
    memo.before_call()
    assert decode_runs([frame, line, frame]) is None


OUT_OF_RANGE_NUMBERS: Final = [b"1e400", b"-1e400", b"1.8e308", b"1E+400", b"9" * 5000]


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
@pytest.mark.parametrize("number", OUT_OF_RANGE_NUMBERS, ids=lambda n: n[:8].decode())
def test_numbers_out_of_range_in_contents_are_the_receivers_call(number: bytes,
                                                                 warm: bool) -> None:
    """decode() refuses these numbers (invalid_json); inside the contents the envelope
    check accepts them (valid JSON syntax), with the same verdict whichever path the
    frame takes (cold memo: exact path; warm: fast path and runs)."""
    line = _with_contents(NOTE, b'{"x":1}', b'{"v":' + number + b"}")
    with pytest.raises(MessageInvalide) as exc:
        decode(line)
    assert exc.value.reason is Reason.INVALID_JSON
    memo = Memo(warm)
    memo.prepare([NOTE])
    memo.before_call()
    env = decode_envelope(line)
    assert (env.type, env.source, env.destination, env.raw) == (
        "notification", "vm-a", "vm-b", line)
    spaced = line.replace(b'"data":', b'"data": ')  # never canonical: the exact path
    memo.before_call()
    assert decode_envelope(spaced).raw == spaced
    memo.before_call()
    runs = decode_runs([NOTE, line])
    if warm:
        assert runs is not None and [type(r) for r in runs] == [Run]
    # Where the same number is an envelope value, it is refused like decode() does.
    bad_id = (b'{"type":"commande","source":"vm-a","destination":"vm-b","payload":'
              b'{"id":' + number + b',"commande":"c"}}')
    with pytest.raises(MessageInvalide) as exc:
        decode_envelope(bad_id)
    assert exc.value.reason is Reason.INVALID_JSON


def test_other_argument_types_and_endings(memo: Memo) -> None:
    memo.prepare([NOTE])
    want = fields(decode(NOTE), NOTE)
    for line in (NOTE + b"\n", NOTE + b"\r\n", bytearray(NOTE), memoryview(NOTE + b"\n"),
                 NOTE.decode()):
        memo.before_call()
        env = decode_envelope(line)
        assert fields(env, env.raw) == want and type(env.raw) is bytes
    with pytest.raises(MessageInvalide) as exc:
        decode_envelope('{"type":"notification","source":"\ud800"}')
    assert exc.value.reason is Reason.INVALID_UTF8


def test_envelope_of_each_type(memo: Memo) -> None:
    cases = [(NOTE, ("notification", "vm-a", "vm-b", "entree", None)),
             (CMD, ("commande", "vm-a", "vm-b", "lister", "c1")),
             (OK_REP, ("reponse", "vm-a", "vm-b", "lister", "c1")),
             (ERR_REP, ("reponse", "vm-a", "vm-b", "lister", "c1")),
             (JOURNAL, ("journal", "vm-a", DOM0, "usbd", None)),
             (encode(Notification("dom0", TOUS, "domaine", "etat"))[:-1],
              ("notification", DOM0, TOUS, "domaine", None))]
    memo.prepare([c for c, _ in cases])
    for line, want in cases:
        memo.before_call()
        assert envelope_outcome(line) == ("ok", *want, line)


@pytest.mark.parametrize(("line", "reason", "field"), [
    (NOTE.replace(b'"source":"vm-a"', b'"source":"tous"'), Reason.BAD_NAME, "source"),
    (CMD.replace(b'"destination":"vm-b"', b'"destination":"tous"'), Reason.BAD_NAME,
     "destination"),
    (OK_REP.replace(b'"destination":"vm-b"', b'"destination":"tous"'), Reason.BAD_NAME,
     "destination"),
    (CMD.replace(b'"id":"c1"', b'"id":"c 1"'), Reason.BAD_VALUE, "payload.id"),
    (CMD.replace(b'"id":"c1"', b'"id":""'), Reason.BAD_VALUE, "payload.id"),
    (CMD.replace(b'"id":"c1"', b'"id":"' + b"c" * 65 + b'"'), Reason.BAD_VALUE, "payload.id"),
    (CMD.replace(b'"id":"c1"', b'"id":"c\x7f"'), Reason.BAD_VALUE, "payload.id"),
    (CMD.replace(b'"id":"c1"', b'"id":"\xc3\xa9"'), Reason.BAD_VALUE, "payload.id"),
    (CMD.replace(b'"id":"c1"', b'"id":1'), Reason.WRONG_TYPE, "payload.id"),
    (NOTE.replace(b'{"x":1}', b"[]"), Reason.WRONG_TYPE, "payload.data"),
    (NOTE.replace(b'{"x":1}', b'"x"'), Reason.WRONG_TYPE, "payload.data"),
    (CMD.replace(b'{"x":1}', b"[1]"), Reason.WRONG_TYPE, "payload.arguments"),
    (OK_REP.replace(b'"ok"', b'"OK"'), Reason.BAD_VALUE, "payload.statut"),
    (ERR_REP.replace(b',"erreur":{"code":"refuse","message":"non"}', b""),
     Reason.MISSING_FIELD, "payload.erreur"),
    (ERR_REP.replace(b'"code":"refuse",', b""), Reason.MISSING_FIELD, "payload.erreur.code"),
    (ERR_REP.replace(b'"refuse"', b"1"), Reason.WRONG_TYPE, "payload.erreur.code"),
    (ERR_REP.replace(b'{"code":"refuse","message":"non"}', b'"non"'), Reason.WRONG_TYPE,
     "payload.erreur"),
    (NOTE.replace(b'"entree"', b'"en tree"'), Reason.BAD_VALUE, "payload.categorie"),
    (NOTE.replace(b'"vm-b"', b'"vm_b!"'), Reason.BAD_NAME, "destination"),
])
def test_refusals_name_the_field(memo: Memo, line: bytes, reason: Reason,
                                 field: str) -> None:
    memo.prepare([NOTE, CMD, OK_REP, ERR_REP])
    assert check_equivalent(line, memo) == ("refused", reason, field)


@pytest.mark.parametrize("line", [
    # Odd but valid reponses: statut ok with an erreur, erreur with a resultat, no resultat.
    OK_REP.replace(b'"resultat":[1]', b'"resultat":[1],"erreur":{"code":"x","message":"y"}'),
    ERR_REP.replace(b'"statut":"erreur"', b'"statut":"erreur","resultat":1'),
    OK_REP.replace(b',"resultat":[1]', b""),
    OK_REP.replace(b"[1]", b"null"),
    NOTE.replace(b',"data":{"x":1}', b""),
    NOTE.replace(b'{"x":1}', b"null"),
])
def test_odd_valid_reponses_and_notifications(memo: Memo, line: bytes) -> None:
    memo.prepare([line])
    assert check_equivalent(line, memo)[0] == "ok"


# -- decode_runs ---------------------------------------------------------------------

def shape(item: Envelope | Run) -> tuple[Any, ...]:
    if type(item) is Run:
        e = item.envelope
        return ("run", item.count, item.data, *fields(e, e.raw))
    assert type(item) is Envelope
    return ("one", *fields(item, item.raw))


def expected_shape(lines: list[bytes], msgs: list[Message]) -> list[tuple[Any, ...]]:
    """Consecutive unicast notifications with one (source, destination, categorie)
    make a run; everything else stands alone; the order is kept."""
    out: list[tuple[Any, ...]] = []
    i = 0
    while i < len(msgs):
        m = msgs[i]
        j = i + 1
        if isinstance(m, Notification) and m.destination not in (TOUS, DOM0):
            key = (m.source, m.destination, m.categorie)
            while (j < len(msgs) and isinstance(msgs[j], Notification)
                   and (msgs[j].source, msgs[j].destination, msgs[j].name) == key):
                j += 1
        if j - i == 1:
            out.append(("one", *fields(m, lines[i])))
        else:
            out.append(("run", j - i, b"\n".join(lines[i:j]) + b"\n", *fields(m, lines[i])))
        i = j
    return out


def expand(items: list[Any]) -> list[Any]:
    """Runs as the frames they carry, each with the run's envelope; the rest as is."""
    out: list[Any] = []
    for item in items:
        if type(item) is Run:
            frames = item.data.split(b"\n")
            assert frames[-1] == b"" and len(frames) - 1 == item.count
            e = item.envelope
            assert e.raw == frames[0]
            out += [fields(e, f) for f in frames[:-1]]
        elif type(item) is Envelope:
            out.append(fields(item, item.raw))
        else:
            out.append(item)
    return out


def one_by_one(lines: list[bytes]) -> list[Outcome]:
    return [envelope_outcome(line) for line in lines]


def runs_and_one_by_one(memo: Memo, lines: list[bytes]) -> tuple[list[Any] | None,
                                                                  list[Outcome]]:
    """``decode_runs(lines)`` and each line's own outcome, each call made from the memo's
    state (cold or warm); where ``decode_runs`` answers, it must say what the lines say
    one by one."""
    memo.prepare(lines)
    memo.before_call()
    got = decode_runs(lines)
    memo.before_call()
    each = one_by_one(lines)
    if got is not None:
        assert expand(got) == each
    return got, each


@pytest.mark.parametrize("n", [2, 3, 100, 400])
def test_mouse_moves_make_one_run(n: int) -> None:
    lines = [mouse("vm-a", "vm-b", i) for i in range(n)]
    decode_envelope(lines[0])  # warm: the slow path fills the memo
    (run,) = decode_runs(lines) or [None]
    assert type(run) is Run
    assert run.count == n
    assert run.data == b"\n".join(lines) + b"\n"
    assert fields(run.envelope, run.envelope.raw) == (
        "ok", "notification", "vm-a", "vm-b", "entree", None, lines[0])


def test_one_frame_gives_an_envelope() -> None:
    line = mouse("vm-a", "vm-b", 7)
    decode_envelope(line)
    (item,) = decode_runs([line]) or [None]
    assert type(item) is Envelope
    assert fields(item, item.raw) == ("ok", "notification", "vm-a", "vm-b", "entree", None,
                                      line)


def test_mixed_sequence_keeps_order_and_splits_runs() -> None:
    cmd = encode(Commande("vm-a", "vm-b", "lister", id="c1"))[:-1]
    rep = encode(Reponse("vm-a", "vm-c", "c9", "lister", resultat=1))[:-1]
    to_all = encode(Notification("vm-a", TOUS, "entree", "souris"))[:-1]
    to_dom0 = encode(Notification("vm-a", DOM0, "entree", "souris"))[:-1]
    lines = [
        mouse("vm-a", "vm-b", 0), mouse("vm-a", "vm-b", 1), mouse("vm-a", "vm-b", 2),  # run
        mouse("vm-a", "vm-c", 3), mouse("vm-a", "vm-c", 4),              # other destination
        mouse("vm-a", "vm-c", 5, "clavier"),                             # other category
        mouse("vm-a", "vm-b", 6), cmd, mouse("vm-a", "vm-b", 7),         # a commande between
        to_all, to_all, to_dom0, to_dom0,                                # never runs
        mouse("vm-a", "vm-b", 8), mouse("vm-a", "vm-b", 9), rep,
        mouse("dom0", "vm-b", 10), mouse("dom0", "vm-b", 11),            # other source
    ]
    for line in lines:
        decode_envelope(line)
    got = decode_runs(lines)
    assert got is not None
    msgs = [decode(line) for line in lines]
    assert [shape(i) for i in got] == expected_shape(lines, msgs)
    assert [type(i).__name__ for i in got] == [
        "Run", "Run", "Envelope", "Envelope", "Envelope", "Envelope", "Envelope", "Envelope",
        "Envelope", "Envelope", "Run", "Envelope", "Run"]
    assert expand(got) == one_by_one(lines)


@pytest.mark.parametrize(("name", "bad"), [
    ("source tous", mouse("vm-a", "vm-b", 1).replace(b'"vm-a"', b'"tous"')),
    ("bad destination", mouse("vm-a", "vm-b", 1).replace(b'"vm-b"', b'"-vm-b"')),
    ("bad categorie", mouse("vm-a", "vm-b", 1, "en tree")),
    ("bad evenement", mouse("vm-a", "vm-b", 1).replace(b'"evenement":"souris"',
                                                       b'"evenement":"sou ris"')),
    ("data not an object", mouse("vm-a", "vm-b", 1).replace(b'"data":{', b'"data":[{')[:-2]
     + b"]}}"),
    ("bad id", CMD.replace(b'"c1"', b'"c 1"')),
    ("reponse to tous", OK_REP.replace(b'"vm-b"', b'"tous"')),
    ("bad json", mouse("vm-a", "vm-b", 1)[:-1]),
    ("bad json in data", mouse("vm-a", "vm-b", 1).replace(b'"seq":1', b'"seq":01')),
    ("invalid utf-8 in data", mouse("vm-a", "vm-b", 1).replace(b'"entree":"souris"',
                                                               b'"entree":"sour\xefs"')),
    ("repeat in envelope", mouse("vm-a", "vm-b", 1).replace(b'"source":"vm-a"',
                                                          b'"source":"vm-a","source":"vm-a"')),
    ("spaces", mouse("vm-a", "vm-b", 1).replace(b'"type":', b'"type": ')),
    ("unknown key", mouse("vm-a", "vm-b", 1)[:-1] + b',"x":1}'),
    ("other key order", mouse("vm-a", "vm-b", 1).replace(
        b'"source":"vm-a","destination":"vm-b"', b'"destination":"vm-b","source":"vm-a"')),
    ("empty line", b""),
    ("carriage return", mouse("vm-a", "vm-b", 1) + b"\r"),
    ("journal", JOURNAL),
    ("commande to tous", CMD.replace(b'"vm-b"', b'"tous"')),
    ("array", b"[" + mouse("vm-a", "vm-b", 1) + b"]"),
])
@pytest.mark.parametrize("at", [0, 1, 3])
def test_runs_fall_back(name: str, bad: bytes, at: int) -> None:
    lines = [mouse("vm-a", "vm-b", i) for i in range(3)]
    for line in [*lines, bad, NOTE, CMD, JOURNAL]:
        with contextlib.suppress(MessageInvalide):
            decode_envelope(line)
    assert decode_runs(lines) is not None
    lines.insert(at, bad)
    assert decode_runs(lines) is None


def _split(frame: bytes, at: bytes) -> list[bytes]:
    """``frame`` cut over two lines at ``at``'s comma: each line is invalid JSON, but
    joined with a comma they are the frame again."""
    cut = frame.index(at)
    assert frame[cut:cut + 1] == b","
    return [frame[:cut], frame[cut + 1:]]


@pytest.mark.parametrize("case", ["split", "joined", "split and joined"])
def test_runs_never_misalign_lines(case: str) -> None:
    """decode_runs() decodes the lines joined with commas: a frame cut over two lines,
    or two frames on one line, must not shift envelopes onto other lines' bytes
    (at ad0cebc it did: a forged source rode on an honest frame's run)."""
    honest = mouse("vm-a", "vm-c", 1)
    forged = mouse("vm-b", "vm-c", 2)  # another domain's name as source
    other = mouse("vm-a", "vm-b", 3)
    denied = encode(Commande("vm-a", "vm-c", "effacer", id="x1"))[:-1]
    for line in (honest, forged, other, denied):
        decode_envelope(line)
    if case == "split":  # as many elements as lines minus one
        lines = [*_split(other, b',"destination"'), forged, honest]
    elif case == "joined":  # one more element than lines
        lines = [other + b"," + mouse("vm-a", "vm-c", 4, "clavier"), forged, forged]
    else:  # as many elements as lines, every one after the cut on another line's bytes
        lines = [*_split(other, b',"payload"'), denied, honest + b"," + honest]
    assert envelope_outcome(lines[0])[0] == "refused"
    got = decode_runs(lines)
    # Either fall back, or say exactly what decoding each line says.
    assert got is None or expand(got) == one_by_one(lines)


@SETTINGS
@given(st.lists(clean_messages(), min_size=1, max_size=12), st.data())
def test_runs_match_frame_by_frame(memo: Memo, msgs: list[Message],
                                   data: st.DataObject) -> None:
    lines = [encode(m)[:-1] for m in msgs]
    # Now and then a frame that is not canonical, or not valid, somewhere.
    spoiled = data.draw(st.none() | frames().map(lambda f: f[0]) | garbage
                        | st.sampled_from([b"", b" ", lines[0] + b"\r", lines[0][:-1]]))
    if spoiled is not None:
        spoiled = spoiled.replace(b"\n", b"?")  # one line each, as FrameDecoder gives them
        assume(not out_of_range_number(spoiled))
        lines.insert(data.draw(st.integers(0, len(lines))), spoiled)
    got, each = runs_and_one_by_one(memo, lines)
    if memo.warm and spoiled is None and not any(isinstance(m, Journal) for m in msgs):
        assert got is not None  # canonical, valid, known names: validated at once
        assert [shape(i) for i in got] == expected_shape(lines, msgs)
    if any(o[0] == "refused" for o in each) or spoiled == b"":
        assert got is None


@pytest.mark.parametrize("destination", [TOUS, DOM0])
def test_identical_frames_to_tous_or_dom0_never_make_a_run(destination: str) -> None:
    lines = [encode(Notification("vm-a", destination, "entree", "souris", {"x": 1}))[:-1]] * 5
    decode_envelope(lines[0])
    got = decode_runs(lines)
    assert got is not None
    assert [type(i) for i in got] == [Envelope] * 5
    assert expand(got) == one_by_one(lines)


VARIANTS: Final = ["evenement", "categorie", "data null", "no data", "data array", "spaced",
                   "unknown key", "commande"]


@pytest.mark.slow
@SETTINGS
@given(st.tuples(st.sampled_from([*NAMES, DOM0]),
                 st.sampled_from([*NAMES, NAMES[1], DOM0, TOUS]), st.sampled_from(CATEGORIES)),
       st.lists(json_objects, min_size=1, max_size=20), st.none() | st.sampled_from(VARIANTS),
       st.data())
def test_runs_of_one_envelope(memo: Memo, envelope: tuple[str, str, str],
                              datas: list[dict[str, Any]], variant: str | None,
                              data: st.DataObject) -> None:
    """Frames that all share one envelope (the common case, and decode_runs' shortcut),
    now and then with one that differs a little."""
    source, destination, categorie = envelope
    lines = [encode(Notification(source, destination, categorie, "souris", d))[:-1]
             for d in datas]
    if variant is not None:
        i = data.draw(st.integers(0, len(lines) - 1))
        payload: dict[str, Any] = {"categorie": categorie, "evenement": "souris",
                                   "data": datas[i]}
        obj = {"type": "notification", "source": source, "destination": destination,
               "payload": payload}
        if variant == "evenement":
            payload["evenement"] = "clavier"
        elif variant == "categorie":
            payload["categorie"] = "autre"
        elif variant == "data null":
            payload["data"] = None
        elif variant == "no data":
            del payload["data"]
        elif variant == "data array":
            payload["data"] = [datas[i]]
        elif variant == "unknown key":
            payload["zz"] = 1
        elif variant == "commande":
            obj = Commande(source, destination if destination != TOUS else DOM0, "lister",
                           id="c1").to_dict()
        line = msgspec.json.encode(obj)
        lines[i] = json.dumps(obj).encode() if variant == "spaced" else line
    got, _ = runs_and_one_by_one(memo, lines)
    if variant in ("data array", "spaced", "unknown key"):
        assert got is None
    elif memo.warm:
        assert got is not None
        assert [shape(i) for i in got] == expected_shape(lines, [decode(x) for x in lines])


# -- the FrameDecoder's batch path ----------------------------------------------------

def decoded(d: FrameDecoder[Any], stream: bytes, cuts: list[int]) -> list[Any]:
    out: list[Any] = []
    points = sorted({0, len(stream), *(c for c in cuts if c <= len(stream))})
    for a, b in itertools.pairwise(points):
        out += d.feed(stream[a:b])
    return expand(out)


@SETTINGS
@given(st.lists(clean_messages().map(lambda m: encode(m)[:-1])
                | st.integers(0, 99).map(lambda i: mouse("vm-a", "vm-b", i))
                | wire_objects().map(lambda o: encode(from_dict(o))[:-1])
                | frames().map(lambda f: f[0]) | garbage
                | st.sampled_from([b"", b"\r", b"x" * 1500]), max_size=16),
       st.lists(st.sampled_from([b"\n", b"\r\n"]), min_size=16, max_size=16),
       st.lists(st.integers(0, 20_000), max_size=12))
def test_batch_path_gives_what_frames_give(memo: Memo, lines: list[bytes],
                                           endings: list[bytes], cuts: list[int]) -> None:
    lines = [line.replace(b"\n", b"?") for line in lines]
    assume(not any(out_of_range_number(line) for line in lines))
    stream = b"".join(line + end for line, end in zip(lines, endings, strict=False))
    memo.prepare(lines)
    batched = decoded(FrameDecoder(1024, decode=decode_envelope, batch=decode_runs),
                      stream, cuts)
    memo.prepare(lines)
    plain = decoded(FrameDecoder(1024, decode=decode_envelope), stream, cuts)
    assert batched == plain


def test_batch_path_is_taken_for_a_read_of_mouse_moves() -> None:
    lines = [mouse("vm-a", "vm-b", i) for i in range(50)]
    decode_envelope(lines[0])
    out = FrameDecoder(decode=decode_envelope, batch=decode_runs).feed(
        b"".join(line + b"\n" for line in lines))
    assert [type(o) for o in out] == [Run]
    assert expand(out) == one_by_one(lines)


def test_batch_path_with_a_frame_split_over_two_lines() -> None:
    other = mouse("vm-a", "vm-b", 3)
    forged = mouse("vm-b", "vm-c", 2)
    honest = mouse("vm-a", "vm-c", 1)
    for line in (other, forged, honest):
        decode_envelope(line)
    stream = b"\n".join([*_split(other, b',"destination"'), forged, honest]) + b"\n"
    batched = expand(FrameDecoder(decode=decode_envelope, batch=decode_runs).feed(stream))
    plain = expand(FrameDecoder(decode=decode_envelope).feed(stream))
    assert batched == plain
    assert [type(o).__name__ for o in plain] == ["FrameError", "FrameError", "tuple", "tuple"]


@pytest.mark.parametrize("where", ["top", "payload"])
def test_unknown_keys_values_are_contents(memo: Memo, where: str) -> None:
    """The value of a key the protocol does not define is contents: a key repeated inside
    it is left to the receiver (decode() refuses it), by both paths alike."""
    inner = b'"ext":{"a":1,"a":2},'
    line = (NOTE.replace(b'"payload":', inner + b'"payload":') if where == "top"
            else NOTE.replace(b'"data":', inner + b'"data":'))
    with pytest.raises(MessageInvalide) as exc:
        decode(line)
    assert exc.value.reason is Reason.DUPLICATE_KEY
    memo.before_call()
    assert envelope_outcome(line) == fields(decode(NOTE), line)
    # The same key repeated at the envelope's own level is refused, with its field.
    twice = line.replace(inner, inner + inner)
    memo.before_call()
    assert envelope_outcome(twice) == (
        "refused", Reason.DUPLICATE_KEY, "ext" if where == "top" else "payload.ext")


_HEAD = (b'{"type":"notification","source":"vm-a","destination":"vm-b","payload":'
         b'{"categorie":"entree","evenement":"souris","data":')
_HEADS = [_HEAD,
          _HEAD.replace(b'"evenement"', b'"categorie":"autre","evenement"'),  # repeated
          _HEAD.replace(b'"vm-b"', b'"tous"'), _HEAD.replace(b'"vm-b"', b'"dom0"'),
          _HEAD.replace(b'"vm-a"', b'"vm-\xff"'), _HEAD.replace(b'":"', b'": "', 1),
          _HEAD.replace(b'"data":', b'"zz":1,"data":')]  # an unknown key: not canonical
_VALID = [b"{}", b'{"b":1}', b'{"a":"}"}', b'{"a":[1,{"b":null}]}', b'{"x":"\\u00e9"}',
          b'{"a":' * 30 + b"1" + b"}" * 30, b'{"a":' * 63 + b"1" + b"}" * 63,
          b'{"a":"\xff"}', b'{"a":"\xed\xa0\x80"}']  # the last two: not UTF-8
_PIECES = [b"{", b"}", b"{}", b'"a":"', b'"}', b'"', b",", b'"b":1', b",{", b"},{",
           b'"categorie":"autre"', b'"data":{}', b":", b"1", b" ", b"]", b"[", b'\\"',
           b"\xff", b'"\xc3\xa9"']
_ENDS = [b"}}"] * 5 + [b"}", b"}x", b"} }", b"}}}", b"}}\r"]
_piece_built = st.lists(st.sampled_from(_PIECES), max_size=4).map(lambda p: b"{" + b"".join(p))


@SETTINGS
@given(st.sampled_from(_HEADS),
       st.lists(st.tuples(st.sampled_from(_VALID) | _piece_built,
                          st.sampled_from(_ENDS)), min_size=2, max_size=6))
@example(_HEAD, [(b"{}", b"}}"), (b'{"a":"', b"}}"), (b'{"}', b"}}"), (b"{},{}", b"}}")])
@example(_HEAD, [(b"{}", b"}}"), (b'{"b":1}', b"}}"), (b"{} ", b"}}")])  # spaced, valid
@example(_HEAD, [(b"{}", b"}}"), (b"{}", b"}x")])  # bytes after the frame
@example(_HEADS[1], [(b"{}", b"}}"), (b"{}", b"}}")])  # a key repeated in the head
@example(_HEADS[2], [(b"{}", b"}}"), (b"{}", b"}}")])  # to tous: never a run
@example(_HEAD, [(b"{}", b"}}"), (_VALID[6], b"}}")])  # 65 levels deep, the frame's two
@example(_HEAD, [(b"{}", b"}}"), (_VALID[7], b"}}")])  # not UTF-8 inside a string
def test_a_run_of_one_head_takes_each_data_as_its_own(
        memo: Memo, head: bytes, parts: list[tuple[bytes, bytes]]) -> None:
    """Frames that share their bytes up to the data are checked on the first frame and
    on the others' data, all in one parse: a data must be one value on its own, not a
    piece of one that spans lines (``{"a":"`` then ``"}``) nor two values (``{},{}``),
    nor anything but JSON, and the frame must end right after it. Whatever the head,
    the data and the ending, decode_runs says what each line says; when the lines are
    valid and canonical, at once (one run)."""
    lines = [head + d + end for d, end in parts]
    got, each = runs_and_one_by_one(memo, lines)
    # Never a run to tous or dom0: the broker takes a run for one domain's.
    assert not [i for i in got or [] if type(i) is Run
                and i.envelope.destination in (TOUS, DOM0)]
    if (memo.warm and head == _HEAD and all(o[0] == "ok" for o in each)
            and not any(b" " in line or b"\r" in line for line in lines)):
        assert got is not None and [type(i) for i in got] == [Run]  # canonical


@pytest.mark.parametrize("where", ["same envelope", "mixed"])
@pytest.mark.parametrize("opener", [b"[", b'{"a":'])
def test_runs_refuse_exactly_the_frames_nested_too_deeply(where: str, opener: bytes) -> None:
    # decode_runs() bounds the depth from the frames' lengths or counts the openers of
    # the whole run in C: at the limit a run is taken at once; one level more, in any
    # frame, it falls back, and decoding that frame alone refuses it.
    closer = b"]" if opener == b"[" else b"}"
    tail = b"" if opener == b"[" else b"1"

    def note(destination: bytes, value: bytes) -> bytes:
        return (b'{"type":"notification","source":"vm-a","destination":"' + destination
                + b'","payload":{"categorie":"entree","evenement":"souris","data":{"seq":'
                + value + b"}}}")

    def deep(levels: int) -> bytes:  # the frame, its payload and data: three levels
        k = levels - 3
        return note(b"vm-b", opener * k + tail + closer * k)

    other = note(b"vm-c" if where == "mixed" else b"vm-b", b"1")
    decode_envelope(other)
    for levels in (MAX_DEPTH, MAX_DEPTH + 1):
        frame = deep(levels)
        assert nesting_depth(frame) == levels
        lines = [other, frame, other, other]
        if levels <= MAX_DEPTH:
            decode_envelope(frame)
            got = decode_runs(lines)
            assert got is not None and expand(got) == one_by_one(lines)
            if where == "same envelope":
                assert [type(i) for i in got] == [Run]
        else:
            assert decode_runs(lines) is None
            with pytest.raises(MessageInvalide) as exc:
                decode_envelope(frame)
            assert "nested too deeply" in exc.value.detail


_PREFIX = (b'{"type":"notification","source":"vm-p","destination":"vm-q","payload":'
           b'{"categorie":"entree","evenement":"souris"')


@st.composite
def after_a_known_prefix(draw: st.DrawFn) -> bytes:
    """A frame starting with the bytes, up to its data, of a notification accepted
    before, and then anything: data of every kind, repeated or escaped keys and
    envelope names inside it, invalid UTF-8, depth past the limit, bytes after it."""
    value = draw(json_objects | json_values)
    data = json.dumps(value, separators=(",", ":"), ensure_ascii=draw(st.booleans())).encode()
    data = draw(st.sampled_from([
        data,
        b'{"source":"dom0","source":"vm-x","data":{},"a":' + data + b"}",  # keys inside
        b'{"\\u0073ource":1,"Source":2,"a":' + data + b"}",  # escaped, case variants
        b'{"a":' + b"[" * 70 + data + b"]" * 70 + b"}",  # too deep
        b'{"a":' + b"[" * 58 + data + b"]" * 58 + b"}",  # deep, within the limit
        b'{"a":"\xff' + data[:3] + b'"}',  # invalid UTF-8
        b"{" + data,  # broken
    ]))
    tail = draw(st.sampled_from([b"}}", b"}}", b"} }", b"}} ", b'},"x":1}', b'},"data":{}}',
                                 b',"x":1}}', b',"Categorie":"x"}}', b'},"Source":"dom0"}']))
    return _PREFIX + b',"data":' + data + tail


def decode_outcome(line: bytes) -> Outcome:
    try:
        msg = decode(line)
    except MessageInvalide as exc:
        return ("refused", exc.reason, exc.field)
    return (*fields(msg, msg.raw), msg.payload, msg.extra)


@SETTINGS
@given(after_a_known_prefix(), st.booleans())
def test_a_known_prefix_decides_as_a_cold_memo_does(line: bytes, by_decode: bool) -> None:
    # decode_envelope() and decode() take a canonical notification whose bytes up to its
    # data are a known frame's from a memo (filled by either): their verdicts must be
    # the ones reached with every memo empty.
    known = _PREFIX + b',"data":{"n":1}}}'
    clear_memos()
    cold = envelope_outcome(line), decode_outcome(line)
    clear_memos()
    for _ in range(2):  # decode() memoises a frame's names first, then its prefix
        (decode if by_decode else decode_envelope)(known)
    assert _PREFIX in envelope_module._PREFIXES  # remembered
    assert (envelope_outcome(line), decode_outcome(line)) == cold
    if cold[0][0] == "refused":
        assert cold[1][0] == "refused"


_SPEC_PREFIX = (b'{"type":"notification","source":"vm-p","destination":"tous","payload":'
                b'{"categorie":"device","evenement":"connect"')


@st.composite
def after_a_known_last_key(draw: st.DrawFn) -> bytes:
    """A frame starting with the bytes, up to its payload's last key, of a notification
    whose last key is one the protocol does not define (the spec's ``chemin``), then a
    key (the same, another, a field, a case variant) and anything after it."""
    value = draw(json_objects | json_values)
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=draw(st.booleans())).encode()
    text = draw(st.sampled_from([
        text, b"[" * 70 + text + b"]" * 70, b"[" * 58 + text + b"]" * 58,
        b'"\xff' + text[:3] + b'"', b'"a,\\"b\\":1"', b"{" + text, text + b"," + text,
        b'{"a":1,"a":2}', b" " + text, text + b" "]))
    key = draw(st.sampled_from([b',"chemin":', b',"chemin":', b',"Chemin":', b',"data":',
                                b',"evenement":', b',"categorie":', b',"\\u0063hemin":',
                                b',"chemin":"x","chemin":', b',"Source":']))
    tail = draw(st.sampled_from([b"}}", b"}}", b"} }", b"}} ", b'},"x":1}', b',"x":1}}']))
    return _SPEC_PREFIX + key + text + tail


@SETTINGS
@given(after_a_known_last_key(), st.booleans())
def test_a_known_last_key_decides_as_a_cold_memo_does(line: bytes, by_decode: bool) -> None:
    # The same memo for a notification whose last payload key is not the protocol's:
    # only that key's value is the frame's own.
    known = _SPEC_PREFIX + b',"chemin":"/mnt/usb_in"}}'
    clear_memos()
    cold = envelope_outcome(line), decode_outcome(line)
    clear_memos()
    for _ in range(2):  # decode() memoises a frame's names first, then its prefix
        (decode if by_decode else decode_envelope)(known)
    assert _SPEC_PREFIX in envelope_module._PREFIXES  # remembered
    assert (envelope_outcome(line), decode_outcome(line)) == cold


def test_a_prefix_ends_before_contents_only() -> None:
    # Without data, a notification's payload ends with a field the protocol reads: no
    # prefix, or any value would pass for it.
    clear_memos()
    known = _SPEC_PREFIX + b"}}"
    for _ in range(3):
        decode(known)
        decode_envelope(known)
    for check in (decode, decode_envelope):
        with pytest.raises(MessageInvalide) as exc:
            check(known.replace(b'"connect"', b'{"e":1}'))
        assert (exc.value.reason, exc.value.field) == (Reason.WRONG_TYPE, "payload.evenement")


def test_the_memo_of_prefixes_stays_small_whatever_the_frames() -> None:
    # A key the protocol does not define may carry a long string before the last key:
    # such a prefix is not kept (4096 of them would hold hundreds of MiB).
    clear_memos()
    long = _SPEC_PREFIX + b',"note":"' + b"x" * 600 + b'","chemin":"/mnt/usb_in"}}'
    short = _SPEC_PREFIX + b',"chemin":"/mnt/usb_in"}}'
    for _ in range(3):
        decode(long)
        decode_envelope(long)
    assert not envelope_module._PREFIXES
    # Nor is one whose last key is long (an unknown key may be up to the frame's size):
    # each entry holds the key, a hostile domain's 4096 of them 740 MB.
    long_key = _SPEC_PREFIX + b',"k' + b"x" * 600 + b'":1}}'
    for _ in range(3):
        decode(long_key)
        decode_envelope(long_key)
    assert not envelope_module._PREFIXES
    for _ in range(2):
        decode(short)
    assert list(envelope_module._PREFIXES) == [_SPEC_PREFIX]


def test_a_prefix_is_remembered_only_from_a_frame_laid_out_as_encode_writes_it() -> None:
    # A decoded dict keeps the frame's key order: with the names after the payload, the
    # bytes before data hold no names, and a frame starting with them may name anyone.
    clear_memos()
    reordered = (b'{"type":"notification","payload":{"categorie":"entree","evenement":"souris",'
                 b'"data":{"n":1}},"source":"vm-p","destination":"vm-q"}')
    for _ in range(3):
        decode(reordered)
        decode_envelope(reordered)
    forged = reordered.replace(b'"source":"vm-p"', b'"source":"tous"')
    for check in (decode, decode_envelope):
        with pytest.raises(MessageInvalide) as exc:
            check(forged)
        assert (exc.value.reason, exc.value.field) == (Reason.BAD_NAME, "source")


# -- a frame that cannot be an object -------------------------------------------------
# A flood of junk lines (``x``) costs the broker a refusal each: one that cannot be a JSON
# object (its first byte is neither ``{`` nor whitespace) is refused in one parse, as
# decode() refuses it, not after the exact path's four.
NOT_OBJECTS: Final = [b"x", b"123", b"[1,2]", b'"s"', b"null", b"\xff", b"x\xff", b"-",
                      b"]", b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), b"x" * 5000]


@pytest.mark.parametrize("line", NOT_OBJECTS)
def test_a_frame_that_cannot_be_an_object_is_refused_in_one_parse(
        line: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    want = expected(line)
    with pytest.raises(MessageInvalide) as reference:
        decode(line)

    def exact(*args: Any) -> Envelope:
        raise AssertionError("the exact path was taken")
    monkeypatch.setattr(envelope_module, "_exact", exact)
    assert envelope_outcome(line) == want
    with pytest.raises(MessageInvalide) as got:
        decode_envelope(line)
    assert str(got.value) == str(reference.value)  # the same explanation


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=1, max_size=40).filter(
    lambda b: b[:1] not in (b"{", b" ", b"\t", b"\r", b"\n") and b"\n" not in b))
def test_frames_not_starting_like_an_object_are_refused_as_decode_refuses_them(
        line: bytes) -> None:
    assert envelope_outcome(line) == expected(line)
