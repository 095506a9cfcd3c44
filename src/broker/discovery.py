"""Discovery of domains by pattern: the field's ``/var/run/*-msg.sock`` convention.

Pure: ``scan(patterns)`` lists what is there now; the daemon calls it every
``decouverte.intervalle`` seconds, so a domain that appears is picked up within one
interval (plus the time to connect), and one whose file disappears is dropped.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable

from messagerie import DOM0, is_valid_name


def name_from_path(pattern: str, path: str) -> str:
    """The part of ``path``'s file name that the pattern's ``*`` matched."""
    prefix, suffix = os.path.basename(pattern).split("*", 1)
    base = os.path.basename(path)
    return base[len(prefix):len(base) - len(suffix)]


def scan(patterns: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """Return ({domain name: path}, [paths whose name is not a valid domain name]).

    The first pattern to find a name wins; results are sorted for determinism.
    """
    found: dict[str, str] = {}
    rejected: list[str] = []
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            name = name_from_path(pattern, path)
            if not is_valid_name(name) or name == DOM0:
                rejected.append(path)
            else:
                found.setdefault(name, path)
    return found, rejected
