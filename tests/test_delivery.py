"""The delivery runner end to end: local DNS, sinks standing in for remote MX hosts."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import urllib.request

import pytest
import trustme

from elemta import Discard, Outcome, Route, hookimpl
from elemta.delivery.dsn import parse_dsn
from elemta.testing.client import RawSMTP
from elemta.testing.sink import Sink

MSG = b"Subject: hello\r\nMessage-ID: <m1@origin.example>\r\n\r\nbody\r\n.\r\n"


def delivery_config(dns_server, **delivery):
    return {
        "server": {"relay_networks": ["127.0.0.0/8"]},
        "dns": {"nameservers": [dns_server.nameserver], "timeout_seconds": 1, "attempts": 1},
        "delivery": {"enabled": True, "workers": 4, "retry_intervals_seconds": [0.3, 0.6],
                     "idle_connection_seconds": 0, **delivery},
    }


async def submit(server, sender, rcpts, data=MSG):
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        reply = await c.send_message(sender, rcpts, data)
    assert reply.code == 250, str(reply)
    await server.app.spool.checkpoint()  # hand it to the runner now, not at the next tick
    return reply.text.rsplit(" ", 1)[1]


async def wait_gone(server, queue_id, timeout=10.0):
    """Until the message has no file left in the spool: neither its envelope nor its
    content (removed a moment after the envelope; a message written out at a checkpoint
    while it was being delivered gets files after its delivery began)."""
    async with asyncio.timeout(timeout):
        while (any((server.spool_path / s / f"{queue_id}.json").exists()
                   for s in ("ready", "deferred"))
               or (server.spool_path / "messages" / queue_id).exists()):
            await asyncio.sleep(0.02)


async def wait_deferred(server, queue_id, timeout):
    """The envelope once the message is in deferred/; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        state, env = envelope(server, queue_id)
        if state == "deferred":
            return env
        assert time.monotonic() < deadline, f"{queue_id} not deferred within {timeout} s"
        await asyncio.sleep(0.01)


def envelope(server, queue_id):
    for state in ("ready", "deferred", "hold", "failed"):
        path = server.spool_path / state / f"{queue_id}.json"
        if path.exists():
            return state, json.loads(path.read_bytes())
    return None, None


@pytest.fixture
async def origin(dns_server):
    """The sender's own domain, so bounces can be delivered and inspected."""
    async with Sink() as sink:
        dns_server.zone("origin.example")
        dns_server.add("origin.example", "MX", "10 mx.origin.example.")
        dns_server.add("mx.origin.example", "A", "127.0.0.1")
        yield sink


def overrides(**hosts: Sink | str) -> dict[str, str]:
    return {name.replace("_", "."): (v if isinstance(v, str) else v.address)
            for name, v in hosts.items()}


async def test_mx_preference_order_and_failover_to_the_second_mx(elemta_server, dns_server):
    async with Sink() as mx2, Sink() as mx3:
        dns_server.zone("remote.example")
        dns_server.add("remote.example", "MX", "20 mx2.remote.example.")
        dns_server.add("remote.example", "MX", "10 mx1.remote.example.")
        dns_server.add("remote.example", "MX", "30 mx3.remote.example.")
        for n in (1, 2, 3):
            dns_server.add(f"mx{n}.remote.example", "A", "127.0.0.1")
        server = await elemta_server(delivery_config(dns_server, mx_overrides={
            "mx1.remote.example": "127.0.0.1:9",  # nothing listens there
            "mx2.remote.example": mx2.address, "mx3.remote.example": mx3.address}))
        queue_id = await submit(server, "a@origin.example", ["bob@remote.example"])
        [got] = await mx2.wait_for(1)
        await wait_gone(server, queue_id)
    assert got.recipients == ["bob@remote.example"] and mx3.messages == []
    assert got.content.endswith(b"\r\n\r\nbody\r\n")
    assert not (server.spool_path / "messages" / queue_id).exists()


async def test_the_smtp_transport_asks_the_servers_one_resolver(elemta_server, dns_server):
    """Delivering in the server's event loop (without the transport process, whose
    resolver and cache are its own)."""
    async with Sink() as mx:
        dns_server.zone("one.example")
        dns_server.add("one.example", "MX", "10 mx.one.example.")
        dns_server.add("mx.one.example", "A", "127.0.0.1")
        server = await elemta_server(delivery_config(dns_server, transport_process=False,
                                                     mx_overrides={
                                                         "mx.one.example": mx.address}))
        # what a plugin asks through app.resolver is what the transport finds cached
        assert [m.host for m in await server.app.resolver.mx("one.example")] == ["mx.one.example"]
        queue_id = await submit(server, "a@origin.example", ["bob@one.example"])
        await mx.wait_for(1)
        await wait_gone(server, queue_id)
    assert dns_server.count("one.example", "MX") == 1


def scripted_mx(host: str, after_data):
    """A remote MX that takes the whole message, then answers what ``await after_data()``
    returns (bytes), or closes without a reply when it returns ``None``."""

    async def serve(reader, writer):
        writer.write(f"220 {host} ESMTP\r\n".encode())
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(f"250-{host}\r\n250 8BITMIME\r\n".encode())
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                await reader.readuntil(b"\r\n.\r\n")
                reply = await after_data()
                if reply is None:
                    break
                writer.write(reply)
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                await writer.drain()
                break
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()
        writer.close()

    return serve


async def _no_reply():
    return None


#: a remote MX that takes the whole message, then closes without a reply
hang_up_after_the_dot = scripted_mx("mx.hangup.example", _no_reply)


async def test_a_connection_closed_after_data_is_reported_as_such(elemta_server, dns_server):
    hangup = await asyncio.start_server(hang_up_after_the_dot, "127.0.0.1", 0)
    port = hangup.sockets[0].getsockname()[1]
    try:
        dns_server.zone("hangup.example")
        dns_server.add("hangup.example", "MX", "10 mx.hangup.example.")
        dns_server.add("mx.hangup.example", "A", "127.0.0.1")
        server = await elemta_server(delivery_config(dns_server, mx_overrides={
            "mx.hangup.example": f"127.0.0.1:{port}"}, retry_intervals_seconds=[60]))
        queue_id = await submit(server, "a@origin.example", ["bob@hangup.example"])
        env = await wait_deferred(server, queue_id, 10)
    finally:
        hangup.close()
    assert env["recipients"][0]["last_error"] == (
        f"451 4.4.2 connection closed by mx.hangup.example[127.0.0.1]:{port} after the end of "
        "DATA -- message may be sent more than once")


async def test_domain_without_mx_is_delivered_to_its_address(elemta_server, dns_server):
    async with Sink() as sink:
        dns_server.zone("nomx.example")
        dns_server.add("nomx.example", "A", "127.0.0.1")
        server = await elemta_server(delivery_config(dns_server, port=sink.port))
        await submit(server, "a@origin.example", ["bob@nomx.example"])
        [got] = await sink.wait_for(1)
    assert got.recipients == ["bob@nomx.example"]


async def test_null_mx_bounces_at_once(elemta_server, dns_server, origin):
    dns_server.zone("nullmx.example")
    dns_server.add("nullmx.example", "MX", "0 .")
    server = await elemta_server(delivery_config(dns_server, mx_overrides=overrides(
        mx_origin_example=origin)))
    queue_id = await submit(server, "alice@origin.example", ["bob@nullmx.example"])
    [bounce] = await origin.wait_for(1)
    await wait_gone(server, queue_id)
    assert bounce.sender == "" and bounce.recipients == ["alice@origin.example"]
    [fields] = parse_dsn(bounce.content)
    assert fields["Final-Recipient"] == "rfc822; bob@nullmx.example"
    assert fields["Action"] == "failed" and fields["Status"] == "5.1.10"


async def test_starttls_to_the_remote_mx(elemta_server, dns_server):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("mx.tls.example").configure_cert(ctx)
    async with Sink(tls_context=ctx) as sink:
        dns_server.zone("tls.example")
        dns_server.add("tls.example", "MX", "10 mx.tls.example.")
        dns_server.add("mx.tls.example", "A", "127.0.0.1")
        server = await elemta_server(delivery_config(dns_server, mx_overrides=overrides(
            mx_tls_example=sink)))
        await submit(server, "a@origin.example", ["bob@tls.example"])
        [got] = await sink.wait_for(1)
    assert got.tls is True


async def test_smarthost_with_auth_over_starttls(elemta_server, dns_server):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("relay.example").configure_cert(ctx)
    async with Sink(tls_context=ctx, users={"relayuser": "relaypass"}) as relay:
        server = await elemta_server(delivery_config(dns_server, routes={
            "*": {"host": relay.address, "tls": "required", "username": "relayuser",
                  "password": "relaypass"}}))
        await submit(server, "a@origin.example", ["x@anywhere.example", "y@elsewhere.example"])
        [got] = await relay.wait_for(1)
    assert got.auth == "relayuser" and got.tls
    assert sorted(got.recipients) == ["x@anywhere.example", "y@elsewhere.example"]


async def test_temporary_failure_is_retried_until_it_succeeds(elemta_server, dns_server):
    async with Sink(data_replies=["451 4.3.0 Try again later"]) as sink:
        dns_server.zone("remote.example")
        dns_server.add("remote.example", "MX", "10 mx.remote.example.")
        dns_server.add("mx.remote.example", "A", "127.0.0.1")
        server = await elemta_server(delivery_config(dns_server, mx_overrides=overrides(
            mx_remote_example=sink)))
        queue_id = await submit(server, "a@origin.example", ["bob@remote.example"])
        env = await wait_deferred(server, queue_id, timeout=1.0)
        assert env["attempts"] == 1 and "451 4.3.0" in env["recipients"][0]["last_error"]
        [got] = await sink.wait_for(1)
        await wait_gone(server, queue_id)
    assert got.recipients == ["bob@remote.example"]


async def test_partial_success_gives_each_recipient_its_own_fate(elemta_server, dns_server,
                                                                 origin):
    async with Sink() as sink:
        sink.rcpt_replies["later@remote.example"] = "450 4.2.1 Mailbox busy"
        sink.rcpt_replies["nobody@remote.example"] = "550 5.1.1 No such user"
        dns_server.zone("remote.example")
        dns_server.add("remote.example", "MX", "10 mx.remote.example.")
        dns_server.add("mx.remote.example", "A", "127.0.0.1")
        server = await elemta_server(delivery_config(dns_server, mx_overrides=overrides(
            mx_remote_example=sink, mx_origin_example=origin)))
        queue_id = await submit(server, "alice@origin.example", [
            "ok@remote.example", "later@remote.example", "nobody@remote.example"])
        [first] = await sink.wait_for(1)
        [bounce] = await origin.wait_for(1)
        state, env = envelope(server, queue_id)
        assert state == "deferred"
        fates = {r["address"]: r["state"] for r in env["recipients"]}
        assert fates == {"ok@remote.example": "delivered", "later@remote.example": "pending",
                         "nobody@remote.example": "failed"}
        del sink.rcpt_replies["later@remote.example"]
        await sink.wait_for(2)
        await wait_gone(server, queue_id)
    assert first.recipients == ["ok@remote.example"]
    assert sink.messages[1].recipients == ["later@remote.example"]
    assert [f["Final-Recipient"] for f in parse_dsn(bounce.content)] == [
        "rfc822; nobody@remote.example"]
    assert parse_dsn(bounce.content)[0]["Diagnostic-Code"].startswith("smtp; 550 5.1.1")
    assert sink.deliveries()[("<m1@origin.example>", "ok@remote.example")] == 1


async def test_permanent_failure_bounces_with_an_rfc3464_report(elemta_server, dns_server,
                                                                origin):
    async with Sink(data_reply="554 5.7.1 Content refused") as sink:
        dns_server.zone("remote.example")
        dns_server.add("remote.example", "MX", "10 mx.remote.example.")
        dns_server.add("mx.remote.example", "A", "127.0.0.1")
        server = await elemta_server(delivery_config(dns_server, mx_overrides=overrides(
            mx_remote_example=sink, mx_origin_example=origin)))
        queue_id = await submit(server, "alice@origin.example", ["bob@remote.example"])
        [bounce] = await origin.wait_for(1)
        await wait_gone(server, queue_id)
    head = bounce.content.split(b"\r\n\r\n", 1)[0]
    assert b"multipart/report" in head and b"report-type=delivery-status" in head
    [fields] = parse_dsn(bounce.content)
    assert fields["Status"] == "5.7.1" and fields["Action"] == "failed"
    assert fields["Remote-MTA"].startswith("dns; mx.remote.example")
    assert b"Subject: hello" in bounce.content and b"\r\nbody\r\n" not in bounce.content


async def test_no_bounce_is_sent_to_the_null_sender(elemta_server, dns_server, origin):
    async with Sink(data_reply="550 5.1.1 No such user") as sink:
        dns_server.zone("remote.example")
        dns_server.add("remote.example", "MX", "10 mx.remote.example.")
        dns_server.add("mx.remote.example", "A", "127.0.0.1")
        server = await elemta_server(delivery_config(dns_server, mx_overrides=overrides(
            mx_remote_example=sink, mx_origin_example=origin)))
        queue_id = await submit(server, "", ["bob@remote.example"])
        await wait_gone(server, queue_id)
        await asyncio.sleep(0.5)
    assert origin.messages == []
    assert server.app.spool.counts() == {"ready": 0, "deferred": 0, "hold": 0, "failed": 0}


async def test_retry_schedule_is_honoured_and_the_deadline_bounces(elemta_server, dns_server,
                                                                   origin):
    attempts: list[float] = []

    class Clock:
        @hookimpl
        def deferred(self, envelope, recipient, outcome):
            attempts.append(time.monotonic())

    async with Sink(data_reply="451 4.3.0 Always busy") as sink:
        dns_server.zone("remote.example")
        dns_server.add("remote.example", "MX", "10 mx.remote.example.")
        dns_server.add("mx.remote.example", "A", "127.0.0.1")
        server = await elemta_server(
            delivery_config(dns_server, retry_intervals_seconds=[0.4, 0.8],
                            bounce_after_seconds=2.5,
                            mx_overrides=overrides(mx_remote_example=sink,
                                                   mx_origin_example=origin)),
            plugins=[("clock", Clock())])
        queue_id = await submit(server, "alice@origin.example", ["bob@remote.example"])
        [bounce] = await origin.wait_for(1, timeout=10)
        await wait_gone(server, queue_id)
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    assert len(attempts) >= 3
    assert gaps[0] >= 0.35 and all(g >= 0.75 for g in gaps[1:]), gaps
    [fields] = parse_dsn(bounce.content)
    assert fields["Status"] == "4.4.7" and fields["Action"] == "failed"
    assert "delivery time expired" in fields["Diagnostic-Code"]


# ------------------------------------------------------------------ delivery hooks


class LocalTransport:
    """A transport plugin for the ``local`` route (what a maildir plugin does)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str], bytes]] = []

    @hookimpl
    def deliver(self, envelope, route, recipients, content_path):
        if route.transport != "local":
            return None
        with open(content_path, "rb") as f:
            self.calls.append((route.destination, [r.address for r in recipients], f.read()))
        return [Outcome(r.address, 250, "2.0.0", "stored") for r in recipients]


class RefuseLocal:
    """A transport that refuses every local recipient for good."""

    @hookimpl
    def deliver(self, envelope, route, recipients):
        if route.transport == "local":
            return [Outcome(r.address, 550, "5.1.1", "unknown user") for r in recipients]
        return None


async def test_hook_deliver(elemta_server, dns_server):
    local = LocalTransport()
    server = await elemta_server(delivery_config(dns_server), plugins=[("local", local)])
    queue_id = await submit(server, "a@origin.example", ["u1@example.test", "u2@example.test"])
    await wait_gone(server, queue_id)
    [(domain, rcpts, content)] = local.calls
    assert domain == "example.test" and rcpts == ["u1@example.test", "u2@example.test"]
    assert content.endswith(b"\r\n\r\nbody\r\n")


async def test_local_mail_without_a_local_transport_stays_queued(elemta_server, dns_server):
    server = await elemta_server(delivery_config(dns_server))
    queue_id = await submit(server, "a@origin.example", ["u1@example.test"])
    env = await wait_deferred(server, queue_id, timeout=2.0)
    assert "no transport accepted this route" in env["recipients"][0]["last_error"]


async def test_hook_route(elemta_server, dns_server):
    local = LocalTransport()

    class Redirect:
        @hookimpl
        def route(self, envelope, recipient):
            if recipient.address.endswith("@legacy.example"):
                return Route(transport="local", destination="archive")
            return None

    server = await elemta_server(delivery_config(dns_server),
                                 plugins=[("redirect", Redirect()), ("local", local)])
    queue_id = await submit(server, "a@origin.example", ["old@legacy.example"])
    await wait_gone(server, queue_id)
    assert [(d, r) for d, r, _ in local.calls] == [("archive", ["old@legacy.example"])]


async def test_hook_delivered(elemta_server, dns_server):
    seen = []

    class Watch:
        @hookimpl
        def delivered(self, envelope, recipient, outcome):
            seen.append((envelope.sender, recipient.address, recipient.state, outcome.code))

    server = await elemta_server(delivery_config(dns_server),
                                 plugins=[("local", LocalTransport()), ("watch", Watch())])
    queue_id = await submit(server, "a@origin.example", ["u1@example.test"])
    await wait_gone(server, queue_id)
    async with asyncio.timeout(5):  # delivered comes last, after the envelope is removed
        while not seen:
            await asyncio.sleep(0.01)
    assert seen == [("a@origin.example", "u1@example.test", "delivered", 250)]


async def test_hook_deferred(elemta_server, dns_server):
    calls = []

    class Busy:
        @hookimpl
        def deliver(self, envelope, route, recipients):
            return [Outcome(r.address, 451, "4.2.0", "busy") for r in recipients]

    class Policy:
        @hookimpl
        def deferred(self, envelope, recipient, outcome):
            calls.append(outcome.reply())
            return 0.05 if len(calls) < 3 else Discard("gave up")

    server = await elemta_server(delivery_config(dns_server, retry_intervals_seconds=[60]),
                                 plugins=[("busy", Busy()), ("policy", Policy())])
    queue_id = await submit(server, "a@origin.example", ["u1@example.test"])
    await wait_gone(server, queue_id)
    assert calls == ["451 4.2.0 busy"] * 3, "the 60 s schedule was shortened to 0.05 s"


async def test_hook_bounced(elemta_server, dns_server, origin):
    seen = []

    class Watch:
        @hookimpl
        def bounced(self, envelope, recipient, outcome):
            seen.append((recipient.address, recipient.state, outcome.enhanced))

    server = await elemta_server(delivery_config(dns_server, mx_overrides=overrides(
        mx_origin_example=origin)), plugins=[("refuse", RefuseLocal()), ("watch", Watch())])
    await submit(server, "alice@origin.example", ["ghost@example.test"])
    await origin.wait_for(1)
    assert seen == [("ghost@example.test", "failed", "5.1.1")]


async def test_hook_bounce(elemta_server, dns_server, origin):
    class Rewrite:
        @hookimpl
        def bounce(self, envelope, outcomes, message):
            if outcomes[0].recipient.startswith("quiet"):
                return Discard("no bounces for this one")
            return message.replace(b"Undelivered Mail Returned to Sender", b"Returned mail")

    server = await elemta_server(delivery_config(dns_server, mx_overrides=overrides(
        mx_origin_example=origin)), plugins=[("refuse", RefuseLocal()), ("rewrite", Rewrite())])
    await submit(server, "alice@origin.example", ["quiet@example.test"])
    await submit(server, "alice@origin.example", ["loud@example.test"])
    [bounce] = await origin.wait_for(1)
    await asyncio.sleep(0.3)
    assert len(origin.messages) == 1
    assert b"Subject: Returned mail" in bounce.content


async def test_delay_notice_is_sent_once_after_the_configured_time(elemta_server, dns_server,
                                                                  origin):
    async with Sink(data_reply="451 4.3.0 Busy") as sink:
        dns_server.zone("remote.example")
        dns_server.add("remote.example", "MX", "10 mx.remote.example.")
        dns_server.add("mx.remote.example", "A", "127.0.0.1")
        server = await elemta_server(delivery_config(
            dns_server, retry_intervals_seconds=[0.3], delay_notice_after_seconds=0.5,
            mx_overrides=overrides(mx_remote_example=sink, mx_origin_example=origin)))
        queue_id = await submit(server, "alice@origin.example", ["bob@remote.example"])
        [notice] = await origin.wait_for(1)
        await asyncio.sleep(1.0)  # more attempts, but no second notice
        state, env = envelope(server, queue_id)
    assert len(origin.messages) == 1 and state == "deferred" and env["attempts"] >= 3
    assert b"Subject: Delayed Mail (still being retried)" in notice.content
    [fields] = parse_dsn(notice.content)
    assert fields["Action"] == "delayed" and fields["Status"] == "4.3.0"
    assert "Will-Retry-Until" in fields


async def test_delivery_metrics(elemta_server, dns_server, origin):
    async with Sink() as sink:
        sink.rcpt_replies["nobody@remote.example"] = "550 5.1.1 No such user"
        dns_server.zone("remote.example")
        dns_server.add("remote.example", "MX", "10 mx.remote.example.")
        dns_server.add("mx.remote.example", "A", "127.0.0.1")
        server = await elemta_server(delivery_config(dns_server, mx_overrides=overrides(
            mx_remote_example=sink, mx_origin_example=origin)))
        queue_id = await submit(server, "alice@origin.example",
                                ["bob@remote.example", "nobody@remote.example"])
        await wait_gone(server, queue_id)
        await origin.wait_for(1)
        for _ in range(200):  # until the bounce itself has left the queue
            counts = server.app.spool.counts()
            if counts["ready"] == counts["deferred"] == 0:
                break
            await asyncio.sleep(0.02)
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        body = (await asyncio.to_thread(lambda: urllib.request.urlopen(url).read())).decode()
    # neither domain is local: both fold into "other" (one delivery, one bounce)
    assert 'smtp_messages_sent_total{domain="other"} 2.0' in body
    assert 'smtp_delivery_attempts_total{result="delivered"} 2.0' in body
    assert 'smtp_delivery_attempts_total{result="failed"} 1.0' in body
    assert 'smtp_delivery_duration_seconds_count{domain="other",type="smtp"} 2.0' in body
    assert 'elemta_spool_messages{state="ready"} 0.0' in body
    assert 'elemta_spool_messages{state="deferred"} 0.0' in body


async def test_a_plugin_queues_a_message_with_app_queue_message(elemta_server, elemta_outbox):
    """Durable when it returns; delivered like any other; 8-bit content gets BODY=8BITMIME."""
    server = await elemta_server(outbox=elemta_outbox)
    content = "From: notice@example.test\r\nSubject: café\r\n\r\nbonjour\r\n".encode()
    queue_id = await server.app.queue_message("notice@example.test", ["a@elsewhere.example"],
                                              content, note="a test notice")
    server.app.spool.wait_written()           # durable in the journal; the files follow
    state, env = server.app.spool.load(queue_id)
    assert state == "ready" and env.mail_params == {"BODY": "8BITMIME"}
    assert env.trace == [{"queued_by": "a test notice"}]
    [captured] = await elemta_outbox.wait(1)
    assert captured.envelope.id == queue_id and captured.content == content
    with pytest.raises(ValueError, match="at least one recipient"):
        await server.app.queue_message("x@example.test", [], content)
