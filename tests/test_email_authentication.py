"""SPF, DKIM and DMARC together, through real servers, with the repository's plugins.

A submission server signs the mail of a logged-in user and relays it to an
MX running elemta-spf, elemta-dkim and elemta-dmarc, on one local DNS zone.
What each plugin concludes reaches the next (DMARC reads the SPF and DKIM
results the others wrote) and the one Authentication-Results header.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from pathlib import Path

import pytest

from elemta import Accept, hookimpl
from elemta.testing import RawSMTP, run_cli, unverified_context

pytest.importorskip("elemta_spf")
pytest.importorskip("elemta_dkim")
pytest.importorskip("elemta_dmarc")

DOMAIN = "example.org"


class Users:
    @hookimpl
    def auth(self, credentials):
        return Accept(identity="alice@example.org")


def dkim_key(folder: Path) -> tuple[Path, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = folder / "example.org.s1.key"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return path, f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode()}"


@pytest.fixture
def zone(dns_server, tmp_path):
    key_file, record = dkim_key(tmp_path)
    dns_server.zone(DOMAIN)
    dns_server.add(DOMAIN, "TXT", "v=spf1 ip4:127.0.0.1 -all")
    dns_server.add(f"_dmarc.{DOMAIN}", "TXT", "v=DMARC1; p=reject")
    dns_server.add(f"s1._domainkey.{DOMAIN}", "TXT", record)
    dns_server.zone("quarantine.example")
    dns_server.add("quarantine.example", "TXT", "v=spf1 ip4:127.0.0.1 -all")
    dns_server.add("_dmarc.quarantine.example", "TXT", "v=DMARC1; p=quarantine")
    return {"nameservers": [dns_server.nameserver], "timeout_seconds": 1, "attempts": 1,
            "key_file": str(key_file)}


async def mx_server(elemta_server, zone, outbox=None):
    return await elemta_server({
        "domains": {"remote.example": {}},     # the MX of bob@remote.example
        "dns": {k: v for k, v in zone.items() if k != "key_file"},
        "plugins": {"enabled": ["spf", "dkim", "dmarc"]},
    }, outbox=outbox)


def spooled(server) -> tuple[dict, bytes]:
    server.app.spool.wait_written()
    paths = sorted((server.spool_path / "ready").glob("*.json")) \
        + sorted((server.spool_path / "hold").glob("*.json"))
    env = json.loads(paths[-1].read_bytes())
    return env, (server.spool_path / "messages" / env["id"]).read_bytes()


def auth_results(content: bytes) -> str:
    head = content.split(b"\r\n\r\n", 1)[0].decode()
    [field] = [f for f in re.split(r"\r\n(?![ \t])", head)
               if f.lower().startswith("authentication-results:")]
    return re.sub(r"\s+", " ", field)


async def test_signed_at_submission_verified_at_the_mx(elemta_server, zone):
    mx = await mx_server(elemta_server, zone)
    submission = await elemta_server({
        "dns": {k: v for k, v in zone.items() if k != "key_file"},
        "delivery": {"enabled": True, "retry_intervals_seconds": [0.5],
                     "routes": {"*": {"host": f"127.0.0.1:{mx.port('mx')}", "tls": "none"}}},
        "plugins": {"enabled": ["dkim"],
                    "dkim": {"keys": [{"domain": DOMAIN, "selector": "s1",
                                       "key_file": zone["key_file"]}]}},
    }, plugins=[("users", Users())])
    async with RawSMTP(submission.port("submission")) as c:
        await c.cmd("EHLO client.example")
        await c.starttls(unverified_context())
        await c.cmd("EHLO client.example")
        token = base64.b64encode(b"\0alice\0pw").decode()
        assert (await c.cmd(f"AUTH PLAIN {token}")).code == 235
        reply = await c.send_message("alice@example.org", ["bob@remote.example"],
                                     b"From: Alice <alice@example.org>\r\nTo: bob@remote.example"
                                     b"\r\nSubject: signed\r\n\r\nHello Bob.\r\n.\r\n")
        assert reply.code == 250, reply
    await submission.flush()
    for _ in range(200):
        if list((mx.spool_path / "ready").glob("*.json")):
            break
        await asyncio.sleep(0.05)
    _, content = spooled(mx)
    results = auth_results(content)
    assert "spf=pass smtp.mailfrom=alice@example.org" in results
    assert "dkim=pass header.d=example.org header.s=s1" in results
    assert "dmarc=pass header.from=example.org" in results


async def test_altered_in_transit_from_elsewhere_is_rejected_by_dmarc(elemta_server, zone):
    mx = await mx_server(elemta_server, zone)
    import dkim

    message = (b"From: Alice <alice@example.org>\r\nTo: bob@example.test\r\n"
               b"Subject: original\r\n\r\nPay 10 euros.\r\n")
    signature = dkim.sign(message, b"s1", DOMAIN.encode(), Path(zone["key_file"]).read_bytes(),
                          include_headers=[b"from", b"to", b"subject"])
    altered = (signature + message).replace(b"Pay 10 euros", b"Pay 99 euros")
    # from an address SPF does not allow, with the body changed: nothing aligned passes
    async with RawSMTP(mx.port("mx"), source="127.0.0.5") as c:
        await c.cmd("EHLO relay.example")
        reply = await c.send_message("alice@example.org", ["bob@example.test"],
                                     altered + b".\r\n")
    assert (reply.code, reply.enhanced) == (550, "5.7.1"), reply
    assert "DMARC policy of example.org" in reply.text
    # the same altered message from an allowed address passes on SPF alone, with dkim=fail
    async with RawSMTP(mx.port("mx"), source="127.0.0.1") as c:
        await c.cmd("EHLO relay.example")
        reply = await c.send_message("alice@example.org", ["bob@example.test"],
                                     altered + b".\r\n")
    assert reply.code == 250, reply
    results = auth_results(spooled(mx)[1])
    assert "dkim=fail" in results and "spf=pass" in results and "dmarc=pass" in results


async def test_quarantine_policy_holds_the_message_until_released(elemta_server, zone,
                                                                  elemta_outbox):
    mx = await mx_server(elemta_server, zone, outbox=elemta_outbox)
    async with RawSMTP(mx.port("mx"), source="127.0.0.6") as c:
        await c.cmd("EHLO relay.example")
        reply = await c.send_message("news@quarantine.example", ["bob@example.test"],
                                     b"From: news@quarantine.example\r\nSubject: q\r\n\r\n"
                                     b"hi\r\n.\r\n")
    assert reply.code == 250, reply
    env, content = spooled(mx)
    assert (mx.spool_path / "hold" / f"{env['id']}.json").exists()
    assert "dmarc=fail" in auth_results(content) and "spf=fail" in auth_results(content)
    result = await asyncio.to_thread(run_cli, "queue", "release", env["id"],
                                     config=mx.config_path)
    assert result.exit_code == 0, result.stderr
    [delivered] = await elemta_outbox.wait(1)
    assert delivered.envelope.id == env["id"]
