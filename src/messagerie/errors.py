"""The exceptions of messagerie, in one hierarchy.

Pure: no I/O and no import of the rest of the package at run time, so that
``model.py`` can derive :class:`~messagerie.model.MessageInvalide` from
:class:`MessagerieError` and stay free of asyncio::

    MessagerieError
    ├── MessageInvalide (also a ValueError)   a message breaks the protocol (model.py)
    ├── CommandError                          a command was answered ``statut: erreur``
    ├── CommandTimeout (also a TimeoutError)  no answer in time
    ├── Disconnected (also a ConnectionError) the channel is down, or the client closed
    └── NameUnknown                           this domain's own name is unknown

``MessageInvalide`` lives with the model it validates; it is importable from here too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .model import Commande, MessageInvalide, Reponse


class MessagerieError(Exception):
    """Base class of every error messagerie raises on purpose."""


class CommandError(MessagerieError):
    """A command was answered with ``statut: erreur`` (by its destination or by the
    broker: ``destination_inconnue``, ``destination_hors_ligne``, ``refuse``,
    ``limite``, ``commande_inconnue``...).

    Raise it from a handler to answer with your own ``code`` and ``message``.
    ``reponse`` is the error :class:`Reponse` received (``None`` when raised locally).
    """

    def __init__(self, code: str, message: str = "", reponse: Reponse | None = None) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message
        self.reponse = reponse


class CommandTimeout(MessagerieError, TimeoutError):
    """No answer to a command within its timeout."""

    def __init__(self, commande: Commande, timeout: float) -> None:
        super().__init__(f"no answer to {commande.commande!r} from {commande.destination!r} "
                         f"within {timeout:g} s")
        self.commande = commande
        self.timeout = timeout


class Disconnected(MessagerieError, ConnectionError):
    """The channel is down: it reset while a command was in flight, it could not be
    (re)opened in time, or the client is closed."""


class NameUnknown(MessagerieError):
    """This domain's own name could not be determined."""


def __getattr__(name: str) -> Any:
    # MessageInvalide is defined in model.py, which imports this module: resolve it
    # on first use instead of importing model here.
    if name == "MessageInvalide":
        from .model import MessageInvalide
        return MessageInvalide
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CommandError",
    "CommandTimeout",
    "Disconnected",
    "MessageInvalide",
    "MessagerieError",
    "NameUnknown",
]
