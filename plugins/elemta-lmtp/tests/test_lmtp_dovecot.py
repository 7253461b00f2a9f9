"""elemta-lmtp against a real Dovecot 2.3: delivered over its LMTP socket, read back over IMAP.

A private Dovecot (:class:`elemta_lmtp.testing.Dovecot`) with a Maildir++
quota and ``lmtp_save_to_detail_mailbox``. Bounces go through ``[delivery.routes]``
to an SMTP sink standing in for the sender's MX.
"""

from __future__ import annotations

import asyncio
import email
import email.policy

import aiosmtplib
import pytest

from elemta.testing import Sink, parse_dsn
from elemta_lmtp.testing import Dovecot, DovecotUser

SENDER = "alice@origin.example"
USERS = [DovecotUser("lena@example.test"), DovecotUser("ola@example.test"),
         DovecotUser("full@example.test", quota="*:storage=1K")]


@pytest.fixture(scope="module")
def dovecot():
    with Dovecot.started(USERS) as server:
        yield server


async def start(elemta_server, dovecot: Dovecot, bounces: Sink | None = None):
    delivery: dict = {"enabled": True, "workers": 2, "retry_intervals_seconds": [60]}
    if bounces is not None:
        delivery["routes"] = {"origin.example": {"host": bounces.address, "tls": "none"}}
    return await elemta_server({"delivery": delivery,
                                "plugins": {"lmtp": {"address": dovecot.lmtp_address}}},
                               enabled=["lmtp"])


async def submit(server, rcpts: list[str], content: bytes, **options) -> str:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=server.port("mx"),
                               start_tls=False) as client:
        errors, reply = await client.sendmail(SENDER, rcpts, content, **options)
    assert not errors, errors
    await server.app.spool.checkpoint()
    return reply.rsplit(" ", 1)[1]


async def wait_gone(server, queue_id: str) -> None:
    def queued() -> bool:
        return any((server.spool_path / state / f"{queue_id}.json").exists()
                   for state in ("ready", "deferred", "hold", "failed"))
    async with asyncio.timeout(10):
        while queued():
            await asyncio.sleep(0.02)


def fetch_all(imap, mailbox: str) -> list[bytes]:
    status, data = imap.select(mailbox, readonly=True)
    assert status == "OK", (mailbox, data)
    count = int(data[0])
    if not count:
        return []
    status, data = imap.fetch(f"1:{count}", "(BODY.PEEK[])")
    assert status == "OK", data
    return [part[1] for part in data if isinstance(part, tuple)]


async def test_lmtp_delivery_to_dovecot_is_byte_exact_and_finds_the_detail_folder(
        elemta_server, dovecot):
    content = (b"From: alice@origin.example\r\nTo: lena@example.test\r\n"
               b"Subject: caf\xc3\xa9 8-bit\r\nMessage-ID: <exact@origin.example>\r\n\r\n"
               b".a line starting with a dot\r\n..two dots\r\n\xe2\x82\xac\r\n"
               + b"x" * 998 + b"\r\n\r\n  trailing blanks  \r\nlast line\r\n")
    with dovecot.imap("lena@example.test") as imap:
        for folder in ("Work", "r&-d"):   # IMAP's spelling of "r&d"
            assert imap.create(folder)[0] == "OK"
    server = await start(elemta_server, dovecot)
    queue_id = await submit(server, ["lena@example.test", "lena+Work@example.test",
                                     "lena+r&d@example.test"], content,
                            mail_options=["BODY=8BITMIME"])
    await wait_gone(server, queue_id)
    with dovecot.imap("lena@example.test") as imap:
        for folder in ("INBOX", "Work", "r&-d"):
            [served] = fetch_all(imap, folder)
            # Dovecot's Return-Path and Received, Elemta's Received, the message as sent
            assert served.startswith(f"Return-Path: <{SENDER}>\r\nReceived: from "
                                     "mx.example.test\r\n\tby ".encode()), folder
            elemta_trace = served.index(b"\r\nReceived: from localhost")
            assert b"by mx.example.test (Elemta)" in served[elemta_trace:]
            assert served.endswith(b"\r\n" + content), folder


async def test_a_full_dovecot_mailbox_bounces_without_naming_the_socket(elemta_server,
                                                                         dovecot):
    """Stock Dovecot answers ``552 5.2.2`` (``quota_full_tempfail = no``): a permanent failure."""
    async with Sink() as origin:
        server = await start(elemta_server, dovecot, bounces=origin)
        queue_id = await submit(server, ["full@example.test", "ola@example.test"],
                                b"Subject: too big\r\n\r\n" + b"y" * 3000 + b"\r\n")
        [bounce] = await origin.wait_for(1)
        await wait_gone(server, queue_id)
    assert bounce.recipients == [SENDER]
    [fields] = parse_dsn(bounce.content)
    assert fields["Final-Recipient"] == "rfc822; full@example.test"
    assert (fields["Action"], fields["Status"]) == ("failed", "5.2.2")
    assert fields["Diagnostic-Code"].startswith("smtp; 552 5.2.2 <full@example.test> Quota "
                                                "exceeded")
    assert fields["Remote-MTA"] == "dns; mx.example.test"   # the host, not the socket
    message = email.message_from_bytes(bounce.content, policy=email.policy.default)
    text = next(p for p in message.walk() if p.get_content_type() == "text/plain").get_content()
    assert "reply from mx.example.test:" in text
    for shown in (bounce.content.decode("utf-8", "replace"), text):
        assert str(dovecot.root) not in shown and "lmtp:unix" not in shown
