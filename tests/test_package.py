"""Packaging: everything installs inside the `retrodb` namespace (no top-level `cli` or `schemas`)."""

from __future__ import annotations

import tomllib

from conftest import REPO


def test_every_installed_package_is_inside_retrodb():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert all(p == "retrodb" or p.startswith("retrodb.") for p in config["packages"]), config["packages"]
    assert config["package-dir"] == {"retrodb.cli": "cli", "retrodb.schemas": "schemas"}
    assert "retrodb.schemas" in config["package-data"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["retrodb"].startswith("retrodb.cli.")


def test_schemas_load_from_the_retrodb_namespace():
    from retrodb.schema import arrow_schema

    assert "chunk_id" in arrow_schema("chunks").names
