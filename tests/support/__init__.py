"""What the tests (and the benchmarks in ``bench/``) share, one module per job:

* :mod:`.waiting`: wait on a condition with a deadline (never a fixed sleep);
* :mod:`.ptys`: socat pty pairs standing in for Xen pv-channels;
* :mod:`.peers`: the ends of a channel a test plays (a DomU end, QEMU's listening
  socket, a fake broker on a pty or a unix socket);
* :mod:`.broker_process`: the broker started as users start it (its console script);
* :mod:`.socket_endpoints`: the broker in the test's own loop, its domains on unix
  socketpairs (a real socket where a fake transport would not do);
* :mod:`.spool_system`: the broker with a spool, and domains taken down and brought
  back (or found by socket discovery, gone and found again);
* :mod:`.xenstored`: a stand-in xenstored on a unix socket, and domains introduced in
  it with a QEMU-like socket channel;
* :mod:`.process`: a program started as users start it, its JSON log events collected;
* :mod:`.mqtt`: a real mosquitto, a test CA, and the MQTT bridge as users start it;
* :mod:`.policy`: routing policies written for a test (rules as keyword arguments);
* :mod:`.corpus`: the specification's example frame and the hostile corpus;
* :mod:`.strategies`: Hypothesis strategies shared by the property tests.

Imported as ``tests.support.<module>``: the repository root is on ``sys.path`` under
pytest (``tests`` is a package, and ``pythonpath`` in pyproject.toml) and for the
benchmarks, run from the root as ``python -m bench.<script>``.
"""
