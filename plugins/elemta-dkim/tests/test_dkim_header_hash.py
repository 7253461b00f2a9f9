"""The verifier's own header hash is dkimpy's, byte for byte, in both canonicalizations."""

from __future__ import annotations

import hashlib

import dkim
import pytest
from dkim.canonicalization import CanonicalizationPolicy

from elemta_dkim.verify import hash_headers

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
