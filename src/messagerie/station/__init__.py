"""The clean station's reference services, built on :mod:`messagerie.socle`.

* :class:`~messagerie.station.usb.UsbService`: vm-sys-usb (the disks);
* :class:`~messagerie.station.depot.DepotService`: dom0's store (the "dépôt local");
* :mod:`messagerie.station.ui`: a small UI-domain client (list, read, copy, delete).

``python -m messagerie.station usb|depot|ui --help`` runs one of them.

A package of the library rather than ``examples/``: ``messagerie-broker --demo`` runs
the station, so it must be importable wherever the distribution is installed, and its
tests import it like any other module; an integrator starts from a working station and
replaces one service at a time.
"""
