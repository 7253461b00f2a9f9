"""What ``[plugins.datasource]`` names: the directory backend (SQLite, PostgreSQL, a TOML
file) and the password source (the directory, a passwd-file, LDAP, Dovecot)."""

from __future__ import annotations

import os
from typing import Any

from .directory import Backend
from .hashing import Argon2Params, Hasher, Verifier
from .settings import AuthSettings, DatasourceSettings
from .sources import PasswordSource


def make_backend(settings: DatasourceSettings, server_settings: Any) -> Backend:
    """The configured backend (not opened yet). Paths are resolved once, against the
    configuration file's folder: the same file named by any path opens the same data."""
    state = server_settings.resolve(server_settings.server.state_dir)
    if settings.backend == "toml":
        from .static import StaticBackend

        return StaticBackend(server_settings.resolve(settings.toml_path),
                             state / "datasource-usage.sqlite3")
    if settings.backend == "postgresql":
        from .sql import PostgresBackend

        assert settings.postgresql_dsn is not None
        return PostgresBackend(settings.postgresql_dsn.get_secret_value(),
                               settings.postgresql_pool_size, settings.lookup_timeout_seconds)
    from .sql import SQLiteBackend

    path = settings.sqlite_path
    return SQLiteBackend(state / "datasource.sqlite3" if path is None
                         else server_settings.resolve(path))


def make_hasher(auth: AuthSettings) -> Hasher:
    return Hasher(Argon2Params(auth.argon2_time_cost, auth.argon2_memory_kib,
                               auth.argon2_parallelism), auth.max_memory_kib)


def verification_threads(auth: AuthSettings) -> int:
    """``max_concurrent_verifications``, by default every core but one: the event loop
    keeps a core, so a login flood slows logins, not the MX (docs/performance.md)."""
    return auth.max_concurrent_verifications or max(1, (os.cpu_count() or 2) - 1)


def make_verifier(auth: AuthSettings) -> Verifier:
    return Verifier(make_hasher(auth), verification_threads(auth),
                    auth.max_waiting_verifications)


def make_source(auth: AuthSettings, backend: Backend, verifier: Verifier,
                server_settings: Any) -> PasswordSource | None:
    """The configured password source (not opened yet); ``None`` for ``source = "none"``."""
    if auth.source == "directory":
        from .passwords import DirectoryPasswords

        return DirectoryPasswords(backend, verifier, auth.scram_iterations)
    if auth.source == "passwd-file":
        from .passwords import PasswdFilePasswords

        assert auth.passwd_file is not None
        return PasswdFilePasswords(server_settings.resolve(auth.passwd_file), verifier)
    if auth.source == "ldap":
        from .ldap import LdapPasswords

        assert auth.ldap is not None
        ldap = auth.ldap
        if ldap.ca_file is not None:
            ldap = ldap.model_copy(update={"ca_file": server_settings.resolve(ldap.ca_file)})
        return LdapPasswords(ldap)
    if auth.source == "dovecot":
        from .dovecot import DovecotPasswords

        return DovecotPasswords(auth.dovecot.model_copy(
            update={"socket": server_settings.resolve(auth.dovecot.socket)}))
    return None
