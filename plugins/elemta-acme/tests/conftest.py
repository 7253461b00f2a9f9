"""A real ACME CA for the tests: Debian's pebble, started once per session on loopback.

- ``acme_dns``: one :class:`elemta.testing.ZoneServer` for the session, because
  pebble is told its DNS server once, at start (``-dnsserver``). The
  ``dns_server`` fixture is overridden to hand it to each test with the test
  names pointing at 127.0.0.1, and is put back after the test.
- ``pebble``: pebble with its own API certificate (made here with
  ``cryptography``), real validation (``PEBBLE_VA_NOSLEEP=1``,
  ``PEBBLE_AUTHZREUSE=0``, not the always-valid mode), its default 5 % of
  rejected nonces, an External Account Binding key, and ``httpPort``/``tlsPort``
  set to free ports where the plugin's responders listen in the tests. Even
  with ``PEBBLE_AUTHZREUSE=0`` pebble 2.4 reuses a valid authorization of the
  same account for 1 % of identifiers; a test that needs a validation to
  happen again uses a new account.
- ``faulty_ca``: an HTTPS proxy in front of pebble that injects what pebble
  cannot do: answering new orders with an ACME ``rateLimited`` problem and a
  ``Retry-After``, and being down (a closed port). It forwards everything else
  to pebble unchanged (pebble builds its URLs from the Host header, so they
  name the proxy).
"""

from __future__ import annotations

import datetime
import http.client
import http.server
import ipaddress
import json
import os
import ssl
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from acme_support import EAB_HMAC, EAB_KID
from elemta.testing import ZoneServer, free_port, require_tool_or_skip

TEST_NAMES = ("mx.example.test", "smtp.example.test", "other.example.test")


def _api_certificate(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate for 127.0.0.1/localhost, for pebble's HTTPS API."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "elemta-acme test API CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=7))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = folder / "api-ca.pem", folder / "api-cert.pem", folder / "api-key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


@dataclass
class Pebble:
    directory: str
    api_ca: Path
    api_cert: Path
    api_key: Path
    root: Path
    port: int
    management_port: int
    http_port: int
    tls_port: int
    log: Path
    process: subprocess.Popen[bytes] = field(repr=False)

    def api_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.api_ca))

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="session")
def acme_dns() -> Iterator[ZoneServer]:
    with ZoneServer() as server:
        yield server


def _default_records(dns: ZoneServer) -> None:
    dns.clear()
    dns.zone("example.test")
    for name in TEST_NAMES:
        dns.add(name, "A", "127.0.0.1")


@pytest.fixture
def dns_server(acme_dns: ZoneServer) -> Iterator[ZoneServer]:
    """The session's DNS server (pebble asks it), with the test names at 127.0.0.1."""
    _default_records(acme_dns)
    yield acme_dns
    _default_records(acme_dns)


@pytest.fixture(scope="session")
def pebble(tmp_path_factory: pytest.TempPathFactory, acme_dns: ZoneServer) -> Iterator[Pebble]:
    binary = require_tool_or_skip("pebble", "pebble")
    folder = tmp_path_factory.mktemp("pebble")
    api_ca, api_cert, api_key = _api_certificate(folder)
    ports = set()
    while len(ports) < 4:
        ports.add(free_port())
    port, management, http_port, tls_port = sorted(ports)
    config = {"pebble": {
        "listenAddress": f"127.0.0.1:{port}",
        "managementListenAddress": f"127.0.0.1:{management}",
        "certificate": str(api_cert), "privateKey": str(api_key),
        "httpPort": http_port, "tlsPort": tls_port, "ocspResponderURL": "",
        "externalAccountBindingRequired": False,
        "externalAccountMACKeys": {EAB_KID: EAB_HMAC},
    }}
    (folder / "pebble.json").write_text(json.dumps(config))
    env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_AUTHZREUSE": "0"}
    env.pop("PEBBLE_VA_ALWAYS_VALID", None)
    _default_records(acme_dns)
    log = folder / "pebble.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [binary, "-config", str(folder / "pebble.json"), "-dnsserver", acme_dns.nameserver],
            cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
    server = Pebble(f"https://127.0.0.1:{port}/dir", api_ca, api_cert, api_key,
                    folder / "pebble-root.pem", port, management, http_port, tls_port, log,
                    process)
    context = server.api_context()
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(server.directory, context=context, timeout=2) as r:
                r.read()
            with urllib.request.urlopen(f"https://127.0.0.1:{management}/roots/0",
                                        context=context, timeout=2) as r:
                server.root.write_bytes(r.read())
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"pebble did not start:\n{server.log_text()}", pytrace=False)
            time.sleep(0.1)
    try:
        yield server
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# ------------------------------------------------------------------ the faulty CA


class FaultyCA:
    """An HTTPS proxy to pebble that can answer new orders with ``rateLimited`` and can
    go away (its port closed) and come back on the same port."""

    def __init__(self, pebble: Pebble) -> None:
        self.pebble = pebble
        self.port = free_port()
        self.rate_limit_seconds: int | None = None
        self.requests: list[tuple[str, str, int]] = []   # method, path, status
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def orders(self) -> int:
        """New orders the CA created (not counting nonces it rejected, or refusals)."""
        return sum(1 for method, path, status in self.requests
                   if method == "POST" and path.startswith("/order-plz") and status == 201)

    def order_attempts(self) -> int:
        """New orders sent, whatever the answer."""
        return sum(1 for method, path, _ in self.requests
                   if method == "POST" and path.startswith("/order-plz"))

    def start(self) -> FaultyCA:
        proxy = self
        upstream = self.pebble.api_context()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if (self.command == "POST" and self.path.startswith("/order-plz")
                        and proxy.rate_limit_seconds is not None):
                    proxy.requests.append((self.command, self.path, 429))
                    problem = json.dumps({
                        "type": "urn:ietf:params:acme:error:rateLimited",
                        "detail": "too many new orders (300) from this account in the last "
                                  "3h0m0s", "status": 429}).encode()
                    self.send_response(429)
                    self.send_header("Content-Type", "application/problem+json")
                    self.send_header("Retry-After", str(proxy.rate_limit_seconds))
                    self.send_header("Content-Length", str(len(problem)))
                    self.end_headers()
                    self.wfile.write(problem)
                    return
                conn = http.client.HTTPSConnection("127.0.0.1", proxy.pebble.port,
                                                   context=upstream, timeout=10)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("connection", "content-length")}
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                proxy.requests.append((self.command, self.path, response.status))
                self.send_response(response.status, response.reason)
                for k, v in response.getheaders():
                    if k.lower() not in ("connection", "transfer-encoding", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_POST = do_HEAD = _forward

        server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.pebble.api_cert, self.pebble.api_key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the port: the CA is unreachable."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join()
            self._server = None


@pytest.fixture
def faulty_ca(pebble: Pebble) -> Iterator[FaultyCA]:
    proxy = FaultyCA(pebble).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def acme_settings(pebble: Pebble) -> Any:
    """``acme_settings(**overrides)``: the ``[plugins.acme]`` table for pebble."""
    from acme_support import acme_table

    return lambda **overrides: acme_table(pebble, **overrides)


@pytest.fixture(autouse=True)
def _show_pebble_log_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """On failure, show the end of pebble's log (what it validated, and how)."""
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed and "pebble" in request.fixturenames:
        pebble = request.getfixturevalue("pebble")
        print("---- pebble log (end) ----\n" + pebble.log_text()[-4000:])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
