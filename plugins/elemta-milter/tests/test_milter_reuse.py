"""One milter connection per SMTP session, whatever the number of messages (SMFIC_ABORT
between an unfinished message and the next); kept across sessions with SMFIC_QUIT_NC
where the milter takes it. The connections are counted at the milter's side, by a TCP
proxy in front of the real milter."""

from __future__ import annotations

from typing import Any

import pytest
from milter_support import HAM, SIGNED, metric, milter_config

from elemta.testing import RawSMTP, data_bytes, send_mail


def through(proxy: Any, name: str = "opendkim", **extra: Any) -> dict[str, Any]:
    config = milter_config({"name": name, "address": proxy.address, **extra})
    config["plugins"]["timeouts"] = {"milter": 60}
    return config


async def test_two_messages_of_one_session_share_one_connection(
        elemta_server, elemta_outbox, opendkim, counting_proxy):
    proxy = await counting_proxy(opendkim.port)
    server = await elemta_server(config=through(proxy, reuse_connections="never"),
                                 outbox=elemta_outbox)

    async with RawSMTP(server.port()) as smtp:
        assert (await smtp.cmd("EHLO client.example")).code == 250
        for n in range(2):
            reply = await smtp.send_message("alice@example.org", ["bob@remote.example"],
                                            data_bytes(SIGNED))
            assert reply.code == 250, reply
        # a third transaction, abandoned after RCPT: the milter gets SMFIC_ABORT at the
        # next MAIL, and that message is signed all the same
        assert (await smtp.cmd("MAIL FROM:<alice@example.org>")).code == 250
        assert (await smtp.cmd("RCPT TO:<bob@remote.example>")).code == 250
        assert (await smtp.cmd("RSET")).code == 250
        reply = await smtp.send_message("alice@example.org", ["bob@remote.example"],
                                        data_bytes(SIGNED))
        assert reply.code == 250, reply
        assert (await smtp.cmd("QUIT")).code == 221

    delivered = await elemta_outbox.wait(3)
    assert all(d.header("DKIM-Signature") for d in delivered)
    assert proxy.connections == 1
    assert await metric(server, "smtp_milter_connections_total", milter="opendkim",
                        how="new") == 1


async def test_sessions_reuse_a_connection_kept_after_smfir_continue(
        elemta_server, elemta_outbox, spamassassin, counting_proxy):
    """spamass-milter (libmilter) ends a message with SMFIR_CONTINUE: the connection is
    kept with SMFIC_QUIT_NC and the next sessions use it."""
    proxy = await counting_proxy(spamassassin.socket)
    server = await elemta_server(config=through(proxy, "spamassassin",
                                                command_timeout_seconds=20,
                                                end_timeout_seconds=25),
                                 outbox=elemta_outbox)

    for n in range(3):
        sent = await send_mail(server, "alice@example.org", ["bob@example.test"], HAM)
        assert sent.accepted, sent.replies

    delivered = await elemta_outbox.wait(3)
    assert all(d.header("X-Spam-Status") for d in delivered)
    assert proxy.connections == 1
    assert await metric(server, "smtp_milter_connections_total", milter="spamassassin",
                        how="reused") == 2


async def test_a_connection_after_smfir_accept_is_not_kept(elemta_server, elemta_outbox,
                                                          opendkim, counting_proxy):
    """OpenDKIM ends a message with SMFIR_ACCEPT, after which libmilter ignores
    SMFIC_QUIT_NC: with "auto" each session has a connection of its own."""
    proxy = await counting_proxy(opendkim.port)
    server = await elemta_server(config=through(proxy), outbox=elemta_outbox)

    for n in range(2):
        sent = await send_mail(server, "alice@example.org", ["bob@remote.example"], SIGNED)
        assert sent.accepted, sent.replies

    delivered = await elemta_outbox.wait(2)
    assert all(d.header("DKIM-Signature") for d in delivered)
    assert proxy.connections == 2


@pytest.mark.slow              # rspamd's start-up, when this test is the first to use it
async def test_always_keeps_rspamds_connection(elemta_server, elemta_outbox, rspamd,
                                              counting_proxy):
    """rspamd takes SMFIC_QUIT_NC in any state: with "always", sessions without a
    message and sessions whose message ended with SMFIR_ACCEPT share one connection."""
    proxy = await counting_proxy(rspamd.port)
    server = await elemta_server(config=through(proxy, "rspamd", reuse_connections="always"),
                                 outbox=elemta_outbox)

    async with RawSMTP(server.port()) as smtp:
        assert (await smtp.cmd("EHLO client.example")).code == 250
        assert (await smtp.cmd("QUIT")).code == 221
    for n in range(2):
        sent = await send_mail(server, "alice@example.org", ["bob@example.test"], HAM)
        assert sent.accepted, sent.replies

    delivered = await elemta_outbox.wait(2)
    assert all(d.header("X-Spamd-Result") for d in delivered)
    assert proxy.connections == 1


async def test_without_reuse_each_session_has_its_own_connection(
        elemta_server, elemta_outbox, opendkim, counting_proxy):
    proxy = await counting_proxy(opendkim.port)
    server = await elemta_server(config=through(proxy, reuse_connections="never"),
                                 outbox=elemta_outbox)

    for n in range(2):
        sent = await send_mail(server, "alice@example.org", ["bob@remote.example"], SIGNED)
        assert sent.accepted, sent.replies

    await elemta_outbox.wait(2)
    assert proxy.connections == 2


async def test_a_session_without_a_message_is_not_kept(elemta_server, opendkim,
                                                       counting_proxy):
    """libmilter takes SMFIC_QUIT_NC only after a finished message: a session that sent
    none ends with SMFIC_QUIT, and the next session opens a connection of its own."""
    proxy = await counting_proxy(opendkim.port)
    server = await elemta_server(config=through(proxy))

    for n in range(2):
        async with RawSMTP(server.port()) as smtp:
            assert (await smtp.cmd("EHLO client.example")).code == 250
            assert (await smtp.cmd("QUIT")).code == 221
    sent = await send_mail(server, "alice@example.org", ["bob@remote.example"], SIGNED)

    assert sent.accepted, sent.replies
    assert proxy.connections == 3
