"""How a benchmark run ends: on every path, with its child processes stopped and its
temporary directories removed.

The benchmarks start many processes (socat ptys and relays, brokers, MQTT servers,
peers), each owned by a context manager that stops it on the way out. A signal's
default action would skip them all and leave orphans behind: :func:`unwind_on_signals`
turns SIGTERM, SIGHUP and SIGINT (and an optional deadline, SIGALRM) into an exception,
so that the context managers run. SIGKILL cannot be caught: whoever runs a benchmark
under a timeout should start it in a session of its own and signal the whole group
(tests/test_bench_suite.py does).
"""

from __future__ import annotations

import signal
import sys
from types import FrameType


class Interrupted(SystemExit):
    """The run was stopped by a signal or its deadline; the exit status says which."""


def unwind_on_signals(deadline: float | None = None) -> None:
    """From now on, SIGTERM, SIGHUP, SIGINT and (after ``deadline`` seconds, if given)
    SIGALRM raise :class:`Interrupted` in the main thread. Further signals are ignored
    while the run unwinds, so that the cleanup itself is not cut short."""
    def stop(signum: int, _frame: FrameType | None) -> None:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGALRM):
            signal.signal(sig, signal.SIG_IGN)
        what = ("its deadline passed" if signum == signal.SIGALRM
                else f"{signal.Signals(signum).name} received")
        print(f"benchmark stopped: {what}; stopping its processes", file=sys.stderr,
              flush=True)
        raise Interrupted(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGALRM):
        signal.signal(sig, stop)
    if deadline is not None:
        signal.setitimer(signal.ITIMER_REAL, deadline)
