"""The configured backend, chosen from ``[plugins.datasource]``: SQLite, PostgreSQL or a TOML file."""

from __future__ import annotations

from typing import Any

from .directory import Backend
from .settings import DatasourceSettings


def make_backend(settings: DatasourceSettings, server_settings: Any) -> Backend:
    """The configured backend (not opened yet)."""
    if settings.backend == "toml":
        from .static import StaticBackend

        return StaticBackend(server_settings.resolve(settings.toml_path))
    if settings.backend == "postgresql":
        from .sql import PostgresBackend

        assert settings.postgresql_dsn is not None
        return PostgresBackend(settings.postgresql_dsn.get_secret_value(),
                               settings.postgresql_pool_size, settings.lookup_timeout_seconds)
    from .sql import SQLiteBackend

    path = settings.sqlite_path
    if path is None:
        path = server_settings.resolve(server_settings.server.state_dir) / "datasource.sqlite3"
    return SQLiteBackend(server_settings.resolve(path))
