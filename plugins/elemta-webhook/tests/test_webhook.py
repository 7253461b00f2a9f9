"""elemta-webhook through a real Elemta server, a real HTTP receiver on loopback and, for
bounces, an SMTP sink as the senders' MX."""

from __future__ import annotations

import asyncio
import base64
import email
import json
import logging
import time
from email.message import EmailMessage
from typing import Any

import pytest
from conftest import SECRET
from webhook_receiver import Hold, decode, readme_verifier

from elemta import Route, hookimpl
from elemta.testing import parse_dsn, send_mail
from elemta_webhook import payload
from elemta import sign_body as signature
from elemta_webhook.settings import WebhookSettings

SENDER = "alice@sender.example"
PDF = b"%PDF-1.4 fake\x00\x01\x02" * 10


def target(receiver: Any, **more: Any) -> dict[str, Any]:
    """One [[plugins.webhook.targets]] entry for ``receiver``."""
    return {"name": more.pop("name", "helpdesk"), "url": receiver.url,
            "secret": more.pop("secret", SECRET), **more}


async def start(elemta_server: Any, sender_mx: Any, *targets: dict[str, Any],
                retry: list[float] | None = None, **config: Any) -> Any:
    return await elemta_server({
        "delivery": {"enabled": True, "retry_intervals_seconds": retry or [60.0],
                     "routes": {"*": {"host": sender_mx.address, "tls": "none"}}},
        "plugins": {"webhook": {"targets": list(targets)}}, **config}, enabled=["webhook"])


def rich_message() -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"Alice <{SENDER}>"
    msg["To"] = "help@example.test"
    msg["Subject"] = "Drucker brennt – bitte helfen"
    msg["Message-ID"] = "<m1@sender.example>"
    msg.set_content("It is on fire.\nReally.\n")
    msg.add_alternative("<p>It is <b>on fire</b>.</p>\n", subtype="html")
    msg.add_attachment(PDF, maintype="application",
                       subtype="pdf", filename="report.pdf")
    return msg


async def submit(server: Any, rcpts: list[str], message: Any = None) -> str:
    sent = await send_mail(server, SENDER, rcpts, message or rich_message())
    assert sent.accepted, sent.reply
    assert sent.queue_id is not None
    await server.flush()
    return sent.queue_id


def spooled(server: Any, qid: str) -> tuple[str | None, dict[str, Any] | None]:
    """The state and envelope of a spooled message, or (None, None) once it is gone."""
    server.app.spool.wait_written()
    for state in ("ready", "deferred", "hold", "failed"):
        path = server.spool_path / state / f"{qid}.json"
        if path.exists():
            return state, json.loads(path.read_bytes())
    return None, None


async def wait_state(server: Any, qid: str, want: str | None, timeout: float = 10.0
                     ) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while True:
        state, envelope = spooled(server, qid)
        if state == want:
            return envelope
        assert time.monotonic() < deadline, f"{qid} is {state}, not {want}: {envelope}"
        await asyncio.sleep(0.02)


async def metric(server: Any, name: str, **labels: str) -> float | None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.metrics_port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    body = (await reader.read()).decode()
    writer.close()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in body.splitlines():
        if line.startswith(f"{name}{{"):
            got = line[len(name) + 1:line.index("}")]
            if ",".join(sorted(got.split(","))) == want:
                return float(line.rsplit(" ", 1)[1])
    return None


# ------------------------------------------------------------------ the request


async def test_a_message_is_posted_as_signed_json_and_leaves_the_spool(
        elemta_server, sender_mx, receiver, caplog):
    caplog.set_level(logging.DEBUG)
    rx = await receiver()
    server = await start(elemta_server, sender_mx, target(rx))

    qid = await submit(server, ["help@example.test", "Sales@example.test"])

    [request] = await rx.wait(1)
    await wait_state(server, qid, None)
    doc = request.document
    assert rx.refused == []
    assert doc["version"] == 1 and doc["id"] == qid and doc["target"] == "helpdesk"
    assert doc["from"] == SENDER and doc["to"] == ["help@example.test", "Sales@example.test"]
    assert doc["attempt"] == 1
    assert doc["timestamp"] == int(request.headers["x-elemta-timestamp"])
    assert abs(doc["timestamp"] - time.time()) < 30
    assert doc["subject"] == "Drucker brennt – bitte helfen"
    assert doc["messageId"] == "<m1@sender.example>"
    assert doc["body"] == {"text": "It is on fire.\nReally.\n",
                           "html": "<p>It is <b>on fire</b>.</p>\n"}
    assert doc["attachments"] == [{"filename": "report.pdf", "contentType": "application/pdf",
                                   "size": len(PDF), "disposition": "attachment",
                                   "contentId": None}]
    raw = base64.b64decode(doc["raw"])
    assert doc["size"] == len(raw) and b"Really." in raw
    names = [n for n, _ in doc["headers"]]
    assert names[0] == "Received" and "Subject" in names and "Message-ID" in names
    # the raw message is what the spool held: Elemta's Received field on top, CRLF lines
    assert raw.startswith(b"Received: from ") and b"\r\nSubject: " in raw
    assert doc["truncated"] is False and doc["link"] is None
    # headers of the request
    assert request.headers["content-type"] == "application/json"
    assert request.headers["x-elemta-target"] == "helpdesk"
    assert request.headers["idempotency-key"] == doc["idempotencyKey"]
    assert doc["idempotencyKey"] == payload.idempotency_key(
        qid, ["sales@example.test", "help@example.test"])
    assert request.headers["user-agent"].startswith("elemta-webhook/")
    # the runner logs the outcome after it removed the message: a moment after the spool
    # says it is gone, from the same event loop as this test
    deadline = time.monotonic() + 5
    while "posted to webhook helpdesk: HTTP 200" not in caplog.text:
        assert time.monotonic() < deadline, "the delivery was not logged"
        await asyncio.sleep(0.01)
    # neither the secret nor the URL's token is ever logged
    assert SECRET not in caplog.text and "t0ps3cret" not in caplog.text


async def test_multipart_has_the_fields_and_the_raw_message_as_a_file_part(
        elemta_server, sender_mx, receiver):
    rx = await receiver()
    server = await start(elemta_server, sender_mx, target(rx, format="multipart"))

    qid = await submit(server, ["help@example.test"])

    [request] = await rx.wait(1)
    await wait_state(server, qid, None)
    fields, files = request.document, request.files
    assert request.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert fields["id"] == qid and fields["from"] == SENDER
    assert json.loads(fields["to"]) == ["help@example.test"]
    assert fields["timestamp"] == request.headers["x-elemta-timestamp"]
    assert fields["subject"] == "Drucker brennt – bitte helfen"
    assert fields["text"] == "It is on fire.\nReally.\n"
    assert fields["html"] == "<p>It is <b>on fire</b>.</p>\n"
    assert json.loads(fields["attachments"])[0]["filename"] == "report.pdf"
    assert ["Message-ID", "<m1@sender.example>"] in json.loads(fields["headers"])
    assert fields["truncated"] == "false" and "link" not in fields and "raw" not in fields
    filename, content_type, raw = files["raw"]
    assert (filename, content_type) == (f"{qid}.eml", "message/rfc822")
    assert raw.startswith(b"Received: ") and b"Really." in raw
    assert int(fields["size"]) == len(raw)


async def test_a_large_message_is_sent_as_its_header_section_and_a_link(
        elemta_server, sender_mx, receiver):
    rx = await receiver()
    server = await start(elemta_server, sender_mx, target(
        rx, max_message_bytes=2000, link_base="https://archive.example.com/raw/"))
    big = ("From: alice@sender.example\nSubject: big one\nMessage-ID: <big@sender.example>\n\n"
           + "x" * 76 + "\n") * 100

    qid = await submit(server, ["help@example.test"], big)

    [request] = await rx.wait(1)
    await wait_state(server, qid, None)
    doc = request.document
    assert doc["truncated"] is True
    assert doc["link"] == f"https://archive.example.com/raw/{qid}"
    assert doc["body"] is None and doc["attachments"] is None and doc["raw"] is None
    assert doc["subject"] == "big one" and doc["size"] > 2000
    assert ["Message-ID", "<big@sender.example>"] in doc["headers"]
    assert len(request.body) < 2000
    assert await metric(server, "smtp_webhook_headers_only_total", target="helpdesk") == 1


async def test_each_target_gets_its_own_recipients(elemta_server, sender_mx, receiver):
    desk, crm = await receiver(), await receiver()
    server = await start(
        elemta_server, sender_mx,
        target(crm, name="crm", recipients=["sales@example.test", "leads+*@example.test"],
               format="multipart"),
        target(desk, name="desk"),     # every other recipient of the local domain
        domains={"example.test": {}, "support.example.test": {}})

    qid = await submit(server, ["help@example.test", "leads+web@example.test",
                                "sales@example.test", "ops@support.example.test"])

    await wait_state(server, qid, None)
    [to_crm] = crm.requests
    [to_desk] = desk.requests
    assert sorted(json.loads(to_crm.document["to"])) == ["leads+web@example.test",
                                                         "sales@example.test"]
    assert to_desk.document["to"] == ["help@example.test", "ops@support.example.test"]
    assert to_crm.headers["idempotency-key"] != to_desk.headers["idempotency-key"]
    assert to_crm.document["id"] == to_desk.document["id"] == qid


async def test_connections_are_kept_and_reused(elemta_server, sender_mx, receiver):
    rx = await receiver()
    server = await start(elemta_server, sender_mx, target(rx, max_connections=2))

    for n in range(6):
        await submit(server, ["help@example.test"], f"Subject: {n}\n\nmessage {n}\n")
        await rx.wait(n + 1)

    assert len(rx.delivered()) == 6
    assert rx.connections <= 2


# ------------------------------------------------------------------ answers and outcomes


async def test_a_500_then_a_200_delivers_the_message_exactly_once(
        elemta_server, sender_mx, receiver):
    rx = await receiver()
    rx.answers = [500]
    rx.body = b"database is down"
    server = await start(elemta_server, sender_mx, target(rx), retry=[0.2])

    qid = await submit(server, ["help@example.test"])

    await rx.wait(2)
    await wait_state(server, qid, None)
    await asyncio.sleep(0.5)        # a third POST would come in well within this
    first, second = rx.requests
    assert [first.answered, second.answered] == [500, 200]
    assert len(rx.requests) == 2 and len(rx.delivered()) == 1
    assert first.document["id"] == second.document["id"] == qid
    assert first.headers["idempotency-key"] == second.headers["idempotency-key"]
    assert [first.document["attempt"], second.document["attempt"]] == [1, 2]
    assert first.document["raw"] == second.document["raw"]
    assert sender_mx.messages == []              # no bounce, no delay notice
    assert await metric(server, "smtp_webhook_posts_total", target="helpdesk") == 2
    assert await metric(server, "smtp_webhook_responses_total", target="helpdesk",
                        status="5xx") == 1
    assert await metric(server, "smtp_webhook_responses_total", target="helpdesk",
                        status="2xx") == 1
    assert await metric(server, "smtp_webhook_duration_seconds_count", target="helpdesk") == 2


async def test_a_404_bounces_the_message_to_its_sender(elemta_server, sender_mx, receiver):
    rx = await receiver()
    rx.default = 404
    rx.body = b'{"error": "no such queue: help"}'
    server = await start(elemta_server, sender_mx, target(rx))

    qid = await submit(server, ["help@example.test"])

    [dsn] = await sender_mx.wait_for(1)
    await wait_state(server, qid, None)
    assert dsn.sender == "" and dsn.recipients == [SENDER]
    [block] = parse_dsn(dsn.content)
    assert block["Final-Recipient"] == "rfc822; help@example.test"
    assert block["Action"] == "failed" and block["Status"] == "5.1.1"
    assert "HTTP 404" in block["Diagnostic-Code"]
    assert "no such queue: help" in block["Diagnostic-Code"]
    assert "t0ps3cret" not in dsn.content.decode("utf-8", "replace")
    assert len(rx.requests) == 1
    assert await metric(server, "smtp_webhook_responses_total", target="helpdesk",
                        status="4xx") == 1


@pytest.mark.parametrize("status, settings", [
    (400, {"on_4xx": "defer"}),
    (429, {}),
    (404, {"status_actions": {"404": "defer"}}),
    (503, {}),
    (302, {}),
])
async def test_answers_that_mean_later_defer_the_message(elemta_server, sender_mx, receiver,
                                                         status, settings):
    rx = await receiver()
    rx.default = status
    server = await start(elemta_server, sender_mx, target(rx, **settings))

    qid = await submit(server, ["help@example.test"])

    envelope = await wait_state(server, qid, "deferred")
    [rcpt] = envelope["recipients"]
    assert rcpt["state"] == "pending"
    assert rcpt["last_error"].startswith("451 4.3.")
    assert f"webhook helpdesk answered HTTP {status}" in rcpt["last_error"]
    assert sender_mx.messages == []

    rx.default = 200
    await server.retry(qid)
    await wait_state(server, qid, None)
    assert [r.answered for r in rx.requests] == [status, 200]


async def test_a_status_action_can_bounce_a_5xx(elemta_server, sender_mx, receiver):
    rx = await receiver()
    rx.default = 501
    server = await start(elemta_server, sender_mx, target(rx, status_actions={"501": "bounce"}))

    qid = await submit(server, ["help@example.test"])

    [dsn] = await sender_mx.wait_for(1)
    await wait_state(server, qid, None)
    [block] = parse_dsn(dsn.content)
    assert block["Status"] == "5.0.0" and "HTTP 501" in block["Diagnostic-Code"]


async def test_a_receiver_that_does_not_answer_in_time_defers_the_message(
        elemta_server, sender_mx, receiver, caplog):
    rx = await receiver()
    rx.answers = [Hold()]
    server = await start(elemta_server, sender_mx, target(rx, timeout_seconds=0.5))

    qid = await submit(server, ["help@example.test"])

    envelope = await wait_state(server, qid, "deferred")
    assert envelope["recipients"][0]["last_error"].startswith(
        "451 4.4.2 target helpdesk (http://127.0.0.1:")
    assert "timeout_seconds = 0.5" in envelope["recipients"][0]["last_error"]
    assert "timed out waiting for the answer" in caplog.text
    assert await metric(server, "smtp_webhook_failures_total", target="helpdesk",
                        reason="timeout") == 1

    await server.retry(qid)
    await wait_state(server, qid, None)
    assert [r.answered for r in rx.requests] == [None, 200]


async def test_a_refused_connection_defers_the_message(elemta_server, sender_mx, receiver):
    rx = await receiver()
    url = rx.url
    await rx.__aexit__(None, None, None)     # nothing listens there any more
    server = await start(elemta_server, sender_mx,
                         {"name": "gone", "url": url, "secret": SECRET})

    qid = await submit(server, ["help@example.test"])

    envelope = await wait_state(server, qid, "deferred")
    error = envelope["recipients"][0]["last_error"]
    assert error.startswith("451 4.4.1 target gone (http://127.0.0.1:")
    assert "cannot connect" in error and "t0ps3cret" not in error
    assert sender_mx.messages == []


# ------------------------------------------------------------------ signatures and settings


def test_the_readme_verifier_accepts_the_signature_and_refuses_anything_else():
    verify = readme_verifier()
    body = b'{"id": "x"}'
    now = int(time.time())
    good = signature(SECRET.encode(), now, body)
    assert verify(SECRET.encode(), str(now), good, body)
    assert not verify(SECRET.encode(), str(now), good, body + b" ")
    assert not verify(b"another-secret-0123456789", str(now), good, body)
    assert not verify(SECRET.encode(), str(now + 1), good, body)
    old = now - 301
    assert not verify(SECRET.encode(), str(old), signature(SECRET.encode(), old, body), body)
    assert not verify(SECRET.encode(), "", good, body)
    assert not verify(SECRET.encode(), str(now), "", body)


def test_the_signature_is_the_hmac_of_the_timestamp_and_the_body():
    # printf '%s' '1767225600.{"a":1}' | openssl dgst -sha256 -hmac 0123456789abcdef
    assert signature(b"0123456789abcdef", 1767225600, b'{"a":1}') == (
        "sha256=539b0e21b535c5201ef7d1453c0a0de4ad132293226de9018be0cfbf0092faa6")


def test_multipart_decoding_of_a_body_without_raw():
    post = payload.Post(id="Q1", idempotency_key="Q1-x", timestamp=1, received_at=0.0,
                        attempt=1, target="t", sender="", recipients=["a@b.example"],
                        subject="s", text="hi", raw=None)
    fields, files = decode("multipart/form-data; boundary=B0", payload.multipart_body(post, "B0"))
    assert files == {} and fields["text"] == "hi" and fields["from"] == ""
    assert "html" not in fields and "attachments" not in fields and "link" not in fields


@pytest.mark.parametrize("target, problem", [
    ({"url": "ftp://x.example/"}, "is not an http:// or https:// URL"),
    ({"url": "https://user:pw@x.example/"}, "put no credentials in the URL"),
    ({"secret": "short"}, "at least 16 characters"),
    ({"domains": ["*@example.com"]}, "for address patterns use `recipients`"),
    ({"recipients": ["example.com"]}, "is not an address pattern"),
    ({"status_actions": {"200": "bounce"}}, "2xx is a delivery"),
    ({"link_base": "https://a.example/raw?x=1"}, "give no ?query"),
    ({"name": "Help Desk"}, "is not a target name"),
    ({"ca_file": "ca.pem"}, "ca_file is only used for an https:// url"),
])
def test_mistakes_in_a_target_are_refused_with_the_fix(target, problem):
    entry = {"name": "t", "url": "http://127.0.0.1:9/x", "secret": SECRET, **target}
    with pytest.raises(ValueError, match=problem.replace("?", r"\?").replace("*", r"\*")):
        WebhookSettings.model_validate({"targets": [entry]})


def test_two_catch_all_targets_are_refused():
    entry = {"url": "http://127.0.0.1:9/x", "secret": SECRET}
    with pytest.raises(ValueError, match="all catch-alls"):
        WebhookSettings.model_validate({"targets": [{"name": "a", **entry},
                                                    {"name": "b", **entry}]})


# ------------------------------------------------------------------ more ways in


async def test_a_401_defers_whatever_on_4xx_says(elemta_server, sender_mx, receiver):
    rx = await receiver(secret="the-receiver-has-another-secret")
    server = await start(elemta_server, sender_mx, target(rx))

    qid = await submit(server, ["help@example.test"])

    envelope = await wait_state(server, qid, "deferred")
    assert "answered HTTP 401" in envelope["recipients"][0]["last_error"]
    assert rx.requests == [] and rx.refused == ["bad signature or timestamp"]
    assert sender_mx.messages == []


async def test_https_with_a_private_ca_in_ca_file(elemta_server, sender_mx, receiver,
                                                   receiver_tls):
    rx = await receiver(tls=receiver_tls["context"])
    trusting = await start(elemta_server, sender_mx,
                           target(rx, ca_file=str(receiver_tls["ca_file"])))
    qid = await submit(trusting, ["help@example.test"])
    await wait_state(trusting, qid, None)
    assert len(rx.delivered()) == 1

    # without ca_file the system's CAs do not know the receiver's: deferred, never sent
    doubting = await start(elemta_server, sender_mx, target(rx))
    qid = await submit(doubting, ["help@example.test"])
    envelope = await wait_state(doubting, qid, "deferred")
    error = envelope["recipients"][0]["last_error"]
    assert error.startswith("451 4.7.5 ") and "set ca_file" in error
    assert len(rx.requests) == 1


class RouteToCrm:
    """A routing plugin of the site: tickets@ goes to the crm target, lost@ to none.
    (``tryfirst``, as if listed before ``webhook`` in ``[plugins] enabled``.)"""

    @hookimpl(tryfirst=True)
    def route(self, recipient):
        local = recipient.address.partition("@")[0]
        if local in ("tickets", "lost"):
            return Route("webhook", destination="crm" if local == "tickets" else "nowhere")
        return None


async def test_a_routing_plugin_can_send_a_recipient_to_a_target_by_name(
        elemta_server, sender_mx, receiver):
    desk, crm = await receiver(), await receiver()
    server = await elemta_server({
        "delivery": {"enabled": True, "retry_intervals_seconds": [60.0],
                     "routes": {"*": {"host": sender_mx.address, "tls": "none"}}},
        "plugins": {"webhook": {"targets": [
            target(desk, name="desk"),
            target(crm, name="crm", recipients=["sales@example.test"])]}}},
        plugins=[("site", RouteToCrm())], enabled=["webhook"])

    qid = await submit(server, ["tickets@example.test", "help@example.test",
                                "lost@example.test"])

    envelope = await wait_state(server, qid, "deferred")
    states = {r["address"]: (r["state"], r["last_error"]) for r in envelope["recipients"]}
    assert states["tickets@example.test"][0] == states["help@example.test"][0] == "delivered"
    assert states["lost@example.test"] == ("pending",
                                           "451 4.3.0 no webhook target named 'nowhere'")
    assert [r.document["to"] for r in crm.requests] == [["tickets@example.test"]]
    assert [r.document["to"] for r in desk.requests] == [["help@example.test"]]


async def test_a_message_over_256_kib_is_prepared_off_the_event_loop_and_sent_whole(
        elemta_server, sender_mx, receiver):
    rx = await receiver()
    server = await start(elemta_server, sender_mx, target(rx, format="multipart"))
    msg = rich_message()
    blob = bytes(range(256)) * 2048          # 512 KiB
    msg.add_attachment(blob, maintype="application", subtype="octet-stream",
                       filename="blob.bin")

    qid = await submit(server, ["help@example.test"], msg)

    [request] = await rx.wait(1)
    await wait_state(server, qid, None)
    attachments = json.loads(request.document["attachments"])
    assert [(a["filename"], a["size"]) for a in attachments] == [("report.pdf", len(PDF)),
                                                                 ("blob.bin", len(blob))]
    raw = request.files["raw"][2]
    assert int(request.document["size"]) == len(raw) > len(blob)
    parsed = email.message_from_bytes(raw)
    [found] = [p.get_payload(decode=True) for p in parsed.walk()
               if p.get_filename() == "blob.bin"]
    assert found == blob


async def test_start_up_warns_about_a_domain_that_is_not_local_and_plain_http_abroad(
        elemta_server, sender_mx, caplog):
    await start(elemta_server, sender_mx,
                {"name": "far", "url": "http://hooks.example.net/in", "secret": SECRET,
                 "domains": ["in.example.net"]})

    assert "target far takes in.example.net, which is no local domain" in caplog.text
    assert '[domains."in.example.net"]' in caplog.text
    assert "target far sends messages over plain HTTP to hooks.example.net" in caplog.text
