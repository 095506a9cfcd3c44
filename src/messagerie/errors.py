"""The exceptions of messagerie, in one hierarchy.

Pure: no I/O and no import of the rest of the package at run time, so that the
wire definition and the model can raise these and stay free of asyncio::

    MessagerieError
    ├── MessageInvalide (also a ValueError)   a message breaks the protocol
    ├── CommandError                          a command was answered ``statut: erreur``
    ├── CommandTimeout (also a TimeoutError)  no answer in time
    ├── Disconnected (also a ConnectionError) the channel is down, or the client closed
    └── NameUnknown                           this domain's own name is unknown

:class:`Reason` says why a frame or a message was refused (``MessageInvalide.reason``).
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .model import Commande, Reponse


class MessagerieError(Exception):
    """Base class of every error messagerie raises on purpose."""


class Reason(StrEnum):
    """Why a frame or a message was refused. Stable strings, used in logs and tests."""

    INVALID_UTF8 = "invalid_utf8"
    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    UNKNOWN_TYPE = "unknown_type"
    BAD_NAME = "bad_name"
    BAD_VALUE = "bad_value"
    DUPLICATE_KEY = "duplicate_key"
    TOO_LARGE = "too_large"


class MessageInvalide(MessagerieError, ValueError):
    """A message (or a frame) that does not follow the protocol.

    A :class:`MessagerieError` like every error of the library, and a ``ValueError``
    (what it is to the caller of :func:`~messagerie.decode`).

    ``reason`` is a :class:`Reason`, ``field`` the JSON path of the offending field
    (``source``, ``payload.categorie``) when there is one, ``detail`` the explanation.
    """

    def __init__(self, reason: Reason, detail: str, field: str | None = None) -> None:
        self.reason = reason
        self.field = field
        self.detail = detail
        super().__init__(f"{field}: {detail}" if field else detail)


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
    """No answer to a command within its timeout: the client's own, or the deadline the
    command carried (``delai``), which the broker enforces by answering
    ``delai_depasse`` (also at its own ``duree_commande``, or when the destination
    stayed offline longer than its spool keeps messages, or went away). Both are the
    same timeout, so both raise this; ``reponse`` is the broker's ``delai_depasse``
    answer when that is what ended the wait (else ``None``), and the message ends with
    ``why`` (the broker's reason). ``timeout`` is the deadline the command carried, else the
    client's timeout.
    """

    def __init__(self, commande: Commande, timeout: float,
                 reponse: Reponse | None = None, why: str = "") -> None:
        super().__init__(f"no answer to {commande.commande!r} from {commande.destination!r} "
                         f"within {timeout:g} s" + (f": {why}" if why else ""))
        self.commande = commande
        self.timeout = timeout
        self.reponse = reponse


class Disconnected(MessagerieError, ConnectionError):
    """The channel is down: it reset while a command was in flight, it could not be
    (re)opened in time, or the client is closed."""


class NameUnknown(MessagerieError):
    """This domain's own name could not be determined."""


__all__ = [
    "CommandError",
    "CommandTimeout",
    "Disconnected",
    "MessageInvalide",
    "MessagerieError",
    "NameUnknown",
    "Reason",
]
