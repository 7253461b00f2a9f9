"""How the client connects: TLS policy, timeouts, and the client TLS contexts."""

from __future__ import annotations

import dataclasses
import functools
import ssl
from dataclasses import dataclass
from typing import Literal

TLSMode = Literal["none", "opportunistic", "required", "verify"]
_TLS_MODES = ("none", "opportunistic", "required", "verify")


@dataclass(frozen=True, slots=True)
class TLSPolicy:
    """How much TLS a connection insists on.

    ``none`` never sends STARTTLS. ``opportunistic`` uses it when offered,
    without checking the certificate, and falls back to plaintext when the
    handshake fails. ``required`` fails (temporarily) when STARTTLS is not
    offered or the handshake fails, still without checking the certificate.
    ``verify`` is ``required`` plus a certificate valid for the MX host name,
    checked against ``cafile`` or, without one, the system's CAs.
    """

    mode: TLSMode = "opportunistic"
    cafile: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in _TLS_MODES:
            raise ValueError(f"TLS mode must be one of {', '.join(_TLS_MODES)}, not {self.mode!r}")
        if self.cafile is not None and self.mode != "verify":
            raise ValueError("cafile is only used by TLS mode 'verify'")


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds to wait for each step; the defaults are RFC 5321 §4.5.3.2 and Postfix's."""

    connect_seconds: float = 30.0
    greeting_seconds: float = 300.0
    ehlo_seconds: float = 300.0
    starttls_seconds: float = 300.0
    auth_seconds: float = 120.0
    mail_seconds: float = 300.0
    rcpt_seconds: float = 300.0
    data_init_seconds: float = 120.0
    data_block_seconds: float = 180.0
    data_done_seconds: float = 600.0
    rset_seconds: float = 20.0
    quit_seconds: float = 5.0

    @classmethod
    def uniform(cls, seconds: float) -> Timeouts:
        """The same limit for every step (tests, probes)."""
        return cls(**{f.name: seconds for f in dataclasses.fields(cls)})

    @classmethod
    def scaled(cls, connect: float, command: float) -> Timeouts:
        """RFC 5321's per-step limits scaled so that the 5-minute ones become ``command``.

        The wait after the final dot keeps its longer share (10 minutes at
        300 s): that is when the server delivers (Sieve, quota checks, filters).
        """
        defaults = cls()
        scale = command / 300.0
        return cls(**{f.name: getattr(defaults, f.name) * scale
                      for f in dataclasses.fields(cls) if f.name != "connect_seconds"},
                   connect_seconds=connect)


@functools.lru_cache(maxsize=16)
def client_context(verify: bool, cafile: str | None) -> ssl.SSLContext:
    # Cached: loading the system CA store takes milliseconds, and every
    # connection would otherwise do it. A changed cafile needs a restart.
    if verify:
        return ssl.create_default_context(cafile=cafile)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def tls_reason(exc: BaseException) -> str:
    """Why a TLS handshake failed, in words for logs and results."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate not trusted: {exc.verify_message}"
    if isinstance(exc, TimeoutError):
        return "handshake timed out"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason
    return str(exc) or type(exc).__name__
