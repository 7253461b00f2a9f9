"""The ``[plugins.webhook]`` table and its ``[[plugins.webhook.targets]]`` entries."""

from __future__ import annotations

import fnmatch
import re
import urllib.parse
from pathlib import Path
from typing import Literal

import pydantic
from pydantic import Field

from elemta import Secret, check_secret, check_service_url

MIB = 1 << 20

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
# Answers that say "later" whatever on_4xx says; status_actions may override them. A 401
# is a signature the receiver does not accept: a wrong secret on one side, which must not
# bounce the mail while it is being fixed.
DEFAULT_STATUS_ACTIONS = {401: "defer", 408: "defer", 425: "defer", 429: "defer"}

_DOMAIN = re.compile(r"[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9_])?")


class TargetSettings(pydantic.BaseModel):
    """One receiving web service: which recipients go to it, and how it is posted to."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    name: str
    url: str
    secret: Secret
    domains: tuple[str, ...] = ()
    recipients: tuple[str, ...] = ()
    format: Literal["json", "multipart"] = "json"
    raw: bool = True
    max_message_bytes: int = Field(10 * MIB, ge=1)
    link_base: str | None = None
    on_4xx: Literal["bounce", "defer"] = "bounce"
    status_actions: dict[int, Literal["bounce", "defer"]] = {}
    connect_timeout_seconds: float = Field(10.0, gt=0, le=300)
    timeout_seconds: float = Field(60.0, gt=0, le=3600)
    max_connections: int = Field(10, ge=1, le=1000)
    ca_file: Path | None = None

    @pydantic.field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.fullmatch(v):
            raise ValueError(f"{v!r} is not a target name: use lower-case letters, digits, "
                             "'-' and '_' (up to 63), e.g. \"tickets\"; it names the target in "
                             "logs, metrics and the X-Elemta-Target header")
        return v

    @pydantic.field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return check_service_url(v, "https://hooks.example.com/inbound-mail")

    @pydantic.field_validator("secret")
    @classmethod
    def _secret(cls, v: pydantic.SecretStr) -> pydantic.SecretStr:
        check_secret(v.get_secret_value())
        return v

    @pydantic.field_validator("domains")
    @classmethod
    def _domains(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for domain in v:
            d = domain.strip().lower().rstrip(".")
            if not d.isascii():
                try:
                    d = d.encode("idna").decode("ascii")
                except UnicodeError:
                    raise ValueError(f"{domain!r} is not a domain name") from None
            if not _DOMAIN.fullmatch(d):
                hint = (" (for address patterns use `recipients`)"
                        if "@" in d or "*" in d else "")
                raise ValueError(f"{domain!r} is not a domain name, e.g. \"in.example.com\""
                                 f"{hint}")
            out.append(d)
        return tuple(out)

    @pydantic.field_validator("recipients")
    @classmethod
    def _recipients(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for pattern in v:
            p = pattern.strip().lower()
            if not p or (p != "*" and "@" not in p):
                raise ValueError(f"{pattern!r} is not an address pattern: write "
                                 "\"tickets@example.com\", \"support+*@example.com\", "
                                 "\"*@in.example.com\", or \"*\" for every recipient")
            out.append(p)
        return tuple(out)

    @pydantic.field_validator("link_base")
    @classmethod
    def _link_base(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urllib.parse.urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{v!r} is not an http:// or https:// URL with a host; the link "
                             "sent for a large message is this URL, '/' and the queue id, "
                             "e.g. \"https://archive.example.com/raw\"")
        if parts.query or parts.fragment:
            raise ValueError(f"{v!r}: the queue id is appended to the path, so give no "
                             "?query or #fragment")
        return v.rstrip("/")

    @pydantic.field_validator("status_actions")
    @classmethod
    def _status_actions(cls, v: dict[int, str]) -> dict[int, str]:
        wrong = sorted(code for code in v if not 300 <= code <= 599)
        if wrong:
            raise ValueError(f"HTTP status {', '.join(map(str, wrong))}: only 3xx, 4xx and "
                             "5xx answers can be bounced or deferred (2xx is a delivery), "
                             "e.g. { 429 = \"defer\", 501 = \"bounce\" }")
        return v

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> "TargetSettings":
        if self.ca_file is not None and not self.url.lower().startswith("https://"):
            raise ValueError(f"target {self.name}: ca_file is only used for an https:// url; "
                             f"{self.url} is plain HTTP")
        return self

    def action_for(self, status: int) -> str:
        """What an HTTP status means for the recipients: ``delivered``, ``defer`` or ``bounce``."""
        if 200 <= status < 300:
            return "delivered"
        action = self.status_actions.get(status) or DEFAULT_STATUS_ACTIONS.get(status)
        if action is not None:
            return action
        if 400 <= status < 500:
            return self.on_4xx
        return "defer"

    @property
    def catch_all(self) -> bool:
        """Neither ``domains`` nor ``recipients``: every recipient of a local domain."""
        return not self.domains and not self.recipients

    def matches(self, address: str, local_domains: frozenset[str]) -> bool:
        """Whether this target takes ``address`` (compared in lower case)."""
        address = address.lower()
        domain = address.rpartition("@")[2].rstrip(".")
        if self.catch_all:
            return bool(domain) and domain in local_domains
        if domain and domain in self.domains:
            return True
        return any(fnmatch.fnmatchcase(address, p) for p in self.recipients)


class WebhookSettings(pydantic.BaseModel):
    """``[plugins.webhook]``: the transport's name and its targets, matched in order."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    transport: str = Field("webhook", min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    targets: tuple[TargetSettings, ...] = ()

    @pydantic.field_validator("transport")
    @classmethod
    def _transport(cls, v: str) -> str:
        if v in ("smtp", "local"):
            raise ValueError(f"{v!r} is the name of another transport (the built-in SMTP "
                             "transport, or local delivery); keep \"webhook\"")
        return v

    @pydantic.field_validator("targets")
    @classmethod
    def _targets(cls, v: tuple[TargetSettings, ...]) -> tuple[TargetSettings, ...]:
        names = [t.name for t in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"target name used twice: {', '.join(dupes)} (each "
                             "[[plugins.webhook.targets]] needs its own name)")
        catch_alls = [t.name for t in v if t.catch_all]
        if len(catch_alls) > 1:
            raise ValueError(f"targets {', '.join(catch_alls)} are all catch-alls (no domains "
                             "and no recipients); only the first could ever be used")
        return v

    def target_for(self, address: str, local_domains: frozenset[str]) -> TargetSettings | None:
        """The first target that takes ``address``, or ``None``."""
        for target in self.targets:
            if target.matches(address, local_domains):
                return target
        return None

    def target_named(self, name: str) -> TargetSettings | None:
        for target in self.targets:
            if target.name == name:
                return target
        return None
