"""Interoperability with OpenDKIM (Debian's opendkim-tools and libopendkim).

Our signatures → ``opendkim-testmsg`` (verify mode), which looks keys up through
the libc resolver: it runs in a private mount+network namespace whose
/etc/resolv.conf points at a ZoneServer on 127.0.0.1:53 (``opendkim_verify``).

OpenDKIM's signatures → our verifier, with keys in the ``dns_server`` fixture:
``opendkim-testmsg`` in signing mode (it signs rsa-sha1 only, which RFC 8301
makes a ``fail``), and libopendkim itself for rsa-sha256 and ed25519-sha256.
"""

from __future__ import annotations

import datetime as dt
import io
import subprocess
import time
from pathlib import Path

import pytest
from dkim_support import (MESSAGE, LibOpenDKIM, ed_key, key_records, opendkim_verify,
                          pem, publish, rsa_key, tamper_body, tamper_subject, verify)

from elemta_dkim.keys import SigningKey
from elemta_dkim.settings import DkimSettings
from elemta_dkim.sign import Signer


@pytest.fixture(scope="module")
def libopendkim():
    try:
        return LibOpenDKIM()
    except OSError as e:
        pytest.skip(f"libopendkim is not installed (apt-get install opendkim-tools): {e}")


def sign_ours(message: bytes, keys: list[SigningKey], canonicalization: str) -> bytes:
    signer = Signer(keys, DkimSettings(canonicalization=canonicalization))
    values = signer.sign(b"", io.BytesIO(message), keys, time.time())
    return b"".join(b"DKIM-Signature: " + v.encode() + b"\r\n" for v in values) + message


def our_keys() -> tuple[SigningKey, SigningKey]:
    rsa, ed = rsa_key(2048), ed_key()
    return (SigningKey("example.com", "rsa1", "rsa", Path("-"), rsa, None, None),
            SigningKey("example.com", "ed1", "ed25519", Path("-"), ed, None, None))


@pytest.mark.parametrize("canonicalization", ["relaxed/relaxed", "simple/simple",
                                              "relaxed/simple"])
def test_opendkim_verifies_our_rsa_and_ed25519_signatures(tmp_path, namespace,
                                                          canonicalization):
    rsa, ed = our_keys()
    records = key_records("example.com", {"rsa1": rsa.private, "ed1": ed.private})
    messages = [sign_ours(MESSAGE, [rsa], canonicalization),
                sign_ours(MESSAGE, [ed], canonicalization),
                tamper_body(sign_ours(MESSAGE, [rsa], canonicalization)),
                tamper_subject(sign_ours(MESSAGE, [ed], canonicalization)),
                sign_ours(MESSAGE, [SigningKey("example.com", "nokey", "rsa", Path("-"),
                                               rsa.private, None, None)], canonicalization)]

    (rsa_ok, _), (ed_ok, _), (rsa_bad, why_rsa), (ed_bad, why_ed), (nokey, why_nokey) = \
        opendkim_verify(namespace, tmp_path, messages, records)

    assert (rsa_ok, ed_ok) == (0, 0)
    assert rsa_bad != 0 and "Bad signature" in why_rsa
    assert ed_bad != 0 and "Bad signature" in why_ed
    assert nokey != 0 and why_nokey


def test_opendkim_verifies_a_large_message_we_signed(tmp_path, namespace):
    rsa, _ = our_keys()
    big = MESSAGE + b"".join(b"%06d:  lorem ipsum \t dolor  \r\n" % i for i in range(40_000))
    [(rc, why)] = opendkim_verify(namespace, tmp_path, [sign_ours(big, [rsa], "relaxed/relaxed")],
                                  key_records("example.com", {"rsa1": rsa.private}))
    assert rc == 0, why


def test_the_opendkim_harness_tells_pass_from_missing_keys(tmp_path, namespace, libopendkim):
    """The namespace really answers from the zone: a key it does not hold fails."""
    key = rsa_key(2048)
    signed = libopendkim.sign(MESSAGE, "example.com", "sel", pem(key, pkcs8=True),
                              LibOpenDKIM.RSA_SHA256)
    [(ok, _), (missing, why)] = opendkim_verify(
        namespace, tmp_path, [signed, signed.replace(b"s=sel;", b"s=other;")],
        key_records("example.com", {"sel": key}))
    assert ok == 0
    assert missing != 0 and "key" in why.lower(), why


R, E = LibOpenDKIM.RSA_SHA256, LibOpenDKIM.ED25519_SHA256
RELAXED, SIMPLE = LibOpenDKIM.RELAXED, LibOpenDKIM.SIMPLE


# Not (ed25519, simple header canonicalization): libopendkim 2.11.0~beta2 makes such
# signatures wrong, and OpenDKIM's own opendkim-testmsg rejects them too ("Bad
# signature"), as does dkimpy. Ours in that mode verify in both (test above).
@pytest.mark.parametrize("algorithm, canon", [
    (R, (RELAXED, RELAXED)), (R, (SIMPLE, SIMPLE)), (R, (RELAXED, SIMPLE)), (R, (SIMPLE, RELAXED)),
    (E, (RELAXED, RELAXED)), (E, (RELAXED, SIMPLE)),
])
async def test_we_verify_what_libopendkim_signs(dns_server, libopendkim, algorithm, canon):
    key = ed_key() if algorithm == LibOpenDKIM.ED25519_SHA256 else rsa_key(2048)
    publish(dns_server, "example.com", "odk", key)
    signed = libopendkim.sign(MESSAGE, "example.com", "odk", pem(key, pkcs8=True), algorithm,
                              *canon)
    expected = "ed25519-sha256" if algorithm == LibOpenDKIM.ED25519_SHA256 else "rsa-sha256"

    [good] = await verify(dns_server, signed)
    [bad] = await verify(dns_server, tamper_body(signed))

    assert good.result == "pass", good
    assert good.algorithm == expected and good.selector == "odk"
    assert bad.result == "fail"


async def test_opendkim_testmsg_signatures_are_rsa_sha1_and_fail_rfc_8301(
        dns_server, testmsg, tmp_path):
    key = rsa_key(2048)
    publish(dns_server, "example.com", "tm", key)
    key_file = tmp_path / "tm.private"
    key_file.write_bytes(pem(key, pkcs8=True))
    # opendkim-testmsg refuses a message without Date (its "Syntax error")
    run = subprocess.run([testmsg, "-C", "-d", "example.com", "-s", "tm", "-k", str(key_file)],
                         input=MESSAGE, capture_output=True, timeout=30)
    assert run.returncode == 0, run.stderr
    signed = run.stdout
    assert b"a=rsa-sha1;" in signed

    [c] = await verify(dns_server, signed)

    assert c.result == "fail" and "RFC 8301" in c.reason
    assert c.selector == "tm" and c.domain == "example.com"


def test_keys_from_opendkim_genkey_sign_for_us(tmp_path, require_tool, namespace):
    """A key made by opendkim-genkey loads (mode 0600 PKCS#8 PEM), and its published
    record (opendkim-genkey's own text) verifies our signature in OpenDKIM."""
    from elemta_dkim.keys import load_private_key

    genkey = require_tool("opendkim-genkey", "opendkim-tools")
    subprocess.run([genkey, "--bits=2048", "--domain=example.com", "--selector=gk",
                    f"--directory={tmp_path}"], check=True, timeout=60)
    private = load_private_key(tmp_path / "gk.private", "rsa")
    zone = (tmp_path / "gk.txt").read_text()
    record = "".join(part for part in zone.split('"')[1::2])
    assert record.startswith("v=DKIM1; h=sha256; k=rsa; p=")
    key = SigningKey("example.com", "gk", "rsa", tmp_path / "gk.private", private, None,
                     dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc))
    [(rc, why)] = opendkim_verify(namespace, tmp_path, [sign_ours(MESSAGE, [key], "relaxed/relaxed")],
                                  [("example.com", "ZONE", ""),
                                   ("gk._domainkey.example.com", "TXT", record)])
    assert rc == 0, why
