"""The ``[plugins.acme]`` table (and its ``[plugins.acme.eab]`` sub-table)."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from pathlib import Path
from typing import Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from elemta import Secret

DIRECTORIES = {
    "production": "https://acme-v02.api.letsencrypt.org/directory",
    "staging": "https://acme-staging-v02.api.letsencrypt.org/directory",
}
"""Directory URLs selectable by name: Let's Encrypt's production and staging CAs."""

KeyType = Literal["ecdsa-p256", "rsa-2048", "rsa-3072", "rsa-4096"]
ChallengeType = Literal["http-01", "tls-alpn-01"]

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def normalize_name(value: str) -> str:
    """A host name as it goes into a certificate: lower case, A-labels, no final dot.

    Raises ``ValueError`` saying what is wrong with it.
    """
    name = value.strip().rstrip(".").lower()
    if not name:
        raise ValueError("an empty name; list host names such as \"mx.example.com\"")
    if name.startswith("*."):
        raise ValueError(f"{value!r}: wildcard names need the DNS-01 challenge, which this "
                         "plugin does not use; list every host name instead")
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        pass
    else:
        raise ValueError(f"{value!r} is an IP address; list host names (the names in the "
                         "MX records and the ones clients connect to)")
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"{value!r} is not a valid internationalized host name") from None
    labels = name.split(".")
    if len(labels) < 2:
        raise ValueError(f"{value!r} is not a fully-qualified name; a public CA issues "
                         "only for names such as \"mx.example.com\"")
    for label in labels:
        if not _LABEL.match(label):
            raise ValueError(f"{value!r}: label {label!r} is not a valid host name label "
                             "(letters, digits and '-', 1-63 characters, not starting or "
                             "ending with '-')")
    if len(name) > 253:
        raise ValueError(f"{value!r} is longer than 253 characters")
    return name


def parse_address(value: str, what: str) -> tuple[str | None, int]:
    """``"host:port"``, ``"[v6]:port"`` or ``":port"`` (every address) → (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f'{what} must be "host:port" or ":port" (every address), '
                         f"got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    number = int(port)
    if not 1 <= number <= 65535:
        raise ValueError(f"{what}: port must be 1..65535, got {number}")
    return (host or None), number


class EABSettings(BaseModel):
    """``[plugins.acme.eab]``: External Account Binding, for CAs that require it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kid: str = Field(min_length=1)
    hmac_key: Secret
    algorithm: Literal["HS256", "HS384", "HS512"] = "HS256"

    @field_validator("hmac_key")
    @classmethod
    def _base64url(cls, v: pydantic.SecretStr) -> pydantic.SecretStr:
        raw = v.get_secret_value().strip()
        try:
            decoded = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
        except (binascii.Error, ValueError):
            decoded = b""
        if not decoded or not re.fullmatch(r"[A-Za-z0-9_\-=]+", raw):
            raise ValueError("must be the base64url-encoded HMAC key your CA shows with the "
                             "key identifier (kid), copied as it is")
        return pydantic.SecretStr(raw)


class AcmeSettings(BaseModel):
    """``[plugins.acme]``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    names: tuple[str, ...] = Field((), validate_default=True)
    email: str | None = None
    agree_terms: bool = False
    directory: str = "production"
    ca_file: Path | None = None
    eab: EABSettings | None = None
    key_type: KeyType = "ecdsa-p256"
    challenges: tuple[ChallengeType, ...] = ("http-01",)
    http_address: str = ":80"
    tls_alpn_address: str = ":443"
    responders: Literal["on-demand", "always"] = "on-demand"
    renew_share: float = Field(1 / 3, gt=0, lt=1)
    renew_days: float | None = Field(None, gt=0)
    ari: bool = True
    retry_initial_seconds: float = Field(300.0, gt=0)
    retry_max_seconds: float = Field(21600.0, gt=0)
    order_timeout_seconds: float = Field(300.0, gt=0)
    request_timeout_seconds: float = Field(30.0, gt=0)
    state_dir: Path | None = None

    @field_validator("names", mode="before")
    @classmethod
    def _names_list(cls, v: object) -> object:
        if isinstance(v, str):
            raise ValueError('must be a list of host names: names = ["mx.example.com"]')
        return v

    @field_validator("names")
    @classmethod
    def _names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError('list the host names of the certificate: names = ["mx.example.com"] '
                             "(the names in your MX records and the ones clients connect to)")
        out: list[str] = []
        for value in v:
            name = normalize_name(value)
            if name not in out:
                out.append(name)
        if len(out) > 100:
            raise ValueError(f"{len(out)} names; a certificate holds at most 100")
        return tuple(out)

    @field_validator("email")
    @classmethod
    def _email(cls, v: str | None) -> str | None:
        if v is None:
            return None
        v = v.strip()
        if v.lower().startswith("mailto:"):
            raise ValueError(f"write the address without \"mailto:\": {v[7:]!r}")
        local, at, domain = v.rpartition("@")
        if not at or not local or " " in v or "," in v:
            raise ValueError(f"{v!r} is not an e-mail address (one address, such as "
                             "\"postmaster@example.com\")")
        try:
            normalize_name(domain)
        except ValueError:
            raise ValueError(f"{v!r}: the domain {domain!r} is not a valid host name; "
                             "CAs refuse contacts they cannot send mail to") from None
        return v

    @field_validator("directory")
    @classmethod
    def _directory(cls, v: str) -> str:
        v = v.strip()
        if v in DIRECTORIES:
            return v
        if v.startswith("https://") and len(v) > len("https://"):
            return v
        if v.startswith("http://"):
            raise ValueError(f"{v!r}: ACME (RFC 8555) runs over HTTPS only; use the https:// "
                             "URL of the directory")
        raise ValueError(f"{v!r}: use \"production\" or \"staging\" (Let's Encrypt), or the "
                         "https:// URL of an RFC 8555 directory")

    @field_validator("ca_file", "state_dir")
    @classmethod
    def _relative_to_config(cls, v: Path | None, info: pydantic.ValidationInfo) -> Path | None:
        if v is None:
            return None
        base = (info.context or {}).get("base_dir")
        path = Path(v).expanduser()
        if not path.is_absolute() and base is not None:
            path = Path(base, path).absolute()
        return path

    @field_validator("ca_file")
    @classmethod
    def _ca_file_exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError(f"{v}: no such file; name the PEM file of the root certificate "
                             "of your private ACME CA, or remove ca_file for a public CA")
        return v

    @field_validator("challenges")
    @classmethod
    def _challenges(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError('list at least one challenge type: "http-01" or "tls-alpn-01"')
        if len(set(v)) != len(v):
            raise ValueError(f"{list(v)} names a challenge type twice")
        return v

    @field_validator("http_address")
    @classmethod
    def _http_address(cls, v: str) -> str:
        parse_address(v, "http_address")
        return v

    @field_validator("tls_alpn_address")
    @classmethod
    def _tls_alpn_address(cls, v: str) -> str:
        parse_address(v, "tls_alpn_address")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> AcmeSettings:
        if self.retry_max_seconds < self.retry_initial_seconds:
            raise ValueError(f"retry_max_seconds ({self.retry_max_seconds:g}) is below "
                             f"retry_initial_seconds ({self.retry_initial_seconds:g}); raise "
                             "retry_max_seconds")
        if ("http-01" in self.challenges and "tls-alpn-01" in self.challenges
                and parse_address(self.http_address, "http_address")
                == parse_address(self.tls_alpn_address, "tls_alpn_address")):
            raise ValueError("http_address and tls_alpn_address are the same address; give "
                             "each challenge responder its own port (80 and 443)")
        return self

    @property
    def directory_url(self) -> str:
        return DIRECTORIES.get(self.directory, self.directory)

    @property
    def http_bind(self) -> tuple[str | None, int]:
        return parse_address(self.http_address, "http_address")

    @property
    def tls_alpn_bind(self) -> tuple[str | None, int]:
        return parse_address(self.tls_alpn_address, "tls_alpn_address")
