"""Calling web services from a plugin: URL and secret checks, signed bodies, client TLS.

Plugins that POST to an operator's HTTP service (policy hooks, webhooks) share
one signing scheme, so that one receiver function verifies all of them::

    X-Elemta-Timestamp: <unix seconds>
    X-Elemta-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>." + body>

and the same rules for the settings an operator writes: an http(s) URL with
a host and no credentials or fragment, a secret of at least 16 characters.
TLS to a service always verifies, against the system's CAs or a given file.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import ssl
import urllib.parse
from pathlib import Path

__all__ = ["check_secret", "check_service_url", "existing_ca_file", "plain_http_host",
           "service_origin", "service_tls_context", "sign_body"]

MIN_SECRET_CHARS = 16


def check_service_url(url: str, example: str) -> str:
    """``url`` if it is an ``http://`` or ``https://`` URL with a host, no credentials, no
    fragment and a valid port; else ``ValueError`` saying what to write (``example``)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// or https:// URL with a host, e.g. "
                         f"\"{example}\"")
    if parts.username or parts.password:
        raise ValueError("put no credentials in the URL: requests are signed with "
                         "`secret` instead")
    if parts.fragment:
        raise ValueError(f"{url!r}: a URL fragment (#...) is never sent; remove it")
    try:
        parts.port
    except ValueError:
        raise ValueError(f"{url!r}: the port is not a number from 0 to 65535") from None
    return url


def check_secret(secret: str) -> None:
    """``ValueError`` unless ``secret`` is long enough to sign with."""
    if len(secret) < MIN_SECRET_CHARS:
        raise ValueError(f"the secret must be at least {MIN_SECRET_CHARS} characters (32 "
                         "random ones are better: `openssl rand -hex 32`)")


def sign_body(secret: bytes, timestamp: int, body: bytes) -> str:
    """The ``X-Elemta-Signature`` value: ``sha256=`` and the hex HMAC-SHA256 of
    ``"<timestamp>." + body`` keyed with ``secret``."""
    mac = hmac.new(secret, str(timestamp).encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def service_origin(url: str) -> str:
    """``scheme://host:port`` of ``url``: what logs and bounces may name, since a service
    URL's path or query often holds a token."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}:{port}"


def plain_http_host(url: str) -> str | None:
    """The host ``url`` sends to over plain HTTP beyond this machine (worth a warning), or
    ``None`` for ``https://`` and for loopback."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http":
        return None
    host = parts.hostname or ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    return None if loopback else host


def existing_ca_file(ca_file: Path | None, whose: str = "the service") -> Path | None:
    """``ca_file`` (already resolved against the configuration's folder), or
    ``ValueError`` saying what it should be when there is no such file."""
    if ca_file is not None and not ca_file.is_file():
        raise ValueError(f"ca_file {ca_file} does not exist (a PEM file of the CA certificate "
                         f"that signed {whose}'s certificate)")
    return ca_file


def service_tls_context(ca_file: Path | None, whose: str = "the service") -> ssl.SSLContext:
    """A client context that always verifies: the system's trusted CAs, or only those of
    ``ca_file``; ``ValueError`` naming the file when it cannot be read."""
    if ca_file is None:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"ca_file {ca_file}: {getattr(e, 'strerror', None) or e} (it must be "
                         f"a PEM file of the CA certificate(s) that signed {whose}'s "
                         "certificate)") from None
