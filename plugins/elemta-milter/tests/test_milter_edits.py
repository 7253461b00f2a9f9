"""Every milter modification, made by a real milter (purepythonmilter, ``edit_milter.py``),
carried out on the message and the envelope; the verdicts at every stage."""

from __future__ import annotations

from typing import Any

import pytest
from milter_support import milter_config

from elemta import Accept, Reject, hookimpl
from elemta.testing import send_mail


def edit(edit_milter: Any, **extra: Any) -> dict[str, Any]:
    # purepythonmilter 0.0.1 serves one message per connection (it neither resets its
    # state after a message nor knows SMFIC_QUIT_NC): no reuse across sessions
    return {"name": "edit", "address": edit_milter.address, "reuse_connections": "never",
            **extra}


def message(subject: str, extra: str = "") -> str:
    return (f"From: Alice <alice@example.org>\r\nTo: bob@example.test\r\n"
            f"Subject: {subject}\r\nX-Remove-Me: please\r\n{extra}\r\n"
            "The body as it was sent.\r\n")


async def test_headers_body_recipients_and_sender_are_edited(
        elemta_server, elemta_outbox, edit_milter):
    server = await elemta_server(config=milter_config(edit(edit_milter)), outbox=elemta_outbox)

    sent = await send_mail(server, "alice@example.org",
                           ["bob@example.test", "removed@example.test"], message("edit me"))

    assert sent.accepted, sent.replies
    delivered = await elemta_outbox.wait(1)
    recipients = sorted(r for d in delivered for r in d.recipients)
    assert recipients == ["added-par@example.test", "added@example.test", "bob@example.test"]
    first = delivered[0]
    assert first.sender == "changed@example.org"
    assert first.header("Subject") == "edited"
    assert first.header("X-Remove-Me") is None
    assert first.header("X-Edit-Appended") == "appended"
    # inserted at index 0 of the header section the milter saw: above From, below the
    # trace fields Elemta prepends when it commits
    names = [line.split(b":", 1)[0] for line in first.content.split(b"\r\n\r\n", 1)[0]
             .split(b"\r\n") if line[:1] not in (b" ", b"\t")]
    assert names.index(b"X-Edit-Inserted") == names.index(b"From") - 1
    assert names[0] == b"Received"
    assert first.content.split(b"\r\n\r\n", 1)[1] == b"The body the milter wrote.\r\n"
    # the macros it asked for with SMFIR_SETSYMLIST, and only those
    seen = first.header("X-Edit-Seen")
    assert seen == f"i={sent.queue_id},{{mail_addr}}=alice@example.org;" \
                   "{rcpt_addr}=removed@example.test", seen
    # ADDRCPT_PAR's ESMTP arguments are the new recipient's parameters
    [par] = [r for r in first.envelope.recipients if r.address == "added-par@example.test"]
    assert par.params == {"NOTIFY": "NEVER"}


async def test_a_body_replaced_in_many_chunks(elemta_server, elemta_outbox, edit_milter):
    server = await elemta_server(config=milter_config(edit(edit_milter)), outbox=elemta_outbox)

    sent = await send_mail(server, "alice@example.org", ["bob@example.test"],
                           message("big body"))

    assert sent.accepted, sent.replies
    [delivered] = await elemta_outbox.wait(1)
    body = delivered.content.split(b"\r\n\r\n", 1)[1]
    line = b"0123456789abcdef" * 4 + b"\r\n"
    assert body == line * (200 * 1024 // len(line))


@pytest.mark.parametrize("subject,code,enhanced,text", [
    ("reject me", 554, "5.7.1", "content refused"),
])
async def test_a_custom_reply_at_the_end_of_data(elemta_server, edit_milter, subject, code,
                                                 enhanced, text):
    server = await elemta_server(config=milter_config(edit(edit_milter)))

    sent = await send_mail(server, "alice@example.org", ["bob@example.test"], message(subject))

    assert (sent.reply.code, sent.reply.text) == (code, f"{enhanced} {text}")


async def test_quarantine_spools_the_message_on_hold(elemta_server, edit_milter):
    server = await elemta_server(config=milter_config(edit(edit_milter)))

    sent = await send_mail(server, "alice@example.org", ["bob@example.test"],
                           message("quarantine me"))

    assert sent.accepted, sent.replies
    await server.flush()       # the journal written out: the spool's files are there
    envelopes = [p for p in server.spool_path.rglob(f"*{sent.queue_id}*") if "hold" in str(p)]
    assert envelopes, sorted(server.spool_path.rglob("*"))


async def test_discard_answers_250_and_drops_the_message(elemta_server, elemta_outbox,
                                                        edit_milter):
    server = await elemta_server(config=milter_config(edit(edit_milter)), outbox=elemta_outbox)

    sent = await send_mail(server, "alice@example.org", ["bob@example.test"],
                           message("discard me"))

    assert sent.reply.code == 250, sent.replies
    await server.flush()
    assert list(server.spool_path.rglob(f"*{sent.queue_id}*")) == []


async def test_verdicts_at_mail_and_rcpt(elemta_server, elemta_outbox, edit_milter):
    server = await elemta_server(config=milter_config(edit(edit_milter)), outbox=elemta_outbox)

    busy = await send_mail(server, "busy@example.org", ["bob@example.test"], message("hi"))
    assert (busy.reply.code, busy.reply.text) == (451, "4.7.1 try again in a minute")

    sent = await send_mail(server, "alice@example.org",
                           ["refused@example.test", "bob@example.test"], message("hi"))
    rcpt = sent.replies[3]
    assert (rcpt.code, rcpt.text) == (550, "5.1.1 no such user here")
    assert sent.accepted
    [delivered] = await elemta_outbox.wait(1)
    assert delivered.recipients == ["bob@example.test"]


async def test_macros_reach_the_milter_at_their_stages(elemta_server, elemta_outbox,
                                                       edit_milter):
    """Connect macros with SMFIC_CONNECT, TLS macros with the HELO after STARTTLS."""
    server = await elemta_server(config=milter_config(edit(edit_milter)), outbox=elemta_outbox)

    sent = await send_mail(server, "alice@example.org", ["bob@example.test"], message("hi"),
                           starttls=True, helo="client.example")

    assert sent.accepted, sent.replies
    [delivered] = await elemta_outbox.wait(1)
    connect, helo = delivered.header("X-Edit-Session").split(";")
    assert connect == ("unknown|_=unknown [127.0.0.1],j=mx.example.test,"
                       "{client_addr}=127.0.0.1,{daemon_name}=mx,{if_addr}=127.0.0.1"), connect
    assert helo.startswith("client.example|{tls_version}=TLSv1."), helo


class Users:
    """A tiny datasource: alice logs in with her password."""

    @hookimpl
    def auth(self, credentials):
        if (credentials.login, credentials.password) == ("alice@example.org", "secret"):
            return Accept()
        return Reject(535, "5.7.8", "Authentication credentials invalid")


async def test_the_authenticated_identity_reaches_the_milter_at_mail(
        elemta_server, elemta_outbox, edit_milter):
    server = await elemta_server(config=milter_config(edit(edit_milter)),
                                 plugins=[("users", Users())], outbox=elemta_outbox)

    sent = await send_mail(server, "alice@example.org", ["bob@example.test"], message("hi"),
                           listener="submission", starttls=True,
                           auth=("alice@example.org", "secret"))

    assert sent.accepted, sent.replies
    [delivered] = await elemta_outbox.wait(1)
    mail_macros = delivered.header("X-Edit-Seen").split(";")[0]
    assert mail_macros == (f"i={sent.queue_id},{{auth_authen}}=alice@example.org,"
                           "{mail_addr}=alice@example.org"), mail_macros
    connect = delivered.header("X-Edit-Session").split(";")[0]
    assert "{daemon_name}=submission,{if_addr}=127.0.0.1" in connect, connect


class AcceptsMail:
    """A plugin that answers MAIL FROM before the milter plugin is asked."""

    @hookimpl(tryfirst=True)
    def mail(self):
        return Accept()


async def test_milters_hear_of_a_mail_from_another_plugin_accepted(
        elemta_server, elemta_outbox, edit_milter):
    server = await elemta_server(config=milter_config(edit(edit_milter)),
                                 plugins=[("accepts-mail", AcceptsMail())],
                                 outbox=elemta_outbox)

    sent = await send_mail(server, "alice@example.org", ["bob@example.test"], message("hi"))
    busy = await send_mail(server, "busy@example.org", ["bob@example.test"], message("hi"))

    assert sent.accepted, sent.replies
    [delivered] = await elemta_outbox.wait(1)
    assert "{mail_addr}=alice@example.org" in delivered.header("X-Edit-Seen")
    # the milter's refusal of MAIL FROM, heard at RCPT TO, refuses the recipient
    assert [r.code for r in busy.replies[-2:]] == [250, 451], busy.replies


async def test_accept_at_mail_ends_the_milters_part_in_that_message(
        elemta_server, elemta_outbox, edit_milter):
    server = await elemta_server(config=milter_config(edit(edit_milter)), outbox=elemta_outbox)

    sent = await send_mail(server, "trusted@example.org", ["bob@example.test"],
                           message("edit me"))

    assert sent.accepted, sent.replies
    [delivered] = await elemta_outbox.wait(1)
    assert delivered.header("Subject") == "edit me"          # not edited: not even sent
    assert delivered.header("X-Edit-Seen") is None


async def test_skip_stops_the_body(elemta_server, elemta_outbox, edit_milter):
    """SMFIR_SKIP to the first chunk of a 200 KiB body: no more chunks, then the end."""
    server = await elemta_server(config=milter_config(edit(edit_milter)), outbox=elemta_outbox)
    line = "x" * 98 + "\r\n"
    body = line * 2000

    skipped = await send_mail(server, "alice@example.org", ["bob@example.test"],
                              message("skip body") + body)
    whole = await send_mail(server, "alice@example.org", ["bob@example.test"],
                            message("hi") + body)

    assert skipped.accepted and whole.accepted, (skipped.replies, whole.replies)
    chunks = {d.header("Subject"): d.header("X-Edit-Chunks")
              for d in await elemta_outbox.wait(2)}
    # 200 KiB in chunks of at most 65535 bytes: 4 chunks when the milter takes them all
    assert chunks == {"skip body": "1", "hi": "4"}
