"""Fixtures of the elemta-datasource tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from elemta_datasource.sql import PostgresBackend, SQLiteBackend
from elemta_datasource.static import StaticBackend


@pytest.fixture(params=["sqlite", "toml", "postgresql"])
async def backend(request, tmp_path: Path):
    """An open directory backend, once for each real kind: SQLite on disk, the TOML file,
    PostgreSQL (a server started for the test)."""
    if request.param == "sqlite":
        b = SQLiteBackend(tmp_path / "ds.sqlite3")
    elif request.param == "toml":
        b = StaticBackend(tmp_path / "directory.toml")
    else:
        b = PostgresBackend(request.getfixturevalue("postgresql"))
    await b.open()
    yield b
    await b.close()
