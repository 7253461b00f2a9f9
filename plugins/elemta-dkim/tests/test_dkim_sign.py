"""Signing without a server: key choice and rotation, the signed header list, key files,
settings; and that the loop keeps running while large messages are signed and verified."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import time
from pathlib import Path

import pydantic
import pytest
from dkim_support import (MESSAGE, Users, ed_key, ed_seed_b64, pem, publish, results, rsa_key,
                          server_config, verify)

from elemta.testing import send_mail
from elemta_dkim.keys import KeyFileError, SigningKey, load_private_key, write_private_key
from elemta_dkim.settings import DkimSettings
from elemta_dkim.sign import Signer, SignError, from_domain

UTC = dt.timezone.utc
NOW = dt.datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def key(selector, algorithm="rsa", domain="example.com", not_before=None, not_after=None):
    private = rsa_key(2048) if algorithm == "rsa" else ed_key()
    return SigningKey(domain, selector, algorithm, Path(selector), private, not_before, not_after)


def days(n):
    return NOW + dt.timedelta(days=n)


# ------------------------------------------------------------------ choosing keys


def test_the_key_that_became_valid_last_signs_one_per_algorithm():
    keys = [key("old", not_before=days(-400), not_after=days(10)),
            key("new", not_before=days(-1)),
            key("future", not_before=days(3)),
            key("expired", not_before=days(-900), not_after=days(-1)),
            key("ed-a", "ed25519"),
            key("ed-b", "ed25519", not_before=days(-30))]
    signer = Signer(keys, DkimSettings())

    assert [k.selector for k in signer.keys_for("example.com", NOW)] == ["new", "ed-b"]
    assert [k.selector for k in signer.keys_for("example.com", days(5))] == ["future", "ed-b"]
    assert [k.selector for k in signer.keys_for("example.com", days(-2))] == ["old", "ed-b"]
    assert signer.keys_for("example.org", NOW) == []


def test_not_after_is_exclusive_and_not_before_inclusive():
    signer = Signer([key("k", not_before=days(0), not_after=days(1))], DkimSettings())
    assert signer.keys_for("example.com", days(0))
    assert not signer.keys_for("example.com", days(1))


def test_subdomains_use_the_parent_keys_only_when_asked():
    keys = [key("k")]
    assert Signer(keys, DkimSettings()).keys_for("mail.example.com", NOW) == []
    [k] = Signer(keys, DkimSettings(sign_subdomains=True)).keys_for("mail.example.com", NOW)
    assert k.domain == "example.com"
    assert Signer(keys, DkimSettings(sign_subdomains=True)).keys_for("com", NOW) == []


@pytest.mark.parametrize("fields, domain", [
    (["Alice <alice@Example.COM>"], "example.com"),
    (["alice@example.com, bob@example.com"], "example.com"),
    (["alice@example.com, bob@example.org"], None),
    (["alice@example.com", "bob@example.com"], None),
    ([], None),
    (["undisclosed"], None),
])
def test_the_signing_domain_is_the_one_from_domain(fields, domain):
    assert from_domain(fields) == domain


# ------------------------------------------------------------------ what is signed


def test_every_instance_is_signed_and_oversigned_fields_once_more():
    signer = Signer([], DkimSettings(headers=["from", "to", "cc", "subject", "received-spf"],
                                     oversign=["from", "subject", "reply-to"]))
    headers = [(b"From", b""), (b"To", b""), (b"To", b""), (b"Subject", b""), (b"X-Other", b"")]
    assert signer.signed_names(headers) == ["from", "from", "to", "to", "subject", "subject",
                                            "reply-to"]


async def test_signatures_verify_for_every_canonicalization(dns_server):
    rsa, ed = key("r"), key("e", "ed25519")
    publish(dns_server, "example.com", "r", rsa.private)
    publish(dns_server, "example.com", "e", ed.private)
    for canonicalization in ("relaxed/relaxed", "relaxed/simple", "simple/relaxed",
                             "simple/simple"):
        signer = Signer([rsa, ed], DkimSettings(canonicalization=canonicalization,
                                                expire_after_seconds=3600))
        values = signer.sign(b"", io.BytesIO(MESSAGE), [rsa, ed], time.time())
        assert all("x=" in v and "c=" + canonicalization in v for v in values)
        signed = b"".join(b"DKIM-Signature: " + v.encode() + b"\r\n" for v in values) + MESSAGE
        assert results(await verify(dns_server, signed)) == ["pass", "pass"], canonicalization


def test_signature_lines_are_folded():
    rsa = key("r")
    [value] = Signer([rsa], DkimSettings()).sign(b"", io.BytesIO(MESSAGE), [rsa], time.time())
    lines = value.split("\r\n")
    assert len(lines) > 4 and all(len(line) <= 78 for line in lines)
    assert all(line.startswith("\t") for line in lines[1:])


def test_a_malformed_header_section_cannot_be_signed():
    rsa = key("r")
    signer = Signer([rsa], DkimSettings())
    broken = MESSAGE.replace(b"MIME-Version: 1.0", b"MIME-Version 1.0")
    with pytest.raises(SignError, match="malformed"):
        signer.sign(b"", io.BytesIO(broken), [rsa], time.time())


async def test_a_malformed_submission_is_refused_with_the_reason(elemta_server, dns_server,
                                                                 signing_keys):
    server = await elemta_server(config=server_config(dns_server, signing_keys),
                                 enabled=["dkim"], plugins=[("users", Users())])
    sent = await send_mail(server, "alice@example.com", ["bob@example.org"],
                           MESSAGE.replace(b"MIME-Version: 1.0", b"MIME-Version 1.0"),
                           listener="submission", starttls=True,
                           auth=("alice@example.com", "correct horse"))
    assert sent.reply.code == 550 and sent.reply.enhanced == "5.6.0"
    assert "cannot be DKIM-signed" in sent.reply.text


# ------------------------------------------------------------------ the event loop


async def test_the_loop_keeps_running_while_large_messages_are_signed_and_verified(dns_server):
    """8 MiB messages: the work is in worker threads and in chunks, so the event loop is
    never held for long (dkimpy canonicalizing such a body in one call holds the GIL for
    about half a second)."""
    from concurrent.futures import ThreadPoolExecutor

    rsa = key("r")
    publish(dns_server, "example.com", "r", rsa.private)
    line = b"a line  of text with   runs of blanks\t and a tab   \r\n"
    big = MESSAGE + line * (8 * 1024 * 1024 // len(line))
    signer = Signer([rsa], DkimSettings())
    loop = asyncio.get_running_loop()
    worst = 0.0
    stop = asyncio.Event()

    async def heartbeat():
        nonlocal worst
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.002)
            now = time.monotonic()
            worst = max(worst, now - last)
            last = now

    beat = asyncio.create_task(heartbeat())
    with ThreadPoolExecutor(2) as executor:
        [value] = await loop.run_in_executor(executor, signer.sign, b"", io.BytesIO(big), [rsa],
                                             time.time())
        signed = b"DKIM-Signature: " + value.encode() + b"\r\n" + big
        checked = await verify(dns_server, signed)
    stop.set()
    await beat

    assert results(checked) == ["pass"]
    assert worst < 0.25, f"the event loop was held for {worst * 1000:.0f} ms"


# ------------------------------------------------------------------ key files


def test_key_files_written_by_us_are_0600_and_load(tmp_path):
    for algorithm, private in (("rsa", rsa_key(2048)), ("ed25519", ed_key())):
        path = tmp_path / f"{algorithm}.key"
        write_private_key(path, private)
        assert path.stat().st_mode & 0o777 == 0o600
        assert type(load_private_key(path, algorithm)) is type(private)
        with pytest.raises(FileExistsError):
            write_private_key(path, private)


def test_pkcs1_pkcs8_and_raw_ed25519_seeds_load(tmp_path):
    for name, data, algorithm in (("pkcs1", pem(rsa_key(2048)), "rsa"),
                                  ("pkcs8", pem(rsa_key(2048), pkcs8=True), "rsa"),
                                  ("seed", ed_seed_b64(ed_key()) + b"\n", "ed25519")):
        path = tmp_path / name
        path.write_bytes(data)
        path.chmod(0o600)
        load_private_key(path, algorithm)


def _problem(path: Path, algorithm: str = "rsa") -> str:
    with pytest.raises(KeyFileError) as e:
        load_private_key(path, algorithm)
    return str(e.value)


def test_unusable_key_files_say_what_is_wrong_and_how_to_fix_it(tmp_path):
    missing = tmp_path / "missing.key"
    assert "no such key file" in _problem(missing) and "keygen" in _problem(missing)

    shared = tmp_path / "shared.key"
    write_private_key(shared, rsa_key(2048))
    shared.chmod(0o640)
    assert "mode 0640" in _problem(shared) and f"chmod 600 {shared}" in _problem(shared)

    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"hello\n")
    garbage.chmod(0o600)
    assert "neither a PEM private key nor a base64 Ed25519 seed" in _problem(garbage)

    broken = tmp_path / "broken.key"
    broken.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    broken.chmod(0o600)
    assert "not a readable PEM private key" in _problem(broken)

    ed = tmp_path / "ed.key"
    write_private_key(ed, ed_key())
    assert 'set algorithm = "ed25519"' in _problem(ed, "rsa")

    weak = tmp_path / "weak.key"
    weak.write_bytes(pem(rsa_key(768)))
    weak.chmod(0o600)
    assert "768-bit" in _problem(weak) and "RFC 8301" in _problem(weak)

    folder = tmp_path / "folder.key"
    folder.mkdir(mode=0o700)
    assert "not a regular file" in _problem(folder)

    from cryptography.hazmat.primitives import serialization

    locked = tmp_path / "locked.key"
    locked.write_bytes(rsa_key(2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    locked.chmod(0o600)
    assert "encrypted" in _problem(locked)


def test_an_unreadable_key_file_says_so(tmp_path):
    """Loaded by a user who may not read it: as root, the check runs as nobody."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="elemta-dkim-"))
    try:
        folder.chmod(0o755)
        path = folder / "k.key"
        write_private_key(path, rsa_key(2048))
        if os.geteuid() != 0:
            path.chmod(0o000)
            problem = _problem(path)
        else:
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                pytest.skip("setpriv (util-linux) is needed to load the key as another user")
            run = subprocess.run(
                [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
                 "-c", "import sys; from pathlib import Path; "
                 "from elemta_dkim.keys import KeyFileError, load_private_key\n"
                 "try: load_private_key(Path(sys.argv[1]), 'rsa')\n"
                 "except KeyFileError as e: print(e)", str(path)],
                capture_output=True, text=True, timeout=60)
            assert run.returncode == 0, run.stderr
            problem = run.stdout
        assert f"{path}: permission denied" in problem
        assert "readable by the user Elemta runs as" in problem
    finally:
        shutil.rmtree(folder)


# ------------------------------------------------------------------ settings


def _error(**table) -> str:
    with pytest.raises(pydantic.ValidationError) as e:
        DkimSettings(**table)
    return str(e.value)


def test_settings_errors_say_what_to_do():
    assert "From must always be signed" in _error(headers=["to", "subject"])
    assert "must not be signed" in _error(headers=["from", "received"])
    assert "must not be signed" in _error(oversign=["dkim-signature"])
    assert "not a header field name" in _error(headers=["from", "bad name"])
    assert "not a domain name" in _error(keys=[{"domain": "exa mple", "selector": "s",
                                                "key_file": "k"}])
    assert "not a DNS label" in _error(keys=[{"domain": "example.com", "selector": "s_1",
                                              "key_file": "k"}])
    assert "never sign" in _error(keys=[{"domain": "example.com", "selector": "s",
                                         "key_file": "k", "not_before": "2026-02-01",
                                         "not_after": "2026-01-01"}])
    twice = {"domain": "example.com", "selector": "s", "key_file": "k"}
    assert "listed twice" in _error(keys=[twice, twice])
    assert "extra" in _error(sign_relays=True).lower()


def test_key_dates_are_utc_and_domains_a_labels():
    settings = DkimSettings(keys=[{"domain": "Bücher.Example.", "selector": "S1",
                                   "key_file": "k", "not_before": dt.date(2026, 1, 1),
                                   "not_after": dt.datetime(2027, 1, 1, 1, 0)}])
    [entry] = settings.keys
    assert entry.domain == "xn--bcher-kva.example" and entry.selector == "s1"
    assert entry.not_before == dt.datetime(2026, 1, 1, tzinfo=UTC)
    assert entry.not_after == dt.datetime(2027, 1, 1, 1, 0, tzinfo=UTC)
