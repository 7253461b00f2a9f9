"""The PROXY protocol: the client's address from the load balancer in front of a listener.

A listener with ``proxy_protocol = true`` sits behind a proxy (HAProxy, a
cloud load balancer) that opens each connection with a PROXY header, the
text version 1 or the binary version 2 of HAProxy's specification
(https://www.haproxy.org/download/2.6/doc/proxy-protocol.txt). It is read
before anything else, before the greeting and before the TLS handshake of an
implicit-TLS listener, and only from an address in the listener's
``proxy_trusted``: anyone else could claim any address. From then on the
session's ``peer`` is the client the proxy accepted (``local`` the address it
connected to), so relay networks, connection limits, plugins (SPF, rate
limits), ``Received:`` and the logs all see the client, not the proxy.

A version 2 ``LOCAL`` header (the proxy's own health check) and a version 1
``UNKNOWN`` one keep the proxy's own address, as the specification says.
Whatever else goes wrong (an untrusted address, no header within
``proxy_timeout_seconds``, a malformed, truncated or oversized header) closes
the connection without a greeting, with a log line and
``smtp_connections_refused_total{reason}`` counting it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .protocol import ElemtaSMTP

log = logging.getLogger("elemta.smtp")

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX_BYTES = 107               # the whole line, CRLF included (the specification's bound)
V2_MAX_PAYLOAD_BYTES = 2048      # addresses and TLVs after the 16-byte v2 head

_V2_ADDRESS_BYTES = {0x1: 12, 0x2: 36, 0x3: 216}   # INET, INET6, UNIX


class ProxyHeaderError(ValueError):
    """A PROXY header that cannot be used; ``str()`` says what is wrong with it."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What a PROXY header said.

    ``source`` and ``destination`` are ``(ip, port)`` of the client and of the
    address it connected to on the proxy; both ``None`` for a v2 ``LOCAL``
    header, a v1 ``UNKNOWN`` one, or an address family other than TCP over
    IPv4 or IPv6 (the connection's own addresses are kept then).
    """

    version: int
    command: str                                   # "proxy" or "local"
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None


def _ip(text: str, version: int) -> str:
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyHeaderError(f"{text!r} is not an IP address") from None
    if addr.version != version:
        raise ProxyHeaderError(f"{text!r} is not an IPv{version} address")
    return _plain(addr)


def _plain(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    # a v4 client reaching a v6 proxy socket is a v4 client
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def _port(text: str) -> int:
    if not text.isdigit() or not text.isascii() or (len(text) > 1 and text[0] == "0"):
        raise ProxyHeaderError(f"{text!r} is not a port number")
    port = int(text)
    if port > 65535:
        raise ProxyHeaderError(f"port {port} is out of range")
    return port


def parse_v1(line: bytes) -> ProxyHeader:
    """A whole version 1 line, ``b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 25\\r\\n"``."""
    if len(line) > V1_MAX_BYTES:
        raise ProxyHeaderError(f"v1 header longer than {V1_MAX_BYTES} bytes")
    if not line.endswith(b"\r\n"):
        raise ProxyHeaderError("v1 header does not end with CRLF")
    try:
        text = line[:-2].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("v1 header is not ASCII") from None
    parts = text.split(" ")
    if parts[0] != "PROXY" or len(parts) < 2:
        raise ProxyHeaderError("v1 header does not start with 'PROXY '")
    if parts[1] == "UNKNOWN":
        return ProxyHeader(1, "proxy")
    if parts[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError(f"v1 protocol {parts[1]!r} is not TCP4, TCP6 or UNKNOWN")
    if len(parts) != 6:
        raise ProxyHeaderError(f"v1 {parts[1]} header needs 4 fields after the protocol, "
                               f"got {len(parts) - 2}")
    version = 4 if parts[1] == "TCP4" else 6
    return ProxyHeader(1, "proxy", (_ip(parts[2], version), _port(parts[4])),
                       (_ip(parts[3], version), _port(parts[5])))


def parse_v2(head: bytes, payload: bytes) -> ProxyHeader:
    """A version 2 header: the 16-byte ``head`` (signature included) and what follows it."""
    if len(head) != 16 or head[:12] != V2_SIGNATURE:
        raise ProxyHeaderError("not a v2 header")
    version, command = head[12] >> 4, head[12] & 0x0F
    if version != 2:
        raise ProxyHeaderError(f"v2 signature with version {version}")
    if command not in (0, 1):
        raise ProxyHeaderError(f"v2 command {command} is neither LOCAL (0) nor PROXY (1)")
    family, transport = head[13] >> 4, head[13] & 0x0F
    if len(payload) != int.from_bytes(head[14:16], "big"):
        raise ProxyHeaderError("v2 length does not match the bytes that follow")
    if command == 0:
        return ProxyHeader(2, "local")
    if family not in (0, *_V2_ADDRESS_BYTES) or transport not in (0, 1, 2):
        raise ProxyHeaderError(f"v2 address family/protocol byte 0x{head[13]:02x} is unknown")
    size = _V2_ADDRESS_BYTES.get(family, 0)
    if len(payload) < size:
        raise ProxyHeaderError(f"v2 addresses need {size} bytes, the header has "
                               f"{len(payload)}")
    if size:
        _check_tlvs(payload[size:])
    if family not in (0x1, 0x2) or transport != 1:
        if transport == 2:
            raise ProxyHeaderError("v2 header describes a datagram (UDP) connection")
        return ProxyHeader(2, "proxy")  # UNSPEC or UNIX: no client address to take
    n = 4 if family == 0x1 else 16
    src = ipaddress.ip_address(payload[:n])
    dst = ipaddress.ip_address(payload[n:2 * n])
    sport = int.from_bytes(payload[2 * n:2 * n + 2], "big")
    dport = int.from_bytes(payload[2 * n + 2:2 * n + 4], "big")
    return ProxyHeader(2, "proxy", (_plain(src), sport), (_plain(dst), dport))


def _check_tlvs(data: bytes) -> None:
    """TLVs are not used, but they must fit the length the header announced."""
    i = 0
    while i < len(data):
        if i + 3 > len(data):
            raise ProxyHeaderError("v2 TLV block ends inside a TLV head")
        i += 3 + int.from_bytes(data[i + 1:i + 3], "big")
        if i > len(data):
            raise ProxyHeaderError("v2 TLV longer than the header")


async def read_header(reader: asyncio.StreamReader) -> ProxyHeader:
    """Read one PROXY header and not a byte more: what follows may be a TLS handshake.

    Raises :class:`ProxyHeaderError`, or ``asyncio.IncompleteReadError`` when
    the connection closes first.
    """
    start = await reader.readexactly(12)
    if start == V2_SIGNATURE:
        head = start + await reader.readexactly(4)
        length = int.from_bytes(head[14:16], "big")
        if length > V2_MAX_PAYLOAD_BYTES:
            raise ProxyHeaderError(f"v2 header announces {length} bytes of addresses and TLVs, "
                                   f"more than the {V2_MAX_PAYLOAD_BYTES} accepted")
        return parse_v2(head, await reader.readexactly(length))
    if not start.startswith(b"PROXY "):
        raise ProxyHeaderError(f"the connection does not start with a PROXY header: {start!r}")
    line = bytearray(start)
    while not line.endswith(b"\n"):
        if len(line) >= V1_MAX_BYTES:
            raise ProxyHeaderError(f"v1 header longer than {V1_MAX_BYTES} bytes")
        line += await reader.readexactly(1)
    return parse_v1(bytes(line))


async def receive(proto: ElemtaSMTP) -> bool:
    """Take the client's address from the PROXY header; ``False``: close without a greeting."""
    conn, listener, ctx = proto.conn, proto.listener, proto.ctx
    assert conn is not None
    proxy_ip = conn.peer[0]
    if not ctx.proxy_trusted(listener.name, proxy_ip):
        log.warning("session %s: refused %s on %s: not a trusted proxy (listener %s reads a "
                    "PROXY header only from its proxy_trusted networks)",
                    conn.id, proxy_ip, listener.name, listener.name)
        _refused(proto, "proxy_untrusted")
        return False
    try:
        async with asyncio.timeout(listener.proxy_timeout_seconds):
            header = await read_header(proto._reader)
    except TimeoutError:
        log.warning("session %s: refused %s on %s: no PROXY header within %gs "
                    "(proxy_timeout_seconds); is the proxy set to send one (HAProxy: "
                    "send-proxy or send-proxy-v2)?", conn.id, proxy_ip, listener.name,
                    listener.proxy_timeout_seconds)
        _refused(proto, "proxy_header")
        return False
    except (asyncio.IncompleteReadError, asyncio.CancelledError) as e:
        # aiosmtpd cancels the session's task when the client half-closes
        log.warning("session %s: refused %s on %s: the connection closed before a whole "
                    "PROXY header arrived", conn.id, proxy_ip, listener.name)
        _refused(proto, "proxy_header")
        if isinstance(e, asyncio.CancelledError):
            raise
        return False
    except ProxyHeaderError as e:
        log.warning("session %s: refused %s on %s: bad PROXY header: %s",
                    conn.id, proxy_ip, listener.name, e)
        _refused(proto, "proxy_header")
        return False
    if header.source is None or header.destination is None:
        log.debug("session %s: PROXY v%d %s header from %s: the proxy's own connection",
                  conn.id, header.version, header.command.upper(), proxy_ip)
        return True
    conn.peer = header.source
    conn.local = header.destination
    conn.relay_allowed = ctx.in_relay_networks(header.source[0])
    log.info("session %s: client %s port %d via proxy %s on %s", conn.id,
             header.source[0], header.source[1], proxy_ip, listener.name)
    return True


def _refused(proto: ElemtaSMTP, reason: str) -> None:
    proto.ctx.metrics.connections_refused.labels(listener=proto.listener.name,
                                                 reason=reason).inc()
