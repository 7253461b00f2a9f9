"""A local authoritative DNS server for tests, so that no test asks the real DNS.

The ``dns_server`` fixture starts one on 127.0.0.1 (UDP and TCP on the same
free port) for each test. Tests change its records while it runs and can make
it misbehave::

    async def test_delivery_uses_the_preferred_mx(dns_server):
        dns_server.zone("example.test")
        dns_server.add("example.test", "MX", "10 mx1.example.test.")
        dns_server.add("mx1.example.test", "A", "127.0.0.1")
        resolver = dns_server.resolver()
        assert await resolver.mx("example.test") == [MX(10, "mx1.example.test")]
        dns_server.fail("example.test", "SERVFAIL")

It answers like an authoritative server for every name it holds: it follows
CNAMEs through its own records, and tells ``NXDOMAIN`` (the name has no
records and no names below it) from ``NODATA`` (it has other records), with
the SOA of the closest enclosing :meth:`ZoneServer.zone` in the authority
section. A name under no zone gets the same answers without an SOA, which
resolvers do not cache. UDP answers larger than the client's EDNS buffer
(512 bytes without EDNS) are truncated, so the client retries over TCP.
"""

from __future__ import annotations

import ipaddress
import socket
import socketserver
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Self

import dnslib
from dnslib import QTYPE, RCODE, RR, DNSRecord

from ..config import DNSSettings
from ..dns import Resolver

__all__ = ["FAULTS", "Query", "ZoneServer"]

FAULTS = ("SERVFAIL", "REFUSED", "timeout", "garbage", "truncate", "wrong-type")
"""What :meth:`ZoneServer.fail` can make the server do for a name:

- ``"SERVFAIL"``, ``"REFUSED"``: answer with that rcode;
- ``"timeout"``: never answer, over UDP or TCP;
- ``"garbage"``: answer with bytes that are not a DNS message;
- ``"truncate"``: answer with the TC bit and no records over UDP, so the client
  must ask again over TCP, where the real answer comes;
- ``"wrong-type"``: answer with a record of another type than the one asked for.
"""

_EDNS_PAYLOAD_BYTES = 1232
_PLAIN_UDP_BYTES = 512
_TCP_IDLE_SECONDS = 5.0
# serve_forever polls for shutdown this often; it bounds how long stop() takes
_POLL_SECONDS = 0.01


@dataclass(frozen=True, slots=True)
class Query:
    """One question the server received."""

    name: str
    rdtype: str
    transport: str  # "udp" or "tcp"


def _normalize(name: str) -> str:
    name = name.strip().rstrip(".").lower()
    if not name.isascii():
        raise ValueError(f"write {name!r} with A-labels (xn--...): the test server "
                         "holds names as they travel in DNS packets")
    return name


def _chunks(value: str | bytes | Sequence[str | bytes]) -> list[bytes]:
    """TXT data as character-strings of at most 255 bytes each."""
    if isinstance(value, (str, bytes)):
        data = value.encode() if isinstance(value, str) else value
        return [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]
    out = [v.encode() if isinstance(v, str) else v for v in value]
    if any(len(v) > 255 for v in out):
        raise ValueError("a TXT character-string is at most 255 bytes; pass one string "
                         "to have it split")
    return out


class ZoneServer:
    """Authoritative DNS for tests, on ``host`` (an IPv4 address) at a free port,
    UDP and TCP.

    Every method may be called while the server runs, from any thread.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.queries: list[Query] = []
        """Every question received, in order."""
        self._lock = threading.Lock()
        self._records: dict[str, list[RR]] = {}
        self._faults: dict[tuple[str, str | None, str | None], str] = {}
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        for _ in range(20):
            tcp = _TCPServer((self.host, 0), _TCPHandler)
            try:
                udp = _UDPServer((self.host, tcp.server_address[1]), _UDPHandler)
            except OSError:
                # the UDP side of the free TCP port was taken: pick another
                tcp.server_close()
                continue
            break
        else:
            raise RuntimeError(f"no port on {self.host} is free for both UDP and TCP")
        self.port = tcp.server_address[1]
        for server in (udp, tcp):
            server.zone = self  # type: ignore[attr-defined]
            thread = threading.Thread(target=server.serve_forever,
                                      kwargs={"poll_interval": _POLL_SECONDS},
                                      name=f"dns-{type(server).__name__}-{self.port}", daemon=True)
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join()
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def nameserver(self) -> str:
        """``"host:port"``, as ``[dns] nameservers`` takes it."""
        return f"{self.host}:{self.port}"

    def settings(self, **overrides: Any) -> DNSSettings:
        """``[dns]`` settings that ask this server, failing fast (1 s, one attempt)."""
        values: dict[str, Any] = {"nameservers": (self.nameserver,), "timeout_seconds": 1.0,
                                  "attempts": 1}
        return DNSSettings(**{**values, **overrides})

    def resolver(self, *, clock: Callable[[], float] | None = None,
                 **settings: Any) -> Resolver:
        """A new :class:`elemta.dns.Resolver` that asks this server."""
        if clock is None:
            return Resolver(self.settings(**settings))
        return Resolver(self.settings(**settings), clock=clock)

    # ------------------------------------------------------------ zone data

    def zone(self, apex: str, *, negative_ttl: int = 300, ttl: int = 3600) -> None:
        """Make ``apex`` a zone: an SOA whose negative TTL is ``negative_ttl``, and an NS."""
        owner = _normalize(apex)
        self.remove(owner, "SOA")
        self.remove(owner, "NS")
        self.add(owner, "SOA", f"ns.{owner}. hostmaster.{owner}. 1 3600 600 86400 {negative_ttl}",
                 ttl=ttl)
        self.add(owner, "NS", f"ns.{owner}.", ttl=ttl)

    def add(self, name: str, rdtype: str, value: str | bytes | Sequence[str | bytes],
            ttl: int = 300) -> None:
        """Add one record.

        ``value`` is in zone-file syntax (``"10 mx1.example.test."``,
        ``"192.0.2.1"``), except for TXT: the text itself, unquoted, split into
        255-byte strings when longer, or a list of the strings. A PTR may be
        added under an IP address instead of its ``in-addr.arpa`` name.
        """
        rr = self._record(name, rdtype, value, ttl)
        with self._lock:
            self._records.setdefault(_normalize(str(rr.rname)), []).append(rr)

    def remove(self, name: str, rdtype: str | None = None,
               value: str | bytes | Sequence[str | bytes] | None = None) -> int:
        """Remove the records of ``name``: all, of one type, or one record.

        :returns: how many were removed.
        """
        if value is not None and rdtype is None:
            raise ValueError("give the record type along with the value")
        owner = self._owner(name, rdtype)
        wanted = self._record(owner, rdtype, value, 0) if value is not None else None
        qtype = getattr(QTYPE, rdtype.upper()) if rdtype is not None else None

        def matches(rr: RR) -> bool:
            return ((qtype is None or rr.rtype == qtype)
                    and (wanted is None or rr.rdata == wanted.rdata))

        with self._lock:
            records = self._records.get(owner, [])
            keep = [rr for rr in records if not matches(rr)]
            if keep:
                self._records[owner] = keep
            else:
                self._records.pop(owner, None)
            return len(records) - len(keep)

    def clear(self) -> None:
        """Forget every record and fault, and the queries received."""
        with self._lock:
            self._records.clear()
            self._faults.clear()
            self.queries.clear()

    def fail(self, name: str, fault: str, rdtype: str | None = None,
             transport: str | None = None) -> None:
        """Make questions about ``name`` misbehave (see :data:`FAULTS`): those of
        type ``rdtype`` only, or of any type; over ``transport`` (``"udp"`` or
        ``"tcp"``) only, or over both. The narrowest fault that matches wins."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; choose from {', '.join(FAULTS)}")
        if transport not in (None, "udp", "tcp"):
            raise ValueError(f'transport is "udp" or "tcp", not {transport!r}')
        with self._lock:
            self._faults[(_normalize(name), rdtype.upper() if rdtype else None, transport)] = fault

    def heal(self, name: str | None = None) -> None:
        """Undo :meth:`fail` for ``name``, or for every name."""
        with self._lock:
            if name is None:
                self._faults.clear()
            else:
                owner = _normalize(name)
                for key in [k for k in self._faults if k[0] == owner]:
                    del self._faults[key]

    def count(self, name: str | None = None, rdtype: str | None = None,
              transport: str | None = None) -> int:
        """How many questions matched: about ``name``, of ``rdtype``, over ``transport``."""
        owner = _normalize(name) if name is not None else None
        with self._lock:
            return sum(1 for q in self.queries
                       if (owner is None or q.name == owner)
                       and (rdtype is None or q.rdtype == rdtype.upper())
                       and (transport is None or q.transport == transport))

    def _owner(self, name: str, rdtype: str | None) -> str:
        if rdtype is not None and rdtype.upper() == "PTR":
            try:
                return _normalize(ipaddress.ip_address(name).reverse_pointer)
            except ValueError:
                pass
        return _normalize(name)

    def _record(self, name: str, rdtype: str, value: Any, ttl: int) -> RR:
        rdtype = rdtype.upper()
        owner = self._owner(name, rdtype)
        if rdtype == "TXT":
            return RR(owner + ".", QTYPE.TXT, ttl=ttl, rdata=dnslib.TXT(_chunks(value)))
        try:
            records = RR.fromZone(f"{owner}. {ttl} IN {rdtype} {value}")
        except (dnslib.DNSError, ValueError, IndexError) as e:
            raise ValueError(f"cannot read {rdtype} record {value!r}: {e}") from None
        if len(records) != 1:
            raise ValueError(f"{rdtype} {value!r} is not one record")
        return records[0]

    # ------------------------------------------------------------ answering

    def answer(self, packet: bytes, transport: str) -> bytes | None:
        """The reply to one request packet; ``None`` to stay silent."""
        try:
            request = DNSRecord.parse(packet)
        except dnslib.DNSError:
            return None
        if not request.questions:
            return None
        question = request.q
        qname = _normalize(str(question.qname))
        qtype = str(QTYPE.get(question.qtype))
        with self._lock:
            self.queries.append(Query(qname, qtype, transport))
            fault = next((self._faults[k] for k in ((qname, qtype, transport), (qname, qtype, None),
                                                   (qname, None, transport), (qname, None, None))
                          if k in self._faults), None)
        if fault == "timeout":
            return None
        if fault == "garbage":
            # the request's id and a header announcing records that never come
            return packet[:2] + b"\x84\x00\x00\x01\x00\x01\x00\x00\x00\x00\x07garb"
        reply = request.reply(ra=0, aa=1)
        udp_limit = _PLAIN_UDP_BYTES
        for rr in request.ar:
            if rr.rtype == QTYPE.OPT:
                udp_limit = max(rr.rclass, _PLAIN_UDP_BYTES)
                reply.add_ar(dnslib.EDNS0(udp_len=_EDNS_PAYLOAD_BYTES))
        if fault in ("SERVFAIL", "REFUSED"):
            reply.header.rcode = getattr(RCODE, fault)
            return reply.pack()
        if fault == "truncate" and transport == "udp":
            reply.header.tc = 1
            return reply.pack()
        if fault == "wrong-type":
            other = QTYPE.TXT if question.qtype == QTYPE.A else QTYPE.A
            rdata = dnslib.TXT("wrong") if other == QTYPE.TXT else dnslib.A("192.0.2.99")
            reply.add_answer(RR(qname + ".", other, ttl=60, rdata=rdata))
            return reply.pack()
        with self._lock:
            self._fill(reply, qname, question.qtype)
        packed = reply.pack()
        if transport == "udp" and len(packed) > udp_limit:
            reply.rr, reply.auth = [], []
            reply.header.tc = 1
            packed = reply.pack()
        return packed

    def _fill(self, reply: DNSRecord, name: str, qtype: int) -> None:
        seen: set[str] = set()
        while True:
            records = self._records.get(name, [])
            matches = [rr for rr in records if rr.rtype == qtype]
            if matches:
                for rr in matches:
                    reply.add_answer(rr)
                return
            cnames = [rr for rr in records if rr.rtype == QTYPE.CNAME]
            if qtype == QTYPE.CNAME or not cnames or name in seen:
                break
            # an authoritative server follows the chain through its own data
            seen.add(name)
            reply.add_answer(cnames[0])
            name = _normalize(str(cnames[0].rdata.label))
        if not self._exists(name):
            reply.header.rcode = RCODE.NXDOMAIN
        soa = self._soa_above(name)
        if soa is not None:
            reply.add_auth(soa)

    def _exists(self, name: str) -> bool:
        suffix = "." + name
        return name in self._records or any(owner.endswith(suffix) for owner in self._records)

    def _soa_above(self, name: str) -> RR | None:
        labels = name.split(".")
        for i in range(len(labels)):
            for rr in self._records.get(".".join(labels[i:]), []):
                if rr.rtype == QTYPE.SOA:
                    return rr
        return None


class _UDPServer(socketserver.ThreadingMixIn, socketserver.UDPServer):
    daemon_threads = True
    block_on_close = False


class _TCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True


class _UDPHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        packet, sock = self.request
        reply = self.server.zone.answer(packet, "udp")  # type: ignore[attr-defined]
        if reply is not None:
            sock.sendto(reply, self.client_address)


class _TCPHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        conn: socket.socket = self.request
        conn.settimeout(_TCP_IDLE_SECONDS)
        try:
            while True:
                header = self._read(2)
                if header is None:
                    return
                packet = self._read(struct.unpack("!H", header)[0])
                if packet is None:
                    return
                reply = self.server.zone.answer(packet, "tcp")  # type: ignore[attr-defined]
                if reply is not None:
                    conn.sendall(struct.pack("!H", len(reply)) + reply)
        except OSError:
            return

    def _read(self, size: int) -> bytes | None:
        data = b""
        while len(data) < size:
            chunk = self.request.recv(size - len(data))
            if not chunk:
                return None
            data += chunk
        return data
