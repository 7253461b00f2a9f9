"""The ``[plugins.mtahooks]`` table and its ``[[plugins.mtahooks.hooks]]`` entries."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import pydantic
from pydantic import Field

from elemta import Secret, check_secret, check_service_url

INBOUND_STAGES = ("connect", "ehlo", "auth", "mail", "rcpt", "data")
DECIDING_OUTBOUND_STAGES = ("route", "deliver")
NOTIFY_STAGES = ("delivered", "deferred", "bounced")
OUTBOUND_STAGES = DECIDING_OUTBOUND_STAGES + NOTIFY_STAGES
STAGES = INBOUND_STAGES + OUTBOUND_STAGES

Stage = Literal["connect", "ehlo", "auth", "mail", "rcpt", "data",
                "route", "deliver", "delivered", "deferred", "bounced"]

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


class HookSettings(pydantic.BaseModel):
    """One HTTP hook: where it is, at which stages it is asked, and how it may fail."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    name: str
    url: str
    stages: tuple[Stage, ...]
    secret: Secret
    timeout_seconds: float = Field(5.0, gt=0, le=300)
    on_failure: Literal["tempfail", "accept"] = "tempfail"
    max_concurrency: int = Field(16, ge=1, le=1024)
    body: Literal["none", "base64", "text"] = "none"
    max_body_bytes: int = Field(1_048_576, ge=1, le=1 << 30)
    body_over_limit: Literal["truncate", "omit"] = "truncate"
    max_response_bytes: int = Field(4_194_304, ge=1024, le=1 << 30)
    ca_file: Path | None = None
    listeners: tuple[str, ...] = ()

    @pydantic.field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.fullmatch(v):
            raise ValueError(f"{v!r} is not a hook name: use lower-case letters, digits, '-' "
                             "and '_' (up to 63), e.g. \"policy\"; it names the hook in logs "
                             "and metrics")
        return v

    @pydantic.field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return check_service_url(v, "https://policy.example.net/mta-hook")

    @pydantic.field_validator("stages")
    @classmethod
    def _stages(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("list at least one stage: " + ", ".join(STAGES))
        dupes = sorted({s for s in v if v.count(s) > 1})
        if dupes:
            raise ValueError(f"stage listed twice: {', '.join(dupes)}")
        return v

    @pydantic.field_validator("secret")
    @classmethod
    def _secret(cls, v: pydantic.SecretStr) -> pydantic.SecretStr:
        check_secret(v.get_secret_value())
        return v

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> "HookSettings":
        if self.ca_file is not None and not self.url.lower().startswith("https://"):
            raise ValueError(f"hook {self.name}: ca_file is only used for an https:// url; "
                             f"{self.url} is plain HTTP")
        return self

    @property
    def inbound(self) -> bool:
        return any(s in INBOUND_STAGES for s in self.stages)


class MtaHooksSettings(pydantic.BaseModel):
    """``[plugins.mtahooks]``: a list of hooks, asked in this order at each stage."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    hooks: tuple[HookSettings, ...] = ()

    @pydantic.field_validator("hooks")
    @classmethod
    def _unique_names(cls, v: tuple[HookSettings, ...]) -> tuple[HookSettings, ...]:
        names = [h.name for h in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"hook name used twice: {', '.join(dupes)} (each "
                             "[[plugins.mtahooks.hooks]] needs its own name)")
        return v

    def for_stage(self, stage: str) -> tuple[HookSettings, ...]:
        return tuple(h for h in self.hooks if stage in h.stages)
