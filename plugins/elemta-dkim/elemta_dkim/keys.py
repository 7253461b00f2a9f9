"""Private keys: loading them safely, making new ones, and the DNS record that goes with each."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from elemta import DkimKey

from .settings import KeySettings

Algorithm = Literal["rsa", "ed25519"]
PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

# RFC 8301 §3.2: signers MUST use RSA keys of at least 1024 bits and SHOULD use 2048
MIN_RSA_BITS = 1024
DEFAULT_RSA_BITS = 2048
MAX_RSA_BITS = 8192


class KeyFileError(Exception):
    """A key file that cannot be used; ``str()`` names the file and the fix."""


@dataclass(frozen=True, slots=True, eq=False)
class SigningKey:
    """A loaded private key and when it may sign."""

    domain: str
    selector: str
    algorithm: Algorithm
    path: Path
    private: PrivateKey
    not_before: dt.datetime | None
    not_after: dt.datetime | None

    @property
    def a_tag(self) -> str:
        return "ed25519-sha256" if self.algorithm == "ed25519" else "rsa-sha256"

    @property
    def bits(self) -> int:
        return self.private.key_size if isinstance(self.private, rsa.RSAPrivateKey) else 256

    def valid_at(self, now: dt.datetime) -> bool:
        return ((self.not_before is None or self.not_before <= now)
                and (self.not_after is None or now < self.not_after))

    def sign_digest(self, digest: bytes) -> bytes:
        """The DKIM signature of a SHA-256 digest of the signed header fields.

        RSA: RSASSA-PKCS1-v1_5 (RFC 6376 §3.3.1). Ed25519: PureEdDSA over the
        digest itself (RFC 8463 §3).
        """
        if isinstance(self.private, rsa.RSAPrivateKey):
            return self.private.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
        return self.private.sign(digest)

    def public_p(self) -> str:
        return public_p(self.private)


def public_p(private: PrivateKey) -> str:
    """The ``p=`` value of the DNS record for ``private``."""
    public = private.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raw = public.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(raw).decode("ascii")


def dns_record(private: PrivateKey) -> str:
    """The TXT record text to publish at ``selector._domainkey.domain``."""
    kind = "ed25519" if isinstance(private, ed25519.Ed25519PrivateKey) else "rsa"
    return f"v=DKIM1; k={kind}; p={public_p(private)}"


def txt_strings(record: str, size: int = 255) -> list[str]:
    """``record`` cut into character-strings of at most ``size`` bytes (one TXT record)."""
    return [record[i:i + size] for i in range(0, len(record), size)] or [""]


def zone_line(name: str, record: str, ttl: int = 3600) -> str:
    """``record`` as a zone-file line, split into 255-byte strings."""
    strings = " ".join(f'"{s}"' for s in txt_strings(record))
    return f"{name}. {ttl} IN TXT ( {strings} )"


# ------------------------------------------------------------------ loading


def _parse(data: bytes, path: Path | str) -> PrivateKey:
    text = data.strip()
    if text.startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except TypeError:
            raise KeyFileError(f"{path}: the private key is encrypted; store it without a "
                            "passphrase (file mode 0600 protects it), or make a new one "
                            "with `elemta dkim keygen`") from None
        except (ValueError, UnsupportedAlgorithm) as e:
            raise KeyFileError(f"{path}: not a readable PEM private key ({e}); make a new "
                            "one with `elemta dkim keygen`") from None
        if not isinstance(key, (rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
            raise KeyFileError(f"{path}: a {type(key).__name__.removeprefix('_')} key; DKIM "
                            "signs with RSA or Ed25519 keys (`elemta dkim keygen --algo "
                            "rsa|ed25519`)")
        return key
    # the raw 32-byte Ed25519 seed in base64, as dkimpy and rspamd keep it
    try:
        seed = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        seed = b""
    if len(seed) == 32:
        return ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    raise KeyFileError(f"{path}: neither a PEM private key nor a base64 Ed25519 seed; make a "
                    "new key with `elemta dkim keygen`")


def load_private_key(path: Path, algorithm: Algorithm) -> PrivateKey:
    """Read a private key file, refusing one others can read or that is not a usable key.

    :raises KeyFileError: saying what is wrong with the file and how to fix it.
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such key file; create it with `elemta dkim keygen "
                        "--domain D --selector S`, or correct key_file") from None
    except OSError as e:
        raise KeyFileError(f"{path}: cannot be examined ({e.strerror}); check the folders "
                        "leading to it") from None
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(f"{path}: not a regular file; key_file must name the private key")
    if info.st_mode & 0o077:
        raise KeyFileError(f"{path}: mode {stat.S_IMODE(info.st_mode):04o} lets other users "
                        f"read the private key; run `chmod 600 {path}` (and publish a new "
                        "key if it may have leaked)")
    try:
        data = path.read_bytes()
    except PermissionError:
        raise KeyFileError(f"{path}: permission denied; make the file readable by the user "
                        f"Elemta runs as (chown that user {path})") from None
    except OSError as e:
        raise KeyFileError(f"{path}: cannot be read ({e.strerror})") from None
    return _usable(_parse(data, path), algorithm, path)


def _usable(key: PrivateKey, algorithm: Algorithm, path: Path | str) -> PrivateKey:
    """``key``, if it is of ``algorithm`` and of a size receivers accept."""
    found: Algorithm = "ed25519" if isinstance(key, ed25519.Ed25519PrivateKey) else "rsa"
    if found != algorithm:
        raise KeyFileError(f"{path}: holds an {found} key but the configuration says "
                        f'algorithm = "{algorithm}"; set algorithm = "{found}" or name the '
                        "right file")
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise KeyFileError(f"{path}: a {key.key_size}-bit RSA key; receivers treat "
                            f"signatures by keys under {MIN_RSA_BITS} bits as failed "
                            f"(RFC 8301); make a {DEFAULT_RSA_BITS}-bit key with `elemta dkim "
                            "keygen`")
        if key.key_size > MAX_RSA_BITS:
            raise KeyFileError(f"{path}: a {key.key_size}-bit RSA key; receivers may refuse "
                            f"keys over {MAX_RSA_BITS} bits; use {DEFAULT_RSA_BITS} bits")
    return key


def _utc(timestamp: float | None) -> dt.datetime | None:
    return None if timestamp is None else dt.datetime.fromtimestamp(timestamp, dt.timezone.utc)


def load_stored_key(record: DkimKey) -> SigningKey:
    """The key of a ``dkim_keys`` answer (a key store's record), loaded.

    The private key is the record's PEM text, or its ``key_file`` (checked like
    a configured key file: mode 0600, a usable key of the stated algorithm).

    :raises KeyFileError: naming the key (or its file) and the fix.
    """
    where = "the private key stored with it"
    if record.key_file is not None:
        path = Path(record.key_file)
        if not path.is_absolute():
            raise KeyFileError(f"key_file {record.key_file} is not an absolute path; store "
                               "the full path of the key file")
        private = load_private_key(path, record.algorithm)  # type: ignore[arg-type]
    else:
        path = Path("-")
        assert record.private_key is not None
        private = _usable(_parse(record.private_key.encode("utf-8", "replace"), where),
                          record.algorithm, where)  # type: ignore[arg-type]
    return SigningKey(record.domain, record.selector, record.algorithm,  # type: ignore[arg-type]
                      path, private, _utc(record.not_before), _utc(record.not_after))


def load_key(entry: KeySettings, keys_dir: Path) -> SigningKey:
    path = Path(entry.key_file)
    if not path.is_absolute():
        path = keys_dir / path
    private = load_private_key(path, entry.algorithm)
    return SigningKey(entry.domain, entry.selector, entry.algorithm, path, private,
                      entry.not_before, entry.not_after)  # type: ignore[arg-type]


# ------------------------------------------------------------------ making


def generate(algorithm: Algorithm, bits: int = DEFAULT_RSA_BITS) -> PrivateKey:
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
        raise ValueError(f"--bits {bits}: RSA keys for DKIM have {MIN_RSA_BITS} to "
                         f"{MAX_RSA_BITS} bits; {DEFAULT_RSA_BITS} is the usual size")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def pem(private: PrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted: what OpenSSL, OpenDKIM and this plugin all read."""
    return private.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())


def write_private_key(path: Path, private: PrivateKey) -> None:
    """Write ``private`` to a new file of mode 0600; never overwrites.

    :raises FileExistsError: if ``path`` exists.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        data = pem(private)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
