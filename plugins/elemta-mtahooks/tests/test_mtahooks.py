"""elemta-mtahooks at the inbound stages, through a real Elemta server and a real HTTP hook
service on loopback (tests/mtahooks_service.py) that checks every signature and every
request against schema/request.json."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest
from mtahooks_service import HANG, Delay, Raw, Status
from mtahooks_support import (MESSAGE, SECRET, SENDER, USERS, at, converse, hook, metric,
                              queue_id, spooled, start)

from elemta import Accept, ConfigError, Reject, hookimpl
from elemta.testing import RawSMTP, send_mail, unverified_context

INBOUND = ["connect", "ehlo", "mail", "rcpt", "data"]
BEFORE = {"connect": [], "ehlo": ["connect"], "mail": ["connect", "ehlo"],
          "rcpt": ["connect", "ehlo", "mail"], "data": ["connect", "ehlo", "mail", "rcpt"]}


def reply_at(got: dict[str, Any], stage: str) -> Any:
    reply = got[stage]
    return reply[0] if isinstance(reply, list) else reply


# ------------------------------------------------------------------ the actions, stage by stage


@pytest.mark.parametrize("stage", INBOUND)
async def test_reject_at_each_stage_answers_that_command(stage, elemta_server, elemta_outbox,
                                                         hook_service):
    svc = await hook_service()
    svc.answer = at(stage, {"action": "reject", "reason": "test",
                            "response": {"code": 550, "enhanced": "5.7.1",
                                         "message": "Refused by the policy service"}})
    server = await start(elemta_server, hook(svc, *INBOUND), outbox=elemta_outbox)

    got = await converse(server)

    for earlier in BEFORE[stage]:
        assert reply_at(got, earlier).code in (220, 250), got
    reply = reply_at(got, stage)
    assert reply.code == (554 if stage == "connect" else 550)
    assert "Refused by the policy service" in reply.text
    assert "data" not in got or stage == "data"
    assert svc.stages() == BEFORE[stage] + [stage]
    assert svc.refused == []
    assert elemta_outbox.messages == []


@pytest.mark.parametrize("stage", INBOUND)
async def test_tempfail_at_each_stage_is_a_temporary_reply(stage, elemta_server, hook_service):
    svc = await hook_service()
    svc.answer = at(stage, {"action": "tempfail",
                            "response": {"code": 452, "message": "Come back later"}})
    server = await start(elemta_server, hook(svc, *INBOUND))

    got = await converse(server, closed=stage == "connect")

    reply = reply_at(got, stage)
    if stage == "connect":
        assert reply.code == 421 and got["closed"]       # 421 closes, whatever the code
    else:
        assert (reply.code, reply.text) == (452, "4.7.1 Come back later")


async def test_defaults_and_disconnect(elemta_server, hook_service):
    svc = await hook_service()
    svc.answer = at("mail", {"action": "reject", "response": {"disconnect": True}})
    server = await start(elemta_server, hook(svc, "mail"))

    got = await converse(server, closed=True)

    assert (got["mail"].code, got["mail"].text) == (550, "5.7.1 Rejected by policy")
    assert got["closed"]


@pytest.mark.parametrize("stage", INBOUND)
async def test_accept_and_continue_at_each_stage_let_the_message_through(
        stage, elemta_server, elemta_outbox, hook_service):
    svc = await hook_service()
    svc.answer = at(stage, {"action": "accept"})
    server = await start(elemta_server, hook(svc, *INBOUND), outbox=elemta_outbox)

    got = await converse(server)

    qid = queue_id(got["data"])
    [delivered] = await elemta_outbox.wait(1)
    assert delivered.envelope.id == qid and delivered.recipients == ["user@example.test"]
    # accept ends the stage for the hooks of this plugin: no later hook is asked there
    assert svc.stages() == INBOUND


async def test_accept_never_opens_a_relay_nor_skips_a_refusal(elemta_server, hook_service):
    class Refuser:
        @hookimpl
        def data(self, message):
            return Reject(550, "5.7.1", "the later plugin refuses")

    svc = await hook_service()
    svc.answer = lambda doc: {"action": "accept"}
    server = await start(elemta_server, hook(svc, "rcpt"))

    got = await converse(server, rcpts=("someone@elsewhere.example",))

    # the rcpt stage (the built-in relay policy) refused first: the hook is not asked
    assert got["rcpt"][0].code == 550 and svc.at("rcpt") == []

    # accept at data ends the data stage: a plugin listed later is not asked
    svc2 = await hook_service()
    svc2.answer = lambda doc: {"action": "accept"}
    server2 = await start(elemta_server, hook(svc2, "data"), plugins=[("refuser", Refuser())])
    assert queue_id((await converse(server2))["data"])
    svc2.answer = lambda doc: {"action": "continue"}
    assert (await converse(server2))["data"].code == 550


@pytest.mark.parametrize("stage", INBOUND)
async def test_discard_at_each_stage_drops_the_message_after_a_250(stage, elemta_server,
                                                                   elemta_outbox, hook_service):
    svc = await hook_service()
    svc.answer = at(stage, {"action": "discard", "reason": "spam trap"})
    server = await start(elemta_server, hook(svc, *INBOUND), outbox=elemta_outbox)

    got = await converse(server)

    assert got["data"].code == 250    # the client is told the message was taken
    qid = got["data"].text.rsplit(" ", 1)[1]
    assert spooled(server, qid) == (None, None)
    assert not (server.spool_path / "messages" / qid).exists()
    await server.flush()
    await asyncio.sleep(0.2)
    assert elemta_outbox.messages == []
    # a discard is decided for the message: the data stage is not asked any more
    assert "data" not in svc.stages() or stage == "data"


async def test_discard_at_rcpt_drops_only_that_recipient(elemta_server, elemta_outbox,
                                                         hook_service):
    svc = await hook_service()
    svc.answer = lambda doc: ({"action": "discard"} if doc["stage"] == "rcpt"
                              and doc["recipient"]["address"] == "trap@example.test"
                              else {"action": "continue"})
    server = await start(elemta_server, hook(svc, "rcpt", "data"), outbox=elemta_outbox)

    got = await converse(server, rcpts=("trap@example.test", "user@example.test"))

    assert [r.code for r in got["rcpt"]] == [250, 250]
    queue_id(got["data"])
    [delivered] = await elemta_outbox.wait(1)
    assert delivered.recipients == ["user@example.test"]
    # the data stage already sees the envelope without it
    [data] = svc.at("data")
    assert [r["address"] for r in data["envelope"]["to"]] == ["user@example.test"]


@pytest.mark.parametrize("stage", INBOUND)
async def test_quarantine_at_each_stage_holds_the_message(stage, elemta_server, elemta_outbox,
                                                          hook_service):
    svc = await hook_service()
    svc.answer = at(stage, {"action": "quarantine", "reason": f"held at {stage}"})
    server = await start(elemta_server, hook(svc, *INBOUND), outbox=elemta_outbox)

    got = await converse(server)

    qid = queue_id(got["data"])
    state, envelope = spooled(server, qid)
    assert state == "hold" and envelope is not None
    assert envelope["hold_reason"].endswith(f"held at {stage}")
    assert elemta_outbox.messages == []


# ------------------------------------------------------------------ auth


class Users:
    """A datasource: it counts the logins it is asked about."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    @hookimpl
    def auth(self, credentials):
        self.asked.append(credentials.login)
        if USERS.get(credentials.login) == credentials.password:
            return Accept()
        return Reject(535, "5.7.8", "Authentication credentials invalid")


async def login(server: Any, user: str, password: str) -> Any:
    sent = await send_mail(server, user, ["user@example.test"], MESSAGE, listener="submission",
                           starttls=True, auth=(user, password))
    return next(r for r in sent.replies if r.code in (235, 535, 454, 421, 503, 504))


@pytest.mark.parametrize("action, password, code, asked", [
    ("continue", "correct horse", 235, True),
    ("accept", "wrong", 535, True),          # a hook never grants a login
    ("accept", "correct horse", 235, True),
    ("reject", "correct horse", 535, False),  # a veto: the datasource is not asked
    ("tempfail", "correct horse", 454, False),
])
async def test_auth_stage_vetoes_but_never_grants(action, password, code, asked, elemta_server,
                                                  hook_service):
    svc = await hook_service()
    svc.answer = lambda doc: {"action": action}
    users = Users()
    server = await start(elemta_server, hook(svc, "auth"), plugins=[("users", users)])

    reply = await login(server, "alice@example.test", password)

    assert reply.code == code, str(reply)
    assert bool(users.asked) == asked
    [doc] = svc.at("auth")
    assert doc["sasl"] == {"mechanism": "PLAIN", "login": "alice@example.test", "authzid": ""}
    assert doc["session"]["tls"]["version"].startswith("TLS")
    assert password not in json.dumps(svc.requests)


@pytest.mark.parametrize("action", ["discard", "quarantine"])
async def test_discard_or_quarantine_at_auth_is_for_the_messages_of_the_session(
        action, elemta_server, elemta_outbox, hook_service):
    svc = await hook_service()
    svc.answer = at("auth", {"action": action, "reason": "new login from a strange place"})
    users = Users()
    server = await start(elemta_server, hook(svc, "auth"), plugins=[("users", users)],
                         outbox=elemta_outbox)

    sent = await send_mail(server, "alice@example.test", ["user@example.test"], MESSAGE,
                           listener="submission", starttls=True,
                           auth=("alice@example.test", "correct horse"))

    assert sent.reply.code == 250 and users.asked == ["alice@example.test"]
    qid = sent.reply.text.rsplit(" ", 1)[1]
    state, envelope = spooled(server, qid)
    if action == "discard":
        assert state is None
    else:
        assert state == "hold"
        assert envelope["hold_reason"].endswith("new login from a strange place")
    await server.flush()
    await asyncio.sleep(0.1)
    assert elemta_outbox.messages == []


async def test_the_auth_hook_alone_offers_no_auth(elemta_server, hook_service):
    svc = await hook_service()
    server = await start(elemta_server, hook(svc, "auth"))

    async with RawSMTP(server.port("submission")) as c:
        await c.cmd("EHLO client.example")
        await c.starttls(unverified_context())
        ehlo = await c.cmd("EHLO client.example")

    assert not any(line.startswith("AUTH") for line in ehlo.lines)


# ------------------------------------------------------------------ data: the message and its edits


async def test_every_modification_at_data_is_in_the_spooled_message_and_envelope(
        elemta_server, elemta_outbox, hook_service):
    svc = await hook_service()
    svc.answer = at("data", {"action": "continue", "modifications": [
        {"type": "addHeader", "name": "X-Added", "value": "yes"},
        {"type": "insertHeader", "index": 0, "name": "X-Top", "value": "first"},
        {"type": "changeHeader", "name": "Subject", "value": "[checked] hello"},
        {"type": "changeHeader", "name": "X-Tag", "index": 2, "value": "two"},
        {"type": "deleteHeader", "name": "X-Remove"},
        {"type": "deleteHeader", "name": "X-Tag", "index": 1},
        {"type": "replaceBody", "value": "New body\nline 2\n"},
        {"type": "addRecipient", "value": "archive@example.test", "params": {"NOTIFY": "NEVER"}},
        {"type": "deleteRecipient", "value": "drop@example.test"},
        {"type": "changeFrom", "value": "bounces@example.org", "params": {"RET": "HDRS"}},
    ]})
    server = await start(elemta_server, hook(svc, "data"), outbox=elemta_outbox)
    message = ("From: a@example.org\nSubject: hello\nX-Tag: one\nX-Remove: a\nX-Tag: 2nd\n"
               "X-Remove: b\n\nOld body.\n")

    got = await converse(server, rcpts=("user@example.test", "drop@example.test"),
                         message=message)

    qid = queue_id(got["data"])
    # the envelope as the spool holds it, handed to delivery (small messages are delivered
    # from memory at once, so it may never be in a file)
    [delivered] = await elemta_outbox.wait(1)
    envelope = delivered.envelope
    assert envelope.id == qid
    assert envelope.sender == "bounces@example.org"
    assert envelope.mail_params == {"RET": "HDRS"}
    assert {r.address: r.params for r in envelope.recipients} == {
        "user@example.test": {}, "archive@example.test": {"NOTIFY": "NEVER"}}
    assert delivered.sender == "bounces@example.org"
    assert sorted(delivered.recipients) == ["archive@example.test", "user@example.test"]
    head, body = delivered.content.split(b"\r\n\r\n", 1)
    assert body == b"New body\r\nline 2\r\n"
    own = [line.split(":", 1)[0] for line in head.decode().split("\r\n")
           if not line.startswith((" ", "\t"))]
    # trace fields the server adds come first, then the message's own section
    own = own[own.index("X-Top"):]
    assert own == ["X-Top", "From", "Subject", "X-Tag", "X-Added"]
    assert delivered.header("Subject") == "[checked] hello"
    assert delivered.headers("X-Tag") == ["two"]
    # the hook saw the message as it was
    [doc] = svc.at("data")
    assert ["X-Tag", "2nd"] in doc["message"]["headers"] and "body" not in doc["message"]


async def test_a_base64_body_replaces_it_byte_for_byte_and_quarantine_keeps_the_edits(
        elemta_server, hook_service):
    raw = b"\xff\xfe binary \x00 body\r\n"
    svc = await hook_service()
    svc.answer = at("data", {"action": "quarantine", "reason": "look at it", "modifications": [
        {"type": "replaceBody", "value": base64.b64encode(raw).decode(), "encoding": "base64"},
        {"type": "addHeader", "name": "X-Quarantined", "value": "yes"}]})
    server = await start(elemta_server, hook(svc, "data"))

    qid = queue_id((await converse(server))["data"])

    state, envelope = spooled(server, qid)
    assert state == "hold" and envelope["hold_reason"].endswith("look at it")
    stored = (server.spool_path / "messages" / qid).read_bytes()
    assert stored.endswith(b"\r\n\r\n" + raw)
    assert b"\r\nX-Quarantined: yes\r\n" in stored


@pytest.mark.parametrize("answer, why", [
    ({"action": "continue", "modifications": [
        {"type": "addHeader", "name": "Bad: name", "value": "x"}]}, "name"),
    ({"action": "continue", "modifications": [
        {"type": "addHeader", "name": "X-Ok", "value": "a\r\nX-Injected: yes"}]}, "value"),
    ({"action": "continue", "modifications": [
        {"type": "addRecipient", "value": "not an address"}]}, "address"),
    ({"action": "continue", "modifications": [
        {"type": "replaceBody", "value": "***", "encoding": "base64"}]}, "base64"),
    ({"action": "continue", "modifications": [
        {"type": "replaceBody", "value": "a"}, {"type": "replaceBody", "value": "b"}]}, "twice"),
    ({"action": "continue", "modifications": [{"type": "frobnicate"}]}, "type"),
])
async def test_an_invalid_modification_changes_nothing_and_is_the_fail_action(
        answer, why, elemta_server, elemta_outbox, hook_service):
    svc = await hook_service()
    svc.answer = at("data", {"action": "continue", "modifications": [
        {"type": "addHeader", "name": "X-First", "value": "fine"}] + answer["modifications"]})
    server = await start(elemta_server, hook(svc, "data"), outbox=elemta_outbox)

    got = await converse(server)

    assert (got["data"].code, got["data"].text) == (
        451, "4.3.0 Policy check unavailable, please try again later")
    assert await metric(server, "smtp_mtahooks_failures_total", hook="policy", stage="data",
                        reason="invalid_response") == 1.0


async def test_modifications_before_data_are_refused(elemta_server, hook_service):
    svc = await hook_service()
    svc.answer = at("mail", {"action": "continue", "modifications": [
        {"type": "addHeader", "name": "X-Early", "value": "no"}]})
    server = await start(elemta_server, hook(svc, "mail"))

    got = await converse(server)

    assert got["mail"].code == 451


async def test_the_body_is_sent_bounded_as_configured(elemta_server, hook_service):
    svc = await hook_service()
    body = "".join(f"line {n:04d} of the body\n" for n in range(40))       # 880 bytes + CR
    server = await start(
        elemta_server,
        hook(svc, "data", name="whole", body="base64"),
        hook(svc, "data", name="cut", body="base64", max_body_bytes=100),
        hook(svc, "data", name="omit", body="base64", max_body_bytes=100,
             body_over_limit="omit"),
        hook(svc, "data", name="text", body="text", max_body_bytes=30))

    queue_id((await converse(server, message="Subject: b\n\n" + body))["data"])

    wire = body.replace("\n", "\r\n").encode()
    docs = {d["hook"]: d["message"] for d in svc.at("data")}
    assert docs["whole"]["body"] == {"encoding": "base64", "size": len(wire), "truncated": False,
                                     "content": base64.b64encode(wire).decode()}
    assert docs["cut"]["body"] == {"encoding": "base64", "size": len(wire), "truncated": True,
                                   "content": base64.b64encode(wire[:100]).decode()}
    assert docs["omit"]["body"] == {"encoding": "base64", "size": len(wire), "truncated": True,
                                    "content": None}
    assert docs["text"]["body"] == {"encoding": "text", "size": len(wire), "truncated": True,
                                    "content": wire[:30].decode()}
    assert docs["whole"]["size"] == len(wire) + len(b"Subject: b\r\n\r\n")


async def test_a_large_body_is_read_only_up_to_the_bound(elemta_server, elemta_outbox,
                                                         hook_service):
    svc = await hook_service()
    server = await start(elemta_server, hook(svc, "data", body="base64", max_body_bytes=1000),
                         outbox=elemta_outbox)
    body = b"".join(b"%07d abcdefghijklmnopqrstuvwxyz0123456789\r\n" % n for n in range(20000))

    sent = await send_mail(server, SENDER, ["user@example.test"], b"Subject: big\r\n\r\n" + body)

    assert sent.accepted, sent.reply
    [doc] = svc.at("data")
    assert doc["message"]["body"]["size"] == len(body) > 800_000
    assert base64.b64decode(doc["message"]["body"]["content"]) == body[:1000]
    [delivered] = await elemta_outbox.wait(1)
    assert delivered.content.endswith(body)


# ------------------------------------------------------------------ what is sent, and how


async def test_the_requests_describe_the_session_and_are_signed(elemta_server, hook_service):
    svc = await hook_service()
    server = await start(elemta_server, hook(svc, *INBOUND))

    sent = await send_mail(server, SENDER, ["user@example.test"], MESSAGE, starttls=True,
                           mail_params=" BODY=8BITMIME")

    assert sent.accepted, sent.reply
    assert svc.refused == [] and svc.connections == 1        # one kept-alive connection
    # connect, EHLO, EHLO again after STARTTLS, MAIL, RCPT, DATA
    assert svc.stages() == ["connect", "ehlo", "ehlo", "mail", "rcpt", "data"]
    connect, ehlo1, ehlo2, mail, rcpt, data = svc.requests
    assert connect["session"]["client"]["address"] == "127.0.0.1"
    assert connect["server"] == {"hostname": "mx.example.test", "listener": "mx",
                                 "address": "127.0.0.1", "port": server.port("mx")}
    assert ehlo1["session"]["helo"] == "client.example" and ehlo1["session"]["tls"] is None
    assert ehlo2["session"]["tls"]["implicit"] is False
    assert mail["envelope"]["from"] == {"address": SENDER, "params": {"BODY": "8BITMIME"}}
    assert mail["envelope"]["to"] == []
    assert rcpt["recipient"] == {"address": "user@example.test", "params": {}}
    assert data["envelope"]["queueId"] == sent.queue_id == rcpt["envelope"]["queueId"]
    assert ["Subject", "hello"] in data["message"]["headers"]
    assert len({d["session"]["id"] for d in svc.requests}) == 1
    assert len({d["requestId"] for d in svc.requests}) == 6
    headers = svc.headers[-1]
    assert headers["x-elemta-request-id"] == data["requestId"]
    assert (headers["x-elemta-stage"], headers["x-elemta-hook"]) == ("data", "policy")
    assert headers["content-type"] == "application/json"
    assert await metric(server, "smtp_mtahooks_calls_total", hook="policy", stage="ehlo") == 2.0
    assert await metric(server, "smtp_mtahooks_actions_total", hook="policy", stage="data",
                        action="continue") == 1.0
    assert await metric(server, "smtp_mtahooks_duration_seconds_count", hook="policy",
                        stage="data") == 1.0


async def test_a_wrong_secret_is_refused_by_the_service(elemta_server, hook_service):
    svc = await hook_service()
    server = await start(elemta_server, hook(svc, "mail", secret="not-the-service-secret"))

    got = await converse(server)

    assert svc.refused == ["bad signature"] and svc.requests == []
    assert got["mail"].code == 451
    assert await metric(server, "smtp_mtahooks_failures_total", hook="policy", stage="mail",
                        reason="http_status") == 1.0


async def test_hooks_are_asked_in_order_and_the_listener_filter(elemta_server, hook_service):
    first, second = await hook_service(), await hook_service()
    first.answer = lambda doc: {"action": "continue"}
    second.answer = lambda doc: {"action": "reject"}
    server = await start(elemta_server, hook(first, "mail", name="first"),
                         hook(second, "mail", name="second"),
                         hook(second, "mail", name="submission-only", listeners=["submission"]))

    got = await converse(server)

    assert got["mail"].code == 550
    assert [d["hook"] for d in first.requests + second.requests] == ["first", "second"]


async def test_concurrency_per_hook_is_bounded(elemta_server, hook_service):
    svc = await hook_service()
    svc.answer = lambda doc: Delay(0.1, {"action": "continue"})
    server = await start(elemta_server, hook(svc, "mail", max_concurrency=2))

    results = await asyncio.gather(*(converse(server, ()) for _ in range(6)))

    assert all(r["mail"].code == 250 for r in results)
    assert svc.max_inflight == 2 and len(svc.requests) == 6


async def test_https_with_a_ca_file(elemta_server, hook_service, hook_tls):
    svc = await hook_service(tls=hook_tls["context"])
    svc.answer = lambda doc: {"action": "reject", "response": {"message": "over TLS"}}
    server = await start(elemta_server, hook(svc, "mail", ca_file=str(hook_tls["ca_file"])))

    got = await converse(server)

    assert svc.url.startswith("https://")
    assert (got["mail"].code, got["mail"].text) == (550, "5.7.1 over TLS")


async def test_https_without_the_ca_file_is_never_trusted(elemta_server, hook_service,
                                                          hook_tls):
    svc = await hook_service(tls=hook_tls["context"])
    server = await start(elemta_server, hook(svc, "mail"))

    got = await converse(server)

    assert got["mail"].code == 451 and svc.requests == []
    assert await metric(server, "smtp_mtahooks_failures_total", hook="policy", stage="mail",
                        reason="tls") == 1.0


# ------------------------------------------------------------------ faults


FAULTS = {
    "hangs": (HANG, "timeout"),
    "answers 500": (Status(500, b"internal error"), "http_status"),
    "closes mid-response": (Raw(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                b"Content-Length: 200\r\n\r\n{\"action\": \"rej"), "protocol"),
    "closes without answering": (Raw(b""), "protocol"),
    "answers invalid JSON": (Raw(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nnot json",
                                 close=False), "invalid_response"),
    "answers a schema-invalid document": ({"action": "maybe"}, "invalid_response"),
    "contradicts itself": ({"action": "reject", "response": {"code": 451}}, "invalid_response"),
    "answers too much": (Raw(b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n{}"),
                         "too_large"),
    "redirects": (Raw(b"HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n",
                      close=False), "http_status"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_a_failing_hook_gives_the_fail_action_and_nothing_is_lost(
        fault, elemta_server, elemta_outbox, hook_service):
    answer, reason = FAULTS[fault]
    svc = await hook_service()
    svc.answer = at("data", answer)
    server = await start(elemta_server, hook(svc, "mail", "data", timeout_seconds=0.5),
                         outbox=elemta_outbox)

    got = await converse(server)

    assert (got["data"].code, got["data"].text) == (
        451, "4.3.0 Policy check unavailable, please try again later")
    assert await metric(server, "smtp_mtahooks_failures_total", hook="policy", stage="data",
                        reason=reason) == 1.0
    # the sender keeps the message and tries again; the service is back
    svc.answer = lambda doc: {"action": "continue"}
    qid = queue_id((await converse(server))["data"])
    [delivered] = await elemta_outbox.wait(1)
    assert delivered.envelope.id == qid


async def test_on_failure_accept_lets_mail_through_and_counts_it(elemta_server, elemta_outbox,
                                                                 hook_service, caplog):
    svc = await hook_service()
    svc.answer = lambda doc: HANG
    server = await start(elemta_server,
                         hook(svc, "rcpt", "data", timeout_seconds=0.3, on_failure="accept"),
                         outbox=elemta_outbox)

    got = await converse(server)

    queue_id(got["data"])
    await elemta_outbox.wait(1)
    assert await metric(server, "smtp_mtahooks_failed_open_total", hook="policy",
                        stage="data") == 1.0
    assert "let through (on_failure = accept)" in caplog.text


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize("entry, says", [
    ({"url": "ftp://policy.example"}, "is not an http:// or https:// URL"),
    ({"stages": []}, "list at least one stage"),
    ({"stages": ["dataa"]}, "input should be 'connect'"),
    ({"secret": "short"}, "at least 16 characters"),
    ({"ca_file": "ca.pem"}, "ca_file is only used for an https:// url"),
    ({"body": "all"}, "'none', 'base64' or 'text'"),
    ({"timeout": 3}, "hooks[0].timeout: unknown key"),
    ({"name": "Policy Service"}, "is not a hook name"),
])
async def test_configuration_mistakes_are_named(entry, says, elemta_server):
    base = {"name": "policy", "url": "http://127.0.0.1:9/hook", "stages": ["mail"],
            "secret": SECRET}

    with pytest.raises(ConfigError) as e:
        await elemta_server({"plugins": {"mtahooks": {"hooks": [{**base, **entry}]}}},
                            enabled=["mtahooks"])

    assert says in str(e.value), str(e.value)


async def test_a_missing_ca_file_stops_start_up(elemta_server, tmp_path):
    from elemta import StartupError

    entry = {"name": "policy", "url": "https://127.0.0.1:9/hook", "stages": ["mail"],
             "secret": SECRET, "ca_file": str(tmp_path / "nope.pem")}
    with pytest.raises(StartupError, match="nope.pem does not exist"):
        await elemta_server({"plugins": {"mtahooks": {"hooks": [entry]}}}, enabled=["mtahooks"])


async def test_an_unknown_listener_stops_start_up(elemta_server):
    from elemta import StartupError

    entry = {"name": "policy", "url": "http://127.0.0.1:9/hook", "stages": ["mail"],
             "secret": SECRET, "listeners": ["mx", "submision"]}
    with pytest.raises(StartupError, match="listeners names submision, but the"):
        await elemta_server({"plugins": {"mtahooks": {"hooks": [entry]}}}, enabled=["mtahooks"])


async def test_two_hooks_with_one_name_are_refused(elemta_server):
    entry = {"name": "policy", "url": "http://127.0.0.1:9/hook", "stages": ["mail"],
             "secret": SECRET}
    with pytest.raises(ConfigError, match="hook name used twice: policy"):
        await elemta_server({"plugins": {"mtahooks": {"hooks": [entry, entry]}}},
                            enabled=["mtahooks"])
