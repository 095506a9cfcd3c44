"""The protocol's vocabulary: the names of categories, events, file states and error
codes that the specification and the deployed system use.

Open sets: a category, an event or an error code is any token (see
:data:`messagerie.wire.TOKEN_PATTERN`); these constants name the ones we know, so that
code says ``Categorie.DISQUE`` rather than spelling the wire name. Pure data: no
validation here, no I/O.
"""

from __future__ import annotations

from typing import Final


class Categorie:
    """Notification categories named by the spec and seen in the field. Open set."""

    USB_DEVICE: Final = "usb_device"
    """A USB device was plugged or unplugged (the spec's table)."""
    DISQUE: Final = "disque"
    """A disk's state, from vm-sys-usb: ``data = {"nom": str, "connecte": bool}``."""
    FICHIER: Final = "fichier"
    """A file's state: ``data = {"fichier": str, "etat": FichierEtat}``."""
    ENTREE: Final = "entree"
    """Input relayed from vm-sys-usb: mouse, keyboard, touch (see :class:`Evenement`)."""
    DOMAINE: Final = "domaine"
    """A domain's state: ``data = {"pret": bool}`` (the broker also sends ``connecte``)."""
    COMMANDE: Final = "commande"
    """Reserved to the broker (refused from anyone else): a command the recipient serves
    was abandoned, ``evenement`` ``abandonnee``, ``data = {"source": name, "id": str,
    "commande": token}``."""


class Evenement:
    """Events named by the spec and seen in the field. Open set."""

    USB_CONNECT: Final = "usb_connect"
    USB_DISCONNECT: Final = "usb_disconnect"
    ETAT: Final = "etat"
    """State change (disque, fichier, domaine)."""
    SOURIS: Final = "souris"
    CLAVIER: Final = "clavier"
    TACTILE: Final = "tactile"
    CONNECTE: Final = "connecte"
    """Broker: a domain's channel came up."""
    DECONNECTE: Final = "deconnecte"
    """Broker: a domain's channel went down."""
    ABANDONNEE: Final = "abandonnee"
    """Broker: nobody awaits the answer to a command any more (category ``commande``)."""


class FichierEtat:
    DISPONIBLE: Final = "disponible"
    ERREUR: Final = "erreur"
    COPIE: Final = "copié"
    SUPPRIME: Final = "supprimé"


class Code:
    """Error codes carried by ``reponse.erreur.code``. Open set; these are the broker's."""

    DESTINATION_INCONNUE: Final = "destination_inconnue"
    """No such domain is configured or discovered."""
    DESTINATION_HORS_LIGNE: Final = "destination_hors_ligne"
    """The domain is known but its channel is down."""
    DESTINATION_SATUREE: Final = "destination_saturee"
    """The destination does not read; its queue is full."""
    REFUSE: Final = "refuse"
    """The routing policy denies it."""
    LIMITE: Final = "limite"
    """The sender exceeded a rate or in-flight limit."""
    COMMANDE_INCONNUE: Final = "commande_inconnue"
    """Nobody serves that command at the destination."""
    MESSAGE_INVALIDE: Final = "message_invalide"
    """The command itself did not validate."""
    ERREUR_INTERNE: Final = "erreur_interne"
    """The handler raised."""
    DELAI_DEPASSE: Final = "delai_depasse"
    """No answer in time: the client at its own timeout, the broker at the command's
    deadline (``min(delai, limites.duree_commande)`` from its receipt)."""
