"""Server TLS: contexts, certificate checks, a generated self-signed certificate.

A certificate is replaced (on reload) by building a whole new context, which
the server hands to new connections, instead of calling ``load_cert_chain``
again on the live one. Loading again in place only replaces the certificate
of the *same key type*: OpenSSL keeps one certificate per key type, so after
going from an ECDSA to an RSA certificate the old ECDSA one would still be
served to every client that prefers ECDSA (most do), and a failed in-place load
leaves the live context without a usable certificate. Established connections
keep the context they were made with.

``cryptography`` is imported by the functions that read or make certificates,
not with the module: a server whose listeners have no TLS never loads it
(about 25 ms of start-up).
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import ssl
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import ConfigError
from ..models import TLSInfo

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

log = logging.getLogger("elemta.tls")

_MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}

SELF_SIGNED_VALIDITY = datetime.timedelta(days=365)
SELF_SIGNED_RENEW_BEFORE = datetime.timedelta(days=30)


class TLSConfigError(ConfigError):
    """A certificate, key or TLS setting cannot be used; ``str()`` names the file and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__([message])


# ------------------------------------------------------------------ contexts


def server_context(cert_file: Path, key_file: Path, *, min_version: str = "1.2",
                   ciphers: str | None = None) -> tuple[ssl.SSLContext, x509.Certificate]:
    """A server TLS context for SMTP from a PEM certificate chain and its key.

    TLS 1.2 or newer (``min_version="1.3"`` for 1.3 only); no client
    certificate is asked for; ``ciphers`` (OpenSSL syntax) limits the TLS 1.2
    suites, TLS 1.3 suites are OpenSSL's. Returns the context and the leaf
    certificate it serves.

    Raises :class:`TLSConfigError` naming the file and how to fix it.
    """
    return _build(cert_file, key_file, min_version, ciphers)


def _build(cert_file: Path, key_file: Path, min_version: str,
           ciphers: str | None) -> tuple[ssl.SSLContext, x509.Certificate]:
    if min_version not in _MIN_VERSIONS:
        raise ValueError(f"min_version must be one of {', '.join(_MIN_VERSIONS)}, "
                         f"got {min_version!r}")
    certificate = check_pair(cert_file, key_file)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _MIN_VERSIONS[min_version]
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.options |= (ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
                    | ssl.OP_NO_RENEGOTIATION)
    if ciphers:
        try:
            ctx.set_ciphers(ciphers)
        except ssl.SSLError:
            raise TLSConfigError(
                f"ciphers = {ciphers!r} selects no cipher {ssl.OPENSSL_VERSION} knows; use "
                "OpenSSL cipher-list syntax such as \"ECDHE+AESGCM:ECDHE+CHACHA20\" "
                "(`openssl ciphers -v LIST` shows what a list selects)") from None
    try:
        # An empty passphrase: a key encrypted after check_pair() looked at it
        # then fails to load instead of making OpenSSL prompt on the terminal.
        ctx.load_cert_chain(cert_file, key_file, password=b"")
    except ssl.SSLError as e:
        raise TLSConfigError(
            f"{cert_file}: OpenSSL refuses this certificate or its key {key_file} "
            f"({e.reason or e}); a key shorter than 2048-bit RSA or a certificate signed "
            "with SHA-1 is refused: get a new certificate") from None
    now = datetime.datetime.now(datetime.timezone.utc)
    if certificate.not_valid_after_utc < now:
        log.warning("TLS: the certificate in %s expired on %s; clients that verify "
                    "certificates will refuse it: renew it and send SIGHUP", cert_file,
                    certificate.not_valid_after_utc.date())
    return ctx, certificate


# -------------------------------------------------------------- file checks


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise TLSConfigError(f"{path}: no such file (the {what}); check the path") from None
    except IsADirectoryError:
        raise TLSConfigError(f"{path}: is a directory, not the {what} file") from None
    except OSError as e:
        raise TLSConfigError(f"{path}: cannot read the {what}: {e.strerror}; make it "
                             "readable by the user Elemta runs as") from None


def _read_certificates(cert_file: Path) -> list[x509.Certificate]:
    from cryptography import x509

    data = _read(cert_file, "certificate")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSConfigError(
            f"{cert_file}: not a PEM certificate (expected a \"-----BEGIN CERTIFICATE-----\" "
            "block: the server certificate first, then its intermediates); convert a DER "
            "file with `openssl x509 -inform DER -in FILE -out cert.pem`") from None


def _read_key(key_file: Path) -> PrivateKeyTypes:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    data = _read(key_file, "private key")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TLSConfigError(
            f"{key_file}: the private key is encrypted and a server cannot ask for its "
            "passphrase; decrypt it with `openssl pkey -in FILE -out key.pem` and "
            "protect it with `chmod 600 key.pem` instead") from None
    except (ValueError, UnsupportedAlgorithm):
        raise TLSConfigError(
            f"{key_file}: not a PEM private key (expected a \"-----BEGIN PRIVATE KEY-----\" "
            "block); convert a DER file with `openssl pkey -inform DER -in FILE -out "
            "key.pem`") from None


def check_pair(cert_file: Path, key_file: Path) -> x509.Certificate:
    """Check that ``cert_file`` holds PEM certificates and ``key_file`` the leaf's key.

    Returns the leaf certificate; raises :class:`TLSConfigError` naming the file.
    """
    from cryptography.hazmat.primitives import serialization

    certificate = _read_certificates(cert_file)[0]
    key = _read_key(key_file)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != certificate.public_key().public_bytes(*spki):
        raise TLSConfigError(
            f"{key_file}: this private key does not belong to the certificate in {cert_file} "
            "(the first certificate in that file must be the server's own); use the key the "
            "certificate was issued for: `openssl x509 -noout -pubkey -in CERT` and "
            "`openssl pkey -pubout -in KEY` print the same key for a matching pair")
    return certificate


# ---------------------------------------------------------------- self-signed


def _name_of(hostname: str) -> str:
    try:
        return str(ipaddress.ip_address(hostname))
    except ValueError:
        return hostname.lower().rstrip(".")


def _names_in(certificate: x509.Certificate) -> set[str]:
    from cryptography import x509

    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return ({n.lower().rstrip(".") for n in san.get_values_for_type(x509.DNSName)}
            | {str(ip) for ip in san.get_values_for_type(x509.IPAddress)})


def _reusable(cert_file: Path, key_file: Path, hostname: str) -> x509.Certificate | None:
    if not (cert_file.exists() and key_file.exists()):
        return None
    try:
        certificate = check_pair(cert_file, key_file)
    except TLSConfigError as e:
        log.info("TLS: replacing the self-signed certificate: %s", e)
        return None
    now = datetime.datetime.now(datetime.timezone.utc)
    if _name_of(hostname) not in _names_in(certificate):
        return None
    if not certificate.not_valid_before_utc <= now < (certificate.not_valid_after_utc
                                                      - SELF_SIGNED_RENEW_BEFORE):
        return None
    return certificate


def _self_signed(hostname: str) -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for name in (_name_of(hostname), "localhost", "127.0.0.1", "::1"):
        try:
            general: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            general = x509.DNSName(name)
        if general not in names:
            names.append(general)
    # X.509 caps the common name at 64 characters; the SAN is what clients check.
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]
                        if len(hostname) <= 64 else [])
    now = datetime.datetime.now(datetime.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # an hour back so a client whose clock is a little behind accepts it
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + SELF_SIGNED_VALIDITY)
        .add_extension(x509.SubjectAlternativeName(names), critical=not subject)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ensure_self_signed(state_dir: Path, hostname: str) -> tuple[Path, Path]:
    """The paths of a self-signed certificate and key for ``hostname`` under ``state_dir/tls``.

    The pair there is reused while it names ``hostname`` and has more than 30
    days left; otherwise a new one (ECDSA P-256, one year, also valid for
    localhost, 127.0.0.1 and ::1) replaces it. Logs a warning either way,
    because clients that verify certificates will not trust it.
    """
    tls_dir = Path(state_dir) / "tls"
    cert_file, key_file = tls_dir / "selfsigned.crt", tls_dir / "selfsigned.key"
    certificate = _reusable(cert_file, key_file, hostname)
    if certificate is not None:
        status = f"expires {certificate.not_valid_after_utc.date()}"
    else:
        cert_pem, key_pem = _self_signed(hostname)
        try:
            Path(state_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
            tls_dir.mkdir(mode=0o700, exist_ok=True)
            # key first: a crash between the two leaves a pair that does not
            # match, which the next start replaces
            _write_atomically(key_file, key_pem, 0o600)
            _write_atomically(cert_file, cert_pem, 0o644)
            dir_fd = os.open(tls_dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as e:
            raise TLSConfigError(
                f"{tls_dir}: cannot write a self-signed certificate there: {e.strerror}; make "
                f"{state_dir} writable by the user Elemta runs as, or configure a certificate "
                "with [tls] cert_file and key_file") from None
        status = "generated now"
    log.warning("TLS: using a self-signed certificate for %s (%s, %s); clients that verify "
                "certificates will not trust it: set [tls] cert_file and key_file to a "
                "CA-issued certificate", hostname, cert_file, status)
    return cert_file, key_file


# ---------------------------------------------------------------- session facts


def tls_info(ssl_object: ssl.SSLObject | ssl.SSLSocket, implicit: bool) -> TLSInfo:
    """The facts about an established TLS session for ``session.tls`` and trace headers."""
    cipher, version = ssl_object.cipher(), ssl_object.version()
    if cipher is None or version is None:
        raise ValueError("the TLS handshake has not completed")
    name, _protocol, bits = cipher
    return TLSInfo(version=version, cipher=name, bits=bits, implicit=implicit)
