"""Built-in Authentication-Results header (RFC 8601).

Received ``Authentication-Results`` fields that carry this server's
authserv-id are forgeries (or stale copies); the core removes them before the
hook runs (RFC 8601 §5). This module writes the one field naming this host
from every ``message_auth`` and ``data`` result, one result per folded line.
Property values that are not plain tokens or addresses are quoted, so a crafted
``MAIL FROM`` cannot inject a fake ``dkim=pass`` clause.
"""

from __future__ import annotations

import logging
import re

from .config import Settings
from .hookspecs import hookimpl
from .models import AuthResult

log = logging.getLogger("elemta.authres")

_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
_PVALUE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+(@[A-Za-z0-9.-]+)?\Z")
_PROPERTY = re.compile(r"[a-z][a-z0-9-]*\.[A-Za-z0-9][A-Za-z0-9.-]*\Z")


def quote(value: str) -> str:
    """A property value: bare when it is a token or an address, else a quoted-string."""
    if _PVALUE.match(value):
        return value
    return quoted_string(value)


def quoted_string(value: str) -> str:
    cleaned = "".join(c for c in value if c.isprintable())
    return '"' + cleaned.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_result(r: AuthResult) -> str | None:
    if not _TOKEN.match(r.method) or not _TOKEN.match(r.result):
        log.warning("dropping malformed authentication result %r", r)
        return None
    parts = [f"{r.method.lower()}={r.result.lower()}"]
    if r.reason:
        parts.append(f"reason={quoted_string(r.reason)}")
    for key, value in r.properties.items():
        if not _PROPERTY.match(key):
            log.warning("dropping malformed property %r of %s result", key, r.method)
            continue
        parts.append(f"{key}={quote(value)}")
    return " ".join(parts)


class AuthenticationResults:
    def __init__(self, settings: Settings) -> None:
        self.authserv_id = settings.server.hostname

    @hookimpl(trylast=True)
    def authentication_results_header(self, auth_results: list[AuthResult]) -> str:
        lines = [line for line in map(format_result, auth_results) if line]
        if not lines:
            return ""
        return self.authserv_id + ";\r\n\t" + ";\r\n\t".join(lines)


def make_plugin(settings: Settings) -> AuthenticationResults:
    return AuthenticationResults(settings)
