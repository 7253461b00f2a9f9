"""A milter that hangs, closes mid-message or sends garbage: the milter's ``on_failure``
applies (451 by default; with "accept" the message goes on, logged and counted), the
server never crashes, and a message is either refused or in the spool."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
from milter_support import metric, milter_config, spooled

from elemta.testing import RawSMTP, data_bytes, send_mail

MESSAGE = "From: a@example.org\r\nTo: b@example.test\r\nSubject: hi\r\n\r\nHello.\r\n"
FAST = {"connect_timeout_seconds": 0.5, "command_timeout_seconds": 0.5,
        "end_timeout_seconds": 1.0}


async def failures(server: Any, milter: str, reason: str, action: str) -> float:
    return await metric(server, "smtp_milter_failures_total", milter=milter, reason=reason,
                        action=action)


IN_MESSAGE = {"close_in_message", "hang_at_end", "progress_forever", "garbage_at_end",
              "bad_edit"}


@pytest.mark.parametrize("mode,reason", [("hang", "timeout"), ("garbage", "protocol"),
                                         ("close_in_message", "closed"),
                                         ("hang_at_end", "timeout"),
                                         ("progress_forever", "timeout"),
                                         ("garbage_at_end", "protocol"),
                                         ("bad_edit", "edit")])
async def test_a_broken_milter_gets_451_by_default(elemta_server, fault_milter, mode, reason):
    milter = await fault_milter(mode)
    server = await elemta_server(config=milter_config(
        {"name": "broken", "address": milter.address, **FAST}))

    started = time.monotonic()
    sent = await send_mail(server, "a@example.org", ["b@example.test"], MESSAGE)

    assert sent.reply.code == 451, sent.replies
    assert sent.reply.enhanced == "4.7.1"
    assert time.monotonic() - started < 5
    await server.flush()
    assert spooled(server) == []
    assert await failures(server, "broken", reason, "tempfail") == 1
    # where it broke: before MAIL FROM (hang, garbage), or in the message (after 354);
    # SMFIR_PROGRESS restarts the wait for an answer, but not past end_timeout_seconds
    codes = [r.code for r in sent.replies]
    assert codes[-1] == 451 and (354 in codes) == (mode in IN_MESSAGE)


@pytest.mark.parametrize("mode,reason", [("hang", "timeout"), ("garbage", "protocol"),
                                         ("close_in_message", "closed"),
                                         ("garbage_at_end", "protocol"),
                                         ("bad_edit", "edit")])
async def test_with_on_failure_accept_the_message_is_spooled_logged_and_counted(
        elemta_server, elemta_outbox, fault_milter, caplog, mode, reason):
    milter = await fault_milter(mode)
    server = await elemta_server(config=milter_config(
        {"name": "broken", "address": milter.address, "on_failure": "accept", **FAST}),
        outbox=elemta_outbox)

    with caplog.at_level(logging.WARNING, logger="elemta.milter"):
        sent = await send_mail(server, "a@example.org", ["b@example.test"], MESSAGE)

    assert sent.accepted, sent.replies
    [delivered] = await elemta_outbox.wait(1)
    assert delivered.header("Subject") == "hi"
    # none of a failed milter's modifications is carried out, not even its good ones
    assert delivered.header("X-Fine") is None and delivered.header("X-Bad") is None
    assert b"injected" not in delivered.content
    assert await failures(server, "broken", reason, "accept") == 1
    assert any("milter broken" in r.getMessage() and "going on without it" in r.getMessage()
               for r in caplog.records), caplog.text


async def test_on_failure_reject_answers_550(elemta_server, fault_milter):
    milter = await fault_milter("garbage")
    server = await elemta_server(config=milter_config(
        {"name": "broken", "address": milter.address, "on_failure": "reject", **FAST}))

    sent = await send_mail(server, "a@example.org", ["b@example.test"], MESSAGE)

    assert sent.reply.code == 550 and sent.reply.enhanced == "5.7.1", sent.replies


async def test_a_milter_that_is_not_there_gets_451(elemta_server):
    server = await elemta_server(config=milter_config(
        {"name": "absent", "address": "inet:127.0.0.1:9", **FAST}))

    sent = await send_mail(server, "a@example.org", ["b@example.test"], MESSAGE)

    assert sent.reply.code == 451, sent.replies
    assert await failures(server, "absent", "connect", "tempfail") == 1


async def test_a_failed_milter_stays_failed_for_the_session_and_the_server_goes_on(
        elemta_server, fault_milter, opendkim):
    """Two messages in one session through a milter that closes mid-message: both get
    451; a second, healthy milter listed before it is unaffected, and so is the next
    session."""
    broken = await fault_milter("close_in_message")
    server = await elemta_server(config=milter_config(
        {"name": "opendkim", "address": opendkim.address},
        {"name": "broken", "address": broken.address, **FAST}))

    async with RawSMTP(server.port()) as smtp:
        assert (await smtp.cmd("EHLO client.example")).code == 250
        first = await smtp.send_message("a@example.org", ["b@example.test"],
                                        data_bytes(MESSAGE))
        assert first.code == 451, first
        reply = await smtp.cmd("MAIL FROM:<a@example.org>")
        assert reply.code == 451 and "try again later" in reply.text, reply
        assert (await smtp.cmd("QUIT")).code == 221
    assert broken.connections == 1
    await server.flush()
    assert spooled(server) == []
    again = await send_mail(server, "a@example.org", ["b@example.test"], MESSAGE)
    assert again.reply.code == 451 and broken.connections == 2
