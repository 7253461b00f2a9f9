"""DKIM signing keys kept with the hosted domains, answered through the ``dkim_keys`` hook.

Each key is a :class:`elemta.DkimKey`: a domain, a selector, the algorithm,
validity dates, and the private key, either stored in the directory itself
(``private_key``, the PEM text: SQLite's file and its journal are the owner's
alone, PostgreSQL's rows are as private as its roles make them, and every MX
host sharing the database signs without copying files) or in a file of mode
0600 that the directory names (``key_file``: the TOML backend's choice, since
the TOML file is configuration, and for keys another tool manages). Making
keys (``elemta domains dkim add``) and printing their DNS records needs
``cryptography`` only.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import re
from pathlib import Path
from typing import Any

from elemta import DkimKey

from .directory import DirectoryError

ALGORITHMS = ("rsa", "ed25519")
_SELECTOR = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}"
                       r"[a-z0-9])?)*\Z")


def check_selector(value: str) -> str:
    text = value.strip().lower()
    if not _SELECTOR.match(text):
        raise DirectoryError(f"selector {value!r} is not a DNS label (letters, digits and '-', "
                             "labels separated by '.', such as 2026a)")
    return text


def timestamp(value: Any, what: str) -> float | None:
    """A validity bound as UTC epoch seconds: from a TOML date or date-time, an ISO 8601
    text (UTC when it has no offset), a number, or ``None``."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise DirectoryError(f"{what} must be a date or date-time")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise DirectoryError(f"{what}: {value!r} is not a date or date-time (such as "
                                 "2027-01-01 or 2027-01-01T00:00:00Z)") from None
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        value = dt.datetime(value.year, value.month, value.day)
    if not isinstance(value, dt.datetime):
        raise DirectoryError(f"{what} must be a date or date-time")
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.timestamp()


def show_time(value: float | None) -> str:
    if value is None:
        return "-"
    return dt.datetime.fromtimestamp(value, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_key(key: DkimKey) -> DkimKey:
    """``key`` with its domain and selector normalized; :class:`DirectoryError` if wrong."""
    from .directory import normalize_domain

    if key.not_before is not None and key.not_after is not None \
            and key.not_after <= key.not_before:
        raise DirectoryError(f"key {key.selector} of {key.domain}: not_after is not later "
                             "than not_before; the key would never sign")
    if key.key_file is not None and not Path(key.key_file).is_absolute():
        raise DirectoryError(f"key_file {key.key_file} must be an absolute path")
    return DkimKey(normalize_domain(key.domain), check_selector(key.selector), key.algorithm,
                   key.private_key, key.key_file, key.not_before, key.not_after)


def generate(algorithm: str, bits: int = 2048) -> Any:
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if not 1024 <= bits <= 8192:
        raise DirectoryError(f"--bits {bits}: RSA keys for DKIM have 1024 to 8192 bits; "
                             "2048 is the usual size")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def pem(private: Any) -> str:
    from cryptography.hazmat.primitives import serialization

    return private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption()).decode("ascii")


def write_key_file(path: Path, text: str) -> None:
    """A new file of mode 0600 (never over an existing one), written durably."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        data = memoryview(text.encode("ascii"))
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)


def load(key: DkimKey) -> Any:
    """The private key of ``key`` (for its DNS record); :class:`DirectoryError` if unusable."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    if key.private_key is not None:
        data, where = key.private_key.encode(), "the stored private key"
    else:
        where = str(key.key_file)
        try:
            data = Path(where).read_bytes()
        except OSError as e:
            raise DirectoryError(f"{where}: {e.strerror or e}") from None
    text = data.strip()
    try:
        if text.startswith(b"-----BEGIN"):
            return serialization.load_pem_private_key(data, password=None)
        seed = base64.b64decode(text, validate=True)
        return ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    except Exception as e:
        raise DirectoryError(f"{where}: not a usable private key ({e})") from None


def dns_record(private: Any) -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    public = private.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw, kind = public.public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw), "ed25519"
    else:
        raw, kind = public.public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo), "rsa"
    return f"v=DKIM1; k={kind}; p={base64.b64encode(raw).decode('ascii')}"


def zone_line(name: str, record: str) -> str:
    strings = " ".join(f'"{record[i:i + 255]}"' for i in range(0, len(record), 255))
    return f"{name}. 3600 IN TXT ( {strings} )"
