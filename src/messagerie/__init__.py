"""messagerie: JSON messages between Xen domains over pv-channels.

The protocol model and codec are importable without asyncio side effects::

    from messagerie import Notification, encode, decode
    line = encode(Notification("vm-sys-usb", "tous", "usb_device", "usb_connect", {}))

Every name below is imported on first use, from the module that defines it: importing
the package (or ``messagerie.model``, ``messagerie.codec``...) loads neither asyncio
nor structlog; ``from messagerie import Client`` loads the client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .blocking import BlockingClient
    from .client import Client, ClientState
    from .codec import MAX_DEPTH, MAX_FRAME, FrameDecoder, FrameError, decode, encode, from_dict
    from .errors import CommandError, CommandTimeout, Disconnected, MessagerieError, NameUnknown
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

_SOURCES: dict[str, tuple[str, ...]] = {
    ".blocking": ("BlockingClient",),
    ".client": ("Client", "ClientState"),
    ".codec": ("MAX_DEPTH", "MAX_FRAME", "FrameDecoder", "FrameError", "decode", "encode",
               "from_dict"),
    ".errors": ("CommandError", "CommandTimeout", "Disconnected", "MessagerieError",
                "NameUnknown"),
    ".model": ("DOM0", "NAME_MAX", "TOUS", "Commande", "Journal", "Message",
               "MessageInvalide", "Niveau", "Notification", "Reason", "Reponse", "Statut",
               "check_name", "is_valid_name", "new_id"),
    ".vocabulary": ("Categorie", "Code", "Evenement", "FichierEtat"),
}
_MODULE_OF: dict[str, str] = {name: module for module, names in _SOURCES.items()
                              for name in names}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # once: later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULE_OF})


__all__ = [
    "DOM0",
    "MAX_DEPTH",
    "MAX_FRAME",
    "NAME_MAX",
    "TOUS",
    "BlockingClient",
    "Categorie",
    "Client",
    "ClientState",
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
