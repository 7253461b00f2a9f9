"""The ``[plugins.datasource]`` table, and its ``auth`` table."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pydantic
from pydantic import ConfigDict, Field

from elemta import Secret

from .dovecot import DovecotSettings
from .ldap import LdapSettings


class AuthSettings(pydantic.BaseModel):
    """``[plugins.datasource.auth]``: where passwords are checked, and what a login may send."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Literal["directory", "passwd-file", "ldap", "dovecot", "none"] = "directory"
    passwd_file: Path | None = None
    ldap: LdapSettings | None = None
    dovecot: DovecotSettings = DovecotSettings()
    # argon2id for new hashes: OWASP's minimum profile (19 MiB, 2 passes)
    argon2_time_cost: int = Field(2, ge=1, le=20)
    argon2_memory_kib: int = Field(19_456, ge=8_192, le=1_048_576)
    argon2_parallelism: int = Field(1, ge=1, le=16)
    max_memory_kib: int = Field(262_144, ge=8_192)    # refuse to verify hungrier stored hashes
    max_concurrent_verifications: int | None = Field(None, ge=1, le=64)  # None: cores - 1
    max_waiting_verifications: int = Field(64, ge=0, le=10_000)
    cache_seconds: float = Field(60.0, ge=0)
    scram_iterations: int = Field(4096, ge=4096, le=1_000_000)
    enforce_sender: bool = True
    check_header_from: bool = True

    @pydantic.model_validator(mode="after")
    def _source_needs(self) -> "AuthSettings":
        if self.source == "passwd-file" and self.passwd_file is None:
            raise ValueError('source = "passwd-file" needs passwd_file (the path of a Dovecot '
                             'passwd-file, such as "/etc/dovecot/users")')
        if self.source == "ldap" and self.ldap is None:
            raise ValueError('source = "ldap" needs an [plugins.datasource.auth.ldap] table '
                             '(url, and bind_dn or search_base)')
        if self.argon2_memory_kib > self.max_memory_kib:
            raise ValueError(f"argon2_memory_kib ({self.argon2_memory_kib}) is above "
                             f"max_memory_kib ({self.max_memory_kib}): new hashes could not "
                             "be checked")
        return self


class DatasourceSettings(pydantic.BaseModel):
    """Where the directory lives and how lookups behave."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["sqlite", "toml", "postgresql"] = "sqlite"
    sqlite_path: Path | None = None   # default: <[server] state_dir>/datasource.sqlite3
    toml_path: Path = Path("directory.toml")
    postgresql_dsn: Secret | None = None
    postgresql_pool_size: int = Field(4, ge=1, le=100)
    cache_seconds: float = Field(10.0, ge=0)
    lookup_timeout_seconds: float = Field(5.0, gt=0)
    recipient_delimiter: str = Field("+", max_length=1)
    max_alias_depth: int = Field(8, ge=1, le=64)
    transport: str = "local"
    auth: AuthSettings = AuthSettings()

    @pydantic.model_validator(mode="after")
    def _dsn_needed(self) -> "DatasourceSettings":
        if self.backend == "postgresql" and self.postgresql_dsn is None:
            raise ValueError('backend = "postgresql" needs postgresql_dsn (for example '
                             '{ env = "ELEMTA_PG_DSN" } holding '
                             '"postgresql://elemta@db.example/elemta")')
        return self
