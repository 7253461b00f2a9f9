"""The ``[plugins.datasource]`` table."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pydantic
from pydantic import ConfigDict, Field

from elemta import Secret


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

    @pydantic.model_validator(mode="after")
    def _dsn_needed(self) -> "DatasourceSettings":
        if self.backend == "postgresql" and self.postgresql_dsn is None:
            raise ValueError('backend = "postgresql" needs postgresql_dsn (for example '
                             '{ env = "ELEMTA_PG_DSN" } holding '
                             '"postgresql://elemta@db.example/elemta")')
        return self
