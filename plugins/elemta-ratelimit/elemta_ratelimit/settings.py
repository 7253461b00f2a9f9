"""The ``[plugins.ratelimit]`` table."""

from __future__ import annotations

import ipaddress
from typing import Literal

import pydantic
from pydantic import Field


class Window(pydantic.BaseModel):
    """Messages per hour and per day for one kind of subject (``None``: no limit)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    per_hour: int | None = Field(None, ge=1)
    per_day: int | None = Field(None, ge=1)

    def limits(self) -> list[tuple[str, int, float]]:
        """``(name, limit, period)`` of each limit set."""
        out = []
        if self.per_hour is not None:
            out.append(("hour", self.per_hour, 3600.0))
        if self.per_day is not None:
            out.append(("day", self.per_day, 86_400.0))
        return out


class RatelimitSettings(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    connections_concurrent: int | None = Field(None, ge=1)   # per client address, all nodes
    connections_per_minute: int | None = Field(None, ge=1)   # per client address
    ip: Window = Window()            # messages per client address
    sender: Window = Window()        # messages per envelope sender address
    domain: Window = Window()        # messages per envelope sender domain
    user: Window = Window()          # messages per authenticated user
    recipient: Window = Window()     # messages per recipient address
    domains: dict[str, Window] = {}  # a sending domain's own limits, instead of `domain`
    users: dict[str, Window] = {}    # a user's own limits, instead of `user`
    exempt_networks: tuple[str, ...] = ()
    exempt_relay_networks: bool = False
    lease_seconds: float = Field(3600.0, gt=0)   # a connection not seen closing frees its slot
    lookup_cache_seconds: float = Field(10.0, ge=0)  # a domain's or user's own limits, reused
    on_store_failure: Literal["tempfail", "accept"] = "tempfail"

    @pydantic.field_validator("exempt_networks")
    @classmethod
    def _networks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for net in v:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"{net!r} is not a network (write 192.0.2.0/24 or "
                                 "2001:db8::/32)") from None
        return v

    @pydantic.field_validator("domains", "users")
    @classmethod
    def _lower_keys(cls, v: dict[str, Window]) -> dict[str, Window]:
        return {k.strip().lower().rstrip("."): w for k, w in v.items()}
