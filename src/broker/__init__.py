"""broker: the dom0 daemon that carries messagerie messages between Xen domains.

Pure parts (``router``, ``policy``, ``config``) import no asyncio; the daemon wiring
(``daemon``) and the endpoints are the asyncio edges.
"""
