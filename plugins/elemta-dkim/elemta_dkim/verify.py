"""Verification of every ``DKIM-Signature`` of a received message (RFC 6376 §6, RFC 8301).

This is dkimpy's asynchronous verification (``dkim.asyncsupport.DKIM.verify``),
taken apart so that each step runs where it belongs: the same building blocks
(``verify_headerprep``, ``evaluate_pk``, ``verify_sig_process``), the key
fetched through the server's resolver (``Resolver.dkim_dnsfunc``), and the body
hashed in chunks in a worker thread (:mod:`.canon`) while the keys are looked
up. ``dkim.asyncsupport`` itself is not imported: it needs aiodns at import time
even when a ``dnsfunc`` is given. On top of dkimpy, the key record's ``h=``,
``s=``, ``t=s`` and ``t=y``, empty ``p=`` (revoked), the key type against
``a=``, RFC 8301 (no rsa-sha1, no RSA key under 1024 bits), ``x=`` and ``l=``
are checked here.

Results, one per signature (RFC 8601 §2.7.1):

- ``pass``: the signature verifies;
- ``fail``: it does not (a changed header field or body), or the key or the
  algorithm is not acceptable (rsa-sha1, a short RSA key, a revoked key, a key
  that excludes it with ``h=`` or ``t=s``, a key of another type, expired);
- ``neutral``: the signature is malformed and cannot be checked;
- ``policy``: it verifies, but ``l=`` leaves part of the body unsigned
  (``partial_body_result``);
- ``permerror``: From is not signed, or there is no usable key record;
- ``temperror``: the key could not be looked up (DNS failure); never a pass;
- ``none``: the message has no signature (one result).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import functools
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import dkim
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError
from dkim.util import InvalidTagValueList
from elemta import AuthResult, DNSError

from .canon import (BodyHash, BodyHashSpec, HeaderTooLarge, body_hashes, buffered,
                    read_header_section)
from .keys import MAX_RSA_BITS, MIN_RSA_BITS
from .syntax import WHITESPACE, header_fields, tag_list, validate_signature

log = logging.getLogger("elemta.dkim")

REQUIRED_TAGS = (b"v", b"a", b"b", b"bh", b"d", b"h", b"s")
ALGORITHMS = {b"rsa-sha256": (b"rsa", "sha256"), b"rsa-sha1": (b"rsa", "sha1"),
              b"ed25519-sha256": (b"ed25519", "sha256")}
# an RSA public exponent above this makes verification as slow as signing (and pure
# Python big-integer maths holds the GIL): real keys use 65537
MAX_RSA_EXPONENT = 2**64
B_PREFIX = 8  # characters of b= in header.b (RFC 6008)
TESTING_NOTE = "the key is in testing mode (t=y)"

DnsFunc = Callable[[bytes], Awaitable[bytes]]
Opener = Callable[[], BinaryIO]


@dataclass(slots=True)
class Checked:
    """The outcome of one signature."""

    result: str
    reason: str | None = None
    domain: str | None = None
    selector: str | None = None
    algorithm: str | None = None
    b: str | None = None

    def auth_result(self) -> AuthResult:
        props: dict[str, str] = {}
        for key, value in (("header.d", self.domain), ("header.s", self.selector),
                           ("header.a", self.algorithm), ("header.b", self.b)):
            if value:
                props[key] = value
        return AuthResult("dkim", self.result, self.reason, props)


@dataclass(slots=True)
class _Signature:
    index: int
    checked: Checked                      # the properties; result set once decided
    decided: bool = False
    tags: dict[bytes, bytes] = field(default_factory=dict)
    include: list[bytes] = field(default_factory=list)
    header: tuple[bytes, bytes] = (b"", b"")
    spec: BodyHashSpec | None = None
    key_name: bytes = b""
    testing: bool = False                 # the key record says t=y

    def decide(self, result: str, reason: str | None = None) -> None:
        self.checked.result = result
        self.checked.reason = reason
        self.decided = True


@dataclass(slots=True)
class Parsed:
    """The signatures of one message, parsed, with the message's header fields as dkimpy
    holds them (``DKIM.headers``)."""

    headers: list[list[bytes]] | None
    signatures: list[_Signature]
    skipped: int = 0


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace")


def _b_prefix(value: bytes) -> str:
    # the first B_PREFIX characters of b= without its white space (a folded value
    # has some between its first characters: 4 times as many is plenty)
    prefix = WHITESPACE.sub(b"", value[:4 * B_PREFIX])
    if len(prefix) < B_PREFIX:
        prefix = WHITESPACE.sub(b"", value)
    return prefix[:B_PREFIX].decode("ascii", "replace")


# ------------------------------------------------------------------ parsing


def parse(f: BinaryIO, max_signatures: int, now: float) -> Parsed:
    """Read the header section of ``f`` and parse its ``DKIM-Signature`` fields; ``f``
    is left at the first byte of the body.

    Blocking (``Message.open()``): run it in a worker thread.
    """
    try:
        header = read_header_section(f)
    except HeaderTooLarge as e:
        return Parsed(None, [_Signature(0, Checked("neutral", f"not checked: {e}"),
                                        decided=True)])
    if b"dkim-signature" not in header.lower():
        return Parsed(None, [])
    try:
        headers = header_fields(header)   # what dkim.DKIM(header) parses, faster
    except dkim.MessageFormatError as e:
        return Parsed(None, [_Signature(0, Checked(
            "neutral", "the header section is malformed, no signature can be checked: "
            f"{_clean(e)}"),
            decided=True)])
    fields = [(name, value) for name, value in headers if name.lower() == b"dkim-signature"]
    out = [_parse_one(i, fields[i], now) for i in range(min(len(fields), max_signatures))]
    return Parsed(headers, out, skipped=max(0, len(fields) - max_signatures))


def _parse_one(index: int, header: tuple[bytes, bytes], now: float) -> _Signature:
    sig = _Signature(index, Checked("neutral"), header=header)
    try:
        tags = tag_list(header[1])
    except InvalidTagValueList as e:
        sig.decide("neutral", f"the signature is not a tag=value list ({_clean(e)})")
        return sig
    sig.tags = tags
    c = sig.checked
    c.domain = _text(tags[b"d"]) if tags.get(b"d") else None
    c.selector = _text(tags[b"s"]) if tags.get(b"s") else None
    c.algorithm = _text(tags[b"a"]).lower() if tags.get(b"a") else None
    c.b = _b_prefix(tags[b"b"]) if tags.get(b"b") else None
    missing = [t.decode() + "=" for t in REQUIRED_TAGS if not tags.get(t, b"").strip()]
    if missing:
        sig.decide("neutral", f"the signature lacks {', '.join(missing)}")
        return sig
    algorithm = tags[b"a"].lower()
    if algorithm not in ALGORITHMS:
        sig.decide("neutral", f"unknown signature algorithm a={c.algorithm}")
        return sig
    expires = tags.get(b"x", b"").strip()
    if expires.isdigit() and int(expires) < now:
        when = dt.datetime.fromtimestamp(int(expires), dt.timezone.utc)
        sig.decide("fail", f"the signature expired at {when:%Y-%m-%d %H:%M:%S} UTC (x=)")
        return sig
    # what dkimpy's verify_headerprep does, without parsing the tag list a second time
    try:
        validate_signature(tags)
    except (dkim.DKIMException, InvalidTagValueList) as e:
        sig.decide("neutral", f"the signature is malformed: {_clean(e)}")
        return sig
    include = [x.lower() for x in _H_SPLIT.split(tags[b"h"])]
    sig.include = include
    if algorithm == b"rsa-sha1":
        sig.decide("fail", "rsa-sha1 signatures are not acceptable (RFC 8301); the "
                   "signer must use rsa-sha256")
        return sig
    if b"from" not in include:
        sig.decide("permerror", "From is not signed (h= lacks from; RFC 6376 §5.4)")
        return sig
    try:
        policy = CanonicalizationPolicy.from_c_value(tags.get(b"c", b"simple/simple"))
    except InvalidCanonicalizationPolicyError:
        sig.decide("neutral", f"unknown canonicalization c={_text(tags.get(b'c', b''))}")
        return sig
    length = int(tags[b"l"]) if b"l" in tags else None
    sig.spec = BodyHashSpec(policy.body_algorithm.name == b"relaxed", ALGORITHMS[algorithm][1],
                            length)
    sig.key_name = tags[b"s"] + b"._domainkey." + tags[b"d"] + b"."
    return sig


_H_SPLIT = re.compile(rb"\s*:\s*")


def _clean(e: BaseException) -> str:
    """dkimpy's messages, without Python's b'' quoting."""
    return re.sub(r"b'([^']*)'", r"\1", str(e))


# ------------------------------------------------------------------ checking


def _flags(value: bytes | None) -> set[bytes]:
    if not value:
        return set()
    return {f.strip().lower() for f in value.split(b":") if f.strip()}


def check(parsed: Parsed, records: dict[bytes, bytes | BaseException],
          hashes: dict[BodyHashSpec, BodyHash], partial_body_result: str) -> list[Checked]:
    """Decide every signature: the key records found, the body hashes computed.

    Pure computation (the header hash and the signature check): cheap, but run
    in a worker thread with the rest.
    """
    for sig in parsed.signatures:
        if not sig.decided:
            _check_one(parsed.headers, sig, records.get(sig.key_name, b""), hashes,
                       partial_body_result)
            if sig.testing:  # t=y: reported as it is, with a note
                c = sig.checked
                c.reason = (c.reason + "; " if c.reason else "") + TESTING_NOTE
    return [sig.checked for sig in parsed.signatures]


def _check_one(headers: list[list[bytes]] | None, sig: _Signature, record: bytes | BaseException,
               hashes: dict[BodyHashSpec, BodyHash], partial_body_result: str) -> None:
    name = _text(sig.key_name).rstrip(".")
    if isinstance(record, BaseException):
        sig.decide("temperror", f"the key at {name} could not be looked up: {record}")
        return
    if not record.strip():
        sig.decide("permerror", f"no key for the signature: {name} has no DKIM record")
        return
    try:
        key = _key_tags(record)
    except InvalidTagValueList:
        sig.decide("permerror", f"the key record at {name} is malformed")
        return
    if key.get(b"v", b"DKIM1") != b"DKIM1":
        sig.decide("permerror", f"the key record at {name} has an unknown version "
                   f"v={_text(key[b'v'])}")
        return
    if b"p" not in key:
        sig.decide("permerror", f"the key record at {name} has no p=")
        return
    if not WHITESPACE.sub(b"", key[b"p"]):
        sig.decide("fail", f"the key {name} is revoked (empty p=)")
        return
    key_type = key.get(b"k", b"rsa").strip().lower()
    if key_type not in (b"rsa", b"ed25519"):
        sig.decide("permerror", f"the key at {name} is of unknown type k={_text(key_type)}")
        return
    services = _flags(key.get(b"s"))
    if services and not services & {b"*", b"email"}:
        sig.decide("permerror", f"the key at {name} is not for email "
                   f"(s={_text(key[b's'])})")
        return
    algorithm = sig.tags[b"a"].lower()
    wanted_type, hash_name = ALGORITHMS[algorithm]
    if key_type != wanted_type:
        sig.decide("fail", f"the key at {name} is an {_text(key_type)} key, not for "
                   f"a={_text(algorithm)}")
        return
    hashes_allowed = _flags(key.get(b"h"))
    if hashes_allowed and hash_name.encode() not in hashes_allowed:
        sig.decide("fail", f"the key at {name} allows only h={_text(key[b'h'])}, not "
                   f"{hash_name}")
        return
    flags = _flags(key.get(b"t"))
    sig.testing = b"y" in flags
    if b"s" in flags and b"i" in sig.tags:
        identity_domain = sig.tags[b"i"].rpartition(b"@")[2].lower()
        if identity_domain != sig.tags[b"d"].lower():
            sig.decide("fail", f"the key at {name} has t=s: i= must be in d= itself, "
                       f"not the subdomain {_text(identity_domain)}")
            return
    try:
        pk, keysize, ktag, _ = _public_key(sig.key_name, record)
    except (dkim.DKIMException, binascii.Error, ValueError, TypeError) as e:
        sig.decide("permerror", f"the key at {name} cannot be decoded: {_clean(e)}")
        return
    if ktag == b"rsa":
        if keysize < MIN_RSA_BITS:
            sig.decide("fail", f"the RSA key at {name} has {keysize} bits; keys under "
                       f"{MIN_RSA_BITS} bits are not acceptable (RFC 8301)")
            return
        if keysize > MAX_RSA_BITS or pk["publicExponent"] > MAX_RSA_EXPONENT:
            sig.decide("permerror", f"the RSA key at {name} is not a sensible key "
                       f"({keysize} bits); not checked")
            return
    assert sig.spec is not None and headers is not None
    body = hashes[sig.spec]
    length = sig.spec.length
    if length is not None and length > body.total:
        sig.decide("fail", f"l={length} is longer than the body ({body.total} bytes "
                   "canonicalized): the body was cut")
        return
    try:
        expected = base64.b64decode(WHITESPACE.sub(b"", sig.tags[b"bh"]), validate=True)
    except (binascii.Error, ValueError):
        sig.decide("neutral", "bh= is not base64")
        return
    if expected != body.digest:
        sig.decide("fail", "body hash mismatch: the body was changed after signing")
        return
    # the body is checked above; only the header hash and the signature are left
    header_only = {k: v for k, v in sig.tags.items() if k != b"bh"}
    try:
        if ktag == b"rsa":
            ok = _rsa_verified(headers, header_only, list(sig.include), sig.header, pk)
        else:
            d = dkim.DKIM(minkey=MIN_RSA_BITS)
            d.headers = headers
            d.pk, d.keysize, d.ktag, d.seqtlsrpt = pk, keysize, ktag, False
            ok = d.verify_sig_process(header_only, list(sig.include), sig.header, None)
    except Exception as e:  # a malformed b=, a key that does not fit: never a pass
        log.debug("dkim: signature %d (d=%s) cannot be checked", sig.index,
                  sig.checked.domain, exc_info=True)
        sig.decide("fail", f"the signature cannot be checked: {_clean(e)}")
        return
    if not ok:
        sig.decide("fail", "signature mismatch: a signed header field was changed after "
                   "signing")
        return
    if length is not None and length < body.total:
        unsigned = body.total - length
        sig.decide(partial_body_result, f"l={length}: the last {unsigned} bytes of the "
                   "body are not signed")
        return
    sig.decide("pass")


@functools.lru_cache(maxsize=1024)
def _key_tags(record: bytes) -> dict[bytes, bytes]:
    """A key record's tags, remembered (read, never changed, by :func:`_check_one`)."""
    return tag_list(record)


@functools.lru_cache(maxsize=1024)
def _public_key(name: bytes, record: bytes) -> tuple[Any, int, bytes, bool]:
    """dkimpy's ``evaluate_pk``, remembered per key record: decoding a key costs more
    than checking a signature with it, and a busy sender signs with one key."""
    return dkim.evaluate_pk(name, record)


# dkimpy's RE_BTAG, ``([;\s]b FWS =)(?:FWS [a-zA-Z0-9+/=])*(?:\r?\n\Z)?``, where FWS
# matches any run of white space: its nested optional groups make Python's re
# take ~60 µs over a 2048-bit b= value; the same match, run by run, takes ~2 µs
_B_TAG = re.compile(rb"[;\s]b\s*=([\sa-zA-Z0-9+/=]*)")


def without_b(value: bytes) -> bytes:
    """The signature field's value with the value of ``b=`` taken out, exactly as
    dkimpy's ``RE_BTAG.sub(b"\\1", value)`` makes it (RFC 6376 §3.7: b= counts as
    empty when the header is hashed)."""
    out: list[bytes] = []
    pos = 0
    while (m := _B_TAG.search(value, pos)) is not None:
        start = m.start(1)
        # the tag value ends at its last base64 character; white space after it stays
        end = start + len(m.group(1).rstrip())
        if value[end:] in (b"\r\n", b"\n"):
            end = len(value)
        out.append(value[pos:start])
        pos = end
    if not out:
        return value
    out.append(value[pos:])
    return b"".join(out)


_WSP = re.compile(rb"[\t ]+")


def _relaxed(name: bytes, value: bytes) -> tuple[bytes, bytes]:
    """One header field in relaxed canonicalization (RFC 6376 §3.4.2), byte for byte as
    dkimpy's ``Relaxed.canonicalize_headers`` makes it."""
    # unfolded as re.sub(rb"\r?\n", b"", value): a CR goes with the LF after it, then
    # every LF
    value = value.replace(b"\r\n", b"").replace(b"\n", b"")
    if b"\t" in value or b"  " in value:   # most fields have no run of white space
        value = _WSP.sub(b" ", value)
    return name.lower().rstrip(), value.strip() + b"\r\n"


def hash_headers(hasher: Any, relaxed: bool, headers: Sequence[Sequence[bytes]],
                 include: list[bytes], sig_header: tuple[bytes, bytes]) -> None:
    """Hash the signed header fields and the signature field (with an empty ``b=``) as
    dkimpy's ``hash_headers`` does, canonicalizing only the fields it selects: for each
    name of ``include``, the last instance not chosen yet, from the bottom up (RFC 6376
    §5.4.2); then the signature field, without its final line end."""
    if relaxed:
        names = [name.lower().rstrip() for name, _ in headers]
    else:
        names = [name.lower() for name, _ in headers]
    last: dict[bytes, int] = {}
    update = hasher.update
    for wanted in include:
        i = last.get(wanted, len(headers))
        while i > 0:
            i -= 1
            if names[i] == wanted:
                name, value = headers[i]
                if relaxed:
                    name, value = _relaxed(name, value)
                update(name)
                update(b":")
                update(value)
                break
        last[wanted] = i
    name, value = sig_header[0], without_b(sig_header[1])
    if relaxed:
        name, value = _relaxed(name, value)
    update(name)
    update(b":")
    update(value.rstrip())


@functools.lru_cache(maxsize=1024)
def _rsa_public(e: int, n: int) -> Any:
    """The OpenSSL public key of (``e``, ``n``), remembered like :func:`_public_key`."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.RSAPublicNumbers(e, n).public_key()


def _rsa_verified(headers: list[list[bytes]], tags: dict[bytes, bytes], include: list[bytes],
                  sig_header: tuple[bytes, bytes], pk: dict[str, int]) -> bool:
    """The header hash as dkimpy computes it (``verify_sig_process``), and the RSA
    signature checked by OpenSSL (``cryptography``) rather than dkimpy's Python
    arithmetic, which costs a millisecond per signature on the event loop."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, utils

    policy = CanonicalizationPolicy.from_c_value(tags.get(b"c", b"simple/simple"))
    h = dkim.HASH_ALGORITHMS[tags[b"a"].lower()]()
    if b"from" in include:
        include.append(b"from")    # as dkimpy does: a second From: field breaks the check
    hash_headers(h, policy.header_algorithm.name == b"relaxed", headers, include, sig_header)
    signature = base64.b64decode(WHITESPACE.sub(b"", tags[b"b"]))
    algorithm = hashes.SHA256() if tags[b"a"].lower() == b"rsa-sha256" else hashes.SHA1()
    public = _rsa_public(pk["publicExponent"], pk["modulus"])
    try:
        public.verify(signature, h.digest(), padding.PKCS1v15(), utils.Prehashed(algorithm))
    except InvalidSignature:
        return False
    return True


# ------------------------------------------------------------------ the whole message


#: messages up to this size are verified on the event loop (see :meth:`Verifier.verify`)
INLINE_BYTES = 256 * 1024


class Verifier:
    """Verifies messages; the work on a large message runs on ``executor``."""

    def __init__(self, dnsfunc: DnsFunc, executor: Executor, *, max_signatures: int = 8,
                 partial_body_result: str = "policy",
                 clock: Callable[[], float] = time.time) -> None:
        self.dnsfunc = dnsfunc
        self.executor = executor
        self.max_signatures = max_signatures
        self.partial_body_result = partial_body_result
        self.clock = clock

    async def verify(self, open_message: Opener, size: int | None = None) -> list[Checked]:
        """One :class:`Checked` per signature (at most ``max_signatures``), or a single
        ``none`` when the message has none.

        ``open_message`` opens the message for reading (``Message.open``), twice:
        for the header section, then for the body. A message of ``size`` up to
        :data:`INLINE_BYTES` is read, hashed and checked on the event loop (a
        fraction of a millisecond: less than the two hand-overs to a thread
        would cost); a larger one, or one of unknown size, in worker threads.
        """
        loop = asyncio.get_running_loop()
        now = self.clock()
        if size is not None and size <= INLINE_BYTES:
            return await self._verify_inline(open_message, now)
        parsed = await loop.run_in_executor(self.executor, self._parse, open_message, now)
        if not parsed.signatures:
            return [Checked("none")]
        if parsed.skipped:
            log.info("dkim: %d signatures beyond max_signatures = %d not checked",
                     parsed.skipped, self.max_signatures)
        pending = [s for s in parsed.signatures if not s.decided]
        if not pending:
            return [s.checked for s in parsed.signatures]
        names = sorted({s.key_name for s in pending})
        specs = {s.spec for s in pending if s.spec is not None}
        lookups = asyncio.gather(*(self._lookup(n) for n in names))
        hashing = loop.run_in_executor(self.executor, self._hash, open_message, specs)
        found, hashes = await asyncio.gather(lookups, hashing)
        records = dict(zip(names, found))
        return await loop.run_in_executor(self.executor, check, parsed, records, hashes,
                                          self.partial_body_result)

    async def _verify_inline(self, open_message: Opener, now: float) -> list[Checked]:
        # the message is opened once: header section, key lookups, then the body
        with open_message() as raw:
            f = buffered(raw)
            parsed = parse(f, self.max_signatures, now)
            if not parsed.signatures:
                return [Checked("none")]
            pending = [s for s in parsed.signatures if not s.decided]
            if not pending:
                return [s.checked for s in parsed.signatures]
            names = sorted({s.key_name for s in pending})
            specs = {s.spec for s in pending if s.spec is not None}
            if len(names) == 1:  # the usual case: no task to gather
                found = [await self._lookup(names[0])]
            else:
                found = await asyncio.gather(*(self._lookup(n) for n in names))
            hashes = body_hashes(f, specs)
        return check(parsed, dict(zip(names, found)), hashes, self.partial_body_result)

    async def _lookup(self, name: bytes) -> bytes | BaseException:
        try:
            return await self.dnsfunc(name)
        except DNSError as e:
            return e

    def _parse(self, open_message: Opener, now: float) -> Parsed:
        with open_message() as f:
            return parse(buffered(f), self.max_signatures, now)

    @staticmethod
    def _hash(open_message: Opener, specs: set[BodyHashSpec]) -> dict[BodyHashSpec, BodyHash]:
        with open_message() as raw:
            f = buffered(raw)
            read_header_section(f)
            return body_hashes(f, specs)
