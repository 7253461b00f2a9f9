"""``[plugins.milter]``: the milters to call, in order, and how to treat each one."""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
ADDRESS_HELP = ("write inet:HOST:PORT (inet:127.0.0.1:8891), inet:PORT@HOST "
                "(Sendmail's form), inet6:[ADDR]:PORT or unix:/path/to/socket")


@dataclass(frozen=True)
class SocketAddress:
    """Where a milter listens: ``("inet", host, port)`` or ``("unix", path, 0)``."""

    kind: Literal["inet", "unix"]
    host: str
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.host}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"inet:{host}:{self.port}"


@functools.lru_cache(maxsize=256)
def parse_address(text: str) -> SocketAddress:
    """A milter socket as Postfix or Sendmail write it; ``ValueError`` says what to write."""
    raw = text.strip()
    scheme, sep, rest = raw.partition(":")
    scheme = scheme.lower()
    if not sep or scheme not in ("inet", "inet6", "unix", "local"):
        raise ValueError(f"address {text!r} is not a milter socket; {ADDRESS_HELP}")
    if scheme in ("unix", "local"):
        if not rest.startswith("/"):
            raise ValueError(f"address {text!r}: a unix socket needs an absolute path "
                             "(unix:/run/opendkim/opendkim.sock)")
        return SocketAddress("unix", rest)
    if "@" in rest:                                   # Sendmail: inet:8891@127.0.0.1
        port_text, _, host = rest.partition("@")
    elif rest.startswith("["):                        # inet6:[::1]:8891
        host, _, port_text = rest[1:].partition("]")
        port_text = port_text.lstrip(":")
    else:                                             # Postfix: inet:127.0.0.1:8891
        host, _, port_text = rest.rpartition(":")
    host = host.strip("[]")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"address {text!r} needs a host and a port from 1 to 65535; "
                         f"{ADDRESS_HELP}")
    if host == "*":
        raise ValueError(f"address {text!r}: '*' is where a milter listens, not an address "
                         "to connect to; write its IP address or host name")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9.-]+", host):
            raise ValueError(f"address {text!r}: {host!r} is neither an IP address nor a "
                             "host name") from None
    return SocketAddress("inet", host, int(port_text))


class MilterSettings(BaseModel):
    """One entry of ``[[plugins.milter.milters]]``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # a short name for logs and metrics ("opendkim", "rspamd")
    name: str
    # where the milter listens (inet:127.0.0.1:8891, inet:8891@127.0.0.1, unix:/path)
    address: str
    # TCP (or unix socket) connect, and the option negotiation that follows
    connect_timeout_seconds: float = Field(5.0, gt=0, le=300)
    # the wait for each reply (and for the milter to read what was sent)
    command_timeout_seconds: float = Field(10.0, gt=0, le=3600)
    # the wait from the end of the message to the milter's final answer, all its
    # modifications and progress replies included
    end_timeout_seconds: float = Field(20.0, gt=0, le=3600)
    # what happens when the milter cannot be reached, times out, closes the connection
    # or breaks the protocol: 451 (tempfail), go on without it (accept), or 550 (reject)
    on_failure: Literal["tempfail", "accept", "reject"] = "tempfail"
    # whether mail of authenticated sessions goes through this milter
    authenticated: bool = True
    # whether mail of sessions allowed to relay without AUTH ([server] relay_networks)
    # goes through this milter
    relay: bool = True
    # keep the connection of a finished SMTP session for the next one (SMFIC_QUIT_NC):
    # "auto" when libmilter's state machine takes it (the session's last message ended
    # with SMFIR_CONTINUE), "always" for milters that take it in any state (rspamd),
    # "never"
    reuse_connections: Literal["auto", "always", "never"] = "auto"
    # at most this many idle connections are kept
    max_idle_connections: int = Field(16, ge=0, le=1024)
    # an idle connection older than this is closed rather than reused
    idle_timeout_seconds: float = Field(30.0, gt=0, le=3600)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME.match(v):
            raise ValueError(f"name {v!r}: use letters, digits, '_', '-' and '.' "
                             "(it labels logs and metrics), such as \"opendkim\"")
        return v

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        parse_address(v)
        return v.strip()

    @model_validator(mode="after")
    def _timeouts(self) -> "MilterSettings":
        if self.end_timeout_seconds < self.command_timeout_seconds:
            raise ValueError(
                f"milter {self.name}: end_timeout_seconds ({self.end_timeout_seconds:g}) is "
                f"shorter than command_timeout_seconds ({self.command_timeout_seconds:g}); "
                "the end of the message is the longest wait, make it at least as long")
        return self

    @property
    def socket(self) -> SocketAddress:
        return parse_address(self.address)


class MilterPluginSettings(BaseModel):
    """The validated ``[plugins.milter]`` table (see the plugin's README for every key)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # the milters, called in this order at every stage
    milters: list[MilterSettings] = Field(default_factory=list)
    # look up the client's host name (PTR, confirmed by a forward lookup) for
    # SMFIC_CONNECT and {client_name}; otherwise, and when it fails, "unknown" (as Postfix)
    client_name_lookup: bool = False

    @field_validator("milters")
    @classmethod
    def _unique(cls, v: list[MilterSettings]) -> list[MilterSettings]:
        seen: set[str] = set()
        for m in v:
            if m.name in seen:
                raise ValueError(f"two milters are called {m.name!r}; give each a name of "
                                 "its own")
            seen.add(m.name)
        return v
