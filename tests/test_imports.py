"""Import purity and the package's exports.

The sans-IO modules (the wire definition, the model, the codec, the envelope decoder,
the schema, the socle's catalogue, the errors, and the package root itself) must be
importable without asyncio, pyserial or structlog: a router, a policy tool or a fuzzer
should not pay for, or depend on, the client's I/O. Each check runs in a fresh interpreter (``-I``:
no user site, no PYTHON* variables), since this test process has long imported
everything.
"""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import messagerie
from messagerie import blocking, client, errors, identity, model, streams

SRC = Path(messagerie.__file__).resolve().parent.parent
IO_MODULES = ("asyncio", "serial", "structlog")
pytestmark = pytest.mark.integration  # each check runs a fresh interpreter

PURE_MODULES = ("messagerie", "messagerie.errors", "messagerie.wire", "messagerie.model",
                "messagerie.vocabulary", "messagerie.codec", "messagerie.envelope",
                "messagerie.schema", "messagerie.socle")


def loaded_by(statement: str) -> tuple[set[str], set[str]]:
    """The modules loaded in a fresh interpreter before and after ``statement``."""
    code = (
        "import json, sys\n"
        "before = sorted(sys.modules)\n"
        f"sys.path.insert(0, {str(SRC)!r})\n"
        f"{statement}\n"
        "print(json.dumps([before, sorted(sys.modules)]))\n")
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    before, after = json.loads(out)
    return set(before), set(after)


@pytest.mark.parametrize("module", [*PURE_MODULES, ", ".join(PURE_MODULES)])
def test_sans_io_modules_import_no_io(module: str) -> None:
    before, after = loaded_by(f"import {module}")
    assert not before & set(IO_MODULES), "the bare interpreter already loaded them"
    assert set(module.split(", ")) <= after
    assert sorted(after & set(IO_MODULES)) == []


def test_package_root_names_need_no_io_until_used() -> None:
    # The sans-IO names come from the package root without the client...
    _, after = loaded_by("from messagerie import Notification, MessageInvalide, decode, "
                         "encode, FrameDecoder, MessagerieError, Disconnected, __version__")
    assert sorted(after & set(IO_MODULES)) == []
    # ... and asking for the client loads it (the control: laziness is what keeps
    # asyncio out above, not an interpreter that cannot load it).
    _, after = loaded_by("from messagerie import Client")
    assert {"asyncio", "structlog"} <= after


def test_every_exported_name_resolves_to_its_definition() -> None:
    for name in messagerie.__all__:
        assert name in dir(messagerie)
        if name == "__version__":
            continue
        home = importlib.import_module(messagerie._MODULE_OF[name], "messagerie")
        assert getattr(messagerie, name) is vars(home)[name], name
    assert messagerie.Client is client.Client
    assert messagerie.BlockingClient is blocking.BlockingClient
    with pytest.raises(AttributeError, match="no attribute 'Klient'"):
        messagerie.Klient  # noqa: B018


def test_type_checking_imports_match_the_lazy_table() -> None:
    # mypy and IDEs read the TYPE_CHECKING block; the run time reads _SOURCES: the two
    # must name the same things, from the same modules, and cover __all__.
    tree = ast.parse(Path(messagerie.__file__).read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If)
                 and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
    imported = {(f".{node.module}", alias.name) for node in block.body
                if isinstance(node, ast.ImportFrom) for alias in node.names}
    table = {(module, name) for module, names in messagerie._SOURCES.items()
             for name in names}
    assert imported == table
    assert {name for _, name in table} == set(messagerie.__all__) - {"__version__"}


def test_the_old_client_module_still_exports_everything() -> None:
    # Everything messagerie.client used to define is still importable from it, and is
    # the same object as in its new home.
    assert client.BlockingClient is blocking.BlockingClient
    assert client.MessageStream is streams.MessageStream
    assert client.resolve_domain_name is identity.resolve_domain_name
    assert (client.DOMAINE_FILE, client.DOMAINE_ENV) == (identity.DOMAINE_FILE,
                                                          identity.DOMAINE_ENV)
    for name in ("MessagerieError", "CommandError", "CommandTimeout", "Disconnected",
                 "NameUnknown"):
        assert getattr(client, name) is getattr(errors, name)
    for name in client.__all__:
        assert getattr(client, name) is not None
    with pytest.raises(AttributeError):
        client.Klient  # noqa: B018


def test_one_error_hierarchy() -> None:
    assert errors.MessageInvalide is model.MessageInvalide
    for cls in (model.MessageInvalide, errors.CommandError, errors.CommandTimeout,
                errors.Disconnected, errors.NameUnknown):
        assert issubclass(cls, errors.MessagerieError), cls
    assert issubclass(model.MessageInvalide, ValueError)
    assert issubclass(errors.CommandTimeout, TimeoutError)
    assert issubclass(errors.Disconnected, ConnectionError)
    with pytest.raises(messagerie.MessagerieError):
        messagerie.decode(b"{")
