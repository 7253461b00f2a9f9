"""The verifier's own header hash is dkimpy's, byte for byte, in both canonicalizations."""

from __future__ import annotations

import hashlib
import random

import dkim
import pytest
from dkim.canonicalization import CanonicalizationPolicy

from elemta_dkim.verify import hash_headers, without_b

HEADER = (b"Received: from a by b;\r\n\tMon, 07 Dec 2026 09:00:00 +0000\r\n"
          b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.com; s=s1;\r\n"
          b"\th=from:to:subject:subject:date:x-missing:from; bh=abc=;\r\n"
          b"\tb=dGhpcyBpcyBub3QgYSBzaWduYXR1cmU=\r\n"
          b"From: Alice  <alice@example.com>\r\n"
          b"To:   Bob\r\n  <bob@example.org> ,\r\n\t carol@example.org   \r\n"
          b"Subject: one\r\n"
          b"Subject:\t  two \t \r\n"
          b"subject: three\r\n"
          b"Date: Mon, 07 Dec 2026 09:00:00 +0000\r\n"
          b"X-Empty:\r\n"
          b"\r\n")


@pytest.mark.parametrize("c", [b"relaxed/relaxed", b"simple/simple"])
@pytest.mark.parametrize("include", [
    [b"from", b"to", b"subject", b"subject", b"date", b"x-missing", b"from"],
    [b"subject", b"subject", b"subject", b"subject"],
    [b"x-empty", b"to", b"received"],
    [],
])
def test_the_header_hash_is_dkimpys(c, include):
    headers, _ = dkim.rfc822_parse(HEADER)
    sig = next(h for h in headers if h[0].lower() == b"dkim-signature")
    policy = CanonicalizationPolicy.from_c_value(c)
    theirs, ours = hashlib.sha256(), hashlib.sha256()
    dkim.hash_headers(theirs, policy, policy.canonicalize_headers(headers), list(include),
                      sig, {})
    hash_headers(ours, c.startswith(b"relaxed"), headers, list(include), sig)
    assert ours.hexdigest() == theirs.hexdigest()


@pytest.mark.parametrize("value", [
    b" v=1; a=rsa-sha256; bh=abc=;\r\n\tb=dGhp cyBp\r\n\t cw==\r\n",
    b" v=1; b=abc; bh=def; b = ghi",
    b" b=\r\n",
    b" b= ;b=x\n",
    b"b=leading; c=relaxed",
    b" v=1; b=abc \r\n",
    b" v=1; z=From:a b=c|To:d; b=eee",
    b" v=1; h=from:to; bh=x; b=",
])
def test_without_b_is_dkimpys_btag_removal(value):
    assert without_b(value) == dkim.RE_BTAG.sub(b"\\1", value)


def test_without_b_agrees_with_dkimpy_on_random_fields():
    rng = random.Random(6376)
    pieces = [b" ", b"\t", b"\r\n", b"\n", b"\r", b";", b"b", b"=", b"bh", b"a", b"Z9+/",
              b"b=", b" b =", b";b=", b"\r\n\t", b"-", b"|", b"x"]
    for _ in range(20000):
        value = b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 16)))
        assert without_b(value) == dkim.RE_BTAG.sub(b"\\1", value), value


def test_relaxed_header_canonicalization_is_dkimpys_on_random_fields():
    from dkim.canonicalization import Relaxed

    from elemta_dkim.verify import _relaxed

    rng = random.Random(6376_342)
    pieces = [b" ", b"\t", b"  ", b"\r\n", b"\n", b"\r", b"\r\n\t", b"x", b"Value", b":"]
    for _ in range(20000):
        name = rng.choice([b"Subject", b"subject ", b"X-A\t"])
        value = b"".join(rng.choice(pieces) for _ in range(rng.randrange(10))) + b"\r\n"
        theirs = Relaxed.canonicalize_headers([(name, value)])[0]
        assert _relaxed(name, value) == tuple(theirs), (name, value)
