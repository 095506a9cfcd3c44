"""Benchmarks. Run them from the repository root as modules, e.g.
``.venv/bin/python -m bench.suite``: they import ``tests.support`` (the broker
process, pty pairs, waiting) and each other as packages, with no sys.path patching.
``peers.py`` and ``py_relay.py`` are standalone scripts the benchmarks start."""
