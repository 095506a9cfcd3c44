"""The distribution is ``messagerie-xen`` (``messagerie`` on PyPI is someone else's);
the import packages stay ``messagerie`` and ``broker`` (and ``pont``, the MQTT bridge)."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import messagerie

ROOT = Path(__file__).resolve().parents[1]
NAME = "messagerie-xen"


def test_pyproject_names_the_distribution_messagerie_xen() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == NAME
    assert project["version"] == messagerie.__version__


def test_installed_distribution_provides_both_import_packages_and_the_commands() -> None:
    dist = importlib.metadata.distribution(NAME)
    assert dist.version == messagerie.__version__
    owners = importlib.metadata.packages_distributions()
    # (A venv made before the rename may also list the old name: docs/install.md.)
    assert NAME in owners["messagerie"]
    assert NAME in owners["broker"]
    assert NAME in owners["pont"]
    assert {e.name: e.value for e in dist.entry_points.select(group="console_scripts")} == {
        "messagerie": "messagerie.cli:main",
        "messagerie-broker": "broker.cli:main",
        "messagerie-policy": "broker.cli:policy_main",
        "messagerie-pont": "pont.cli:main",
    }


def test_debian_changelog_version_is_the_project_version() -> None:
    # packaging/build-deb refuses to build otherwise; this says so before CI builds.
    first = (ROOT / "packaging" / "debian" / "changelog").read_text().splitlines()[0]
    assert first.startswith(f"{NAME} ({messagerie.__version__}) "), first
