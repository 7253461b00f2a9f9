"""OpenDKIM in milter mode signs what a relay client sends; the signature verifies."""

from __future__ import annotations

from typing import Any

import dkim
import dns.message
import dns.query
from milter_support import SIGNED, metric, milter_config

from elemta import Accept, Reject, hookimpl
from elemta.testing import send_mail


def publish(dns_server: Any, opendkim: Any) -> None:
    dns_server.zone(opendkim.domain)
    dns_server.add(f"{opendkim.selector}._domainkey.{opendkim.domain}", "TXT",
                   opendkim.public_key_record())


def dnsfunc(dns_server: Any):  # type: ignore[no-untyped-def]
    """dkimpy's key lookup, asking the test DNS server."""
    host, port = dns_server.nameserver.rsplit(":", 1)

    def lookup(name: bytes, timeout: float = 5) -> bytes:
        query = dns.message.make_query(name.decode(), "TXT")
        answer = dns.query.udp(query, host, port=int(port), timeout=timeout)
        return b"".join(b"".join(rr.strings) for rrset in answer.answer for rr in rrset)

    return lookup


def opendkim_milter(opendkim: Any, **extra: Any) -> dict[str, Any]:
    return {"name": "opendkim", "address": opendkim.address, **extra}


async def test_a_relay_clients_message_is_signed_and_verifies(
        elemta_server, elemta_outbox, opendkim, dns_server):
    publish(dns_server, opendkim)
    server = await elemta_server(config=milter_config(opendkim_milter(opendkim)),
                                 outbox=elemta_outbox)

    sent = await send_mail(server, "alice@example.org", ["bob@remote.example"], SIGNED)

    assert sent.accepted, sent.replies
    [delivered] = await elemta_outbox.wait(1)
    signature = delivered.header("DKIM-Signature")
    assert signature is not None, delivered.content.decode()
    assert "d=example.org" in signature and f"s={opendkim.selector}" in signature
    assert dkim.verify(delivered.content, dnsfunc=dnsfunc(dns_server)), delivered.content
    # the signature covers the body: a changed body no longer verifies
    tampered = delivered.content.replace(b"numbers  are in", b"numbers are out")
    assert not dkim.verify(tampered, dnsfunc=dnsfunc(dns_server))


async def test_an_authenticated_only_milter_skips_relay_sessions(
        elemta_server, elemta_outbox, opendkim):
    config = milter_config(opendkim_milter(opendkim, relay=False))
    server = await elemta_server(config=config, outbox=elemta_outbox)

    sent = await send_mail(server, "alice@example.org", ["bob@remote.example"], SIGNED)

    assert sent.accepted, sent.replies
    [delivered] = await elemta_outbox.wait(1)
    assert delivered.header("DKIM-Signature") is None


class Users:
    """A tiny datasource: alice logs in with her password."""

    @hookimpl
    def auth(self, credentials):
        if (credentials.login, credentials.password) == ("alice@example.org", "secret"):
            return Accept()
        return Reject(535, "5.7.8", "Authentication credentials invalid")


async def test_an_authenticated_clients_message_is_signed_through_auth_type(
        elemta_server, elemta_outbox, opendkim_auth_only, dns_server):
    """OpenDKIM signs for an authenticated client ({auth_type} at the end of the header)
    even when its address is not internal; a client that did not log in is not signed."""
    publish(dns_server, opendkim_auth_only)
    server = await elemta_server(config=milter_config(opendkim_milter(opendkim_auth_only)),
                                 plugins=[("users", Users())], outbox=elemta_outbox)

    submitted = await send_mail(server, "alice@example.org", ["bob@remote.example"], SIGNED,
                                listener="submission", starttls=True,
                                auth=("alice@example.org", "secret"))
    relayed = await send_mail(server, "alice@example.org", ["bob@remote.example"],
                              SIGNED.replace("q1@", "q2@"))

    assert submitted.accepted and relayed.accepted, (submitted.replies, relayed.replies)
    delivered = {d.header("Message-ID"): d for d in await elemta_outbox.wait(2)}
    signed = delivered["<q1@example.org>"]
    assert signed.header("DKIM-Signature") is not None
    assert dkim.verify(signed.content, dnsfunc=dnsfunc(dns_server))
    assert delivered["<q2@example.org>"].header("DKIM-Signature") is None


async def test_a_large_message_is_streamed_in_chunks_and_verifies(
        elemta_server, elemta_outbox, opendkim, dns_server):
    """A 600 KiB body (above the 256 KiB past which it is read in a worker thread) goes
    to OpenDKIM in ten chunks; what it signed is exactly what was spooled."""
    publish(dns_server, opendkim)
    server = await elemta_server(config=milter_config(opendkim_milter(opendkim)),
                                 outbox=elemta_outbox)
    body = "".join(f"line {n:06d} of a long report, padded to a hundred bytes{'.' * 43}\r\n"
                   for n in range(6200))

    sent = await send_mail(server, "alice@example.org", ["bob@remote.example"],
                           SIGNED.split("\r\n\r\n")[0] + "\r\n\r\n" + body)

    assert sent.accepted, sent.replies
    [delivered] = await elemta_outbox.wait(1)
    assert len(delivered.content) > 600_000
    assert dkim.verify(delivered.content, dnsfunc=dnsfunc(dns_server))


async def test_the_signature_is_not_held_up_by_a_delayed_ack(elemta_server, elemta_outbox,
                                                             opendkim):
    """OpenDKIM writes the DKIM-Signature and its final answer as two packets, the second
    held back by Nagle's algorithm until the first is acknowledged; a delayed ACK (40 ms
    at least, on Linux) would add that much to every message. The client acknowledges
    at once when more replies are due: ten messages take far less than 10 x 40 ms in the
    milter's DATA stage."""
    server = await elemta_server(config=milter_config(opendkim_milter(opendkim)),
                                 outbox=elemta_outbox)

    for n in range(10):
        sent = await send_mail(server, "alice@example.org", ["bob@remote.example"],
                               SIGNED.replace("q1@", f"d{n}@"))
        assert sent.accepted, sent.replies

    delivered = await elemta_outbox.wait(10)
    assert all(d.header("DKIM-Signature") for d in delivered)
    assert await metric(server, "smtp_milter_latency_seconds_count", milter="opendkim",
                        stage="data") == 10
    seconds = await metric(server, "smtp_milter_latency_seconds_sum", milter="opendkim",
                           stage="data")
    assert seconds < 0.4, f"{seconds:.3f}s for ten messages"
