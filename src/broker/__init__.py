"""broker: the dom0 daemon that carries messagerie messages between Xen domains.

Pure parts (``router``, ``pending``, ``ratelimit``, ``policy``, ``config``) import no
asyncio; the endpoints, the dom0 socket, the hub and the daemon wiring are the asyncio
edges; ``cli`` is the command line.
"""
