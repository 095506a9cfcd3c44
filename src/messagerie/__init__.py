"""messagerie: JSON messages between Xen domains over pv-channels.

The protocol model and codec are importable without asyncio side effects::

    from messagerie import Notification, encode, decode
    line = encode(Notification("vm-sys-usb", "tous", "usb_device", "usb_connect", {}))
"""

from .client import (
    BlockingClient,
    Client,
    CommandError,
    CommandTimeout,
    Disconnected,
    MessagerieError,
    NameUnknown,
)
from .codec import MAX_DEPTH, MAX_FRAME, FrameDecoder, FrameError, decode, encode, from_dict
from .model import (
    DOM0,
    NAME_MAX,
    TOUS,
    Commande,
    Journal,
    Message,
    MessageInvalide,
    Niveau,
    Notification,
    Reason,
    Reponse,
    Statut,
    check_name,
    is_valid_name,
    new_id,
)
from .vocabulary import Categorie, Code, Evenement, FichierEtat

__version__ = "0.1.0"

__all__ = [
    "DOM0",
    "MAX_DEPTH",
    "MAX_FRAME",
    "NAME_MAX",
    "TOUS",
    "BlockingClient",
    "Categorie",
    "Client",
    "Code",
    "CommandError",
    "CommandTimeout",
    "Commande",
    "Disconnected",
    "Evenement",
    "FichierEtat",
    "FrameDecoder",
    "FrameError",
    "Journal",
    "Message",
    "MessageInvalide",
    "MessagerieError",
    "NameUnknown",
    "Niveau",
    "Notification",
    "Reason",
    "Reponse",
    "Statut",
    "__version__",
    "check_name",
    "decode",
    "encode",
    "from_dict",
    "is_valid_name",
    "new_id",
]
