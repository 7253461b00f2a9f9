"""The ``[plugins.dmarc]`` table and its ``reports`` table (every key is in the README)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pydantic
from pydantic import ConfigDict, Field, field_validator

from .domains import normalize_domain

__all__ = ["DmarcSettings", "ReportSettings"]


class ReportSettings(pydantic.BaseModel):
    """``[plugins.dmarc.reports]``: the aggregate-report data kept in SQLite."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    # default: <[server] state_dir>/dmarc-reports.sqlite3; relative to the config's folder
    path: Path | None = None
    retention_days: int = Field(14, ge=1, le=3650)
    max_rows: int = Field(1_000_000, ge=1000, le=1_000_000_000)


class DmarcSettings(pydantic.BaseModel):
    """``[plugins.dmarc]``: what a DMARC result does to a message."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # a From: header without exactly one author domain: refuse it, or evaluate each domain
    bad_from: Literal["reject", "evaluate"] = "reject"
    # a DNS failure: accept and annotate dmarc=temperror, or answer 451 so the client retries
    on_temperror: Literal["accept", "tempfail"] = "accept"
    # p=reject is applied as quarantine
    never_reject: bool = False
    # From domains (and their subdomains) whose policy is not applied; still annotated
    exempt_domains: tuple[str, ...] = ()
    skip_authenticated: bool = True
    skip_relay: bool = True
    # honour the PRIVATE section of the Public Suffix List (github.io users are apart)
    psl_private_domains: bool = True
    # a Public Suffix List file to use instead of the bundled one
    public_suffix_list: Path | None = None
    # From domains that get a label of their own in smtp_dmarc_results_total
    metrics_domains: tuple[str, ...] = ()
    reports: ReportSettings = ReportSettings()

    @field_validator("exempt_domains", "metrics_domains")
    @classmethod
    def _domains(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out: list[str] = []
        for value in v:
            domain = normalize_domain(value)
            if domain is None:
                raise ValueError(f"{value!r} is not a domain name; write it as "
                                 "\"example.org\" (no address, no wildcard)")
            if domain not in out:
                out.append(domain)
        return tuple(out)
