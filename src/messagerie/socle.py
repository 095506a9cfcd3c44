"""The socle's catalogue: the appliance's base notifications and commands, typed.

The socle (the appliance's base system) defines four notifications and five commands
("Commandes du socle"). This module states each of them as data: its wire names, the
msgspec Struct of its ``data`` / ``arguments`` / ``resultat``, who handles it and what
notification follows. From that one table come:

* typed calls (``await socle.liste_disques(client) -> list[str]``, and the same
  functions on a :class:`~messagerie.BlockingClient`, returning the value directly);
* typed handlers (``@socle.sert(LIT_FICHIER, client)``: the function gets validated
  arguments; bad arguments are answered ``message_invalide`` naming the field);
* the JSON Schema of each command's arguments and result (:func:`schemas`,
  ``messagerie schema --socle``, ``docs/schema/socle.schema.json``).

Sans-IO on import: no asyncio, pyserial or structlog (the typed calls import what they
need when they run, from a client the caller already holds).

Wire names are the field's (``liste_disques``, ``lit_fichier``, categories ``etat_domu``,
``disque``, ``fichier``, ``entree``). Names this code used before are kept in
:data:`FORMER_NAMES` (``lister_disques`` is now ``liste_disques``); see docs/api.md.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Final, Generic, Literal, TypeVar, Union, overload

import msgspec

from .errors import CommandError, CommandTimeout, Disconnected
from .model import DOM0, TOUS, Commande, MessageInvalide, Notification, Reason
from .vocabulary import Code

if TYPE_CHECKING:
    from .blocking import BlockingClient
    from .client import Client

A = TypeVar("A", bound=msgspec.Struct)
R = TypeVar("R")
D = TypeVar("D")

VM_SYS_USB: Final = "vm-sys-usb"
"""The domain that owns the USB disks (and relays input)."""
DEPOT_LOCAL: Final = "local"
"""The dom0 file store (the "dépôt local"), as a disk name."""

ERREUR_DISQUE_ABSENT: Final = "disque_absent"
"""Error code: no connected disk of that name."""
ERREUR_FICHIER_ABSENT: Final = "fichier_absent"
"""Error code: no such file on that disk (or in the store)."""
ERREUR_CHEMIN_REFUSE: Final = "chemin_refuse"
"""Error code: the path leads out of its disk (a symbolic link) or names no regular file."""
ERREUR_TROP_GRAND: Final = "trop_grand"
"""Error code: the file is larger than the service accepts."""

# -- value types -------------------------------------------------------------------

NOM_DISQUE_PATTERN: Final = r"^(?!\.\.?$)[^/\x00-\x1f\x7f]{1,64}$"
"""A disk name: a mount point's directory name (1-64 characters, no ``/``, no control
characters, not ``.`` or ``..``), or ``local``."""
CHEMIN_PATTERN: Final = (r"^(?!/)(?!(.*/)?\.\.?(/|$))(?!.*//)(?!.*/$)"
                         r"[^\x00-\x1f\x7f]{1,1024}$")
"""A file's path on a disk: relative, ``/``-separated, no empty, ``.`` or ``..``
component, no control characters, at most 1024 characters."""

NomDisque = Annotated[str, msgspec.Meta(pattern=NOM_DISQUE_PATTERN,
                                        description="A disk name, or 'local' (the dom0 store)")]
Chemin = Annotated[str, msgspec.Meta(pattern=CHEMIN_PATTERN,
                                     description="A file's relative path on its disk")]
Bit = Literal[0, 1]
Pixel = Annotated[int, msgspec.Meta(ge=0, le=65535)]


ETATS_FICHIER: Final = ("disponible", "erreur", "copié", "supprimé")

# -- notifications' data -----------------------------------------------------------


class EtatDomu(msgspec.Struct, forbid_unknown_fields=False):
    """ETAT_DOMU: a DomU says whether it is ready."""

    pret: bool


class Disque(msgspec.Struct):
    """DISQUE: a disk appeared (``connecte``) or went."""

    nom: NomDisque
    connecte: bool


class Fichier(msgspec.Struct, omit_defaults=True):
    """FICHIER: a file's state; ``message`` (ours, absent when empty) says why an erreur."""

    fichier: Chemin
    etat: Literal["disponible", "erreur", "copié", "supprimé"]
    message: str | None = None


class Position(msgspec.Struct):
    """Absolute pixels from the top-left corner."""

    x: Pixel
    y: Pixel


class Boutons(msgspec.Struct):
    """1 = pressed."""

    gauche: Bit
    milieu: Bit
    droit: Bit


class Souris(msgspec.Struct, tag_field="entree", tag="souris"):
    position: Position
    boutons: Boutons


class Clavier(msgspec.Struct, tag_field="entree", tag="clavier"):
    """A key pressed (alphanumerics only)."""

    touche: Annotated[str, msgspec.Meta(pattern="^[A-Za-z0-9]$")]


class Tactile(msgspec.Struct, tag_field="entree", tag="tactile"):
    """A tap is touche 1 then 0 at one position; a swipe is 1, moves, then 0."""

    position: Position
    touche: Bit


Entree = Union[Souris, Clavier, Tactile]  # noqa: UP007 (a runtime value for msgspec)
"""INPUT's data: one of three shapes, told apart by ``entree``."""

# -- commands' arguments -----------------------------------------------------------


class ListeDisques(msgspec.Struct):
    """LISTE_DISQUES: no arguments."""


class ListeFichiers(msgspec.Struct):
    nom_disque: NomDisque


class LitFichier(msgspec.Struct):
    nom_disque: NomDisque
    nom_fichier: Chemin


class CopieFichier(msgspec.Struct):
    nom_fichier: Chemin
    nom_disque_destination: NomDisque


class SupprimeFichier(msgspec.Struct):
    nom_fichier: Chemin
    nom_disque: NomDisque = DEPOT_LOCAL


# -- the catalogue's entries -------------------------------------------------------


def _field_of(exc: msgspec.ValidationError, prefix: str) -> str:
    """The JSON path msgspec names in ``exc`` (``$.nom_disque``), as ``prefix.nom_disque``."""
    text = str(exc)
    found = re.search(r" - at `\$(.*)`$", text)
    path = found.group(1) if found else ""
    missing = re.match(r"Object missing required field `([^`]+)`", text)
    if missing:
        path += "." + missing.group(1)
    return prefix + path.replace("[", ".").replace("]", "")


def _convert(value: Any, kind: Any, prefix: str) -> Any:
    """``value`` (decoded JSON) as ``kind``, or :class:`MessageInvalide` naming the field."""
    try:
        return msgspec.convert(value, kind, strict=True)
    except msgspec.ValidationError as exc:
        detail = re.sub(r" - at `\$[^`]*`$", "", str(exc))
        for pattern, meaning in _PATTERN_MEANINGS.items():
            detail = detail.replace(f"matching regex {pattern!r}", meaning)
        raise MessageInvalide(Reason.BAD_VALUE, detail, _field_of(exc, prefix)) from None


_PATTERN_MEANINGS: Final = {
    NOM_DISQUE_PATTERN: "naming a disk (1-64 characters, no '/' or control characters)",
    CHEMIN_PATTERN: "that is a relative path (no leading '/', no '..', '.' or empty "
                    "component, no control characters, at most 1024 characters)",
}


@dataclass(frozen=True)
class NotificationSpec(Generic[D]):
    """One of the socle's notifications."""

    ident: str
    """The field's identifier (``TypeEvenement.DISQUE`` there)."""
    categorie: str
    evenement: str | None
    """The wire ``evenement``; ``None`` for INPUT, whose evenement is the input's kind."""
    data: Any
    """The data's type (a Struct, or a union of Structs)."""
    source: str
    """Who sends it: ``vm-sys-usb``, ``dom0``, or ``DomU`` (any business domain)."""
    description: str
    destination: str = TOUS

    def build(self, source: str, data: D, destination: str | None = None) -> Notification:
        """The notification carrying ``data``, from ``source``."""
        evenement = self.evenement or str(msgspec.to_builtins(data).get("entree", ""))
        return Notification(source, destination or self.destination, self.categorie,
                            evenement, msgspec.to_builtins(data))

    def matches(self, msg: object) -> bool:
        return isinstance(msg, Notification) and msg.categorie == self.categorie

    def parse(self, msg: Notification) -> D:
        """The typed data of ``msg``; :class:`MessageInvalide` naming the bad field."""
        if msg.categorie != self.categorie:
            raise MessageInvalide(Reason.BAD_VALUE, f"not a {self.ident} notification",
                                  "payload.categorie")
        data = dict(msg.data)
        if self.evenement is None:
            data.setdefault("entree", msg.evenement)
        value: D = _convert(data, self.data, "payload.data")
        return value


Follows = tuple[NotificationSpec[Any], tuple[str, ...]]


@dataclass(frozen=True)
class CommandSpec(Generic[A, R]):
    """One of the socle's commands."""

    ident: str
    """The field's identifier (``TypeCommande.LISTE_DISQUES``)."""
    commande: str
    """The wire name."""
    arguments: type[A]
    resultat: Any
    """The type of the ``resultat`` of its ``ok`` reponse."""
    handled_by: str
    """Who serves it (``vm-sys-usb``; SUPPRIME_FICHIER: dom0 for ``local``)."""
    description: str
    follows: Follows | None = None
    """The notification that completes it, and its final states (the first is success)."""
    local_to_dom0: bool = False
    """Sent to dom0 when its ``nom_disque`` is ``local``."""
    api: str = ""
    """The field's API function."""
    former: str | None = None
    """The name this code used before, if any."""

    def destination(self, args: A) -> str:
        if self.local_to_dom0 and getattr(args, "nom_disque", None) == DEPOT_LOCAL:
            return DOM0
        return self.handled_by

    def command(self, source: str, args: A) -> Commande:
        """The :class:`Commande` asking for ``args``, addressed as the table says."""
        return Commande(source, self.destination(args), self.commande,
                        msgspec.to_builtins(args))

    def parse_arguments(self, arguments: Mapping[str, Any]) -> A:
        """Validated arguments; :class:`MessageInvalide` naming the field."""
        value: A = _convert(dict(arguments), self.arguments, "arguments")
        return value

    def parse_resultat(self, resultat: Any) -> R:
        value: R = _convert(resultat, self.resultat, "resultat")
        return value


ETAT_DOMU: Final = NotificationSpec[EtatDomu](
    "ETAT_DOMU", "etat_domu", "etat", EtatDomu, "DomU", "A DomU's state: ready or not.")
DISQUE: Final = NotificationSpec[Disque](
    "DISQUE", "disque", "etat", Disque, VM_SYS_USB, "A disk appeared or went.")
FICHIER: Final = NotificationSpec[Fichier](
    "FICHIER", "fichier", "etat", Fichier, DOM0, "A file's state in the store or on a disk.")
INPUT: Final = NotificationSpec[Entree](
    "INPUT", "entree", None, Entree, VM_SYS_USB,
    "Keyboard, touch or mouse input; evenement is the kind (souris, clavier, tactile).")

LISTE_DISQUES: Final = CommandSpec[ListeDisques, list[str]](
    "LISTE_DISQUES", "liste_disques", ListeDisques, list[NomDisque], VM_SYS_USB,
    "The connected disks' names.", api="get_liste_disques()", former="lister_disques")
LISTE_FICHIERS: Final = CommandSpec[ListeFichiers, list[str]](
    "LISTE_FICHIERS", "liste_fichiers", ListeFichiers, list[Chemin], VM_SYS_USB,
    "The paths of a disk's files (local: the dom0 store's).", local_to_dom0=True,
    api="get_liste_fichiers(nom_disque)", former="lister_fichiers")
LIT_FICHIER: Final = CommandSpec[LitFichier, None](
    "LIT_FICHIER", "lit_fichier", LitFichier, None, VM_SYS_USB,
    "Copy a file from a disk into the dom0 store, with its SHA-256 digest.",
    follows=(FICHIER, ("disponible", "erreur")),
    api="lit_fichier(nom_disque, nom_fichier)", former="lire_fichier")
COPIE_FICHIER: Final = CommandSpec[CopieFichier, None](
    "COPIE_FICHIER", "copie_fichier", CopieFichier, None, VM_SYS_USB,
    "Copy a file from the dom0 store to a disk, its digest checked and written as "
    "<name>.hash.", follows=(FICHIER, ("copié", "erreur")),
    api="copie_fichier(nom_fichier, nom_disque_destination)", former="copier_fichier")
SUPPRIME_FICHIER: Final = CommandSpec[SupprimeFichier, None](
    "SUPPRIME_FICHIER", "supprime_fichier", SupprimeFichier, None, VM_SYS_USB,
    "Delete a file: from the dom0 store (local, served by dom0) or from a disk.",
    follows=(FICHIER, ("supprimé", "erreur")), local_to_dom0=True,
    api="supprime_fichier(nom_fichier, nom_du_disque='local')", former="supprimer_fichier")

NOTIFICATIONS: Final = (ETAT_DOMU, DISQUE, FICHIER, INPUT)
COMMANDS: Final = (LISTE_DISQUES, LISTE_FICHIERS, LIT_FICHIER, COPIE_FICHIER, SUPPRIME_FICHIER)
FORMER_NAMES: Final = {c.former: c.commande for c in COMMANDS if c.former}
"""Command names this code used before the catalogue, and their wire names now."""


def command_spec(name: str) -> CommandSpec[Any, Any]:
    """The entry of wire command ``name``; ``KeyError`` otherwise."""
    for spec in COMMANDS:
        if spec.commande == name:
            return spec
    raise KeyError(name)


# -- typed handlers ----------------------------------------------------------------

TypedHandler = Callable[[Any, Commande], Any]
F = TypeVar("F", bound=TypedHandler)


@dataclass
class ServedCommand(Generic[A, R]):
    """A typed handler wrapped as a plain one: ``await served(cmd)`` validates the
    arguments, calls the function with them and checks its result against the
    catalogue. Register it with ``client.add_handler(served.commande, served)``."""

    spec: CommandSpec[A, R]
    fn: Callable[[A, Commande], Any]
    commande: str = field(init=False)

    def __post_init__(self) -> None:
        self.commande = self.spec.commande

    async def __call__(self, cmd: Commande) -> Any:
        try:
            args = self.spec.parse_arguments(cmd.arguments)
        except MessageInvalide as exc:
            raise CommandError(Code.MESSAGE_INVALIDE, str(exc)) from None
        result = self.fn(args, cmd)
        if inspect.isawaitable(result):
            result = await result
        builtins = msgspec.to_builtins(result)
        try:
            self.spec.parse_resultat(builtins)
        except MessageInvalide as exc:  # the handler's bug, not the caller's
            raise CommandError(Code.ERREUR_INTERNE,
                               f"{self.spec.commande} returned a bad result: {exc}") from None
        return builtins


def sert(spec: CommandSpec[A, R], client: Client | BlockingClient | None = None,
         ) -> Callable[[F], F]:
    """Decorator: serve ``spec`` with ``fn(args, cmd)``, where ``args`` is the validated
    arguments Struct. With ``client``, registers it there; the wrapped handler is also
    in ``fn.served`` (a :class:`ServedCommand`) to register later."""
    def register(fn: F) -> F:
        served = ServedCommand(spec, fn)
        with contextlib.suppress(AttributeError):  # a bound method takes no attribute
            fn.served = served  # type: ignore[attr-defined]
        if client is not None:
            client.add_handler(spec.commande, served)
        return fn
    return register


# -- typed calls -------------------------------------------------------------------


class FichierErreur(CommandError):
    """The FICHIER notification that completes a command said ``erreur``."""

    def __init__(self, fichier: Fichier) -> None:
        super().__init__("fichier_erreur", f"{fichier.fichier}: {fichier.message or 'erreur'}")
        self.fichier = fichier


async def call(client: Client, spec: CommandSpec[A, R], args: A, *,
               timeout: float | None = None) -> Any:  # noqa: ASYNC109
    """Send ``args`` as ``spec`` says and return the typed result; for a command that a
    FICHIER completes, wait (within ``timeout``, the client's by default) for it and
    return it (:class:`Fichier`), or raise :class:`FichierErreur`."""
    import asyncio

    if spec.follows is None:
        rep = await client.request(spec.command(client.name, args), timeout=timeout)
        return spec.parse_resultat(rep.resultat)
    notif, states = spec.follows
    name = getattr(args, "nom_fichier", None)
    wait = client.timeout if timeout is None else timeout
    loop = asyncio.get_running_loop()
    start = loop.time()
    stream = client.messages(type="notification", source=DOM0, categorie=notif.categorie)
    try:
        cmd = spec.command(client.name, args)
        await client.request(cmd, timeout=timeout)
        async with asyncio.timeout(None if wait is None else wait - (loop.time() - start)):
            async for msg in stream:
                try:
                    fichier: Fichier = notif.parse(msg)  # type: ignore[arg-type]
                except MessageInvalide:
                    continue
                if fichier.fichier == name and fichier.etat in states:
                    if fichier.etat == "erreur":
                        raise FichierErreur(fichier)
                    return fichier
        raise Disconnected(f"client closed while waiting for FICHIER {name!r}")
    except CommandTimeout:
        raise  # the command itself was not answered in time
    except TimeoutError:
        # Answered, but the FICHIER that completes it did not come: the same timeout.
        raise CommandTimeout(cmd, wait or 0.0, None,
                             f"no FICHIER {'/'.join(states)} for {name!r}") from None
    finally:
        stream.close()


def _dispatch(client: Client | BlockingClient, spec: CommandSpec[A, R], args: A,
              timeout: float | None) -> Any:
    from .blocking import BlockingClient  # the caller holds a client: already loaded

    if isinstance(client, BlockingClient):  # run it on the client's loop
        return client.run(call(client.client, spec, args, timeout=timeout))
    return call(client, spec, args, timeout=timeout)


@overload
def liste_disques(client: Client, *, timeout: float | None = None,
                  ) -> Awaitable[list[str]]: ...
@overload
def liste_disques(client: BlockingClient, *, timeout: float | None = None) -> list[str]: ...
def liste_disques(client: Client | BlockingClient, *,
                  timeout: float | None = None) -> Any:
    """LISTE_DISQUES: the names of vm-sys-usb's connected disks."""
    return _dispatch(client, LISTE_DISQUES, ListeDisques(), timeout)


@overload
def liste_fichiers(client: Client, nom_disque: str, *, timeout: float | None = None,
                   ) -> Awaitable[list[str]]: ...
@overload
def liste_fichiers(client: BlockingClient, nom_disque: str, *,
                   timeout: float | None = None) -> list[str]: ...
def liste_fichiers(client: Client | BlockingClient, nom_disque: str, *,
                   timeout: float | None = None) -> Any:
    """LISTE_FICHIERS: the paths of a disk's files (``local``: the dom0 store's)."""
    return _dispatch(client, LISTE_FICHIERS, ListeFichiers(nom_disque), timeout)


@overload
def lit_fichier(client: Client, nom_disque: str, nom_fichier: str, *,
                timeout: float | None = None) -> Awaitable[Fichier]: ...
@overload
def lit_fichier(client: BlockingClient, nom_disque: str, nom_fichier: str, *,
                timeout: float | None = None) -> Fichier: ...
def lit_fichier(client: Client | BlockingClient, nom_disque: str, nom_fichier: str, *,
                timeout: float | None = None) -> Any:
    """LIT_FICHIER, then its FICHIER ``disponible`` (returned) or ``erreur`` (raised)."""
    return _dispatch(client, LIT_FICHIER, LitFichier(nom_disque, nom_fichier), timeout)


@overload
def copie_fichier(client: Client, nom_fichier: str, nom_disque_destination: str, *,
                  timeout: float | None = None) -> Awaitable[Fichier]: ...
@overload
def copie_fichier(client: BlockingClient, nom_fichier: str, nom_disque_destination: str, *,
                  timeout: float | None = None) -> Fichier: ...
def copie_fichier(client: Client | BlockingClient, nom_fichier: str,
                  nom_disque_destination: str, *, timeout: float | None = None) -> Any:
    """COPIE_FICHIER, then its FICHIER ``copié`` (returned) or ``erreur`` (raised)."""
    return _dispatch(client, COPIE_FICHIER, CopieFichier(nom_fichier, nom_disque_destination),
                     timeout)


@overload
def supprime_fichier(client: Client, nom_fichier: str, nom_disque: str = DEPOT_LOCAL, *,
                     timeout: float | None = None) -> Awaitable[Fichier]: ...
@overload
def supprime_fichier(client: BlockingClient, nom_fichier: str, nom_disque: str = DEPOT_LOCAL,
                     *, timeout: float | None = None) -> Fichier: ...
def supprime_fichier(client: Client | BlockingClient, nom_fichier: str,
                     nom_disque: str = DEPOT_LOCAL, *, timeout: float | None = None) -> Any:
    """SUPPRIME_FICHIER (dom0 for ``local``, else vm-sys-usb), then FICHIER ``supprimé``."""
    return _dispatch(client, SUPPRIME_FICHIER, SupprimeFichier(nom_fichier, nom_disque),
                     timeout)


# -- schemas -----------------------------------------------------------------------

DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"


def schemas() -> dict[str, Any]:
    """The JSON Schema of every command's arguments and result and every notification's
    data, one document (draft 2020-12) with one entry per wire name."""
    kinds: list[Any] = []
    names: list[str] = []
    for c in COMMANDS:
        kinds += [c.arguments, c.resultat]
        names += [f"{c.commande}.arguments", f"{c.commande}.resultat"]
    for n in NOTIFICATIONS:
        kinds.append(n.data)
        names.append(f"{n.categorie}.data")
    generated, defs = msgspec.json.schema_components(kinds, ref_template="#/$defs/{name}")
    doc: dict[str, Any] = {
        "$schema": DIALECT,
        "$id": "https://messagerie.invalid/schema/socle.schema.json",
        "title": "The socle's commands and notifications",
        "description": "Under $defs: each command's arguments and resultat "
                       "('<commande>.arguments', '<commande>.resultat') and each "
                       "notification's data ('<categorie>.data'), by wire name; refer to "
                       "one as '#/$defs/lit_fichier.arguments'. Generated by "
                       "messagerie.socle.",
        "$defs": defs}
    for name, schema in zip(names, generated, strict=True):
        defs[name] = schema
    for c in COMMANDS:
        for part in ("arguments", "resultat"):
            defs[f"{c.commande}.{part}"] = {"description": f"{c.ident}: {c.description}",
                                             **defs[f"{c.commande}.{part}"]}
    for n in NOTIFICATIONS:
        defs[f"{n.categorie}.data"] = {"description": f"{n.ident}: {n.description}",
                                        **defs[f"{n.categorie}.data"]}
    return doc


def render() -> str:
    """:func:`schemas` as the text of ``docs/schema/socle.schema.json``."""
    import json
    return json.dumps(schemas(), indent=2, ensure_ascii=False, sort_keys=True) + "\n"


if __name__ == "__main__":
    import sys
    sys.stdout.write(render())
