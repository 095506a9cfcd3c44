"""Codec throughput on one core: decode+validate, encode, and the FrameDecoder.

    .venv/bin/python -m bench.bench_codec                 # print the figures
    .venv/bin/python -m bench.bench_codec --update-docs   # also rewrite "## Codec" in
                                                          # docs/benchmarks.md
    .venv/bin/python -m bench.bench_codec --baseline DIR  # also compare with the codec of
                                                          # another checkout (DIR/src)

Each figure is the best of N repeats (the machine is shared and noisy); baselines
measured in the same run (bare ``msgspec.json.decode`` to a dict, ``json.loads``) give
ratios that travel better between machines than absolute numbers.

With ``--baseline``, the other checkout's ``messagerie`` is loaded under another name in
the same process and both are timed in short batches taken in turn (so that the load of
a shared machine hits both alike): each figure is the best batch of a run, each ratio is
to a bare ``msgspec.json.decode`` of the same frames in the same run, and the median of
``--runs`` runs is reported with its range.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from messagerie import FrameDecoder, Notification, decode, encode, wire
from messagerie.codec import _message
from messagerie.envelope import Run, decode_envelope, decode_runs
from tests.support.corpus import SPEC_EXAMPLE

MOUSE = encode(Notification("vm-sys-usb", "vm-ui", "entree", "souris", {
    "entree": "souris", "position": {"x": 1024, "y": 600},
    "boutons": {"gauche": 1, "milieu": 0, "droit": 0}}))[:-1]
TARGET = 500_000
_NOTIFICATION_KIND = wire.KINDS["notification"]
DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
COMMAND = ".venv/bin/python -m bench.bench_codec"


def rate(fn: Callable[[], object], repeats: int, min_time: float = 0.2) -> float:
    """Best calls per second of ``fn`` over ``repeats`` timed batches."""
    number = 1
    while True:  # calibrate: a batch lasts at least min_time
        start = time.perf_counter()
        for _ in range(number):
            fn()
        if time.perf_counter() - start >= min_time:
            break
        number *= 2
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, time.perf_counter() - start)
    return number / best


def stream_rate(frames: int, chunk: int, repeats: int, *, envelope: bool = False) -> float:
    """Messages per second through a FrameDecoder fed ``chunk``-byte reads (with
    ``envelope``, the broker's: envelope validation, runs of frames)."""
    data = (MOUSE + b"\n") * frames
    chunks = [data[i:i + chunk] for i in range(0, len(data), chunk)]

    def count(item: object) -> int:
        return item.count if isinstance(item, Run) else 1

    def run() -> None:
        d: FrameDecoder[Any] = (FrameDecoder(decode=decode_envelope, batch=decode_runs)
                                if envelope else FrameDecoder())
        n = 0
        for c in chunks:
            n += sum(map(count, d.feed(c)))
        assert n == frames

    return rate(run, repeats) * frames


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    uname = subprocess.run(["uname", "-a"], capture_output=True, text=True,
                           check=False).stdout.strip() or " ".join(platform.uname())
    return {"uname": uname, "cpu": f"{cpu} ({os.cpu_count()} logical CPUs)",
            "python": sys.version.split()[0], "msgspec": msgspec.__version__,
            "date": datetime.date.today().isoformat()}


def measure(repeats: int) -> list[tuple[str, float, str]]:
    spec_msg, mouse_msg = decode(SPEC_EXAMPLE), decode(MOUSE)
    spec_dict, mouse_dict = spec_msg.to_dict(), mouse_msg.to_dict()
    bare = msgspec.json.Decoder().decode
    enc = msgspec.json.Encoder().encode
    rows: list[tuple[str, float, str]] = []

    def add(name: str, fn: Callable[[], object], note: str = "") -> float:
        r = rate(fn, repeats)
        rows.append((name, r, note))
        return r

    for label, line, msg, d in (("spec example", SPEC_EXAMPLE, spec_msg, spec_dict),
                                ("mouse move", MOUSE, mouse_msg, mouse_dict)):
        size = f"{len(line)} B"
        ours = add(f"decode+validate, {label} ({size})", lambda line=line: decode(line))
        env = add(f"  envelope only (the broker's default), {label}",
                  lambda line=line: decode_envelope(line))
        base = add(f"  baseline msgspec.json.decode to dict, {label}", lambda line=line: bare(line))
        std = add(f"  baseline json.loads, {label}", lambda line=line: json.loads(line))
        rows.append((f"  ratio decode+validate / msgspec bare, {label}", ours / base, "x"))
        rows.append((f"  ratio envelope / msgspec bare, {label}", env / base, "x"))
        rows.append((f"  ratio decode+validate / json.loads, {label}", ours / std, "x"))
        ours = add(f"encode, {label}", lambda msg=msg: encode(msg))
        base = add(f"  baseline msgspec encode of the dict, {label}", lambda d=d: enc(d))
        std = add(f"  baseline json.dumps compact, {label}",
                  lambda d=d: json.dumps(d, separators=(",", ":"), ensure_ascii=False).encode())
        rows.append((f"  ratio encode / msgspec bare, {label}", ours / base, "x"))
        rows.append((f"  ratio encode / json.dumps, {label}", ours / std, "x"))
    for chunk in (65536, 4096):
        r = stream_rate(1000, chunk, repeats)
        rows.append((f"FrameDecoder, 1000 mouse moves in {chunk} B reads", r, ""))
        r = stream_rate(1000, chunk, repeats, envelope=True)
        rows.append((f"  envelope + runs (broker), 1000 mouse moves in {chunk} B reads", r, ""))
    return rows


def load_baseline(checkout: Path) -> Any:
    """The ``messagerie`` package of another checkout, as ``messagerie_baseline``."""
    target = Path(tempfile.mkdtemp(prefix="bench-codec-")) / "messagerie_baseline"
    shutil.copytree(checkout / "src" / "messagerie", target)  # its imports are relative
    spec = importlib.util.spec_from_file_location(
        "messagerie_baseline", target / "__init__.py", submodule_search_locations=[str(target)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["messagerie_baseline"] = module
    spec.loader.exec_module(module)
    return module


def _best_batch(fn: Callable[[], object], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def compare(baseline: Any, runs: int) -> list[tuple[str, float, str, str]]:
    """Rows (name, median ratio to bare, unit, range) for the baseline and this tree."""
    import messagerie
    import messagerie.envelope as new_env
    from tests.support.corpus import mouse
    old_env = importlib.import_module("messagerie_baseline.envelope")
    bare = msgspec.json.Decoder().decode
    mice = [mouse("vm-a", "vm-b", i) for i in range(1000)]
    stream = b"".join(m + b"\n" for m in mice)
    rows: list[tuple[str, float, str, str]] = []

    def feed(mod: Any, env: Any, chunk: int) -> Callable[[], object]:
        chunks = [stream[i:i + chunk] for i in range(0, len(stream), chunk)]

        def run() -> None:
            d = mod.FrameDecoder(decode=env.decode_envelope, batch=env.decode_runs)
            for c in chunks:
                d.feed(c)
        return run

    # The floors: what msgspec alone costs for the checks no validation can skip (a frame
    # parsed once, re-encoded to prove that no key is repeated; the envelope's typed
    # decode with raw contents; the bracket count of the depth limit).
    encode_ = msgspec.json.Encoder().encode
    typed = msgspec.json.Decoder(wire.union(wire.twins(msgspec.Raw))).decode

    cases: list[tuple[str, dict[str, Any], int]] = []
    sizes: dict[str, int] = {}  # cases also reported in nanoseconds per byte
    for label, line in (("spec example", SPEC_EXAMPLE), ("mouse move", MOUSE)):
        cases.append((label, {
            "bare": lambda line=line: bare(line),
            "decode+validate": (lambda line=line: baseline.decode(line),
                                lambda line=line: messagerie.decode(line)),
            "envelope only": (lambda line=line: old_env.decode_envelope(line),
                              lambda line=line: new_env.decode_envelope(line)),
            "floor: dict decode + re-encode compared": lambda line=line: (
                encode_(bare(line)) == line),
            "floor: typed decode (raw contents) + re-encode compared": lambda line=line: (
                encode_(typed(line)) == line),
            "floor: bracket count (two bytes.count)": lambda line=line: (
                line.count(b"{") + line.count(b"[")),
            "floor: dict decode + re-encode compared + a Message built, no check":
                lambda line=line: _unchecked(line, bare, encode_),
        }, 200))
    # The memo of known prefixes tries the last one found first: frames from two sources
    # in turn miss it every time (the prefix is looked for); a stream of different mouse
    # moves hits it, each with its own data.
    from tests.support.corpus import spec_example
    in_turn = [spec_example("vm-a"), spec_example("vm-b")] * 50
    cases.append(("spec example, two sources in turn", {
        "bare": lambda: [bare(m) for m in in_turn],
        "decode+validate": (lambda: [baseline.decode(m) for m in in_turn],
                            lambda: [messagerie.decode(m) for m in in_turn]),
        "envelope only": (lambda: [old_env.decode_envelope(m) for m in in_turn],
                          lambda: [new_env.decode_envelope(m) for m in in_turn]),
    }, 4))
    cases.append(("1000 different mouse moves, one by one", {
        "bare": lambda: [bare(m) for m in mice],
        "decode+validate": (lambda: [baseline.decode(m) for m in mice],
                            lambda: [messagerie.decode(m) for m in mice]),
        "envelope only": (lambda: [old_env.decode_envelope(m) for m in mice],
                          lambda: [new_env.decode_envelope(m) for m in mice]),
    }, 2))
    for chunk in (65536, 4096):
        cases.append((f"1000 mouse moves in {chunk} B reads", {
            "bare": lambda: [bare(m) for m in mice],
            "envelope + runs (broker)": (feed(baseline, old_env, chunk),
                                         feed(messagerie, new_env, chunk)),
        }, 2))
    # Bracket-heavy frames through the broker's FrameDecoder (envelope and runs), one frame
    # per read: bench/peers.py's heavy() (spaces: the exact path), and the same compact.
    from bench.peers import heavy as heavy_frame
    spaced = heavy_frame("vm-a", "vm-b")
    compact = _compact(spaced) + b"\n"
    for label, frame in (("a 59 KiB frame of 15 000 {}, spaced (peers.heavy)", spaced),
                         ("the same frame compact", compact)):
        def one(mod: Any, env: Any, frame: bytes = frame) -> Callable[[], object]:
            d = mod.FrameDecoder(decode=env.decode_envelope, batch=env.decode_runs)
            return lambda: d.feed(frame)
        cases.append((label, {
            "bare": lambda frame=frame: bare(frame),
            "envelope (broker's FrameDecoder)": (one(baseline, old_env), one(messagerie, new_env)),
        }, 1))
        sizes[label] = len(frame)
    for label, fns, number in cases:
        flat: dict[str, Callable[[], object]] = {"bare": fns["bare"]}
        for name, pair in fns.items():
            if name.startswith("floor"):
                flat[name] = pair
            elif name != "bare":
                flat[f"{name} before"], flat[f"{name} after"] = pair
        for fn in flat.values():
            fn()
        ratios: dict[str, list[float]] = {k: [] for k in flat if k != "bare"}
        per_byte: dict[str, list[float]] = {k: [] for k in flat if k != "bare"}
        for _ in range(runs):
            best = dict.fromkeys(flat, float("inf"))
            for _ in range(60 if number > 10 else 40 if number > 1 else 15):
                for k, fn in flat.items():
                    best[k] = min(best[k], _best_batch(fn, number))
            for k, found in ratios.items():
                found.append(best["bare"] / best[k])
                if label in sizes:
                    per_byte[k].append(best[k] / sizes[label] * 1e9)
        for k, values in ratios.items():
            rows.append((f"{k}, {label}", statistics.median(values), "x",
                         f"{min(values):.2f}-{max(values):.2f}"))
            if label in sizes:
                ns = per_byte[k]
                rows.append((f"{k}, {label}, per byte", statistics.median(ns), "ns/B",
                             f"{min(ns):.0f}-{max(ns):.0f}"))
    return rows


def _unchecked(line: bytes, bare: Callable[[bytes], Any], encode_: Callable[[Any], bytes]
               ) -> object:
    """What decode() cannot do with less in Python: parse, prove by re-encoding, build the
    Message (with codec._message, one call more than decode's inlined build), with no
    check at all."""
    obj = bare(line)
    if encode_(obj) != line:
        return None
    return _message(_NOTIFICATION_KIND, obj["source"], obj["destination"], obj["payload"], line)


def _compact(frame: bytes) -> bytes:
    """``frame`` without the spaces between its tokens (it has none in its strings)."""
    return frame.rstrip(b"\n").replace(b", ", b",").replace(b": ", b":")


def render(rows: list[tuple[str, float, str]], info: dict[str, str], repeats: int, *,
           compared: list[tuple[str, float, str, str]] | None = None,
           baseline: str = "", runs: int = 0) -> str:
    out = ["## Codec", "",
           f"Command: `{COMMAND}` (best of {repeats} repeats per figure, one core).", "",
           f"- Machine: `{info['uname']}`",
           f"- CPU: {info['cpu']}",
           f"- Python {info['python']}, msgspec {info['msgspec']}",
           f"- Date: {info['date']}", "",
           "| Operation | Messages/s (or ratio) |", "|---|---:|"]
    for name, value, unit in rows:
        shown = f"{value:.2f}x" if unit == "x" else f"{value:,.0f}".replace(",", " ")
        out.append(f"| {name.strip()} | {shown} |")
    spec = next(v for n, v, _ in rows if n.startswith("decode+validate, spec"))
    verdict = "met" if spec >= TARGET else "NOT met"
    out += ["", f"Target: at least {TARGET:,} decode+validate per second for the spec's "
            f"example: {verdict} ({spec:,.0f}/s).".replace(",", " "),
            "Decode+validate includes UTF-8 and JSON checks, the repeated-key check (a "
            "re-encode compared with the frame), name, token and payload validation, and "
            "building the Message.", ""]
    if compared:
        out += [f"Before and after, same process: `{COMMAND} --baseline DIR --runs {runs}` "
                f"(DIR: a checkout of {baseline}). Each ratio is to a bare "
                "`msgspec.json.decode` of the same frames in the same run; median of "
                f"{runs} runs (range).", "",
                "| Operation | Median (ratio to a bare decode, or ns per byte) | Range |",
                "|---|---:|---:|"]
        out += [f"| {name} | {value:.2f}x | {spread} |" if unit == "x" else
                f"| {name} | {value:.0f} {unit} | {spread} |"
                for name, value, unit, spread in compared]
        out += ["", "The table of rates above is sequential: on a shared machine its figures "
                "drift with the load of the moment (an operation measured while another job "
                "ran looks slower). The interleaved ratios are the comparison to read.", ""]
        out += floors(compared)
    return "\n".join(out)


DECODE_TARGET = 0.5
ENVELOPE_TARGET = 0.7


def floors(compared: list[tuple[str, float, str, str]]) -> list[str]:
    """What the figures say of the targets (decode+validate at DECODE_TARGET of a bare
    decode, the envelope at ENVELOPE_TARGET), as a paragraph per frame."""
    ratio = {name: value for name, value, _, _ in compared}
    out = [f"Targets: decode+validate at {DECODE_TARGET}x a bare decode or better, the "
           f"envelope at {ENVELOPE_TARGET}x. A ratio r costs 1/r bare decodes. A canonical "
           "notification whose bytes up to its payload's last key (its data, or a key the "
           "protocol does not define, as the spec's `chemin`) are those of one accepted "
           "before is checked on that last value alone: parsed and re-encoded by a decode, "
           "syntax-checked raw by the envelope. The floor rows are msgspec alone doing what "
           "the path of any other frame cannot skip: the frame parsed once and re-encoded to "
           "be compared with it (the proof that no key is repeated anywhere; the envelope's "
           "parse is the typed one, contents raw), and the bracket count that the depth "
           "limit needs when a frame is too long to be bounded by its length.", ""]
    for label in ("spec example", "mouse move"):
        decode_ = ratio[f"decode+validate after, {label}"]
        envelope = ratio[f"envelope only after, {label}"]
        dict_floor = ratio[f"floor: dict decode + re-encode compared, {label}"]
        typed_floor = ratio[f"floor: typed decode (raw contents) + re-encode compared, {label}"]
        out.append(
            f"- {label}: decode+validate {decode_:.2f}x "
            f"({'met' if decode_ >= DECODE_TARGET else 'not met'}), envelope "
            f"{envelope:.2f}x ({'met' if envelope >= ENVELOPE_TARGET else 'not met'}); "
            f"a frame that is not a known prefix's has floors of {dict_floor:.2f}x (decode) "
            f"and {typed_floor:.2f}x (envelope).")
    return [*out, ""]


def update_docs(section: str, path: Path = DOCS) -> None:
    """Replace the ``## Codec`` section of ``path`` (up to the next ``## `` heading or
    ``<!--`` marker of another section), keeping the rest of the file; create the file
    with its title if absent."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    pattern = re.compile(r"^## Codec\n.*?(?=^## |^<!-- |\Z)", re.M | re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n", encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="best of N (default 7)")
    parser.add_argument("--update-docs", action="store_true",
                        help=f"rewrite the '## Codec' section of {DOCS.name}")
    parser.add_argument("--baseline", type=Path,
                        help="a checkout of an older commit to compare with")
    parser.add_argument("--runs", type=int, default=5, help="with --baseline: runs (default 5)")
    args = parser.parse_args()
    compared = None
    described = ""
    if args.baseline is not None:
        baseline = load_baseline(args.baseline)
        described = subprocess.run(["git", "-C", str(args.baseline), "log", "-1", "--format=%h"],
                                   capture_output=True, text=True, check=False).stdout.strip()
        compared = compare(baseline, args.runs)
        for name, value, unit, spread in compared:
            print(f"{name:<70}  {value:6.2f} {unit}  ({spread})")
    rows = measure(args.repeats)
    width = max(len(n) for n, _, _ in rows)
    for name, value, unit in rows:
        shown = f"{value:10.2f} x" if unit == "x" else f"{value:12,.0f} /s"
        print(f"{name:<{width}}  {shown}")
    section = render(rows, machine(), args.repeats, compared=compared,
                     baseline=described or "the baseline", runs=args.runs)
    if args.update_docs:
        update_docs(section)
        print(f"updated {DOCS}")
    spec = next(v for n, v, _ in rows if n.startswith("decode+validate, spec"))
    return 0 if spec >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
