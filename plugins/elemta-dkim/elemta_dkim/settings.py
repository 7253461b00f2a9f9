"""``[plugins.dkim]``: what is verified, what is signed, with which keys."""

from __future__ import annotations

import datetime as dt
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# RFC 6376 §5.4.1: the fields a signer should sign, in the order they go into h=
DEFAULT_HEADERS = (
    "from", "to", "cc", "subject", "date", "message-id", "reply-to", "sender",
    "in-reply-to", "references", "mime-version", "content-type",
    "content-transfer-encoding", "list-id", "list-unsubscribe", "list-unsubscribe-post",
)
# signed once more than they occur, so that none can be added without breaking the signature
DEFAULT_OVERSIGN = ("from", "to", "subject", "date")
# RFC 6376 §5.4.1: fields a signer must not sign (trace fields that change in transit,
# fields removed in transit, and the signature itself)
NEVER_SIGNED = frozenset({"return-path", "received", "comments", "keywords", "bcc",
                          "resent-bcc", "dkim-signature", "authentication-results",
                          "arc-seal", "arc-message-signature", "arc-authentication-results"})

_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+\Z")  # RFC 5322 ftext
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN = re.compile(rf"(?:{_LABEL}\.)+{_LABEL}\Z")
_SELECTOR = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\Z")


def normalize_domain(value: str) -> str:
    """A domain as it goes into ``d=``: lower case, A-labels (``xn--``), no final dot.

    :raises ValueError: with what is wrong, for a value that is not a domain name.
    """
    text = value.strip().rstrip(".").lower()
    if not text.isascii():
        try:
            text = text.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"{value!r} is not a valid internationalized domain name; "
                             "write it with A-labels (xn--...)") from None
    if not _DOMAIN.match(text):
        raise ValueError(f"{value!r} is not a domain name (such as example.com)")
    return text


def check_selector(value: str) -> str:
    text = value.strip().lower()
    if not _SELECTOR.match(text):
        raise ValueError(f"selector {value!r} is not a DNS label (letters, digits and '-', "
                         "labels separated by '.', such as 2026a)")
    return text


def _utc(value: dt.datetime | dt.date | None) -> dt.datetime | None:
    if value is None:
        return None
    if not isinstance(value, dt.datetime):
        value = dt.datetime(value.year, value.month, value.day)
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc)


class KeySettings(BaseModel):
    """One ``[[plugins.dkim.keys]]`` entry: a private key that signs for ``domain``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    domain: str
    selector: str
    algorithm: Literal["rsa", "ed25519"] = "rsa"
    # relative to keys_dir
    key_file: str
    # signs only from not_before (inclusive) until not_after (exclusive); UTC when no
    # offset is given
    not_before: dt.datetime | dt.date | None = None
    not_after: dt.datetime | dt.date | None = None

    @field_validator("domain")
    @classmethod
    def _domain(cls, v: str) -> str:
        return normalize_domain(v)

    @field_validator("selector")
    @classmethod
    def _selector(cls, v: str) -> str:
        return check_selector(v)

    @field_validator("key_file")
    @classmethod
    def _key_file(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("key_file is empty; name the private key file, such as "
                             "\"example.com.2026a.key\" (`elemta dkim keygen` writes one)")
        return v

    @field_validator("not_before", "not_after")
    @classmethod
    def _when(cls, v: dt.datetime | dt.date | None) -> dt.datetime | None:
        return _utc(v)

    @model_validator(mode="after")
    def _window(self) -> KeySettings:
        if (self.not_before is not None and self.not_after is not None
                and self.not_after <= self.not_before):  # type: ignore[operator]
            raise ValueError(f"key {self.selector} of {self.domain}: not_after "
                             f"({self.not_after}) is not later than not_before "
                             f"({self.not_before}); the key would never sign")
        return self

    def valid_at(self, now: dt.datetime) -> bool:
        start, end = self.not_before, self.not_after
        return ((start is None or start <= now)  # type: ignore[operator]
                and (end is None or now < end))  # type: ignore[operator]


Canonicalization = Literal["relaxed/relaxed", "relaxed/simple", "simple/relaxed",
                           "simple/simple"]


def _header_names(value: list[str], key: str) -> list[str]:
    out: list[str] = []
    for name in value:
        lname = name.strip().lower()
        if not _FIELD_NAME.match(lname):
            raise ValueError(f"{key}: {name!r} is not a header field name")
        if lname in NEVER_SIGNED:
            raise ValueError(f"{key}: {name!r} must not be signed (RFC 6376 §5.4.1: it "
                             "changes or is removed in transit); take it out of the list")
        if lname not in out:
            out.append(lname)
    return out


class DkimSettings(BaseModel):
    """The validated ``[plugins.dkim]`` table (see the plugin's README for every key)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # verification of inbound signatures, in message_auth
    verify: bool = True
    verify_authenticated: bool = False
    max_signatures: int = Field(8, ge=1, le=64)
    partial_body_result: Literal["policy", "pass"] = "policy"
    # signing, in data
    sign_authenticated: bool = True
    sign_relay: bool = False
    sign_subdomains: bool = False
    keys_dir: str = "dkim"
    keys: list[KeySettings] = Field(default_factory=list)
    # keys of other domains, from a key store's dkim_keys hook (a datasource), kept this long
    hook_keys_cache_seconds: float = Field(60, ge=0)
    headers: list[str] = Field(default_factory=lambda: list(DEFAULT_HEADERS))
    oversign: list[str] = Field(default_factory=lambda: list(DEFAULT_OVERSIGN))
    canonicalization: Canonicalization = "relaxed/relaxed"
    expire_after_seconds: int = Field(0, ge=0)
    # worker threads for canonicalization and crypto
    threads: int = Field(2, ge=1, le=64)
    metrics_domains: list[str] = Field(default_factory=list)

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: list[str]) -> list[str]:
        names = _header_names(v, "headers")
        if "from" not in names:
            raise ValueError('headers: "from" is missing; From must always be signed '
                             "(RFC 6376 §5.4)")
        return names

    @field_validator("oversign")
    @classmethod
    def _oversign(cls, v: list[str]) -> list[str]:
        return _header_names(v, "oversign")

    @field_validator("metrics_domains")
    @classmethod
    def _metrics_domains(cls, v: list[str]) -> list[str]:
        return [normalize_domain(d) for d in v]

    @field_validator("keys_dir")
    @classmethod
    def _keys_dir(cls, v: str) -> str:
        if not v.strip():
            raise ValueError('keys_dir is empty; name a folder such as "dkim" (relative to '
                             "the folder of elemta.toml) or /etc/elemta/dkim")
        return v

    @model_validator(mode="after")
    def _unique_selectors(self) -> DkimSettings:
        seen: set[tuple[str, str]] = set()
        for key in self.keys:
            pair = (key.domain, key.selector)
            if pair in seen:
                raise ValueError(f"keys: selector {key.selector} of {key.domain} is listed "
                                 "twice; a selector names one DNS record, so give each key "
                                 "its own selector")
            seen.add(pair)
        return self
