"""The ``[plugins.greylist]`` table."""

from __future__ import annotations

import ipaddress
from typing import Literal

import pydantic
from pydantic import Field


class GreylistSettings(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    delay_seconds: float = Field(300.0, ge=0)              # a retry earlier than this: again 451
    retry_window_seconds: float = Field(2 * 86_400.0, gt=0)   # how long a first try is remembered
    pass_lifetime_days: float = Field(36.0, gt=0)          # a passed triplet, unused this long, goes
    auto_allow_after: int = Field(5, ge=0)                 # passes of a network; 0: never
    ipv4_prefix: int = Field(24, ge=8, le=32)
    ipv6_prefix: int = Field(64, ge=16, le=128)
    exempt_networks: tuple[str, ...] = ()
    exempt_sender_domains: tuple[str, ...] = ()
    exempt_recipient_domains: tuple[str, ...] = ()
    exempt_recipients: tuple[str, ...] = ("postmaster", "abuse")  # local parts, or addresses
    spf_pass_domains: tuple[str, ...] = ()                 # senders SPF-verified for these pass
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

    @pydantic.field_validator("exempt_sender_domains", "exempt_recipient_domains",
                              "spf_pass_domains", "exempt_recipients")
    @classmethod
    def _lower(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(d.strip().lower().rstrip(".") for d in v)

    @pydantic.model_validator(mode="after")
    def _window(self) -> "GreylistSettings":
        if self.retry_window_seconds <= self.delay_seconds:
            raise ValueError(f"retry_window_seconds ({self.retry_window_seconds:g}) must be "
                             f"longer than delay_seconds ({self.delay_seconds:g}): a sender "
                             "must be able to retry after the delay")
        return self
