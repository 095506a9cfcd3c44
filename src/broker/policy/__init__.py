"""The routing policy: who may send what to whom. Pure: no asyncio, no I/O but
:func:`load_policy` reading its file.

Three parts, as qrexec's: the rule model (:mod:`broker.policy.rules`: matchers, rules,
:class:`Policy` and its :class:`Verdict`), the file parser
(:mod:`broker.policy.parser`) and the "would this be allowed?" tool
(``messagerie-policy``, in :mod:`broker.cli`). This package re-exports the first two.

Modelled on Qubes' qrexec policy: an ordered list of rules, the **first rule that
matches decides**, and when none matches the message is **denied**. A policy file is
TOML::

    [groupes]
    metier = ["vm-ui", "vm-diag"]        # named groups of domains, used as "@metier"

    [[regle]]
    source = "vm-sys-usb"                # domain | "@groupe" | "*" | "dom0"
    destination = "tous"                 # domain | "@groupe" | "*" | "dom0" | "tous"
    type = "notification"                # notification | commande | journal | "*"
    nom = ["usb_device", "disque"]       # optional: string or list, fnmatch globs allowed
    action = "allow"                     # allow | deny

Matching, field by field:

``source``, ``destination``
    A domain name matches that domain only; ``@groupe`` matches the members of the
    group; ``*`` matches **any DomU but never dom0**: dom0 is matched only where it is
    named (``"dom0"``, or as a member of a group), as in qrexec.

``destination = "tous"`` and broadcasts
    The broker filters a broadcast per recipient: it calls
    ``decide(source, recipient, type, name, broadcast=True)`` once for each domain the
    broadcast would reach. A rule whose destination is ``tous`` matches **every
    recipient of a broadcast** (dom0 included, since ``tous`` names it), and no
    unicast message. Every other destination pattern matches the recipient's name,
    whether the message is a broadcast or not, so ``destination = "vm-ui"`` lets a
    broadcast reach vm-ui and ``destination = "*"`` lets it reach every DomU.
    ``decide(source, "tous", ...)`` without ``broadcast`` asks "may this source
    broadcast at all?": only ``tous`` rules match it.

``type``
    One of ``notification``, ``commande``, ``journal`` or ``*``.

``nom``
    What the message is called (:attr:`messagerie.model.Message.name`): the
    ``categorie`` of a notification, the command name of a commande, the
    ``composant`` of a journal event. A string or a list of strings, each an exact
    name or an :mod:`fnmatch` glob (``liste_*``), compared case-sensitively. Absent
    or ``"*"``: any name.

``reponse`` messages are not governed by rules (a rule with ``type = "reponse"`` is an
error). A reponse answers a command, and the router only delivers a reponse that
answers a command it forwarded, back to that command's sender: so **a reponse passes
if and only if the command it answers was allowed** (:attr:`Policy.allows_reponses`).
That keeps the promise "every command is answered" across a policy reload that happens
while the command is in flight. For a caller that asks anyway, :meth:`Policy.decide`
answers a reponse with the decision for the command it mirrors (the reponse's
destination sending that command to its source), never with a blanket allow.

A policy is compiled once (sets and regexes) and :meth:`Policy.decide` memoises its
answers in a bounded dict: it runs for every message, mouse moves included.
"""

from __future__ import annotations

from .parser import PolicyError, load_policy, parse_policy
from .rules import (
    ANY,
    CACHE_SIZE,
    RULE_TYPES,
    Action,
    Matcher,
    NameMatcher,
    Policy,
    Rule,
    Verdict,
)

__all__ = [
    "ANY",
    "CACHE_SIZE",
    "RULE_TYPES",
    "Action",
    "Matcher",
    "NameMatcher",
    "Policy",
    "PolicyError",
    "Rule",
    "Verdict",
    "load_policy",
    "parse_policy",
]
