"""Signing: which keys sign a message, and the ``DKIM-Signature`` fields they make.

The bytes signed are the bytes the spool will hold: the header fields the core
and earlier plugins have added so far (``Message.added``, in the order the core
writes them, above the received header section), then the received message
(``Message.open()``). dkimpy canonicalizes and hashes the header fields; the
body is canonicalized in chunks (:mod:`.canon`); the digest is signed by
``cryptography`` (OpenSSL), not by dkimpy's pure-Python RSA, which is about
25 times slower.
"""

from __future__ import annotations

import base64
import datetime as dt
import email.utils
import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, BinaryIO

import dkim
from dkim.canonicalization import CanonicalizationPolicy

from .canon import BodyHashSpec, HeaderTooLarge, body_hashes, buffered, read_header_section
from .keys import SigningKey
from .settings import DkimSettings, normalize_domain

SIGNATURE_FIELD = "DKIM-Signature"
_LINE = 72  # fold the signature's lines near this width


class SignError(Exception):
    """The message cannot be signed as it is; ``str()`` says why."""


def added_bytes(added: Iterable[tuple[str, str]]) -> bytes:
    """Header fields added by the core and plugins, exactly as the core writes them."""
    return b"".join(f"{name}: {value}\r\n".encode("utf-8", "surrogateescape")
                    for name, value in added)


def from_domain(from_fields: Sequence[str]) -> str | None:
    """The one domain of the message's ``From:`` field, or ``None``.

    ``None`` when there is no ``From:``, more than one, or addresses of several
    domains: which domain would sign is then not clear, and DMARC refuses such
    messages anyway.
    """
    if len(from_fields) != 1:
        return None
    domains = {address.rpartition("@")[2]
               for _, address in email.utils.getaddresses(list(from_fields)) if "@" in address}
    if len(domains) != 1:
        return None
    try:
        return normalize_domain(domains.pop())
    except ValueError:
        return None


def _fold_list(prefix: str, items: Sequence[str], sep: str) -> str:
    """``prefix`` and ``items`` joined by ``sep``, folded after a separator near _LINE."""
    lines = [prefix]
    for i, item in enumerate(items):
        piece = item + (sep if i < len(items) - 1 else "")
        if len(lines[-1]) + len(piece) > _LINE and lines[-1].strip():
            lines.append("\t" + piece)
        else:
            lines[-1] += piece
    return "\r\n".join(lines)


def _fold_b64(data: str) -> str:
    first = _LINE - 3  # after "\tb="
    chunks = [data[:first]] + [data[i:i + _LINE - 1] for i in range(first, len(data), _LINE - 1)]
    return "\r\n\t".join(c for c in chunks if c)


_OLDEST = dt.datetime.min.replace(tzinfo=dt.timezone.utc)


def choose(keys: Iterable[Any], now: dt.datetime) -> list[Any]:
    """Of ``keys`` (anything with ``algorithm``, ``not_before`` and ``valid_at``), for
    each algorithm (RSA, then Ed25519), the key valid at ``now`` that became valid last."""
    keys = list(keys)
    chosen = []
    for algorithm in ("rsa", "ed25519"):
        valid = [k for k in keys if k.algorithm == algorithm and k.valid_at(now)]
        if valid:
            chosen.append(max(valid, key=lambda k: k.not_before or _OLDEST))
    return chosen


class Signer:
    """Chooses keys for a domain and signs messages with them."""

    def __init__(self, keys: Iterable[SigningKey], settings: DkimSettings) -> None:
        self.by_domain: dict[str, list[SigningKey]] = {}
        for key in keys:
            self.by_domain.setdefault(key.domain, []).append(key)
        self.headers = list(settings.headers)
        self.oversign = list(settings.oversign)
        self.canonicalization = settings.canonicalization
        self.policy = CanonicalizationPolicy.from_c_value(settings.canonicalization.encode())
        self.body_relaxed = settings.canonicalization.endswith("/relaxed")
        self.expire_after = settings.expire_after_seconds
        self.subdomains = settings.sign_subdomains

    def configured(self, domain: str) -> bool:
        """Whether the configuration has keys for ``domain`` (or, with
        ``sign_subdomains``, for a parent of it), valid now or not."""
        if domain in self.by_domain:
            return True
        if self.subdomains:
            labels = domain.split(".")
            return any(".".join(labels[i:]) in self.by_domain for i in range(1, len(labels) - 1))
        return False

    def keys_for(self, domain: str, now: dt.datetime) -> list[SigningKey]:
        """The keys that sign for ``domain`` at ``now``: for each algorithm (RSA, then
        Ed25519), of the keys valid then, the one that became valid last."""
        keys = self.by_domain.get(domain)
        if keys is None and self.subdomains:
            labels = domain.split(".")
            for i in range(1, len(labels) - 1):
                keys = self.by_domain.get(".".join(labels[i:]))
                if keys is not None:
                    break
        return choose(keys or (), now)

    def signed_names(self, headers: Sequence[Sequence[bytes]]) -> list[str]:
        """The ``h=`` list for a header section: every instance of each configured
        field, and the over-signed ones once more, so that none can be added."""
        present = Counter(name.decode("ascii", "replace").lower() for name, _ in headers)
        names: list[str] = []
        for name in self.headers:
            names += [name] * (present[name] + (name in self.oversign))
        for name in self.oversign:
            if name not in self.headers:
                names += [name] * (present[name] + 1)
        return names

    def sign(self, added: bytes, message: BinaryIO, keys: Sequence[SigningKey],
             now: float) -> list[str]:
        """The ``DKIM-Signature`` values (one per key) for the message that will be
        ``added`` followed by the bytes of ``message``.

        Blocking: run it in a worker thread. ``message`` is read to its end.

        :raises SignError: when the header section cannot be parsed.
        """
        f = buffered(message)
        try:
            header = read_header_section(f)
        except HeaderTooLarge as e:
            raise SignError(str(e)) from None
        try:
            headers, _ = dkim.rfc822_parse(added + header)
        except dkim.MessageFormatError as e:
            detail = re.sub(r"b'([^']*)'", r"\1", str(e))
            raise SignError(f"the header section is malformed ({detail})") from None
        spec = BodyHashSpec(self.body_relaxed, "sha256", None)
        bh = base64.b64encode(body_hashes(f, [spec])[spec].digest).decode("ascii")
        canonical = self.policy.canonicalize_headers(headers)
        names = self.signed_names(headers)
        if "from" not in names:
            raise SignError("the message has no From: field")
        return [self._signature(key, canonical, names, bh, int(now)) for key in keys]

    def _signature(self, key: SigningKey, canonical: list[tuple[bytes, bytes]],
                   names: list[str], bh: str, now: int) -> str:
        tags = [f"v=1; a={key.a_tag}; c={self.canonicalization}; d={key.domain};"
                f" s={key.selector};", f"\tt={now};"]
        if self.expire_after:
            tags[-1] += f" x={now + self.expire_after};"
        tags.append(_fold_list("\th=", names, ":") + ";")
        tags.append(f"\tbh={bh};")
        tags.append("\tb=")
        unsigned = "\r\n".join(tags)
        hasher = hashlib.sha256()
        # the signature field is hashed as the core will write it ("Name: value\r\n"),
        # with an empty b=, and without its final line end (RFC 6376 §3.7)
        dkim.hash_headers(hasher, self.policy, canonical, [n.encode() for n in names],
                          (SIGNATURE_FIELD.encode(), b" " + unsigned.encode() + b"\r\n"), {})
        signature = base64.b64encode(key.sign_digest(hasher.digest())).decode("ascii")
        return unsigned + _fold_b64(signature)
