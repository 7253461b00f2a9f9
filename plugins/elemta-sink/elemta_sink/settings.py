"""``[plugins.sink]``: sink mode, where the web UI listens, who may use it."""

from __future__ import annotations

import ipaddress

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_ADDRESS = "127.0.0.1:8025"


def split_address(value: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` as (host, port); ``ValueError`` saying what to write."""
    text = value.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not host:port; write such as \"127.0.0.1:8025\"")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError(f"{value!r}: the host must be an IP address (or localhost), such "
                             "as \"127.0.0.1:8025\" or \"[::1]:8025\"") from None
    return host, int(port)


class SinkSettings(BaseModel):
    """The validated ``[plugins.sink]`` table (see the plugin's README for every key)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # sink mode: every recipient accepted, every recipient delivered to the store
    capture_all: bool = False
    # the web UI and JSON API
    address: str = DEFAULT_ADDRESS
    # basic auth: both or neither; password_hash is an argon2id PHC string
    username: str | None = Field(None, min_length=1)
    password_hash: str | None = None
    read_only: bool = False
    page_size: int = Field(50, ge=1, le=1000)
    max_page_size: int = Field(500, ge=1, le=1000)    # the store answers at most 1000

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        split_address(v)
        return v.strip()

    @field_validator("username")
    @classmethod
    def _username(cls, v: str | None) -> str | None:
        if v is not None and (":" in v or any(c.isspace() or ord(c) < 32 for c in v)):
            raise ValueError(f"{v!r}: a basic-auth user name has no colon, space or control "
                             "character")
        return v

    @field_validator("password_hash")
    @classmethod
    def _password_hash(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("$argon2"):
            raise ValueError("not an argon2 hash (it starts with $argon2id$); make one with "
                             "`elemta sink hash-password`")
        return v

    @model_validator(mode="after")
    def _auth_pair(self) -> "SinkSettings":
        if (self.username is None) != (self.password_hash is None):
            raise ValueError("set both username and password_hash, or neither")
        if self.page_size > self.max_page_size:
            raise ValueError(f"page_size ({self.page_size}) is larger than max_page_size "
                             f"({self.max_page_size})")
        return self

    @property
    def host_port(self) -> tuple[str, int]:
        return split_address(self.address)
