"""The ``[plugins.lmtp]`` table and the LMTP server address it names."""

from __future__ import annotations

from dataclasses import dataclass
import pydantic
from pydantic import Field

from elemta import lmtp_remote

UNIX_PREFIX = "unix:"
_FORMS = ('"unix:PATH" for a unix socket (Dovecot: "unix:/var/run/dovecot/lmtp") or '
          '"host:port" for TCP (such as "127.0.0.1:24")')


@dataclass(frozen=True, slots=True)
class LMTPAddress:
    """Where the LMTP server listens: a unix socket ``path``, or ``host`` and ``port``."""

    host: str | None = None
    port: int = 0
    path: str | None = None

    @property
    def remote(self) -> str:
        """The configured address as a name: ``lmtp:unix:/path`` or ``lmtp:host:port``.

        Outcomes name a unix socket's server after this host instead
        (:class:`~elemta_lmtp.transport.LMTPTransport`): a path is no name for a sender.
        """
        return lmtp_remote(self.host or "", self.port, self.path)


def parse_address(value: str) -> LMTPAddress:
    """``"unix:/run/dovecot/lmtp"`` or ``"127.0.0.1:24"`` / ``"[::1]:24"`` / ``"dovecot:24"``.

    Raises ``ValueError`` saying which two forms are accepted.
    """
    if value.startswith(UNIX_PREFIX):
        path = value[len(UNIX_PREFIX):]
        if not path.strip():
            raise ValueError(f"the unix socket path is missing; use {_FORMS}")
        return LMTPAddress(path=path)
    if value.startswith("/"):
        raise ValueError(f'{value!r} looks like a socket path: write "unix:{value}" '
                         f"(accepted: {_FORMS})")
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or any(c.isspace() for c in host) or not port.isdigit() \
            or not 0 < int(port) < 65536:
        raise ValueError(f"must be {_FORMS}, got {value!r}")
    return LMTPAddress(host=host, port=int(port))


class LMTPSettings(pydantic.BaseModel):
    """``[plugins.lmtp]``: the LMTP server and how to talk to it."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    address: str
    transport: str = Field("local", min_length=1)
    lhlo_name: str | None = Field(None, min_length=1, pattern=r"^\S+$")
    connect_timeout_seconds: float = Field(30, gt=0)
    command_timeout_seconds: float = Field(300, gt=0)
    max_connections: int = Field(10, ge=1)
    reuse_connections: bool = True

    @pydantic.field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        parse_address(value)
        return value

    @property
    def target(self) -> LMTPAddress:
        return parse_address(self.address)
