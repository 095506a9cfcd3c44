"""Reference relays for bench_broker.py: how fast can Python alone go over these ptys?

    python bench/py_relay.py FROM TO [--decode]

A blocking loop copying bytes from one dom0-side pty to another: the ceiling for any
Python process in the broker's place. With ``--decode`` every frame also goes through
messagerie's FrameDecoder (full validation) before being written: the ceiling for a
Python broker that validates what it forwards. No asyncio, no routing, no policy.
"""

from __future__ import annotations

import os
import select
import sys
import termios
import tty

from messagerie import FrameDecoder, Message


def main() -> None:
    src = os.open(sys.argv[1], os.O_RDWR | os.O_NOCTTY)
    dst = os.open(sys.argv[2], os.O_RDWR | os.O_NOCTTY)
    for fd in (src, dst):
        tty.setraw(fd, termios.TCSANOW)
    decoder = FrameDecoder() if "--decode" in sys.argv else None
    while True:
        select.select([src], [], [])
        data = os.read(src, 1 << 16)
        if decoder is not None:
            data = b"".join(m.raw + b"\n" for m in decoder.feed(data)
                            if isinstance(m, Message) and m.raw is not None)
        view = memoryview(data)
        while view:
            view = view[os.write(dst, view):]


if __name__ == "__main__":
    main()
