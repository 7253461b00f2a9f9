"""The PROXY protocol (v1 and v2) on listeners behind a load balancer.

Raw headers over real sockets for the exact bytes and every bad input, and
HAProxy from Debian in front of the server for the real thing (send-proxy,
send-proxy-v2, its LOCAL health checks, implicit TLS passed through).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import smtplib
import socket
import ssl
import struct
import subprocess
import time
from pathlib import Path

import pytest

from elemta import hookimpl
from elemta.config import parse_settings
from elemta.smtp.proxy import (V2_MAX_PAYLOAD_BYTES, V2_SIGNATURE, ProxyHeader, ProxyHeaderError,
                               parse_v1, parse_v2)
from elemta.testing import free_port, require_tool_or_skip, wait_until
from elemta.testing.client import RawSMTP, Reply, unverified_context

MSG = b"Subject: proxied\r\n\r\nhello\r\n.\r\n"
CLIENT = "127.0.0.2"        # the client's own address, behind the proxy (127.0.0.1)


def v1(src: str = "203.0.113.7", dst: str = "198.51.100.25", sport: int = 40000,
       dport: int = 25) -> bytes:
    family = "TCP4" if ipaddress.ip_address(src).version == 4 else "TCP6"
    return f"PROXY {family} {src} {dst} {sport} {dport}\r\n".encode()


def v2(src: str = "203.0.113.7", dst: str = "198.51.100.25", sport: int = 40000,
       dport: int = 25, *, command: int = 1, tlvs: bytes = b"") -> bytes:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    family = 0x11 if s.version == 4 else 0x21
    body = s.packed + d.packed + struct.pack("!HH", sport, dport) + tlvs
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


def v2_local() -> bytes:
    return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)


class Proxied(RawSMTP):
    """A client behind a proxy: the header goes first, then SMTP as usual."""

    def __init__(self, port: int, header: bytes, **kw) -> None:
        super().__init__(port, **kw)
        self.header = header

    async def connect(self) -> Reply:
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, limit=1 << 20), self.timeout)
        self.writer.write(self.header)
        self.greeting = await self.read_reply()
        return self.greeting


class SeenPeers:
    """Records the Session every connect hook saw."""

    def __init__(self) -> None:
        self.sessions = []

    @hookimpl
    def connect(self, session):
        self.sessions.append((session.peer, session.local, session.relay_allowed))


def listeners(**mx) -> dict:
    proxied = {"proxy_protocol": True, "proxy_trusted": ["127.0.0.1/32"],
               "proxy_timeout_seconds": 1.0}
    return {"listeners": [
        {"name": "mx", "address": "127.0.0.1:0", "tls": "starttls", **proxied, **mx},
        {"name": "smtps", "address": "127.0.0.1:0", "tls": "implicit", **proxied},
        {"name": "direct", "address": "127.0.0.1:0", "tls": "none"},
    ]}


def spooled(server) -> list[tuple[dict, bytes]]:
    server.app.spool.wait_written()
    out = []
    for p in sorted((server.spool_path / "ready").glob("*.json")):
        env = json.loads(p.read_bytes())
        out.append((env, (server.spool_path / "messages" / env["id"]).read_bytes()))
    return out


async def closed_without_greeting(port: int, data: bytes, *, linger: bool = True,
                                  timeout: float = 5.0) -> bytes:
    """Send ``data``; everything the server sent before closing (``b""`` expected)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        if not linger:
            writer.write_eof()
        async with asyncio.timeout(timeout):
            return await reader.read()
    except ConnectionResetError:
        return b""  # closed with our bytes unread: the kernel answers with a reset
    finally:
        writer.close()


# ------------------------------------------------------------------ parsing


def test_v1_tcp4_tcp6_and_unknown_parse():
    assert parse_v1(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n") == ProxyHeader(
        1, "proxy", ("192.0.2.1", 56324), ("198.51.100.2", 25))
    assert parse_v1(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n").source == (
        "2001:db8::1", 1)
    assert parse_v1(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n") == ProxyHeader(1, "proxy")


@pytest.mark.parametrize("line, why", [
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\n", "CRLF"),
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 56324\r\n", "4 fields"),
    (b"PROXY TCP4 2001:db8::1 198.51.100.2 1 25\r\n", "not an IPv4"),
    (b"PROXY TCP4 192.0.2.300 198.51.100.2 1 25\r\n", "not an IP"),
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 25\r\n", "out of range"),
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 025 25\r\n", "not a port"),
    (b"PROXY UDP4 192.0.2.1 198.51.100.2 1 25\r\n", "not TCP4"),
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\xff\r\n", "ASCII"),
    (b"PROXY UNKNOWN " + b"x" * 100 + b"\r\n", "longer than 107"),
])
def test_malformed_v1_says_what_is_wrong(line, why):
    with pytest.raises(ProxyHeaderError, match=why):
        parse_v1(line)


def test_v2_addresses_local_and_tlvs():
    raw = v2("2001:db8::7", "2001:db8::25", 1234, 465, tlvs=b"\x04\x00\x02ab")
    assert parse_v2(raw[:16], raw[16:]) == ProxyHeader(
        2, "proxy", ("2001:db8::7", 1234), ("2001:db8::25", 465))
    mapped = v2("::ffff:192.0.2.9", "::ffff:192.0.2.1")
    assert parse_v2(mapped[:16], mapped[16:]).source == ("192.0.2.9", 40000)
    assert parse_v2(v2_local(), b"") == ProxyHeader(2, "local")


@pytest.mark.parametrize("head, payload, why", [
    (V2_SIGNATURE + b"\x11\x11\x00\x0c", bytes(12), "version 1"),
    (V2_SIGNATURE + b"\x22\x11\x00\x0c", bytes(12), "command 2"),
    (V2_SIGNATURE + b"\x21\x11\x00\x04", bytes(4), "need 12 bytes"),
    (V2_SIGNATURE + b"\x21\x12\x00\x0c", bytes(12), "datagram"),
    (V2_SIGNATURE + b"\x21\x51\x00\x0c", bytes(12), "unknown"),
    (V2_SIGNATURE + b"\x21\x11\x00\x0e", bytes(12) + b"\x01\x00", "TLV head"),
    (V2_SIGNATURE + b"\x21\x11\x00\x10", bytes(12) + b"\x01\x00\x09x", "TLV longer"),
])
def test_malformed_v2_says_what_is_wrong(head, payload, why):
    with pytest.raises(ProxyHeaderError, match=why):
        parse_v2(head, payload)


def test_proxy_settings_need_each_other():
    for listener, why in [
            ({"proxy_protocol": True}, "needs proxy_trusted"),
            ({"proxy_trusted": ["10.0.0.5"]}, "proxy_protocol is false"),
            ({"proxy_protocol": True, "proxy_trusted": ["proxy.example"]}, "not a network")]:
        text = ('[[listeners]]\nname = "mx"\naddress = "127.0.0.1:2525"\n'
                + "".join(f"{k} = {json.dumps(v)}\n" for k, v in listener.items()))
        with pytest.raises(Exception, match=why):
            parse_settings(text, Path("elemta.toml"))


# ------------------------------------------------------------------ raw headers, real server


@pytest.mark.parametrize("make", [v1, v2], ids=["v1", "v2"])
async def test_client_address_from_the_header_reaches_hooks_received_and_envelope(
        elemta_server, make):
    seen = SeenPeers()
    server = await elemta_server(listeners(), plugins=[("seen", seen)])
    async with Proxied(server.port("mx"), make()) as c:
        assert c.greeting.code == 220
        await c.cmd("EHLO client.example")
        reply = await c.send_message("a@b.example", ["user@example.test"], MSG)
        assert reply.code == 250
    assert seen.sessions == [(("203.0.113.7", 40000), ("198.51.100.25", 25), False)]
    [(env, raw)] = spooled(server)
    assert env["peer"] == {"ip": "203.0.113.7", "port": 40000}
    assert raw.startswith(b"Received: from client.example (unknown [203.0.113.7])")


async def test_relay_networks_apply_to_the_client_not_the_proxy(elemta_server):
    server = await elemta_server({**listeners(), "server": {"relay_networks": ["203.0.113.0/24"]}})
    async with Proxied(server.port("mx"), v2("203.0.113.7")) as c:
        await c.cmd("EHLO relay.example")
        assert (await c.cmd("MAIL FROM:<a@b.example>")).code == 250
        assert (await c.cmd("RCPT TO:<x@elsewhere.example>")).code == 250
    async with Proxied(server.port("mx"), v2("192.0.2.66")) as c:
        await c.cmd("EHLO stranger.example")
        await c.cmd("MAIL FROM:<a@b.example>")
        reply = await c.cmd("RCPT TO:<x@elsewhere.example>")
        assert (reply.code, reply.enhanced) == (550, "5.7.1")


async def test_per_ip_limit_counts_clients_not_the_proxy(elemta_server):
    server = await elemta_server({**listeners(), "server": {"max_connections_per_ip": 1}})
    a = await Proxied(server.port("mx"), v1("192.0.2.1")).__aenter__()
    b = await Proxied(server.port("mx"), v1("192.0.2.2")).__aenter__()
    c = await Proxied(server.port("mx"), v1("192.0.2.1")).__aenter__()
    try:
        assert (a.greeting.code, b.greeting.code) == (220, 220)
        assert c.greeting.code == 421
    finally:
        for client in (a, b, c):
            client.close()


async def test_v2_local_health_check_keeps_the_proxy_address(elemta_server):
    seen = SeenPeers()
    server = await elemta_server(listeners(), plugins=[("seen", seen)])
    async with Proxied(server.port("mx"), v2_local()) as c:
        assert c.greeting.code == 220
        assert (await c.cmd("QUIT")).code == 221
    assert seen.sessions[0][0][0] == "127.0.0.1"


async def test_starttls_after_a_proxy_header(elemta_server):
    seen = SeenPeers()
    server = await elemta_server(listeners(), plugins=[("seen", seen)])
    async with Proxied(server.port("mx"), v1()) as c:
        await c.cmd("EHLO client.example")
        assert (await c.starttls(unverified_context())).code == 220
        assert (await c.cmd("EHLO client.example")).code == 250
        reply = await c.send_message("a@b.example", ["user@example.test"], MSG)
        assert reply.code == 250
    [(env, raw)] = spooled(server)
    assert env["peer"]["ip"] == "203.0.113.7" and env["tls"] is not None
    assert b"(unknown [203.0.113.7])" in raw.split(b"\r\n")[0]


def _tls_exchange(port: int, header: bytes, commands: list[bytes]) -> list[bytes]:
    """Implicit TLS behind a proxy: the header and the ClientHello in one segment."""
    inbound, outbound = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = unverified_context().wrap_bio(inbound, outbound, server_hostname="localhost")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        sock.sendall(header + outbound.read())

        def pump() -> None:
            if outbound.pending:
                sock.sendall(outbound.read())
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed by the server")
            inbound.write(data)

        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pump()
        answers = []
        for command in [None, *commands]:
            if command is not None:
                tls.write(command)
            got = b""
            while not got.endswith(b"\r\n") or got.split(b"\r\n")[-2][3:4] == b"-":
                try:
                    got += tls.read(65536)
                except ssl.SSLWantReadError:
                    pump()
            answers.append(got)
        return answers


@pytest.mark.parametrize("make", [v1, v2], ids=["v1", "v2"])
async def test_implicit_tls_after_a_proxy_header_in_the_same_segment(elemta_server, make):
    seen = SeenPeers()
    server = await elemta_server(listeners(), plugins=[("seen", seen)])
    greeting, ehlo, quit_ = await asyncio.to_thread(
        _tls_exchange, server.port("smtps"), make("198.51.100.40"),
        [b"EHLO client.example\r\n", b"QUIT\r\n"])
    assert greeting.startswith(b"220 ")
    assert ehlo.startswith(b"250-mx.example.test") and b"\r\n250 " in ehlo
    assert quit_.startswith(b"221 ")
    assert seen.sessions[0][0] == ("198.51.100.40", 40000)


# ------------------------------------------------------------------ bad input


async def test_untrusted_address_is_closed_before_the_greeting(elemta_server, caplog):
    caplog.set_level(logging.INFO, logger="elemta.smtp")
    server = await elemta_server(listeners(proxy_trusted=["127.0.0.2/32"]))
    assert await closed_without_greeting(server.port("mx"), v1()) == b""
    assert "refused 127.0.0.1 on mx: not a trusted proxy" in caplog.text
    # a client on the direct listener is unaffected
    async with RawSMTP(server.port("direct")) as c:
        assert c.greeting.code == 220


@pytest.mark.parametrize("data, logged", [
    (b"PROXY TCP4 192.0.2.1 nonsense 1 25\r\nEHLO x\r\n", "bad PROXY header: 'nonsense'"),
    (b"EHLO client.example\r\n", "does not start with a PROXY header"),
    (b"PROXY " + b"A" * 200 + b"\r\n", "longer than 107 bytes"),
    (V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", V2_MAX_PAYLOAD_BYTES + 1)
     + bytes(V2_MAX_PAYLOAD_BYTES + 1), "more than the 2048 accepted"),
    (V2_SIGNATURE + b"\x21\x11\x00\x0e" + bytes(12) + b"\x01\x00", "TLV head"),
], ids=["malformed-v1", "no-header", "long-v1", "oversized-v2", "bad-tlv"])
async def test_bad_header_is_closed_with_a_log_line(elemta_server, caplog, data, logged):
    caplog.set_level(logging.INFO, logger="elemta.smtp")
    server = await elemta_server(listeners())
    assert await closed_without_greeting(server.port("mx"), data) == b""
    assert logged in caplog.text
    async with Proxied(server.port("mx"), v1()) as c:   # the server is fine
        assert c.greeting.code == 220


@pytest.mark.parametrize("data", [v1()[:20], v2()[:20], V2_SIGNATURE[:5]],
                         ids=["v1", "v2", "signature"])
async def test_truncated_header_is_closed_with_a_log_line(elemta_server, caplog, data):
    caplog.set_level(logging.INFO, logger="elemta.smtp")
    server = await elemta_server(listeners())
    assert await closed_without_greeting(server.port("mx"), data, linger=False) == b""
    assert "the connection closed before a whole PROXY header arrived" in caplog.text


async def test_no_header_in_time_is_closed_with_a_log_line(elemta_server, caplog):
    caplog.set_level(logging.INFO, logger="elemta.smtp")
    server = await elemta_server(listeners(proxy_timeout_seconds=0.3))
    start = time.monotonic()
    assert await closed_without_greeting(server.port("mx"), b"PROXY TCP4 ") == b""
    assert time.monotonic() - start < 3
    assert "no PROXY header within 0.3s" in caplog.text


async def test_refusals_are_counted(elemta_server):
    server = await elemta_server(listeners(proxy_trusted=["127.0.0.2/32"]))
    await closed_without_greeting(server.port("mx"), v1())
    refused = server.app.metrics.connections_refused
    assert refused.labels(listener="mx", reason="proxy_untrusted")._value.get() == 1


# ------------------------------------------------------------------ HAProxy in front


HAPROXY_CONFIG = """\
global
    maxconn 100
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend v1
    bind 127.0.0.1:{v1}
    default_backend v1
frontend v2
    bind 127.0.0.1:{v2}
    default_backend v2
frontend tls
    bind 127.0.0.1:{tls}
    default_backend tls
backend v1
    server mx 127.0.0.1:{mx} send-proxy
backend v2
    option smtpchk EHLO haproxy.example
    server mx 127.0.0.1:{mx} send-proxy-v2 check check-send-proxy inter 200ms
backend tls
    server smtps 127.0.0.1:{smtps} send-proxy-v2
"""


class HAProxy:
    """haproxy in the foreground, with a generated config, on loopback ports."""

    def __init__(self, root: Path, **backends: int) -> None:
        self.ports = {"v1": free_port(), "v2": free_port(), "tls": free_port()}
        self.config = root / "haproxy.cfg"
        self.config.write_text(HAPROXY_CONFIG.format(**self.ports, **backends))
        self.log = root / "haproxy.log"
        self.process: subprocess.Popen | None = None

    def start(self, binary: str) -> None:
        check = subprocess.run([binary, "-c", "-f", str(self.config)], capture_output=True,
                               text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([binary, "-db", "-f", str(self.config)],
                                            stdout=log, stderr=subprocess.STDOUT)
        for port in self.ports.values():
            wait_until(lambda: _listening(port), 10, f"haproxy listening on {port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


@pytest.fixture
async def behind_haproxy(elemta_server, tmp_path):
    binary = require_tool_or_skip("haproxy")
    seen = SeenPeers()
    server = await elemta_server(listeners(), plugins=[("seen", seen)])
    haproxy = HAProxy(tmp_path, mx=server.port("mx"), smtps=server.port("smtps"))
    await asyncio.to_thread(haproxy.start, binary)
    try:
        yield server, haproxy, seen
    finally:
        await asyncio.to_thread(haproxy.stop)


def _send_through(port: int) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, source_address=(CLIENT, 0), timeout=10) as client:
        client.ehlo("client.example")
        client.starttls(context=unverified_context())
        client.ehlo("client.example")
        refused = client.sendmail("a@b.example", ["user@example.test"],
                                  b"Subject: via haproxy\r\n\r\nhello\r\n")
        assert refused == {}
        return client.noop()


@pytest.mark.parametrize("frontend", ["v1", "v2"])
async def test_haproxy_send_proxy_passes_the_client_address(behind_haproxy, frontend):
    server, haproxy, seen = behind_haproxy
    code, _ = await asyncio.to_thread(_send_through, haproxy.ports[frontend])
    assert code == 250
    [(env, raw)] = spooled(server)
    assert env["peer"]["ip"] == CLIENT
    assert env["tls"] is not None                         # STARTTLS through the proxy
    assert b"(unknown [127.0.0.2])" in raw.split(b"\r\n")[0]
    assert any(peer[0] == CLIENT for peer, _, _ in seen.sessions)


async def test_haproxy_implicit_tls_passes_through(behind_haproxy):
    server, haproxy, seen = behind_haproxy

    def send() -> dict:
        with smtplib.SMTP_SSL("127.0.0.1", haproxy.ports["tls"], source_address=(CLIENT, 0),
                              timeout=10, context=unverified_context()) as client:
            client.ehlo("client.example")
            return client.sendmail("a@b.example", ["user@example.test"],
                                   b"Subject: via haproxy\r\n\r\nhello\r\n")
    assert await asyncio.to_thread(send) == {}
    [(env, raw)] = spooled(server)
    assert env["peer"]["ip"] == CLIENT and env["listener"] == "smtps"
    assert env["tls"] is not None
    assert b"(unknown [127.0.0.2])" in raw.split(b"\r\n")[0]


async def test_haproxy_health_checks_are_v2_local(behind_haproxy, caplog):
    caplog.set_level(logging.DEBUG, logger="elemta.smtp")
    server, haproxy, seen = behind_haproxy
    deadline = time.monotonic() + 10
    while "PROXY v2 LOCAL header from 127.0.0.1" not in caplog.text:
        assert time.monotonic() < deadline, "no health check arrived"
        await asyncio.sleep(0.1)
    assert ("127.0.0.1", ) == tuple({peer[0] for peer, _, _ in seen.sessions})


async def test_direct_connection_to_a_proxied_listener_is_refused(behind_haproxy, caplog):
    caplog.set_level(logging.INFO, logger="elemta.smtp")
    server, _, _ = behind_haproxy
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port("mx"),
                                                   local_addr=(CLIENT, 0))
    try:
        async with asyncio.timeout(5):
            assert await reader.read() == b""
    finally:
        writer.close()
    assert f"refused {CLIENT} on mx: not a trusted proxy" in caplog.text


async def test_rate_limit_plugin_counts_the_client_behind_the_proxy(elemta_server):
    pytest.importorskip("elemta_ratelimit")
    server = await elemta_server({**listeners(), "plugins": {
        "enabled": ["ratelimit"], "ratelimit": {"connections_concurrent": 1}}})
    a = await Proxied(server.port("mx"), v2("192.0.2.1")).__aenter__()
    b = await Proxied(server.port("mx"), v2("192.0.2.2")).__aenter__()
    c = await Proxied(server.port("mx"), v2("192.0.2.1", sport=40001)).__aenter__()
    try:
        assert (a.greeting.code, b.greeting.code) == (220, 220)
        assert (c.greeting.code, c.greeting.enhanced) == (421, "4.7.0")
    finally:
        for client in (a, b, c):
            client.close()
