"""Frames the tests share: the specification's example, a mouse move as the benchmark
peers send it, and the hostile corpus (each bad frame with the error it must give)."""

from __future__ import annotations

from typing import Any, Final

from messagerie import Notification, Reason, encode

#: The specification's example notification, byte for byte as a frame (without its
#: newline). docs/protocol.md carries it verbatim.
SPEC_EXAMPLE: Final = (b'{"type":"notification","source":"vm-sys-usb","destination":"tous",'
                       b'"payload":{"categorie":"device","evenement":"connect",'
                       b'"chemin":"/mnt/usb_in"}}')
SPEC_EXAMPLE_TEXT: Final = SPEC_EXAMPLE.decode()


def spec_example(source: str = "vm-sys-usb") -> bytes:
    """The specification's example sent by ``source`` (a domain must name itself)."""
    return SPEC_EXAMPLE.replace(b'"source":"vm-sys-usb"', b'"source":"%s"' % source.encode())


def spec_example_object() -> dict[str, Any]:
    """The specification's example as the JSON object (a fresh copy)."""
    return {"type": "notification", "source": "vm-sys-usb", "destination": "tous",
            "payload": {"categorie": "device", "evenement": "connect",
                        "chemin": "/mnt/usb_in"}}


def mouse(source: str, dest: str, i: int, categorie: str = "entree") -> bytes:
    """bench/peers.py's mouse(), bare."""
    return (b'{"type":"notification","source":"%s","destination":"%s","payload":'
            b'{"categorie":"%s","evenement":"souris","data":{"entree":"souris",'
            b'"position":{"x":%d,"y":%d},"boutons":{"gauche":0,"milieu":0,"droit":1},'
            b'"seq":%d,"t":%d}}}'
            % (source.encode(), dest.encode(), categorie.encode(), i % 1920, i % 1080, i,
               1_700_000_000_000_000_000 + i))


# -- the hostile corpus ------------------------------------------------------------

#: A valid frame (with its newline): what follows a bad one must still decode.
OK: Final = encode(Notification("vm-sys-usb", "vm-ui", "entree", "souris",
                                {"entree": "souris", "position": {"x": 1, "y": 2}}))
HEAD: Final = b'{"type":"notification","source":"vm-a","destination":"tous",'


def notif(data: bytes = b"{}", categorie: bytes = b'"c"', source: bytes = b'"vm-a"') -> bytes:
    """A notification frame (no newline) with these raw bytes spliced in."""
    return (b'{"type":"notification","source":' + source + b',"destination":"tous",'
            b'"payload":{"categorie":' + categorie + b',"evenement":"e","data":' + data + b"}}")


#: (name, frame, the Reason decode() gives, the field it names).
CORPUS: Final[list[tuple[str, bytes, Reason, str | None]]] = [
    # encodings
    ("invalid utf-8 byte", notif(b'{"v":"\xff"}'), Reason.INVALID_UTF8, None),
    ("overlong utf-8", notif(b'{"v":"\xc0\xaf"}'), Reason.INVALID_UTF8, None),
    ("truncated utf-8", notif(b'{"v":"\xe2\x82"}'), Reason.INVALID_UTF8, None),
    ("utf-8 encoded surrogate", notif(b'{"v":"\xed\xa0\x80"}'), Reason.INVALID_UTF8, None),
    ("latin-1", notif(b'{"v":"copi\xe9"}'), Reason.INVALID_UTF8, None),
    ("utf-16", notif().decode().encode("utf-16-le"), Reason.INVALID_JSON, None),
    ("bom", b"\xef\xbb\xbf" + notif(), Reason.INVALID_JSON, None),
    ("escaped lone surrogate", notif(b'{"v":"\\ud800"}'), Reason.INVALID_JSON, None),
    ("escaped lone low surrogate", notif(b'{"v":"\\udc00x"}'), Reason.INVALID_JSON, None),
    # NUL and control characters
    ("nul outside strings", notif() + b"\x00", Reason.INVALID_JSON, None),
    ("nul alone", b"\x00", Reason.INVALID_JSON, None),
    ("raw nul in a string", notif(b'{"v":"a\x00b"}'), Reason.INVALID_JSON, None),
    ("raw tab in a string", notif(b'{"v":"a\tb"}'), Reason.INVALID_JSON, None),
    ("escaped nul in source", notif(source=b'"vm\\u0000a"'), Reason.BAD_NAME, "source"),
    ("escaped newline in source", notif(source=b'"vm-a\\n"'), Reason.BAD_NAME, "source"),
    ("escape char in source", notif(source=b'"vm\\u001b[31m"'), Reason.BAD_NAME, "source"),
    ("tab in categorie", notif(categorie=b'"c\\t"'), Reason.BAD_VALUE, "payload.categorie"),
    ("newline in categorie", notif(categorie=b'"c\\nd"'), Reason.BAD_VALUE,
     "payload.categorie"),
    ("del in categorie", notif(categorie=b'"c\x7f"'), Reason.BAD_VALUE, "payload.categorie"),
    ("zero-width space in source", notif(source='"vm\u200ba"'.encode()), Reason.BAD_NAME,
     "source"),
    # numbers
    ("NaN", notif(b'{"v":NaN}'), Reason.INVALID_JSON, None),
    ("Infinity", notif(b'{"v":Infinity}'), Reason.INVALID_JSON, None),
    ("-Infinity", notif(b'{"v":-Infinity}'), Reason.INVALID_JSON, None),
    ("float overflow", notif(b'{"v":1e400}'), Reason.INVALID_JSON, None),
    ("huge integer", notif(b'{"v":' + b"9" * 5000 + b"}"), Reason.INVALID_JSON, None),
    ("huge integer as type", HEAD.replace(b'"notification"', b"9" * 100) +
     b'"payload":{}}', Reason.WRONG_TYPE, "type"),
    ("leading zero", notif(b'{"v":01}'), Reason.INVALID_JSON, None),
    ("hex", notif(b'{"v":0x10}'), Reason.INVALID_JSON, None),
    # nesting
    ("100000 nested arrays", b"[" * 100_000 + b"]" * 100_000, Reason.INVALID_JSON, None),
    ("100000 unclosed arrays", b"[" * 100_000, Reason.INVALID_JSON, None),
    ("100000 nested arrays in data", notif(b'{"v":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
     Reason.INVALID_JSON, None),
    ("100000 nested objects", b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
     Reason.INVALID_JSON, None),
    # repeated keys
    ("duplicate source", HEAD.replace(b'"source":"vm-a"', b'"source":"vm-a","source":"dom0"') +
     b'"payload":{"categorie":"c","evenement":"e"}}', Reason.DUPLICATE_KEY, None),
    ("duplicate with same value",
     HEAD.replace(b'"source":"vm-a"', b'"source":"vm-a","source":"vm-a"') +
     b'"payload":{"categorie":"c","evenement":"e"}}', Reason.DUPLICATE_KEY, None),
    ("duplicate type", b'{"type":"journal",' + HEAD[1:] +
     b'"payload":{"categorie":"c","evenement":"e"}}', Reason.DUPLICATE_KEY, None),
    ("duplicate in payload", HEAD + b'"payload":{"categorie":"c","categorie":"d","evenement":"e"}}',
     Reason.DUPLICATE_KEY, None),
    ("duplicate in data", notif(b'{"x":1,"x":2}'), Reason.DUPLICATE_KEY, None),
    ("duplicate deep in data", notif(b'{"a":[{"b":{"x":1,"y":2,"x":3}}]}'),
     Reason.DUPLICATE_KEY, None),
    ("duplicate hidden by an escape", HEAD.replace(
        b'"source":"vm-a"', b'"source":"vm-a","sourc\\u0065":"dom0"') +
     b'"payload":{"categorie":"c","evenement":"e"}}', Reason.DUPLICATE_KEY, None),
    ("duplicate hidden by escapes", HEAD + b'"\\u0070ayload":{},'
     b'"payload":{"categorie":"c","evenement":"e"}}', Reason.DUPLICATE_KEY, None),
    ("duplicate hidden in data", notif(b'{"k\\u00e9":1,"k\xc3\xa9":2}'),
     Reason.DUPLICATE_KEY, None),
    ("duplicate with spaces", notif(b'{ "x" : 1 , "x" : 2 }'), Reason.DUPLICATE_KEY, None),
    # trailing garbage and truncation
    ("trailing garbage", notif() + b" x", Reason.INVALID_JSON, None),
    ("two objects", notif() + notif(), Reason.INVALID_JSON, None),
    ("trailing comma", notif()[:-1] + b",}", Reason.INVALID_JSON, None),
    ("truncated", notif()[:-2], Reason.INVALID_JSON, None),
    ("whitespace only", b" \t ", Reason.INVALID_JSON, None),
    ("bare cr", b"\r\r", Reason.INVALID_JSON, None),
    ("single quotes", notif().replace(b'"', b"'"), Reason.INVALID_JSON, None),
    ("comment", b"/* hi */" + notif(), Reason.INVALID_JSON, None),
    # not a message
    ("array", b"[" + notif() + b"]", Reason.NOT_AN_OBJECT, None),
    ("number", b"42", Reason.NOT_AN_OBJECT, None),
    ("true", b"true", Reason.NOT_AN_OBJECT, None),
    ("empty object", b"{}", Reason.MISSING_FIELD, "type"),
    ("source list", notif(source=b'["vm-a"]'), Reason.WRONG_TYPE, "source"),
    ("source object", notif(source=b'{"vm-a":1}'), Reason.WRONG_TYPE, "source"),
    ("categorie list", notif(categorie=b"[]"), Reason.WRONG_TYPE, "payload.categorie"),
    ("type in capitals", notif().replace(b'"notification"', b'"Notification"'),
     Reason.UNKNOWN_TYPE, "type"),
]
