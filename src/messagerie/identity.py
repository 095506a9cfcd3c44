"""This domain's own name: the ``source`` of everything a client sends.

Found once, when a client is built, from the first source that gives one (see
:func:`resolve_domain_name`). Blocking (it may run ``xenstore-read``), but no asyncio.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Final

from .channel import channel_kind
from .errors import NameUnknown
from .model import DOM0, is_valid_name

DOMAINE_FILE: Final = Path("/etc/messagerie/domaine")
"""A file holding this domain's name (one line), read when no name is given."""
DOMAINE_ENV: Final = "MESSAGERIE_DOMAINE"
"""Environment variable naming this domain, read when no name is given."""


def resolve_domain_name(name: str | None = None, path: str | os.PathLike[str] | None = None,
                        ) -> str:
    """This domain's name, from the first source that gives one:

    1. ``name``, when given;
    2. the environment variable ``MESSAGERIE_DOMAINE``;
    3. ``dom0`` when ``path`` is a unix socket (only dom0 services connect to one: the
       broker's local socket);
    4. the first line of ``/etc/messagerie/domaine``;
    5. ``xenstore-read name``, when that program exists (a DomU with xenstore access).

    Raises :class:`NameUnknown` when none does, and for an invalid name.
    """
    origin = "argument"
    if not name:
        name, origin = os.environ.get(DOMAINE_ENV, "").strip() or None, DOMAINE_ENV
    if not name and path is not None:
        with contextlib.suppress(OSError):
            if channel_kind(path) == "socket":
                name, origin = DOM0, "unix socket"
    if not name:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            lines = DOMAINE_FILE.read_text().splitlines()
            name, origin = (lines[0].strip() if lines else None), str(DOMAINE_FILE)
    if not name:
        xenstore_read = shutil.which("xenstore-read")
        if xenstore_read:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                out = subprocess.run([xenstore_read, "name"], capture_output=True, text=True,
                                     timeout=5, check=True)
                name, origin = out.stdout.strip() or None, "xenstore-read name"
    if not name:
        raise NameUnknown(
            f"cannot tell this domain's name: pass it, set {DOMAINE_ENV}, "
            f"or write it to {DOMAINE_FILE}")
    if not is_valid_name(name):
        raise NameUnknown(f"invalid domain name {name[:80]!r} (from {origin})")
    return name


__all__ = ["DOMAINE_ENV", "DOMAINE_FILE", "resolve_domain_name"]
