"""dkimpy's parsers of a header section and of a ``DKIM-Signature``, with compiled patterns.

dkimpy's ``rfc822_parse``, ``parse_tag_value`` and ``validate_signature_fields``
call the ``re`` module's functions with pattern strings, some twenty calls per
signature, each paying a cache lookup; the verifier runs them on the event loop
for every message. Each function here answers what its dkimpy namesake answers,
and raises the same exception, for every input (the tests compare them on
random input), with two exceptions where dkimpy fails with an ``IndexError``: a
header section that begins with a continuation line is a
:class:`dkim.MessageFormatError` here, and an ``i=`` no longer than ``d=`` (such
as ``i=example.com``, which lacks its ``@``) a :class:`dkim.ValidationError`.
"""

from __future__ import annotations

import re
import time

import dkim
from dkim.util import DuplicateTag, InvalidTagSpec

__all__ = ["header_fields", "tag_list", "validate_signature"]

_LINES = re.compile(rb"\r?\n")
_NAME = re.compile(rb"[\x21-\x7e]+?:")
_BASE64 = re.compile(rb"[\s0-9A-Za-z+/]+[\s=]*$")
WHITESPACE = re.compile(rb"\s+")
_D_SPECIALS = re.compile(rb"[\(\)<>\[\]:;@\\,]")
_L_VALUE = re.compile(rb"\d{,76}$")
_DIGITS = re.compile(rb"\d+$")
_MANDATORY = (b"v", b"a", b"b", b"bh", b"d", b"h", b"s")
_SLOP = 36000  # dkimpy's leeway for t= and x=, 10 hours


def header_fields(header: bytes) -> list[list[bytes]]:
    """``dkim.rfc822_parse(header)[0]``: the fields as ``[name, value]``, each value
    with its line end (CRLF), continuation lines joined."""
    fields: list[list[bytes]] = []
    for line in _LINES.split(header):
        if not line:
            break
        if line[0] in (9, 32):
            if not fields:
                raise dkim.MessageFormatError("the header section begins with a "
                                              "continuation line")
            fields[-1][1] += line + b"\r\n"
            continue
        m = _NAME.match(line)
        if m is not None:
            end = m.end()
            fields.append([line[:end - 1], line[end:] + b"\r\n"])
        elif not line.startswith(b"From "):
            raise dkim.MessageFormatError("Unexpected characters in RFC822 header: %s" % line)
    return fields


def tag_list(value: bytes) -> dict[bytes, bytes]:
    """``dkim.util.parse_tag_value(value)``: a tag=value list (RFC 6376 §3.2)."""
    tags: dict[bytes, bytes] = {}
    specs = value.strip().split(b";")
    if not specs[-1]:
        specs.pop()
    for spec in specs:
        key, equals, val = spec.partition(b"=")
        if not equals:
            raise InvalidTagSpec(spec)
        key = key.strip()
        if not key[:1].isalpha():
            raise InvalidTagSpec(spec)
        if key in tags:
            raise DuplicateTag(key)
        tags[key] = val.strip()
    return tags


def validate_signature(sig: dict[bytes, bytes]) -> None:
    """``dkim.validate_signature_fields(sig)`` for a DKIM-Signature (not ARC).

    :raises dkim.ValidationError: with dkimpy's message.
    """
    fail = dkim.ValidationError
    for name in _MANDATORY:
        if name not in sig:
            raise fail("missing %s=" % name)
    if sig[b"a"] not in dkim.HASH_ALGORITHMS:
        raise fail("unknown signature algorithm: %s" % sig[b"a"])
    b = sig[b"b"]
    if _BASE64.match(b) is None or len(WHITESPACE.sub(b"", b)) % 4 != 0:
        raise fail("b= value is not valid base64 (%s)" % b)
    # dkimpy's character check for bh= looks at b= again (passed above): only the
    # length of bh= is checked
    if len(WHITESPACE.sub(b"", sig[b"bh"])) % 4 != 0:
        raise fail("bh= value is not valid base64 (%s)" % sig[b"bh"])
    if b"cv" in sig and sig[b"cv"] not in (dkim.CV_Pass, dkim.CV_Fail, dkim.CV_None):
        raise fail("cv= value is not valid (%s)" % sig[b"cv"])
    d = sig[b"d"]
    if d.isascii() and _D_SPECIALS.search(d):
        raise fail("d= value is not valid (%s)" % d)
    if b"i" in sig:
        i = sig[b"i"]
        if (not i.lower().endswith(d.lower()) or len(i) <= len(d)
                or i[-len(d) - 1] not in (64, 46)):
            raise fail("i= domain is not a subdomain of d= (i=%s d=%s)" % (i, d))
    if b"l" in sig and _L_VALUE.match(sig[b"l"]) is None:
        raise fail("l= value is not a decimal integer (%s)" % sig[b"l"])
    if b"q" in sig and sig[b"q"] != b"dns/txt":
        raise fail("q= value is not dns/txt (%s)" % sig[b"q"])
    t_sign = None
    now = int(time.time())
    if b"t" in sig:
        if _DIGITS.match(sig[b"t"]) is None:
            raise fail("t= value is not a decimal integer (%s)" % sig[b"t"])
        t_sign = int(sig[b"t"])
        if t_sign > now + _SLOP:
            raise fail("t= value is in the future (%s)" % sig[b"t"])
    if sig[b"v"] != b"1":
        raise fail("v= value is not 1 (%s)" % sig[b"v"])
    if b"x" in sig:
        if _DIGITS.match(sig[b"x"]) is None:
            raise fail("x= value is not a decimal integer (%s)" % sig[b"x"])
        x_sign = int(sig[b"x"])
        if x_sign < now - _SLOP:
            raise fail("x= value is past (%s)" % sig[b"x"])
        if t_sign and x_sign < t_sign:
            raise fail("x= value is less than t= value (x=%s t=%s)" % (sig[b"x"], sig[b"t"]))
