"""Helpers of the elemta-acme tests (the fixtures are in ``conftest.py``)."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import urllib.request
from pathlib import Path
from typing import Any

from cryptography import x509

from elemta.testing import run_cli

NAMES = ["mx.example.test", "smtp.example.test"]
# the external account pebble is started with
EAB_KID = "elemta-test-kid"
EAB_HMAC = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W"


def acme_table(pebble: Any, **overrides: Any) -> dict[str, Any]:
    """A ``[plugins.acme]`` table ordering from ``pebble`` with quick retries."""
    table: dict[str, Any] = {
        "names": list(NAMES),
        "email": "postmaster@example.test",
        "agree_terms": True,
        "directory": pebble.directory,
        "ca_file": str(pebble.api_ca),
        "challenges": ["http-01"],
        "http_address": f"127.0.0.1:{pebble.http_port}",
        "tls_alpn_address": f"127.0.0.1:{pebble.tls_port}",
        "retry_initial_seconds": 1.0,
        "retry_max_seconds": 4.0,
        "order_timeout_seconds": 30.0,
        "request_timeout_seconds": 5.0,
    }
    table.update(overrides)
    return table


def server_config(table: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """An ``elemta_server`` config enabling the plugin in the file, so that ``elemta acme``
    commands run with ``config=server.config_path`` see it too."""
    return {"plugins": {"enabled": ["acme"], "acme": table}, **extra}


class TLSClient:
    """An SMTP client that verifies the server's chain and host name against ``root``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, name: str, root: Path | None, *, implicit: bool,
                   ) -> TLSClient:
        context = ssl.create_default_context(cafile=str(root)) if root else _unverified()
        if implicit:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                "127.0.0.1", port, ssl=context, server_hostname=name), 10)
            client = cls(reader, writer)
            assert (await client.reply())[0] == 220
            assert (await client.cmd("EHLO client.example.test"))[0] == 250
            return client
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
        client = cls(reader, writer)
        assert (await client.reply())[0] == 220
        assert (await client.cmd("EHLO client.example.test"))[0] == 250
        assert (await client.cmd("STARTTLS"))[0] == 220
        await asyncio.wait_for(writer.start_tls(context, server_hostname=name), 10)
        assert (await client.cmd("EHLO client.example.test"))[0] == 250
        return client

    async def reply(self) -> tuple[int, list[str]]:
        lines = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), 10)
            if not raw:
                raise ConnectionError(f"connection closed after {lines}")
            line = raw.decode().rstrip("\r\n")
            lines.append(line[4:])
            if line[3:4] != "-":
                return int(line[:3]), lines

    async def cmd(self, line: str) -> tuple[int, list[str]]:
        self.writer.write(line.encode() + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    def certificate(self) -> x509.Certificate:
        der = self.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der)

    @property
    def serial(self) -> int:
        return self.certificate().serial_number

    def close(self) -> None:
        self.writer.close()


def _unverified() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def served_serial(port: int, *, implicit: bool = False) -> int:
    """The serial of the certificate a new connection gets (not verified)."""
    client = await TLSClient.open(port, "mx.example.test", None, implicit=implicit)
    try:
        return client.serial
    finally:
        client.close()


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def metric_value(text: str, metric_name: str, /, **labels: str) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        metric, _, rest = key.partition("{")
        got = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if metric == metric_name and got == want:
            return float(value)
    return None


def status_json(config_path: Path) -> dict[str, Any]:
    result = run_cli("acme", "status", "--json", config=config_path)
    assert result.exit_code == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


async def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    """Await until ``predicate()`` (sync, or a coroutine function) is true; its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not true within {timeout} s (last: {value!r})")
        await asyncio.sleep(interval)


def make_chain(names: list[str], *, days: float = 90, key_type: str = "ecdsa-p256",
               not_before: Any = None) -> tuple[bytes, bytes]:
    """A leaf for ``names`` signed by a throw-away CA (with an AKI, as CAs issue them),
    as a PEM full chain, and the leaf's PEM key: for tests of the state directory."""
    import datetime

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from elemta_acme.certs import generate_key, key_to_pem

    start = not_before or datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test Intermediate")])
    ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=3650))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(ski, critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = generate_key(key_type)
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return leaf.public_bytes(pem) + ca.public_bytes(pem), key_to_pem(key)
