"""The ``[plugins.policy]`` table and its ``[[plugins.policy.services]]``."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

import pydantic
from pydantic import Field

_EXAMPLE = 'write "inet:127.0.0.1:10023" (TCP) or "unix:/var/run/policy.sock" (a unix socket)'
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}$")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a policy service listens: ``host``/``port`` for TCP, or ``path`` of a unix socket."""

    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def unix(self) -> bool:
        return bool(self.path)

    def __str__(self) -> str:
        if self.path:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"inet:{host}:{self.port}"


def parse_endpoint(text: str) -> Endpoint:
    """Postfix's ``check_policy_service`` notation: ``inet:host:port``, ``unix:/path``, or
    the short forms ``host:port`` and ``/path``. ``ValueError`` says what is wrong."""
    value = text.strip()
    if not value:
        raise ValueError(f"the address is empty; {_EXAMPLE}")
    if value.startswith("unix:") or value.startswith("/"):
        path = value.removeprefix("unix:")
        if not path.startswith("/"):
            raise ValueError(f"{text!r}: a unix socket needs an absolute path, such as "
                             "unix:/var/run/policy.sock")
        if len(path.encode()) > 107:
            raise ValueError(f"{text!r}: the socket path is longer than the 107 bytes a unix "
                             "socket address holds; use a shorter one")
        return Endpoint(path=path)
    rest = value.removeprefix("inet:")
    if rest.startswith("["):
        host, sep, port = rest[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r}: write an IPv6 address as inet:[::1]:10023")
    else:
        host, sep, port = rest.rpartition(":")
        if not sep:
            raise ValueError(f"{text!r} has no port; {_EXAMPLE}")
        if ":" in host:
            raise ValueError(f"{text!r}: put an IPv6 address in brackets, such as "
                             "inet:[::1]:10023")
    if not host:
        raise ValueError(f"{text!r} has no host; {_EXAMPLE}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    return Endpoint(host=host, port=int(port))


class ServiceSettings(pydantic.BaseModel):
    """One ``[[plugins.policy.services]]`` entry: a policy server and when to ask it."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    address: str
    name: str = ""                       # for logs and metrics; default: the address
    stage: Literal["rcpt", "end-of-message"] = "rcpt"
    policy_context: str = ""
    connect_timeout_seconds: float = Field(2.0, gt=0, le=60)
    request_timeout_seconds: float = Field(8.0, gt=0, le=300)
    max_connections: int = Field(4, ge=1, le=64)
    max_idle_seconds: float = Field(300.0, gt=0)
    max_ttl_seconds: float = Field(1000.0, gt=0)
    on_failure: Literal["tempfail", "accept"] = "tempfail"
    exempt_authenticated: bool = True
    exempt_relay_clients: bool = True
    exempt_networks: tuple[str, ...] = ()
    listeners: tuple[str, ...] = ()

    @pydantic.field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        return str(parse_endpoint(v))

    @pydantic.field_validator("policy_context")
    @classmethod
    def _context(cls, v: str) -> str:
        if any(c in v for c in "\r\n\0"):
            raise ValueError("policy_context must be one line of text")
        return v

    @pydantic.field_validator("exempt_networks")
    @classmethod
    def _networks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for net in v:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"{net!r} is not a network (write 192.0.2.0/24, "
                                 "2001:db8::/32 or a single address)") from None
        return v

    @pydantic.model_validator(mode="after")
    def _named(self) -> "ServiceSettings":
        if not self.name:
            object.__setattr__(self, "name", self.address.removeprefix("inet:"))
        elif not _NAME.match(self.name):
            raise ValueError(f"name {self.name!r}: use letters, digits and . _ - : / "
                             "(at most 64), such as \"postgrey\"")
        return self

    @property
    def endpoint(self) -> Endpoint:
        return parse_endpoint(self.address)

    @property
    def networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(n, strict=False) for n in self.exempt_networks)


class PolicySettings(pydantic.BaseModel):
    """The ``[plugins.policy]`` table."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    services: tuple[ServiceSettings, ...] = ()
    resolve_client_name: bool = True

    @pydantic.model_validator(mode="after")
    def _services(self) -> "PolicySettings":
        if not self.services:
            raise ValueError(
                "no policy service is configured: add one, such as\n"
                "    [[plugins.policy.services]]\n"
                "    name = \"postgrey\"\n"
                "    address = \"inet:127.0.0.1:10023\"\n"
                "  or remove \"policy\" from [plugins] enabled")
        seen: set[str] = set()
        for service in self.services:
            if service.name in seen:
                raise ValueError(f"two services are called {service.name!r}: give each "
                                 "[[plugins.policy.services]] a name of its own")
            seen.add(service.name)
        return self
