"""The verifier's parsers answer what dkimpy's answer, on crafted and random input."""

from __future__ import annotations

import random
import time

import dkim
import pytest
from dkim.util import InvalidTagValueList, parse_tag_value

from elemta_dkim.syntax import header_fields, tag_list, validate_signature


def outcome(function, *args):
    """What ``function`` answers, or the type and message of what it raises."""
    try:
        return ("ok", function(*args))
    except (dkim.DKIMException, InvalidTagValueList) as e:
        return (type(e), str(e))


def dkimpy_fields(header: bytes):
    return dkim.rfc822_parse(header)[0]


@pytest.mark.parametrize("header", [
    b"From: a@example.com\r\nTo: b\r\n\tc\r\n\r\nbody\r\n",
    b"Subject:no space\nX-Empty:\n  folded\n\nbody",
    b"From someone Mon Dec  7\r\nFrom: a\r\n\r\n",
    b"Bad Name: x\r\n\r\n",
    b"A:1\r\nB::2\r\nC: 3 \r\n",
    b"",
    b"\r\n",
])
def test_header_fields_are_dkimpys(header):
    assert outcome(header_fields, header) == outcome(dkimpy_fields, header)


def test_header_fields_agree_with_dkimpy_on_random_sections():
    rng = random.Random(5322)
    pieces = [b"From", b"To", b"X-a", b":", b" ", b"\t", b"\r\n", b"\n", b"value", b"\r",
              b"From ", b"@", b"\x7f", b"\xc3\xa9", b";", b"="]
    for _ in range(20000):
        header = b"A: 1\r\n" + b"".join(rng.choice(pieces) for _ in range(rng.randrange(12)))
        assert outcome(header_fields, header) == outcome(dkimpy_fields, header), header


def test_a_section_that_begins_with_a_continuation_line_is_malformed():
    with pytest.raises(dkim.MessageFormatError):
        header_fields(b" folded\r\nFrom: a\r\n\r\n")


@pytest.mark.parametrize("value", [
    b" v=1; a=rsa-sha256; d=example.com; s=s1;\r\n\th=from:to; bh=abc=; b=de f=\r\n",
    b"v=1;;", b"", b";", b"v=1; v=2", b"1v=x", b"=x", b"v", b" k = rsa ; p = ",
    b"_v=1", b"v=a=b",
])
def test_tag_list_is_dkimpys(value):
    assert outcome(tag_list, value) == outcome(parse_tag_value, value)


def test_tag_list_agrees_with_dkimpy_on_random_lists():
    rng = random.Random(6376)
    pieces = [b"v", b"a", b"bh", b"=", b";", b" ", b"\t", b"\r\n", b"1", b"_", b"x=y", b"\xc3"]
    for _ in range(20000):
        value = b"".join(rng.choice(pieces) for _ in range(rng.randrange(14)))
        assert outcome(tag_list, value) == outcome(parse_tag_value, value), value


GOOD = {b"v": b"1", b"a": b"rsa-sha256", b"b": b"dGhp cw==", b"bh": b"YWJj", b"d": b"example.com",
        b"h": b"from:to", b"s": b"s1"}


@pytest.mark.parametrize("change", [
    {}, {b"v": b"2"}, {b"a": b"rsa-md5"}, {b"b": b"a!b="}, {b"b": b"abc"}, {b"bh": b"abc"},
    {b"d": b"exa(mple).com"}, {b"d": "exämple.com".encode()}, {b"i": b"@example.com"},
    {b"i": b"x@sub.example.com"}, {b"i": b"x@example.org"}, {b"i": b"xexample.com"},
    {b"i": b"x.example.com"}, {b"l": b"12"}, {b"l": b"1x"}, {b"q": b"dns/txt"},
    {b"q": b"dns"}, {b"cv": b"pass"}, {b"cv": b"maybe"}, {b"t": b"100"}, {b"t": b"x"},
    {b"t": str(int(time.time()) + 10**6).encode()}, {b"x": b"1"}, {b"x": b"y"},
    {b"x": str(int(time.time()) + 100).encode(), b"t": str(int(time.time()) + 200).encode()},
    {b"x": str(int(time.time()) + 300).encode(), b"t": str(int(time.time())).encode()},
])
def test_signature_validation_is_dkimpys(change):
    sig = {**GOOD, **change}
    assert outcome(validate_signature, sig) == outcome(dkim.validate_signature_fields, sig)


@pytest.mark.parametrize("missing", [b"v", b"a", b"b", b"bh", b"d", b"h", b"s"])
def test_a_missing_mandatory_tag_is_dkimpys(missing):
    sig = {k: v for k, v in GOOD.items() if k != missing}
    assert outcome(validate_signature, sig) == outcome(dkim.validate_signature_fields, sig)


def test_an_identity_without_its_at_sign_is_invalid_not_a_crash():
    sig = {**GOOD, b"i": b"example.com"}
    with pytest.raises(IndexError):
        dkim.validate_signature_fields(sig)
    with pytest.raises(dkim.ValidationError, match="i= domain"):
        validate_signature(sig)
