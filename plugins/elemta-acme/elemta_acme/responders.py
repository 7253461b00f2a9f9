"""The challenge responders the CA connects to while it validates an order.

**HTTP-01** (RFC 8555, section 8.3): a minimal HTTP/1.1 server that answers
``GET``/``HEAD /.well-known/acme-challenge/<token>`` with the key
authorization, and ``404`` to everything else.

**TLS-ALPN-01** (RFC 8737): a TLS server that presents, to a client whose
ClientHello offers the ALPN protocol ``acme-tls/1`` and names a host being
validated (SNI), a self-signed certificate for that name carrying the critical
id-pe-acmeIdentifier extension with the SHA-256 of the key authorization. It
reads the ClientHello itself before any TLS is spoken, so that a client that
does not offer ``acme-tls/1`` (a browser, a scanner) gets a
``no_application_protocol`` alert and never sees the challenge certificate;
the handshake then runs through memory BIOs with the bytes already read.

Both answer from the challenges of this process, and in ``responders =
"always"`` mode also from the state directory's ``challenges/`` folder, where
the node that orders writes them, so that whichever node of a cluster the CA
reaches can answer.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import ssl
from dataclasses import dataclass
from typing import Any, Iterable

from .certs import ACME_TLS_ALPN, alpn_challenge_context
from .store import Store

log = logging.getLogger("elemta.acme")

HTTP01 = "http-01"
TLSALPN01 = "tls-alpn-01"
CHALLENGE_PATH = "/.well-known/acme-challenge/"

CLIENT_TIMEOUT_SECONDS = 10.0
MAX_CONNECTIONS = 64
"""Connections a responder serves at once; more are closed at once (the CA opens a few)."""
MAX_HTTP_HEAD = 8192
MAX_CLIENT_HELLO = 65536
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,256}$")

# TLS alert records (TLS 1.2 framing, fatal): no_application_protocol (120), unrecognized_name (112)
ALERT_NO_APPLICATION_PROTOCOL = bytes([21, 3, 3, 0, 2, 2, 120])
ALERT_UNRECOGNIZED_NAME = bytes([21, 3, 3, 0, 2, 2, 112])


class ResponderError(Exception):
    """A responder cannot listen; ``str()`` names the address and the fix."""


# ------------------------------------------------------------------ ClientHello


@dataclass(frozen=True)
class ClientHello:
    """What the TLS-ALPN-01 responder needs of a ClientHello."""

    server_name: str | None
    alpn: tuple[str, ...]


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("ClientHello truncated")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def number(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, length_bytes: int) -> bytes:
        return self.take(self.number(length_bytes))

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def parse_client_hello(data: bytes) -> ClientHello | None:
    """The SNI and ALPN offers of the ClientHello at the start of ``data``.

    ``None`` while more bytes are needed (a ClientHello may span TLS records);
    ``ValueError`` when the bytes are not a TLS ClientHello.
    """
    handshake = bytearray()
    pos = 0
    while True:
        if len(data) < pos + 5:
            return None
        content_type, major, length = data[pos], data[pos + 1], int.from_bytes(
            data[pos + 3:pos + 5], "big")
        if content_type != 22 or major != 3:
            raise ValueError("not a TLS handshake record")
        if length == 0 or length > 16384:
            raise ValueError(f"TLS record of {length} bytes")
        if len(data) < pos + 5 + length:
            return None
        handshake += data[pos + 5:pos + 5 + length]
        pos += 5 + length
        if len(handshake) >= 4:
            if handshake[0] != 1:
                raise ValueError("the first handshake message is not a ClientHello")
            size = int.from_bytes(handshake[1:4], "big")
            if size > MAX_CLIENT_HELLO:
                raise ValueError(f"ClientHello of {size} bytes")
            if len(handshake) >= 4 + size:
                return _parse_hello_body(bytes(handshake[4:4 + size]))


def _parse_hello_body(body: bytes) -> ClientHello:
    r = _Reader(body)
    r.take(2 + 32)          # legacy_version, random
    r.vector(1)             # legacy_session_id
    r.vector(2)             # cipher_suites
    r.vector(1)             # legacy_compression_methods
    server_name: str | None = None
    alpn: list[str] = []
    if r.left == 0:
        return ClientHello(None, ())
    extensions = _Reader(r.vector(2))
    while extensions.left:
        kind = extensions.number(2)
        ext = _Reader(extensions.vector(2))
        if kind == 0:       # server_name
            names = _Reader(ext.vector(2))
            while names.left:
                name_type = names.number(1)
                host = names.vector(2)
                if name_type == 0 and server_name is None:
                    server_name = host.decode("ascii", "replace").lower().rstrip(".")
        elif kind == 16:    # application_layer_protocol_negotiation
            protocols = _Reader(ext.vector(2))
            while protocols.left:
                alpn.append(protocols.vector(1).decode("ascii", "replace"))
    return ClientHello(server_name, tuple(alpn))


# ------------------------------------------------------------------ the responders


def _bind_error(typ: str, address: str, e: OSError) -> ResponderError:
    port_hint = "80" if typ == HTTP01 else "443"
    if e.errno == errno.EACCES:
        fix = ("ports below 1024 need root or CAP_NET_BIND_SERVICE (with systemd: "
               "AmbientCapabilities=CAP_NET_BIND_SERVICE), or listen on a high port and "
               f"forward port {port_hint} to it")
    elif e.errno == errno.EADDRINUSE:
        fix = ("another program uses it: stop it, or give the responder another address "
               f"and forward the CA's connections to port {port_hint} there"
               + (" (a web server can proxy /.well-known/acme-challenge/)"
                  if typ == HTTP01 else ""))
    elif e.errno == errno.EADDRNOTAVAIL:
        fix = "this host has no such address; use one of its addresses, or \":port\" for all"
    else:
        fix = "check the address"
    setting = "http_address" if typ == HTTP01 else "tls_alpn_address"
    return ResponderError(f"cannot listen on {address} ({setting}) for the {typ} challenge: "
                          f"{e.strerror or e}; {fix}")


class Responders:
    """The HTTP-01 and TLS-ALPN-01 responders of one process.

    ``shared=True`` (``responders = "always"``) also answers challenges found in
    the state directory, written there by the node that orders.
    """

    def __init__(self, settings: Any, store: Store, *, shared: bool = False) -> None:
        self.settings = settings
        self.store = store
        self.shared = shared
        self._http: dict[str, str] = {}                  # token → key authorization
        self._alpn: dict[str, ssl.SSLContext] = {}       # name → challenge context
        self._alpn_shared: dict[tuple[str, str], ssl.SSLContext] = {}
        self._servers: dict[str, asyncio.base_events.Server] = {}
        self.served: list[tuple[str, str]] = []          # (type, name or token): for logs/tests
        self._connections = 0

    # ------------------------------------------------------------ lifecycle

    async def start(self, types: Iterable[str]) -> None:
        """Listen for the given challenge types (those not listening yet)."""
        for typ in types:
            if typ in self._servers:
                continue
            if typ == HTTP01:
                host, port = self.settings.http_bind
                address, handler = self.settings.http_address, self._serve_http
            elif typ == TLSALPN01:
                host, port = self.settings.tls_alpn_bind
                address, handler = self.settings.tls_alpn_address, self._serve_alpn
            else:
                raise ValueError(f"unknown challenge type {typ!r}")
            try:
                server = await asyncio.start_server(handler, host, port, reuse_address=True,
                                                    limit=MAX_HTTP_HEAD)
            except OSError as e:
                raise _bind_error(typ, address, e) from None
            self._servers[typ] = server
            log.info("ACME: %s responder listening on %s", typ, address)

    async def stop(self) -> None:
        servers, self._servers = list(self._servers.items()), {}
        for typ, server in servers:
            server.close()
        for typ, server in servers:
            await server.wait_closed()
            log.info("ACME: %s responder stopped", typ)

    @property
    def listening(self) -> list[str]:
        return sorted(self._servers)

    # ------------------------------------------------------------ challenges

    def add_http(self, token: str, key_authorization: str) -> None:
        self._http[token] = key_authorization

    def remove_http(self, token: str) -> None:
        self._http.pop(token, None)

    async def add_alpn(self, name: str, key_authorization: str) -> None:
        self._alpn[name] = await asyncio.to_thread(alpn_challenge_context, name,
                                                   key_authorization)

    def remove_alpn(self, name: str) -> None:
        self._alpn.pop(name, None)

    async def _shared_challenges(self) -> list[dict[str, Any]]:
        if not self.shared:
            return []
        return await asyncio.to_thread(self.store.challenge_files)

    async def _http_answer(self, token: str) -> str | None:
        if token in self._http:
            return self._http[token]
        for c in await self._shared_challenges():
            if c.get("type") == HTTP01 and c.get("token") == token:
                return str(c.get("key_authorization"))
        return None

    async def _alpn_context(self, name: str | None) -> ssl.SSLContext | None:
        if name is None:
            return None
        if name in self._alpn:
            return self._alpn[name]
        for c in await self._shared_challenges():
            if c.get("type") == TLSALPN01 and c.get("name") == name:
                key = (name, str(c.get("key_authorization")))
                if key not in self._alpn_shared:
                    self._alpn_shared = {key: await asyncio.to_thread(
                        alpn_challenge_context, *key)}
                return self._alpn_shared[key]
        return None

    # ------------------------------------------------------------ HTTP-01

    async def _serve_http(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        if self._connections >= MAX_CONNECTIONS:
            writer.close()
            return
        self._connections += 1
        peer = writer.get_extra_info("peername")
        try:
            async with asyncio.timeout(CLIENT_TIMEOUT_SECONDS):
                head = await reader.readuntil(b"\r\n\r\n")
                request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
                parts = request_line.split(" ")
                answer = None
                if len(parts) == 3 and parts[0] in ("GET", "HEAD") \
                        and parts[1].startswith(CHALLENGE_PATH):
                    token = parts[1][len(CHALLENGE_PATH):]
                    if _TOKEN.match(token):
                        answer = await self._http_answer(token)
                if answer is not None:
                    body = answer.encode("ascii")
                    status = "200 OK"
                    self.served.append((HTTP01, token))
                    log.info("ACME: answered the http-01 challenge %s for %s", token, peer)
                else:
                    body = b"not found\n"
                    status = "404 Not Found"
                    log.debug("ACME: http-01 responder: 404 for %r from %s",
                              request_line[:200], peer)
                writer.write(f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\n"
                             f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                             .encode("ascii"))
                if parts[0] != "HEAD":
                    writer.write(body)
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ConnectionError, UnicodeError, ValueError):
            pass
        finally:
            self._connections -= 1
            writer.close()

    # ------------------------------------------------------------ TLS-ALPN-01

    async def _serve_alpn(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        if self._connections >= MAX_CONNECTIONS:
            writer.close()
            return
        self._connections += 1
        peer = writer.get_extra_info("peername")
        try:
            async with asyncio.timeout(CLIENT_TIMEOUT_SECONDS):
                await self._alpn_handshake(reader, writer, peer)
        except (TimeoutError, ConnectionError, ValueError, ssl.SSLError) as e:
            log.debug("ACME: tls-alpn-01 responder: %s from %s", e, peer)
        finally:
            self._connections -= 1
            writer.close()

    async def _alpn_handshake(self, reader: asyncio.StreamReader,
                              writer: asyncio.StreamWriter, peer: Any) -> None:
        data = b""
        hello = None
        while hello is None:
            chunk = await reader.read(4096)
            if not chunk:
                return
            data += chunk
            if len(data) > MAX_CLIENT_HELLO + 1024:
                raise ValueError("ClientHello too large")
            hello = parse_client_hello(data)
        if ACME_TLS_ALPN not in hello.alpn:
            # not the CA: the challenge certificate is for acme-tls/1 only (RFC 8737, 3)
            writer.write(ALERT_NO_APPLICATION_PROTOCOL)
            await writer.drain()
            raise ValueError(f"a client offering ALPN {list(hello.alpn)}, not {ACME_TLS_ALPN}")
        context = await self._alpn_context(hello.server_name)
        if context is None:
            writer.write(ALERT_UNRECOGNIZED_NAME)
            await writer.drain()
            raise ValueError(f"no challenge for the name {hello.server_name!r}")
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_side=True)
        incoming.write(data)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pending = outgoing.read()
                if pending:
                    writer.write(pending)
                    await writer.drain()
                chunk = await reader.read(16384)
                if not chunk:
                    return
                incoming.write(chunk)
        pending = outgoing.read()
        if pending:
            writer.write(pending)
        self.served.append((TLSALPN01, hello.server_name or ""))
        log.info("ACME: answered the tls-alpn-01 challenge for %s to %s", hello.server_name,
                 peer)
        # the validation is the handshake; the CA closes the connection now (RFC 8737, 3)
        try:
            tls.unwrap()
        except ssl.SSLError:
            pass
        pending = outgoing.read()
        if pending:
            writer.write(pending)
        await writer.drain()
