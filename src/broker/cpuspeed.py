"""How much slower than the reference machine this one does the broker's kind of work:
the unit of the CPU budget.

The CPU budget (``limites.part_cpu``, ``limites.rafale_cpu``) and the length of a turn
(``endpoint.TURN_CPU``) are figures for real dom0 hardware: a mouse move costs the
broker about 0.01 us per byte there, and honest traffic stays far below 10 % of a
core. On a machine many times slower (an emulated dom0: nested TCG runs Python 20-100x
slower) every frame costs that many times more CPU seconds, so the same figures in
CPU seconds would throttle honest traffic there, and cut reads into turns of a few
frames. So each turn's CPU time is divided by :func:`cpu_scale`, this machine's
slowness against the reference: the budget then says what share of the broker's work
a channel may take, the same on every machine, and what a hostile channel can cost
its neighbours is bounded as on the reference.

The measure is taken once, at the first call (the broker's start, before any channel
is read: no domain can influence it): the thread's own CPU clock over a small fixed
workload like the broker's (a JSON decode with msgspec, then field checks in
Python), the best of several rounds, so that being preempted costs nothing and a
busy moment at start makes the machine look slower by little. Never below 1: a faster
machine keeps the figures as they are. On a slower one the budget in real seconds
grows with the scale, up to half a core (:func:`budget`): honest traffic there costs
more real CPU too, but no channel may take the whole loop.
"""

from __future__ import annotations

import functools
import time
from typing import Final

import msgspec

REFERENCE_SECONDS: Final = 300e-6
"""What one round of :func:`_round` costs on the reference machine, the one the
budget's figures were measured on (2 cores, x86-64, CPython 3.11), when it is busy:
best of 7, 178-196 us at a load average of 2, up to 297 us beside other jobs. The
upper end, so that the reference itself, busy at the broker's start, measures 1 and
keeps its figures (a busy moment must not loosen the budget); a machine several
times slower is still told apart (nested TCG measured 12.6 against 200 us)."""
MAX_SCALE: Final = 100.0
"""Never more than this: a measure that far off is not a machine's speed."""
REAL_CEILING: Final = 0.5
"""On a slower machine, a budget in the reference's seconds never allows more of a real
core's seconds than this (a second, or a share of one) unless it was configured
higher: a channel kept to 10 % of the reference's work on a machine 40x slower would
otherwise be allowed four real cores, i.e. the whole loop (:func:`budget`)."""
ROUNDS: Final = 7

_FRAMES: Final = [
    b'{"type":"notification","source":"vm-a","destination":"vm-b","payload":'
    b'{"categorie":"entree","evenement":"souris","data":{"x":%d,"y":%d,'
    b'"boutons":[1,0,0]}}}' % (i, 2 * i) for i in range(50)
] + [
    b'{"type":"commande","source":"vm-ui","destination":"vm-sys-usb","payload":'
    b'{"id":"c%d","commande":"lit_fichier","arguments":{"nom_disque":"cle",'
    b'"nom_fichier":"f%d.txt"}}}' % (i, i) for i in range(50)
]
_KEYS: Final = ("type", "source", "destination", "payload")


def _round() -> float:
    """CPU seconds of one round of the workload."""
    decode = msgspec.json.decode
    started = time.thread_time()
    for frame in _FRAMES:
        obj = decode(frame)
        if not all(key in obj for key in _KEYS) or not isinstance(obj["payload"], dict):
            raise AssertionError("calibration frame")  # pragma: no cover
        for key, value in obj["payload"].items():
            if not key.islower() or value is None:
                raise AssertionError("calibration frame")  # pragma: no cover
    return time.thread_time() - started


def measure() -> float:
    """The workload's best time over :data:`ROUNDS` rounds (CPU seconds)."""
    return min(_round() for _ in range(ROUNDS))


def scale_of(seconds: float) -> float:
    """The slowness that ``seconds`` (a :func:`measure`) means, within 1..MAX_SCALE."""
    return min(MAX_SCALE, max(1.0, seconds / REFERENCE_SECONDS))


def budget(value: float, scale: float) -> float:
    """A CPU budget figure (``part_cpu`` or ``rafale_cpu``, in the reference's seconds)
    on a machine of ``scale``: the same, except that it never allows more than
    :data:`REAL_CEILING` real seconds (or ``value`` itself, when configured higher)."""
    return min(value * scale, max(value, REAL_CEILING)) / scale


@functools.cache
def cpu_scale() -> float:
    """This machine's slowness against the reference, measured once per process."""
    return scale_of(measure())
