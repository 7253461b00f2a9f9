"""Keys, certificate requests, certificate facts, TLS contexts: plain functions.

Everything here is CPU work on small data (key generation is the slowest:
an RSA-4096 key takes about a second), so callers on the event loop run it in
a thread.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import NameOID

ACME_IDENTIFIER_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")
"""id-pe-acmeIdentifier (RFC 8737): the TLS-ALPN-01 challenge certificate's extension."""

ACME_TLS_ALPN = "acme-tls/1"

_MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


# ------------------------------------------------------------------ keys


def generate_key(key_type: str) -> PrivateKeyTypes:
    """A new private key: ``"ecdsa-p256"`` or ``"rsa-2048"``/``"rsa-3072"``/``"rsa-4096"``."""
    if key_type == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type.startswith("rsa-"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
    raise ValueError(f"unknown key type {key_type!r}")


def key_to_pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def key_from_pem(data: bytes) -> PrivateKeyTypes:
    return serialization.load_pem_private_key(data, password=None)


def key_type_of(key: PrivateKeyTypes | PublicKeyTypes) -> str:
    """``"ecdsa-p256"``, ``"rsa-3072"``… (``"ecdsa-secp384r1"`` for curves not offered)."""
    public = key.public_key() if hasattr(key, "public_key") else key
    if isinstance(public, ec.EllipticCurvePublicKey):
        return "ecdsa-p256" if public.curve.name == "secp256r1" else f"ecdsa-{public.curve.name}"
    if isinstance(public, rsa.RSAPublicKey):
        return f"rsa-{public.key_size}"
    return type(public).__name__


def make_csr(key: PrivateKeyTypes, names: list[str] | tuple[str, ...]) -> bytes:
    """A PEM certificate request for ``names`` (all in the SAN; the first is the CN)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]
                        if len(names[0]) <= 64 else [])
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(subject)
           .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                          critical=False)
           .sign(key, hashes.SHA256()))  # type: ignore[arg-type]
    return csr.public_bytes(serialization.Encoding.PEM)


# ------------------------------------------------------------------ certificate facts


@dataclass(frozen=True)
class CertInfo:
    """What ``elemta acme status`` and the renewal schedule need to know of a certificate."""

    names: tuple[str, ...]
    issuer: str
    serial: int
    not_before: datetime.datetime
    not_after: datetime.datetime
    key_type: str
    ari_id: str | None

    @property
    def serial_hex(self) -> str:
        return format(self.serial, "x")

    @property
    def lifetime(self) -> datetime.timedelta:
        return self.not_after - self.not_before

    def covers(self, names: tuple[str, ...] | list[str]) -> bool:
        return set(names) <= set(self.names)


def split_chain(fullchain_pem: bytes) -> list[x509.Certificate]:
    """The certificates of a PEM chain, leaf first; ``ValueError`` when there are none."""
    certificates = x509.load_pem_x509_certificates(fullchain_pem)
    if not certificates:
        raise ValueError("no certificate in the chain")
    return certificates


def cert_info(certificate: x509.Certificate) -> CertInfo:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(n.lower() for n in san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = ()
    return CertInfo(names=names, issuer=certificate.issuer.rfc4514_string(),
                    serial=certificate.serial_number,
                    not_before=certificate.not_valid_before_utc,
                    not_after=certificate.not_valid_after_utc,
                    key_type=key_type_of(certificate.public_key()),
                    ari_id=ari_cert_id(certificate))


def ari_cert_id(certificate: x509.Certificate) -> str | None:
    """The certificate's ACME Renewal Information identifier (RFC 9773, section 4.1):
    base64url(AKI key identifier) "." base64url(DER serial), or ``None`` without an AKI."""
    try:
        aki = certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return None
    if aki.key_identifier is None:
        return None
    serial = certificate.serial_number
    serial_der = serial.to_bytes((serial.bit_length() + 8) // 8, "big", signed=True)
    return f"{_b64url(aki.key_identifier)}.{_b64url(serial_der)}"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def check_pair(fullchain_pem: bytes, key_pem: bytes) -> tuple[x509.Certificate, PrivateKeyTypes]:
    """The leaf and key of a pair; ``ValueError`` when they do not belong together."""
    leaf = split_chain(fullchain_pem)[0]
    key = key_from_pem(key_pem)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise ValueError("the private key does not belong to the certificate")
    return leaf, key


# ------------------------------------------------------------------ TLS contexts


def server_context(cert_file: Path, key_file: Path, *, min_version: str = "1.2",
                   ciphers: str | None = None) -> ssl.SSLContext:
    """A new server context for SMTP serving ``cert_file`` (leaf then chain) and its key.

    The same settings as Elemta's own: TLS 1.2 or newer (``[tls] min_version``),
    no client certificate, no compression or renegotiation, ``[tls] ciphers``.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _MIN_VERSIONS.get(min_version, ssl.TLSVersion.TLSv1_2)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.options |= (ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
                    | ssl.OP_NO_RENEGOTIATION)
    if ciphers:
        ctx.set_ciphers(ciphers)
    ctx.load_cert_chain(cert_file, key_file, password=b"")
    return ctx


def key_authorization_digest(key_authorization: str) -> bytes:
    return hashlib.sha256(key_authorization.encode("ascii")).digest()


def alpn_challenge_certificate(name: str, key_authorization: str) -> tuple[bytes, bytes]:
    """The TLS-ALPN-01 challenge certificate for ``name`` (RFC 8737, section 3), and its key.

    Self-signed, with ``name`` as its only SAN and the critical
    id-pe-acmeIdentifier extension holding the SHA-256 of the key authorization
    (a DER OCTET STRING of 32 bytes).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ACME challenge")])
    digest = key_authorization_digest(key_authorization)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.UnrecognizedExtension(ACME_IDENTIFIER_OID,
                                                  b"\x04\x20" + digest), critical=True)
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_to_pem(key)


def alpn_challenge_context(name: str, key_authorization: str) -> ssl.SSLContext:
    """A server context presenting the challenge certificate, speaking only ``acme-tls/1``."""
    cert_pem, key_pem = alpn_challenge_certificate(name, key_authorization)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols([ACME_TLS_ALPN])
    # the ssl module loads certificates from files only: a private folder, removed at once
    with tempfile.TemporaryDirectory(prefix="elemta-acme-") as folder:
        cert_file, key_file = Path(folder, "cert.pem"), Path(folder, "key.pem")
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        cert_file.write_bytes(cert_pem)
        ctx.load_cert_chain(cert_file, key_file)
    return ctx
