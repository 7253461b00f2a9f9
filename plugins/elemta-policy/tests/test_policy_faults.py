"""Services that fail — hang, close, send garbage, are not there — and connection reuse."""

from __future__ import annotations

import asyncio
import time

import pytest

from elemta.testing import free_port

from policy_support import Close, Hang, Raw, config, metric, rcpt, send

FAILED = (451, "4.3.0 Temporary policy problem, please try again later")


def service_table(address: str, **options) -> dict:
    return {"name": "svc", "address": address, "request_timeout_seconds": 0.5,
            "connect_timeout_seconds": 0.5, **options}


@pytest.mark.parametrize("fault,reason", [
    (Hang(), "timeout"),
    (Close(), "closed"),
    (Close(partial_reply=b"action=DUN"), "closed"),
    (Raw(b"hello there\n\n"), "protocol"),
    (Raw(b"\n"), "protocol"),
    (Raw(b"x" * 20_000 + b"\n\n"), "protocol"),
    (Raw(b"foo=bar\n\n"), "protocol"),
])
async def test_a_failing_service_gets_the_failure_reply_and_nothing_is_lost(
        elemta_server, elemta_outbox, dns_server, policy_server, fault, reason):
    failing = {"n": 1}

    def decide(request):
        if failing["n"] > 0:
            failing["n"] -= 1
            return fault
        return "DUNNO"

    service = await policy_server(decide)
    server = await elemta_server(config(dns_server, service_table(service.address)),
                                 enabled=["policy"], outbox=elemta_outbox)

    started = time.monotonic()
    replies = await send(server, "s@origin.example", ["user@example.test"])
    assert (replies[0].code, replies[0].text) == FAILED
    assert replies[-1].code == 554          # DATA without a recipient: the client keeps it
    assert time.monotonic() - started < 3
    assert metric(server, "smtp_policy_failures_total", service="svc", reason=reason,
                  handled_as="tempfail") == 1

    # the client tries again: the service is fine now, the message goes through
    replies = await send(server, "s@origin.example", ["user@example.test"])
    assert [r.code for r in replies] == [250, 250]
    [delivered] = await elemta_outbox.wait(1)
    assert delivered.recipients == ["user@example.test"]
    assert service.connections == 2       # the broken connection was not used again


async def test_a_late_answer_is_never_taken_for_the_next_one(elemta_server, dns_server,
                                                             policy_server):
    answers = iter([Hang(0.8, "REJECT late answer to the first request")])
    service = await policy_server(lambda r: next(answers, "DUNNO"))
    server = await elemta_server(config(dns_server, service_table(service.address)),
                                 enabled=["policy"])

    assert ((await rcpt(server, "a@example.test", "s@origin.example")).code,) == (451,)
    second = await rcpt(server, "b@example.test", "s@origin.example")
    await asyncio.sleep(0.5)                 # the late REJECT has been sent by now
    third = await rcpt(server, "c@example.test", "s@origin.example")
    assert (second.code, third.code) == (250, 250)
    assert service.of("recipient") == ["a@example.test", "b@example.test", "c@example.test"]


async def test_a_service_that_is_not_there(elemta_server, elemta_outbox, dns_server):
    address = f"inet:127.0.0.1:{free_port()}"      # nothing listens there
    server = await elemta_server(config(dns_server, service_table(address)),
                                 enabled=["policy"], outbox=elemta_outbox)

    reply = await rcpt(server, "user@example.test", "s@origin.example")
    assert (reply.code, reply.text) == FAILED
    assert metric(server, "smtp_policy_failures_total", service="svc", reason="connect",
                  handled_as="tempfail") == 1


async def test_on_failure_accept_lets_mail_through_and_counts_it(
        elemta_server, elemta_outbox, dns_server, policy_server, caplog):
    service = await policy_server(lambda r: Hang())
    server = await elemta_server(
        config(dns_server, service_table(service.address, on_failure="accept")),
        enabled=["policy"], outbox=elemta_outbox)

    replies = await send(server, "s@origin.example", ["user@example.test"])

    assert [r.code for r in replies] == [250, 250]
    [delivered] = await elemta_outbox.wait(1)
    assert delivered.recipients == ["user@example.test"]
    assert metric(server, "smtp_policy_failures_total", service="svc", reason="timeout",
                  handled_as="accept") == 1
    assert "let through (on_failure = accept)" in caplog.text


async def test_one_connection_carries_every_request(elemta_server, elemta_outbox, dns_server,
                                                    policy_server):
    service = await policy_server(lambda r: "DUNNO")
    server = await elemta_server(
        config(dns_server, service_table(service.address),
               service_table(service.address, name="eom", stage="end-of-message")),
        enabled=["policy"], outbox=elemta_outbox)

    for n in range(3):
        replies = await send(server, f"s{n}@origin.example",
                             ["one@example.test", "two@example.test"])
        assert [r.code for r in replies] == [250, 250, 250]

    assert len(service.requests) == 9      # 3 × (2 RCPT + 1 END-OF-MESSAGE)
    assert service.connections == 2       # one per configured service
    assert metric(server, "smtp_policy_connections_total", service="svc") == 1
    assert metric(server, "smtp_policy_requests_total", service="svc", stage="RCPT") == 6
    assert metric(server, "smtp_policy_requests_total", service="eom",
                  stage="END-OF-MESSAGE") == 3
    assert metric(server, "smtp_policy_request_seconds_count", service="svc") == 6


async def test_a_service_that_closes_after_each_answer_loses_nothing(
        elemta_server, dns_server, policy_server):
    # like postgrey --exim, or a service restarted between two requests
    service = await policy_server(lambda r: "DUNNO", one_request_per_connection=True)
    server = await elemta_server(config(dns_server, service_table(service.address)),
                                 enabled=["policy"])

    for n in range(4):
        assert (await rcpt(server, "user@example.test", f"s{n}@origin.example")).code == 250
        await asyncio.sleep(0.05 * (n % 2))   # let the close arrive, or not: both are handled

    assert len(service.requests) == 4 and service.connections == 4
    assert metric(server, "smtp_policy_failures_total", service="svc", reason="closed",
                  handled_as="tempfail") == 0


async def test_concurrent_requests_share_a_bounded_pool(elemta_server, dns_server,
                                                        policy_server):
    service = await policy_server(lambda r: Hang(0.2, "DUNNO"))
    server = await elemta_server(
        config(dns_server, service_table(service.address, max_connections=2,
                                         request_timeout_seconds=3)),
        enabled=["policy"])

    replies = await asyncio.gather(*(rcpt(server, "user@example.test", f"s{n}@origin.example")
                                     for n in range(6)))

    assert [r.code for r in replies] == [250] * 6
    assert service.connections == 2


async def test_a_kept_connection_closed_by_the_service_is_replaced_once(
        elemta_server, dns_server, policy_server, caplog):
    # the second request finds the service gone from the kept connection (restarted, or
    # its idle limit struck as the request went out): it is sent again on a new one
    answers = iter(["DUNNO", Close(), "DUNNO", Close(), Close()])
    service = await policy_server(lambda r: next(answers, "DUNNO"))
    server = await elemta_server(config(dns_server, service_table(service.address)),
                                 enabled=["policy"])
    caplog.set_level("DEBUG", logger="elemta.policy")

    assert (await rcpt(server, "a@example.test", "s@origin.example")).code == 250
    assert (await rcpt(server, "b@example.test", "s@origin.example")).code == 250
    assert service.of("recipient") == ["a@example.test", "b@example.test", "b@example.test"]
    assert service.connections == 2
    assert "sending again on a new one" in caplog.text
    # closed again on the new connection as well: that is a failure, not a third try
    reply = await rcpt(server, "c@example.test", "s@origin.example")
    assert (reply.code, reply.text) == FAILED
    assert service.of("recipient")[3:] == ["c@example.test", "c@example.test"]
