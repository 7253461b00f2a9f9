"""Server TLS: protocol versions, certificate errors, the self-signed certificate, reload."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import socket
import ssl
import stat
import threading
import time
from pathlib import Path
from typing import AsyncIterator, Iterator

import pluggy
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from elemta import default_tls, hookspecs
from elemta.config import ConfigError, ListenerSettings, ServerSettings, Settings, TLSSettings
from elemta.models import TLSInfo
from elemta.smtp.tls import TLSConfigError, ensure_self_signed, server_context, tls_info
from elemta.testing.client import RawSMTP, unverified_context

HOSTNAME = "mx.example.test"


# ------------------------------------------------------------------ helpers


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def write_pair(directory: Path, name: str, leaf: trustme.LeafCert) -> tuple[Path, Path]:
    cert_file, key_file = directory / f"{name}.crt", directory / f"{name}.key"
    cert_file.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key_file.write_bytes(leaf.private_key_pem.bytes())
    return cert_file, key_file


def serial_of(leaf: trustme.LeafCert) -> int:
    return x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number


def issue(ca: trustme.CA, key_type: trustme.KeyType = trustme.KeyType.ECDSA) -> trustme.LeafCert:
    return ca.issue_cert("localhost", HOSTNAME, "127.0.0.1", key_type=key_type)


def client_context(trust: trustme.CA | Path,
                   version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if isinstance(trust, trustme.CA):
        trust.configure_trust(ctx)
    else:
        ctx.load_verify_locations(trust)
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


@contextlib.asynccontextmanager
async def echo_server(ctx: ssl.SSLContext) -> AsyncIterator[tuple[int, list[TLSInfo]]]:
    """An implicit-TLS echo server; yields its port and the TLS facts of each session."""
    sessions: list[TLSInfo] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sessions.append(tls_info(writer.get_extra_info("ssl_object"), implicit=True))
        try:
            while data := await reader.read(1024):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    try:
        yield server.sockets[0].getsockname()[1], sessions
    finally:
        server.close()
        await server.wait_closed()


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.ssl_object: ssl.SSLObject = writer.get_extra_info("ssl_object")

    @property
    def serial(self) -> int:
        der = self.ssl_object.getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der).serial_number

    async def echo(self, data: bytes = b"ping") -> bytes:
        self.writer.write(data)
        await self.writer.drain()
        return await asyncio.wait_for(self.reader.readexactly(len(data)), 10)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


async def connect(port: int, ctx: ssl.SSLContext, server_hostname: str = "localhost") -> Client:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname=server_hostname), 10)
    return Client(reader, writer)


@contextlib.contextmanager
def one_handshake_server(ctx: ssl.SSLContext) -> Iterator[tuple[int, list[str | Exception]]]:
    """A blocking server for one handshake; yields its port and what the handshake gave.

    For refusals: asyncio drops the connection without flushing the alert, so
    only a blocking server shows the client that the server said no.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    outcome: list[str | Exception] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    outcome.append(tls.version() or "")
            except (ssl.SSLError, OSError) as e:
                outcome.append(e)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], outcome
    finally:
        thread.join(10)
        listener.close()


def context_of(cert_file: Path, key_file: Path, **settings: str) -> ssl.SSLContext:
    return server_context(cert_file, key_file, **settings)[0]


def handshake(port: int, ctx: ssl.SSLContext) -> str | None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.version()


def refusal_reason(outcome: list[str | Exception]) -> str | None:
    [error] = outcome
    assert isinstance(error, ssl.SSLError), error
    return error.reason


# ------------------------------------------------------------ the context


def test_server_context_asks_no_client_certificate_and_disables_compression(tmp_path, ca):
    ctx = context_of(*write_pair(tmp_path, "leaf", issue(ca)))

    assert ctx.verify_mode == ssl.CERT_NONE
    assert ctx.check_hostname is False
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_tls12_and_tls13_clients_are_accepted(tmp_path, ca, version):
    ctx = context_of(*write_pair(tmp_path, "leaf", issue(ca)))
    expected = {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]

    async with echo_server(ctx) as (port, sessions):
        client = await connect(port, client_context(ca, version))
        assert await client.echo() == b"ping"
        await client.close()

    assert client.ssl_object.version() == expected
    assert sessions[0].version == expected
    assert sessions[0].implicit is True
    assert sessions[0].bits >= 128
    assert sessions[0].cipher == client.ssl_object.cipher()[0]


def tls11_client(ca: trustme.CA) -> ssl.SSLContext:
    """A client that really offers TLS 1.1.

    OpenSSL 3 will not even send a TLS 1.1 hello at security level 1 or above,
    so without @SECLEVEL=0 the client would refuse before the server is asked.
    """
    ctx = client_context(ca)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    return ctx


@pytest.mark.skipif(not ssl.HAS_TLSv1_1, reason="this OpenSSL is built without TLS 1.1")
@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_tls11_client_is_refused_by_the_server(tmp_path, ca):
    cert_file, key_file = write_pair(tmp_path, "leaf", issue(ca))
    old_server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    old_server.set_ciphers("DEFAULT:@SECLEVEL=0")
    old_server.minimum_version = ssl.TLSVersion.TLSv1
    old_server.load_cert_chain(cert_file, key_file)
    with one_handshake_server(old_server) as (port, _):
        # the client can speak TLS 1.1 here, so a refusal below is the server's
        assert handshake(port, tls11_client(ca)) == "TLSv1.1"

    with one_handshake_server(context_of(cert_file, key_file)) as (port, outcome):
        with pytest.raises(ssl.SSLError) as refused:
            handshake(port, tls11_client(ca))

    assert refusal_reason(outcome) == "UNSUPPORTED_PROTOCOL"
    assert refused.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION"


@pytest.mark.parametrize("version,accepted", [
    (ssl.TLSVersion.TLSv1_2, False), (ssl.TLSVersion.TLSv1_3, True)])
def test_min_version_13_refuses_tls12_clients(tmp_path, ca, version, accepted):
    ctx = context_of(*write_pair(tmp_path, "leaf", issue(ca)), min_version="1.3")

    with one_handshake_server(ctx) as (port, outcome):
        if accepted:
            assert handshake(port, client_context(ca, version)) == "TLSv1.3"
        else:
            with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):
                handshake(port, client_context(ca, version))

    if accepted:
        assert outcome == ["TLSv1.3"]
    else:
        assert refusal_reason(outcome) == "UNSUPPORTED_PROTOCOL"


def test_unknown_min_version_is_refused(tmp_path, ca):
    with pytest.raises(ValueError, match="min_version"):
        context_of(*write_pair(tmp_path, "leaf", issue(ca)), min_version="1.1")


async def test_ciphers_limit_the_tls12_suites(tmp_path, ca):
    ctx = context_of(*write_pair(tmp_path, "leaf", issue(ca)),
                         ciphers="ECDHE-ECDSA-CHACHA20-POLY1305")

    async with echo_server(ctx) as (port, sessions):
        client = await connect(port, client_context(ca, ssl.TLSVersion.TLSv1_2))
        await client.close()

    assert sessions[0].cipher == "ECDHE-ECDSA-CHACHA20-POLY1305"


def test_cipher_list_selecting_nothing_is_a_config_error(tmp_path, ca):
    with pytest.raises(TLSConfigError, match="'NO-SUCH-CIPHER'.*openssl ciphers"):
        context_of(*write_pair(tmp_path, "leaf", issue(ca)), ciphers="NO-SUCH-CIPHER")


def test_tls_info_before_the_handshake_is_an_error(tmp_path, ca):
    ctx = context_of(*write_pair(tmp_path, "leaf", issue(ca)))
    ssl_object = ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)

    with pytest.raises(ValueError, match="handshake"):
        tls_info(ssl_object, implicit=False)


# ------------------------------------------------------- certificate errors


def test_missing_certificate_file_is_named(tmp_path, ca):
    _, key_file = write_pair(tmp_path, "leaf", issue(ca))
    missing = tmp_path / "nope" / "cert.pem"

    with pytest.raises(TLSConfigError) as error:
        context_of(missing, key_file)

    assert str(error.value).startswith(f"{missing}: no such file (the certificate)")
    assert isinstance(error.value, ConfigError)


def test_missing_key_file_is_named(tmp_path, ca):
    cert_file, _ = write_pair(tmp_path, "leaf", issue(ca))

    with pytest.raises(TLSConfigError) as error:
        context_of(cert_file, tmp_path / "key.pem")

    assert str(error.value).startswith(f"{tmp_path / 'key.pem'}: no such file (the private key)")


def test_der_certificate_is_reported_as_not_pem_with_the_conversion(tmp_path, ca):
    cert_file, key_file = write_pair(tmp_path, "leaf", issue(ca))
    der = x509.load_pem_x509_certificate(cert_file.read_bytes()).public_bytes(
        serialization.Encoding.DER)
    cert_file.write_bytes(der)

    with pytest.raises(TLSConfigError) as error:
        context_of(cert_file, key_file)

    message = str(error.value)
    assert message.startswith(f"{cert_file}: not a PEM certificate")
    assert "openssl x509 -inform DER" in message


def test_key_file_holding_a_certificate_is_reported_as_not_a_key(tmp_path, ca):
    cert_file, _ = write_pair(tmp_path, "leaf", issue(ca))

    with pytest.raises(TLSConfigError, match="not a PEM private key"):
        context_of(cert_file, cert_file)


def test_key_that_does_not_match_the_certificate_is_named(tmp_path, ca):
    cert_file, _ = write_pair(tmp_path, "one", issue(ca))
    _, other_key = write_pair(tmp_path, "two", issue(ca))

    with pytest.raises(TLSConfigError) as error:
        context_of(cert_file, other_key)

    message = str(error.value)
    assert message.startswith(f"{other_key}: this private key does not belong to the "
                              f"certificate in {cert_file}")
    assert "openssl pkey -pubout" in message


def test_encrypted_key_is_refused_with_how_to_decrypt_it(tmp_path, ca):
    cert_file, key_file = write_pair(tmp_path, "leaf", issue(ca))
    key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    key_file.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))

    with pytest.raises(TLSConfigError) as error:
        context_of(cert_file, key_file)

    assert str(error.value).startswith(f"{key_file}: the private key is encrypted")
    assert "openssl pkey -in" in str(error.value)


# ------------------------------------------------------ self-signed certificate


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_self_signed_certificate_is_generated_with_a_private_key(tmp_path):
    state_dir = tmp_path / "state"

    cert_file, key_file = ensure_self_signed(state_dir, HOSTNAME)

    assert (cert_file, key_file) == (state_dir / "tls" / "selfsigned.crt",
                                     state_dir / "tls" / "selfsigned.key")
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((state_dir / "tls").stat().st_mode) == 0o700
    assert [p.name for p in (state_dir / "tls").iterdir() if p.name.startswith(".")] == []
    certificate = load_cert(cert_file)
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [HOSTNAME, "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    key = certificate.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert datetime.timedelta(days=365) <= lifetime <= datetime.timedelta(days=366)


def test_self_signed_creation_leaves_an_existing_state_dir_mode_alone(tmp_path):
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o750)
    os.chmod(state_dir, 0o750)

    ensure_self_signed(state_dir, HOSTNAME)

    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o750


@pytest.mark.parametrize("server_hostname", [HOSTNAME, "localhost"])
async def test_self_signed_certificate_verifies_for_its_names(tmp_path, server_hostname):
    cert_file, key_file = ensure_self_signed(tmp_path / "state", HOSTNAME)
    client = client_context(cert_file)
    # what Python 3.13's default context checks
    client.verify_flags |= ssl.VERIFY_X509_STRICT

    async with echo_server(context_of(cert_file, key_file)) as (port, _):
        connection = await connect(port, client, server_hostname=server_hostname)
        assert await connection.echo() == b"ping"
        await connection.close()


def test_self_signed_certificate_is_reused(tmp_path):
    first = ensure_self_signed(tmp_path, HOSTNAME)
    before = [p.read_bytes() for p in first]

    second = ensure_self_signed(tmp_path, HOSTNAME.upper())

    assert second == first
    assert [p.read_bytes() for p in second] == before


def test_self_signed_certificate_is_replaced_when_the_hostname_changes(tmp_path):
    cert_file, _ = ensure_self_signed(tmp_path, HOSTNAME)
    old_serial = load_cert(cert_file).serial_number

    ensure_self_signed(tmp_path, "mail.example.test")

    certificate = load_cert(cert_file)
    assert certificate.serial_number != old_serial
    assert "mail.example.test" in certificate.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)


def test_self_signed_certificate_is_renewed_30_days_before_it_expires(tmp_path):
    cert_file, key_file = ensure_self_signed(tmp_path, HOSTNAME)
    key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    old = load_cert(cert_file)
    now = datetime.datetime.now(datetime.timezone.utc)
    expiring = (x509.CertificateBuilder().subject_name(old.subject).issuer_name(old.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=300))
                .not_valid_after(now + datetime.timedelta(days=29))
                .add_extension(old.extensions.get_extension_for_class(
                    x509.SubjectAlternativeName).value, critical=False)
                .sign(key, hashes.SHA256()))
    cert_file.write_bytes(expiring.public_bytes(serialization.Encoding.PEM))

    ensure_self_signed(tmp_path, HOSTNAME)

    renewed = load_cert(cert_file)
    assert renewed.serial_number != expiring.serial_number
    assert renewed.not_valid_after_utc > now + datetime.timedelta(days=364)


def test_self_signed_pair_that_does_not_match_is_replaced(tmp_path):
    cert_file, key_file = ensure_self_signed(tmp_path, HOSTNAME)
    old_serial = load_cert(cert_file).serial_number
    key_file.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))

    ensure_self_signed(tmp_path, HOSTNAME)

    assert load_cert(cert_file).serial_number != old_serial
    context_of(cert_file, key_file)


def test_self_signed_certificate_logs_one_warning_naming_the_settings(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="elemta.tls")

    cert_file, _ = ensure_self_signed(tmp_path, HOSTNAME)

    [record] = caplog.records
    message = record.getMessage()
    assert "self-signed" in message and str(cert_file) in message
    assert "[tls] cert_file and key_file" in message


def test_unwritable_state_dir_is_a_config_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")

    with pytest.raises(TLSConfigError) as error:
        ensure_self_signed(blocker / "state", HOSTNAME)

    assert "cannot write a self-signed certificate" in str(error.value)
    assert "[tls] cert_file" in str(error.value)


# ------------------------------------------------------- built-in plugin


def settings_for(tmp_path: Path, tls: TLSSettings | None = None) -> Settings:
    return Settings(server=ServerSettings(hostname=HOSTNAME, state_dir=Path("state")),
                    tls=tls or TLSSettings(), source=tmp_path / "elemta.toml")


def listener(name: str, tls: str) -> ListenerSettings:
    return ListenerSettings(name=name, address="127.0.0.1:0", tls=tls)


def test_hook_tls_context(tmp_path):
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(default_tls.make_plugin(settings_for(tmp_path)), name="elemta.default_tls")
    plugin_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)

    class CertificatePlugin:
        @hookspecs.hookimpl
        def tls_context(self, listener):
            return plugin_ctx

    pm.register(CertificatePlugin(), name="acme")

    results = pm.hook.tls_context(listener=listener("mx", "starttls"))

    assert results[0] is plugin_ctx
    assert isinstance(results[1], ssl.SSLContext)


def test_default_tls_gives_no_context_to_plaintext_listeners(tmp_path):
    tls = default_tls.make_plugin(settings_for(tmp_path))

    assert tls.tls_context(listener("plain", "none")) is None
    assert not (tmp_path / "state").exists()


def test_default_tls_shares_one_self_signed_context(tmp_path):
    tls = default_tls.make_plugin(settings_for(tmp_path))

    starttls = tls.tls_context(listener("mx", "starttls"))
    implicit = tls.tls_context(listener("smtps", "implicit"))

    assert isinstance(starttls, ssl.SSLContext)
    assert implicit is starttls
    assert (tmp_path / "state" / "tls" / "selfsigned.crt").exists()


async def test_default_tls_uses_configured_files_relative_to_the_config(
        tmp_path, ca):
    leaf = issue(ca)
    (tmp_path / "certs").mkdir()
    write_pair(tmp_path / "certs", "mx", leaf)
    tls = default_tls.make_plugin(settings_for(tmp_path, TLSSettings(
        cert_file=Path("certs/mx.crt"), key_file=Path("certs/mx.key"))))

    ctx = tls.tls_context(listener("mx", "implicit"))

    async with echo_server(ctx) as (port, _):
        client = await connect(port, client_context(ca))
        assert client.serial == serial_of(leaf)
        await client.close()
    assert not (tmp_path / "state").exists()


def test_default_tls_error_names_the_config_file_and_section(tmp_path):
    tls = default_tls.make_plugin(settings_for(tmp_path, TLSSettings(
        cert_file=Path("missing.crt"), key_file=Path("missing.key"))))

    with pytest.raises(TLSConfigError) as error:
        tls.tls_context(listener("mx", "starttls"))

    assert str(error.value).startswith(
        f"{tmp_path / 'elemta.toml'}: [tls]: {tmp_path / 'missing.crt'}: no such file")


def test_default_tls_asked_again_with_unchanged_files_keeps_its_context(tmp_path, ca, caplog):
    cert_file, key_file = write_pair(tmp_path, "mx", issue(ca))
    tls = default_tls.make_plugin(settings_for(tmp_path, TLSSettings(cert_file=cert_file,
                                                             key_file=key_file)))
    first = tls.tls_context(listener("mx", "starttls"))
    caplog.set_level(logging.INFO, logger="elemta.tls")

    assert tls.tls_context(listener("mx", "starttls")) is first
    assert tls.tls_context(listener("smtps", "implicit")) is first
    assert "new connections use" not in caplog.text


async def test_default_tls_asked_again_after_the_files_changed_builds_a_new_context(
        tmp_path, ca, caplog):
    old, new = issue(ca), issue(ca)
    cert_file, key_file = write_pair(tmp_path, "mx", old)
    tls = default_tls.make_plugin(settings_for(tmp_path, TLSSettings(cert_file=cert_file,
                                                             key_file=key_file)))
    before = tls.tls_context(listener("mx", "starttls"))
    write_pair(tmp_path, "mx", new)
    caplog.set_level(logging.INFO, logger="elemta.tls")

    after = tls.tls_context(listener("mx", "starttls"))

    assert after is not before
    assert tls.tls_context(listener("smtps", "implicit")) is after
    for ctx, leaf in ((before, old), (after, new)):
        async with echo_server(ctx) as (port, _):
            client = await connect(port, client_context(ca))
            assert client.serial == serial_of(leaf)
            await client.close()
    assert f"serial {serial_of(new):x}" in caplog.text


def test_default_tls_rebuilt_context_keeps_the_tls_settings(tmp_path, ca):
    cert_file, key_file = write_pair(tmp_path, "mx", issue(ca))
    tls = default_tls.make_plugin(settings_for(tmp_path, TLSSettings(
        cert_file=cert_file, key_file=key_file, min_version="1.3")))
    tls.tls_context(listener("mx", "starttls"))
    write_pair(tmp_path, "mx", issue(ca))
    ctx = tls.tls_context(listener("mx", "starttls"))

    with one_handshake_server(ctx) as (port, outcome):
        with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):
            handshake(port, client_context(ca, ssl.TLSVersion.TLSv1_2))

    assert refusal_reason(outcome) == "UNSUPPORTED_PROTOCOL"


async def test_default_tls_unusable_new_files_are_logged_once_and_the_old_context_stays(
        tmp_path, ca, caplog):
    old = issue(ca)
    cert_file, key_file = write_pair(tmp_path, "mx", old)
    tls = default_tls.make_plugin(settings_for(tmp_path, TLSSettings(cert_file=cert_file,
                                                             key_file=key_file)))
    ctx = tls.tls_context(listener("mx", "starttls"))
    write_pair(tmp_path, "other", issue(ca))
    key_file.write_bytes((tmp_path / "other.key").read_bytes())

    assert tls.tls_context(listener("mx", "starttls")) is ctx
    assert tls.tls_context(listener("smtps", "implicit")) is ctx

    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "not reloaded" in record.getMessage() and "does not belong" in record.getMessage()
    async with echo_server(ctx) as (port, _):
        client = await connect(port, client_context(ca))
        assert client.serial == serial_of(old)
        await client.close()


def test_default_tls_keeps_a_valid_self_signed_certificate(tmp_path):
    tls = default_tls.make_plugin(settings_for(tmp_path))
    first = tls.tls_context(listener("mx", "starttls"))
    cert_file = tmp_path / "state" / "tls" / "selfsigned.crt"
    before = cert_file.read_bytes()

    assert tls.tls_context(listener("mx", "starttls")) is first
    assert cert_file.read_bytes() == before


# ------------------------------------------------------- reload through the hook


async def smtp_tls_session(port: int, trust: ssl.SSLContext, implicit: bool) -> tuple[RawSMTP, int]:
    """An SMTP session encrypted by STARTTLS, or implicitly; and the server's certificate serial."""
    client = RawSMTP(port, tls=trust if implicit else None)
    await client.connect()
    if not implicit:
        assert (await client.cmd("EHLO client.example")).code == 250
        assert (await client.starttls(trust)).code == 220
    assert (await client.cmd("EHLO client.example")).code == 250
    der = client.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return client, x509.load_der_x509_certificate(der).serial_number


@pytest.mark.parametrize("old_type,new_type", [
    (trustme.KeyType.ECDSA, trustme.KeyType.ECDSA),
    # loaded into the live context in place, the ECDSA certificate would stay in service
    (trustme.KeyType.ECDSA, trustme.KeyType.RSA),
    (trustme.KeyType.RSA, trustme.KeyType.ECDSA),
], ids=["ecdsa-ecdsa", "ecdsa-rsa", "rsa-ecdsa"])
async def test_reload_serves_the_new_certificate_to_new_sessions_and_keeps_open_ones(
        elemta_server, tmp_path, ca, old_type, new_type):
    old, new = issue(ca, old_type), issue(ca, new_type)
    cert_file, key_file = write_pair(tmp_path, "mx", old)
    server = await elemta_server({"tls": {"cert_file": str(cert_file), "key_file": str(key_file)}})
    trust = client_context(ca)
    before = [await smtp_tls_session(server.port(name), trust, implicit)
              for name, implicit in (("mx", False), ("smtps", True))]
    write_pair(tmp_path, "mx", new)

    assert await server.app.reload_tls() is True

    for (client, serial), (name, implicit) in zip(before, (("mx", False), ("smtps", True))):
        fresh, fresh_serial = await smtp_tls_session(server.port(name), trust, implicit)
        assert (serial, fresh_serial) == (serial_of(old), serial_of(new)), name
        assert (await client.cmd("NOOP")).code == 250
        assert (await client.cmd("QUIT")).code == 221
        fresh.close()
        client.close()


class RotatingCertificates:
    """A certificate plugin: each time it is asked, the next of its contexts."""

    def __init__(self, contexts: list[ssl.SSLContext]) -> None:
        self.contexts = contexts
        self.asked: list[str] = []
        self.fail = False

    @hookspecs.hookimpl
    def tls_context(self, listener):
        self.asked.append(listener.name)
        if self.fail:
            raise OSError("the certificate store is unreachable")
        return self.contexts[min(len(self.asked), len(self.contexts)) - 1]


async def test_reload_asks_a_certificate_plugin_again_for_every_listener(
        elemta_server, tmp_path, ca):
    leaves = [issue(ca) for _ in range(6)]
    contexts = [context_of(*write_pair(tmp_path, f"c{i}", leaf)) for i, leaf in enumerate(leaves)]
    plugin = RotatingCertificates(contexts)
    server = await elemta_server(plugins=[("certificates", plugin)])
    trust = client_context(ca)
    tls_listeners = ["mx", "submission", "smtps"]
    assert plugin.asked == tls_listeners
    old_session, old_serial = await smtp_tls_session(server.port("smtps"), trust, True)

    assert await server.app.reload_tls() is True

    assert plugin.asked == tls_listeners * 2
    new_session, new_serial = await smtp_tls_session(server.port("smtps"), trust, True)
    _, mx_serial = await smtp_tls_session(server.port("mx"), trust, False)
    assert (old_serial, new_serial, mx_serial) == (
        serial_of(leaves[2]), serial_of(leaves[5]), serial_of(leaves[3]))
    assert (await old_session.cmd("QUIT")).code == 221
    for client in (old_session, new_session):
        client.close()


async def test_reload_that_a_plugin_fails_keeps_the_certificates_in_service(
        elemta_server, tmp_path, ca, caplog):
    leaves = [issue(ca) for _ in range(3)]
    plugin = RotatingCertificates(
        [context_of(*write_pair(tmp_path, f"c{i}", leaf)) for i, leaf in enumerate(leaves)])
    server = await elemta_server(plugins=[("certificates", plugin)])
    plugin.fail = True

    assert await server.app.reload_tls() is False

    client, serial = await smtp_tls_session(server.port("smtps"), client_context(ca), True)
    client.close()
    assert serial == serial_of(leaves[2])
    assert "listener smtps keeps its certificate: plugin certificates failed" in caplog.text


# ------------------------------------------------------------------ handshake limits


async def closed_after(reader: asyncio.StreamReader, limit: float) -> float:
    """Seconds until the server closes the connection (read returns nothing)."""
    start = time.monotonic()
    async with asyncio.timeout(limit):
        while await reader.read(1024):
            pass
    return time.monotonic() - start


async def test_a_stalled_implicit_tls_handshake_ends_at_the_configured_limit(elemta_server):
    server = await elemta_server({"server": {"tls_handshake_timeout_seconds": 1.5}})
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port("smtps"))
    took = await closed_after(reader, 10)  # no ClientHello is ever sent
    writer.close()
    assert 1.3 <= took < 2.5
    assert not server.app.smtp.sessions, "the session is released"


async def test_a_stalled_starttls_handshake_ends_at_the_configured_limit(elemta_server):
    server = await elemta_server({"server": {"tls_handshake_timeout_seconds": 1.5}})
    async with RawSMTP(server.port("mx")) as client:
        await client.cmd("EHLO client.example")
        assert (await client.cmd("STARTTLS")).code == 220
        took = await closed_after(client.reader, 10)
    assert 1.3 <= took < 2.5
    await asyncio.sleep(0.1)
    assert not server.app.smtp.sessions


async def test_handshakes_beyond_the_limit_wait_for_a_slot_then_give_up(elemta_server):
    server = await elemta_server({"server": {"tls_handshake_timeout_seconds": 1.0,
                                             "max_tls_handshakes": 1}})
    slots = server.app.smtp.handshakes
    await slots.acquire()  # as a handshake in progress would: no slot is free
    try:
        async with RawSMTP(server.port("mx")) as client:
            await client.cmd("EHLO client.example")
            reply = await client.cmd("STARTTLS")  # waits for a slot, then answers
            assert (reply.code, reply.enhanced) == (454, "4.7.0")
            assert (await client.cmd("NOOP")).code == 250  # the session goes on in plaintext
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port("smtps"))
            assert await closed_after(reader, 5) >= 0.9  # no slot: closed, no greeting
            writer.close()
            slots.release()
            assert (await client.starttls(unverified_context())).code == 220
            assert (await client.cmd("EHLO client.example")).code == 250
    finally:
        if slots.locked():
            slots.release()


async def test_a_thousand_tls_sessions_come_and_go_without_a_trace(elemta_server):
    """Sessions whose handshake never finished are released, not kept (nor counted)."""
    server = await elemta_server({"server": {"max_connections": 2000,
                                             "max_connections_per_ip": 2000}})
    writers = []
    for _ in range(10):
        writers += [w for _, w in await asyncio.gather(*(
            asyncio.open_connection("127.0.0.1", server.port("smtps")) for _ in range(50)))]
    await asyncio.sleep(0.3)
    for w in writers:
        w.transport.abort()
    async with asyncio.timeout(10):
        while server.app.smtp.sessions:
            await asyncio.sleep(0.05)
