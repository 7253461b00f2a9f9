"""The ``[plugins.spf]`` table (every key is described in the plugin's README)."""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

import pydantic
from pydantic import Field, field_validator

Action = Literal["annotate", "reject", "tempfail"]

# a local part or address as an operator writes it in a list (no quoting, no spaces)
_RECIPIENT = re.compile(r"[^@\s\"<>]+(@[A-Za-z0-9.-]+)?\Z")
_DOMAIN = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})?"
                     r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})?)*\.?\Z")


class SpfSettings(pydantic.BaseModel):
    """The validated ``[plugins.spf]`` table."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    # what a result does to the transaction: "annotate" only records it; "reject"
    # and "tempfail" refuse the recipients at RCPT (see the README for the codes)
    on_fail: Action = "annotate"
    on_softfail: Action = "annotate"
    on_temperror: Literal["annotate", "tempfail"] = "annotate"
    on_permerror: Action = "annotate"
    # also act on the HELO identity's result when the sender is not null
    enforce_helo: bool = False
    # clients never checked: CIDR networks, and sessions allowed to relay
    exempt_networks: tuple[str, ...] = ()
    exempt_relay_clients: bool = True
    # recipients a refusal never applies to: local parts ("abuse") or addresses
    exempt_recipients: tuple[str, ...] = ("postmaster", "abuse")
    # one Received-SPF field (RFC 7208 §9.1) per identity checked
    received_spf_header: bool = True
    # seconds one SPF evaluation may take in all (RFC 7208 §4.6.4: at least 20)
    time_limit_seconds: float = Field(20.0, gt=0, le=300)
    # the most SPF evaluations under way at once (each may have DNS questions out)
    max_concurrent_checks: int = Field(32, ge=1, le=1024)
    # sender domains that get their own label in smtp_spf_results_total
    metrics_domains: tuple[str, ...] = ()

    @field_validator("exempt_networks")
    @classmethod
    def _networks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for text in v:
            try:
                network = ipaddress.ip_network(text.strip(), strict=False)
            except ValueError:
                raise ValueError(
                    f"{text!r} is not a network; write an address or a CIDR network such as "
                    '"192.0.2.0/24" or "2001:db8::/32"') from None
            out.append(str(network))
        return tuple(out)

    @field_validator("exempt_recipients")
    @classmethod
    def _recipients(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for text in v:
            if not _RECIPIENT.match(text):
                raise ValueError(
                    f"{text!r} is not a recipient; write a local part such as \"abuse\" "
                    '(any domain) or an address such as "abuse@example.com"')
            out.append(text.lower())
        return tuple(out)

    @field_validator("metrics_domains")
    @classmethod
    def _domains(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for text in v:
            if not _DOMAIN.match(text):
                raise ValueError(f"{text!r} is not a domain; write it as example.com")
            if text.lower().rstrip(".") == "other":
                raise ValueError('"other" is the label of every domain not listed; '
                                 "it cannot be listed itself")
        return tuple(d.lower().rstrip(".") for d in v)
