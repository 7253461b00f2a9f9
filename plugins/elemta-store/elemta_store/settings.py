"""``[plugins.store]``: where the store lives, which recipients it takes, how much it keeps."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from elemta import Secret


class StoreSettings(BaseModel):
    """The validated ``[plugins.store]`` table (see the plugin's README for every key)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # where messages are kept: a SQLite file, or a PostgreSQL database
    backend: Literal["sqlite", "postgresql"] = "sqlite"
    # the SQLite database; a relative path is relative to the config file's folder
    path: str = Field("store/messages.db", min_length=1)
    # PostgreSQL: "postgresql://user@host/db", with the password here or in PGPASSWORD
    postgresql_dsn: Secret | None = None
    postgresql_pool_size: int = Field(4, ge=1, le=100)
    # the route.transport of the store: route answers it, deliver takes it
    transport: str = Field("store", min_length=1)
    # which recipients route sends to the store
    local_domains: bool = True
    domains: list[str] = Field(default_factory=list)
    catch_all: bool = False
    # bounds: the oldest messages go first; 0 = no bound
    max_messages: int = Field(0, ge=0)
    max_bytes: int = Field(0, ge=0)
    # body text indexed for search, per message
    index_bytes: int = Field(1_048_576, ge=0)
    # the longest a store write may take before the delivery is deferred
    timeout_seconds: float = Field(30.0, gt=0, le=3600)
    # messages read into memory and written at once; further deliveries wait their turn
    writes_in_flight: int = Field(50, ge=1, le=1000)

    @model_validator(mode="after")
    def _dsn_needed(self) -> "StoreSettings":
        if self.backend == "postgresql" and self.postgresql_dsn is None:
            raise ValueError('backend = "postgresql" needs postgresql_dsn (for example '
                             '"postgresql://elemta@db.example.com/elemta")')
        return self

    @field_validator("domains")
    @classmethod
    def _domains(cls, v: list[str]) -> list[str]:
        out = []
        for d in v:
            name = d.strip().lower().rstrip(".")
            if not name or "@" in name or any(c.isspace() for c in name):
                raise ValueError(f'"{d}" is not a domain name; write such as "example.com"')
            out.append(name)
        return out
