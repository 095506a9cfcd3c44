"""messagerie-pont: a bridge between the messagerie broker and an MQTT broker.

The bridge runs in dom0 as a service of its own. To the messagerie broker it is one
domain (its configured identity, e.g. ``supervision``) on a unix-socket channel that the
bridge listens on; to the MQTT broker it is one client. What crosses, in each
direction, is configuration: nothing by default. See docs/bridge.md.

* :mod:`pont.mapping`: messages to topics and back, topic filters (pure);
* :mod:`pont.buffer`: the bounded uplink buffer (pure);
* :mod:`pont.config`: the TOML configuration;
* :mod:`pont.bridge`: the asyncio service;
* :mod:`pont.cli`: ``messagerie-pont``.
"""
