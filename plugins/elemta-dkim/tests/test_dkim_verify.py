"""Verification of every signature of a message, against keys in a real (local) DNS server.

Signatures are made by dkimpy (an independent signer) or written by hand where
no signer would make them; keys are published in the ``dns_server`` fixture and
fetched through Elemta's resolver, faults included.
"""

from __future__ import annotations

import base64
import re
import time

import dkim
import pytest
from dkim_support import (MESSAGE, dkimpy_sign, ed_key, publish, results, rsa_key,
                          tamper_body, tamper_subject, verify)


@pytest.fixture(scope="module")
def rsa2048():
    return rsa_key(2048)


async def test_an_unsigned_message_is_dkim_none(dns_server):
    [c] = await verify(dns_server, MESSAGE)
    assert c.result == "none" and c.auth_result().properties == {}


async def test_rsa_and_ed25519_signatures_pass_with_their_properties(dns_server, rsa2048):
    ed = ed_key()
    publish(dns_server, "example.com", "rsa1", rsa2048)
    publish(dns_server, "example.com", "ed1", ed)
    signed = dkimpy_sign(dkimpy_sign(MESSAGE, "example.com", "rsa1", rsa2048),
                         "example.com", "ed1", ed)

    checked = await verify(dns_server, signed)

    assert results(checked) == ["pass", "pass"]
    ed_result, rsa_result = (c.auth_result() for c in checked)
    assert ed_result.method == "dkim" and ed_result.reason is None
    b = re.search(rb"\bb=([^;]*)", signed.split(b"\r\n\r\n")[0].split(b"DKIM-Signature")[1])
    assert ed_result.properties == {
        "header.d": "example.com", "header.s": "ed1", "header.a": "ed25519-sha256",
        "header.b": re.sub(rb"\s+", b"", b.group(1))[:8].decode()}
    assert rsa_result.properties["header.a"] == "rsa-sha256"
    assert rsa_result.properties["header.s"] == "rsa1"
    assert len(rsa_result.properties["header.b"]) == 8


async def test_every_signature_is_checked_good_bad_and_keyless(dns_server, rsa2048):
    other = rsa_key(1024, seed=1)
    publish(dns_server, "example.com", "good", rsa2048)
    publish(dns_server, "example.net", "bad", other)
    # the bad signature is made, then the key behind its selector is replaced
    message = dkimpy_sign(MESSAGE, "example.com", "good", rsa2048)
    message = dkimpy_sign(message, "example.net", "bad", rsa2048)
    message = dkimpy_sign(message, "example.org", "gone", rsa2048)

    checked = await verify(dns_server, message)

    by_domain = {c.domain: c for c in checked}
    assert [c.domain for c in checked] == ["example.org", "example.net", "example.com"]
    assert by_domain["example.com"].result == "pass"
    assert by_domain["example.net"].result == "fail"
    assert "signature mismatch" in by_domain["example.net"].reason
    assert by_domain["example.org"].result == "permerror"
    assert "no key for the signature" in by_domain["example.org"].reason


async def test_only_max_signatures_are_checked(dns_server, rsa2048):
    publish(dns_server, "example.com", "s", rsa2048)
    message = MESSAGE
    for _ in range(5):
        message = dkimpy_sign(message, "example.com", "s", rsa2048)
    assert results(await verify(dns_server, message, max_signatures=3)) == ["pass"] * 3


async def test_rsa_sha1_fails_rfc_8301(dns_server, rsa2048):
    record = publish(dns_server, "example.com", "s", rsa2048)
    signed = dkimpy_sign(MESSAGE, "example.com", "s", rsa2048,
                         signature_algorithm=b"rsa-sha1")
    # a valid signature as such: dkimpy, which still accepts sha1, says so
    assert dkim.verify(signed, dnsfunc=lambda _name, timeout=5: record.encode())

    [c] = await verify(dns_server, signed)

    assert c.result == "fail"
    assert "rsa-sha1" in c.reason and "RFC 8301" in c.reason
    assert c.algorithm == "rsa-sha1"


@pytest.mark.parametrize("bits", [512, 768])
async def test_short_rsa_keys_fail_rfc_8301(dns_server, bits):
    key = rsa_key(bits)
    publish(dns_server, "example.com", "short", key)
    signed = dkimpy_sign(MESSAGE, "example.com", "short", key)

    [c] = await verify(dns_server, signed)

    assert c.result == "fail"
    assert f"{bits} bits" in c.reason and "RFC 8301" in c.reason


async def test_1024_bit_keys_still_pass(dns_server):
    key = rsa_key(1024, seed=2)
    publish(dns_server, "example.com", "k1024", key)
    assert results(await verify(dns_server, dkimpy_sign(MESSAGE, "example.com", "k1024",
                                                         key))) == ["pass"]


async def test_the_key_records_hash_restriction_is_honoured(dns_server, rsa2048):
    publish(dns_server, "example.com", "sha1only", rsa2048, extra="h=sha1")
    publish(dns_server, "example.com", "sha256ok", rsa2048, extra="h=sha1:sha256")
    refused = dkimpy_sign(MESSAGE, "example.com", "sha1only", rsa2048)
    allowed = dkimpy_sign(MESSAGE, "example.com", "sha256ok", rsa2048)

    [c] = await verify(dns_server, refused)
    assert c.result == "fail" and "h=sha1" in c.reason
    assert results(await verify(dns_server, allowed)) == ["pass"]


async def test_t_s_refuses_a_subdomain_identity(dns_server, rsa2048):
    publish(dns_server, "example.com", "strict", rsa2048, extra="t=s")
    sub = dkimpy_sign(MESSAGE, "example.com", "strict", rsa2048,
                      identity=b"alice@mail.example.com")
    same = dkimpy_sign(MESSAGE, "example.com", "strict", rsa2048,
                       identity=b"alice@example.com")

    [c] = await verify(dns_server, sub)
    assert c.result == "fail" and "t=s" in c.reason and "mail.example.com" in c.reason
    assert results(await verify(dns_server, same)) == ["pass"]


async def test_t_y_testing_keys_are_reported_normally(dns_server, rsa2048):
    publish(dns_server, "example.com", "testing", rsa2048, extra="t=y")
    signed = dkimpy_sign(MESSAGE, "example.com", "testing", rsa2048)

    [good] = await verify(dns_server, signed)
    [bad] = await verify(dns_server, tamper_body(signed))

    assert good.result == "pass" and "t=y" in good.reason
    assert bad.result == "fail" and "t=y" in bad.reason


async def test_l_covers_the_body_as_signed(dns_server, rsa2048):
    publish(dns_server, "example.com", "len", rsa2048)
    signed = dkimpy_sign(MESSAGE, "example.com", "len", rsa2048, length=True)
    assert re.search(rb"\bl=\d+", signed)

    [whole] = await verify(dns_server, signed)
    [appended] = await verify(dns_server, signed + b"Unsubscribe: https://evil.example/\r\n")
    [lenient] = await verify(dns_server, signed + b"-- \r\nfooter\r\n",
                             partial_body_result="pass")

    assert whole.result == "pass" and whole.reason is None
    assert appended.result == "policy"
    assert re.fullmatch(r"l=\d+: the last 40 bytes of the body are not signed", appended.reason)
    # 40: the appended line, and the two empty lines before it that now count
    assert lenient.result == "pass" and "are not signed" in lenient.reason


async def test_l_longer_than_the_body_fails(dns_server, rsa2048):
    publish(dns_server, "example.com", "len", rsa2048)
    signed = dkimpy_sign(MESSAGE, "example.com", "len", rsa2048, length=True)
    cut = signed[:-20] + b"\r\n"

    [c] = await verify(dns_server, cut)

    assert c.result == "fail" and "longer than the body" in c.reason


@pytest.mark.parametrize("canonicalize", [(b"relaxed", b"relaxed"), (b"simple", b"simple"),
                                          (b"relaxed", b"simple"), (b"simple", b"relaxed")])
async def test_altered_body_or_signed_header_fails(dns_server, rsa2048, canonicalize):
    publish(dns_server, "example.com", "s", rsa2048)
    signed = dkimpy_sign(MESSAGE, "example.com", "s", rsa2048, canonicalize=canonicalize)

    [ok] = await verify(dns_server, signed)
    [body] = await verify(dns_server, tamper_body(signed))
    [header] = await verify(dns_server, tamper_subject(signed))

    assert ok.result == "pass"
    assert body.result == "fail" and "body hash mismatch" in body.reason
    assert header.result == "fail" and "signed header field was changed" in header.reason


async def test_an_added_oversigned_header_fails(dns_server, rsa2048):
    publish(dns_server, "example.com", "s", rsa2048)
    signed = dkimpy_sign(MESSAGE, "example.com", "s", rsa2048,
                         include_headers=[b"from", b"to", b"subject", b"subject"])
    head, sep, body = signed.partition(b"\r\n\r\n")
    added = head + b"\r\nSubject: Urgent: wire money" + sep + body

    assert results(await verify(dns_server, signed)) == ["pass"]
    assert results(await verify(dns_server, added)) == ["fail"]


async def test_relaxed_survives_rewrapping_and_whitespace(dns_server, rsa2048):
    publish(dns_server, "example.com", "s", rsa2048)
    signed = dkimpy_sign(MESSAGE, "example.com", "s", rsa2048)
    rewrapped = signed.replace(b"Subject: Quarterly numbers",
                               b"Subject:   Quarterly\r\n   numbers ")
    rewrapped = rewrapped.replace(b"Hello Bob,\r\n", b"Hello   Bob,  \r\n")
    assert results(await verify(dns_server, rewrapped)) == ["pass"]


async def test_a_message_with_bare_lf_line_ends_verifies(dns_server, rsa2048):
    publish(dns_server, "example.com", "s", rsa2048)
    signed = dkimpy_sign(MESSAGE, "example.com", "s", rsa2048)
    assert results(await verify(dns_server, signed.replace(b"\r\n", b"\n"))) == ["pass"]


async def test_a_large_message_is_hashed_in_chunks(dns_server, rsa2048):
    publish(dns_server, "example.com", "s", rsa2048)
    big = MESSAGE + b"".join(b"line %07d with  some   spaces \t\r\n" % i for i in range(60_000))
    signed = dkimpy_sign(big, "example.com", "s", rsa2048)
    assert len(signed) > 2_000_000
    assert results(await verify(dns_server, signed)) == ["pass"]
    assert results(await verify(dns_server, signed[:-40] + b"X" + signed[-39:])) == ["fail"]


# ------------------------------------------------------------------ keys and syntax


async def test_ed25519_signature_against_an_rsa_key_fails(dns_server, rsa2048):
    ed = ed_key()
    publish(dns_server, "example.com", "mixed", rsa2048)
    signed = dkimpy_sign(MESSAGE, "example.com", "mixed", ed)
    [c] = await verify(dns_server, signed)
    assert c.result == "fail" and "not for a=ed25519-sha256" in c.reason


async def test_a_revoked_key_fails(dns_server, rsa2048):
    signed = dkimpy_sign(MESSAGE, "example.com", "old", rsa2048)
    dns_server.zone("example.com")
    dns_server.add("old._domainkey.example.com", "TXT", "v=DKIM1; k=rsa; p=")
    [c] = await verify(dns_server, signed)
    assert c.result == "fail" and "revoked" in c.reason


@pytest.mark.parametrize("record, words", [
    ("v=DKIM1; k=rsa; p=AAAA!!!", "cannot be decoded"),
    ("v=DKIM1; k=dsa; p=AAAA", "unknown type k=dsa"),
    ("v=DKIM1; k=rsa; s=tlsrpt; p=AAAA", "not for email"),
    ("v=DKIM2; p=AAAA", "unknown version"),
    ("v=DKIM1; k=rsa", "has no p="),
    ("this is not a key record", "malformed"),
])
async def test_unusable_key_records_are_permerror(dns_server, rsa2048, record, words):
    signed = dkimpy_sign(MESSAGE, "example.com", "broken", rsa2048)
    dns_server.zone("example.com")
    dns_server.add("broken._domainkey.example.com", "TXT", record)
    [c] = await verify(dns_server, signed)
    assert c.result == "permerror" and words in c.reason


def _hand_signed(tags: str) -> bytes:
    return b"DKIM-Signature: " + tags.encode() + b"\r\n" + MESSAGE


@pytest.mark.parametrize("tags, result, words", [
    ("v=1; a=rsa-sha256; d=example.com; s=s; h=from; bh=AAAA", "neutral", "lacks b="),
    ("v=1; a=rsa-md5; d=example.com; s=s; h=from; bh=AAAA; b=AAAA", "neutral",
     "unknown signature algorithm"),
    ("v=1; a=rsa-sha256; d=example.com; s=s; h=to:subject; bh=AAAA; b=AAAA", "permerror",
     "From is not signed"),
    ("v=1; a=rsa-sha256; d=example.com; i=@example.org; s=s; h=from; bh=AAAA; b=AAAA",
     "neutral", "i= domain is not a subdomain of d="),
    ("v=1; a=rsa-sha256; d=example.com; s=s; x=1000; h=from; bh=AAAA; b=AAAA", "fail",
     "expired"),
    ("v=1; a=rsa-sha256; c=fancy/simple; d=example.com; s=s; h=from; bh=AAAA; b=AAAA",
     "neutral", "c=fancy/simple"),
    ("v=1; a=rsa-sha256 d=example.com", "neutral", "lacks"),
    ("v=1; a=rsa-sha256; a=rsa-sha256", "neutral", "not a tag=value list"),
])
async def test_malformed_signatures(dns_server, tags, result, words):
    [c] = await verify(dns_server, _hand_signed(tags))
    assert c.result == result and words in c.reason, c


async def test_a_malformed_header_section_is_neutral(dns_server, rsa2048):
    signed = dkimpy_sign(MESSAGE, "example.com", "s", rsa2048)
    broken = signed.replace(b"MIME-Version: 1.0\r\n", b"MIME-Version 1.0\r\n")
    [c] = await verify(dns_server, broken)
    assert c.result == "neutral" and "malformed" in c.reason


# ------------------------------------------------------------------ DNS failures


@pytest.mark.parametrize("fault", ["timeout", "SERVFAIL", "garbage", "REFUSED"])
async def test_a_dns_failure_is_temperror_never_pass(dns_server, rsa2048, fault):
    publish(dns_server, "example.com", "s", rsa2048)
    signed = dkimpy_sign(MESSAGE, "example.com", "s", rsa2048)
    dns_server.fail("s._domainkey.example.com", fault)

    started = time.monotonic()
    [c] = await verify(dns_server, signed)

    assert c.result == "temperror", c
    assert "could not be looked up" in c.reason and c.domain == "example.com"
    assert time.monotonic() - started < 5


async def test_a_truncated_answer_is_asked_again_over_tcp(dns_server, rsa2048):
    publish(dns_server, "example.com", "s", rsa2048)
    signed = dkimpy_sign(MESSAGE, "example.com", "s", rsa2048)
    dns_server.fail("s._domainkey.example.com", "truncate", transport="udp")

    assert results(await verify(dns_server, signed)) == ["pass"]
    assert dns_server.count("s._domainkey.example.com", "TXT", transport="tcp") == 1


async def test_a_truncated_answer_with_tcp_failing_is_temperror(dns_server, rsa2048):
    publish(dns_server, "example.com", "s", rsa2048)
    signed = dkimpy_sign(MESSAGE, "example.com", "s", rsa2048)
    dns_server.fail("s._domainkey.example.com", "truncate", transport="udp")
    dns_server.fail("s._domainkey.example.com", "timeout", transport="tcp")

    [c] = await verify(dns_server, signed)

    assert c.result == "temperror"


async def test_one_failing_key_does_not_spoil_the_others(dns_server, rsa2048):
    publish(dns_server, "example.com", "ok", rsa2048)
    publish(dns_server, "example.net", "down", rsa2048)
    signed = dkimpy_sign(dkimpy_sign(MESSAGE, "example.com", "ok", rsa2048),
                         "example.net", "down", rsa2048)
    dns_server.fail("down._domainkey.example.net", "SERVFAIL")

    assert results(await verify(dns_server, signed)) == ["temperror", "pass"]


async def test_a_key_split_into_many_strings_is_joined(dns_server):
    key = rsa_key(4096)
    publish(dns_server, "example.com", "big", key)   # 3 character-strings, and TCP
    signed = dkimpy_sign(MESSAGE, "example.com", "big", key)
    assert results(await verify(dns_server, signed)) == ["pass"]


# ------------------------------------------------------------------ injection


async def test_crafted_selector_and_domain_stay_values(dns_server):
    crafted = ('v=1; a=rsa-sha256; d=example.com(x; s=x dkim=pass header.d=bank.example; '
               'h=from; bh=AAAA; b=' + base64.b64encode(b"x" * 30).decode())
    [c] = await verify(dns_server, _hand_signed(crafted))
    props = c.auth_result().properties
    assert props["header.s"] == "x dkim=pass header.d=bank.example"
    assert props["header.d"] == "example.com(x"
    assert c.result in ("neutral", "permerror")
