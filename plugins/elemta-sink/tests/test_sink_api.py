"""The sink's JSON API against a running Elemta: mail sent over SMTP to the listener,
stored by elemta-store, read through the plugin's uvicorn on loopback."""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import datetime, timedelta, timezone
from email.message import EmailMessage

import httpx
import pytest

from elemta import ConfigError, StartupError
from elemta.testing import Sink, free_port, run_cli, send_mail
from elemta_sink.mime import authentication_results, frame_csp, parse_authres

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")
AUTHRES = ("mx.upstream.example; spf=pass smtp.mailfrom=alice@sender.example; "
           "dkim=fail (signature did not verify) header.d=sender.example header.s=s1; "
           "dmarc=fail reason=\"policy says so\" header.from=sender.example")


def rich_message(subject: str = "Invoice 42", to: str = "bob@app.example") -> bytes:
    msg = EmailMessage()
    msg["From"] = "Alice <alice@sender.example>"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Authentication-Results"] = AUTHRES
    msg.set_content("Hello Bob,\nyour invoice is attached.\n")
    msg.add_alternative('<html><body><p>Hello <b>Bob</b></p><img src="cid:logo@x">'
                        '<img src="http://127.0.0.1:9/track.png"></body></html>',
                        subtype="html")
    msg.get_payload()[1].add_related(PNG, "image", "png", cid="<logo@x>")
    msg.add_attachment(b"%PDF-1.4 fake\n", maintype="application", subtype="pdf",
                       filename="invoice-42.pdf")
    return msg.as_bytes()


def plain(subject: str, body: str = "plain body\n") -> str:
    return f"From: carol@other.example\nTo: dave@app.example\nSubject: {subject}\n\n{body}"


async def test_sink_accepts_every_recipient_and_stores_it_and_the_api_lists_it(sink_server):
    sink = await sink_server()
    sent = await send_mail(sink.server, "alice@sender.example",
                           ["bob@app.example", "eve@elsewhere.example"], rich_message())
    assert sent.accepted, sent.replies
    page = await sink.wait_total(1)
    [m] = page["messages"]
    assert m["subject"] == "Invoice 42"
    assert m["sender"] == "alice@sender.example"
    assert sorted(m["recipients"]) == ["bob@app.example", "eve@elsewhere.example"]
    assert m["has_attachments"] is True
    assert page["offset"] == 0 and page["limit"] == 50 and page["count"] == 1

    async with sink.client() as client:
        detail = (await client.get(f"/api/v1/messages/{m['id']}")).json()
        assert detail["text"].startswith("Hello Bob")
        assert detail["html"] is True
        assert detail["envelope"]["sender"] == "alice@sender.example"
        names = {a["filename"]: a for a in detail["attachments"]}
        assert names["invoice-42.pdf"]["disposition"] == "attachment"
        assert any(a["content_id"] == "logo@x" for a in detail["attachments"])
        [ar] = [f for f in detail["authentication_results"]
                if f["authserv_id"] == "mx.upstream.example"]
        results = {r["method"]: r for r in ar["results"]}
        assert results["spf"]["result"] == "pass"
        assert results["dkim"]["result"] == "fail"
        assert results["dkim"]["comment"] == "signature did not verify"
        assert results["dkim"]["properties"]["header.s"] == "s1"
        assert results["dmarc"]["reason"] == "policy says so"
        assert ["Subject", "Invoice 42"] in detail["headers"]

        # the alias of the first API answers the same
        alias = (await client.get(f"/messages/{m['id']}")).json()
        assert alias["subject"] == detail["subject"] and alias["id"] == m["id"]
        listed = (await client.get("/messages")).json()
        assert [x["id"] for x in listed["messages"]] == [m["id"]]

        raw = await client.get(f"/api/v1/messages/{m['id']}/raw")
        assert raw.headers["content-type"] == "message/rfc822"
        assert b"Subject: Invoice 42" in raw.content
        assert b"Received: " in raw.content       # as delivered, with the trace header

        parts = (await client.get(f"/api/v1/messages/{m['id']}/parts")).json()
        assert "<b>Bob</b>" in parts["html"]
        pdf = names["invoice-42.pdf"]
        download = await client.get(f"/api/v1/messages/{m['id']}/parts/{pdf['index']}")
        assert download.status_code == 200
        assert download.content == b"%PDF-1.4 fake\n"
        assert download.headers["content-type"] == "application/pdf"
        assert download.headers["content-disposition"].startswith("attachment;")
        assert download.headers["content-security-policy"] == "sandbox"

        html = await client.get(f"/api/v1/messages/{m['id']}/html")
        assert html.headers["content-security-policy"] == frame_csp(remote=False)
        assert "img-src data:;" in html.headers["content-security-policy"]
        assert "script-src 'none'" in html.headers["content-security-policy"]
        assert "data:image/png;base64," in html.text        # the cid: image, inlined
        remote = await client.get(f"/api/v1/messages/{m['id']}/html?remote=1")
        assert "img-src * data:;" in remote.headers["content-security-policy"]

        spec = (await client.get("/api/openapi.json")).json()
        assert spec["openapi"].startswith("3.")
        for path in ("/api/v1/messages", "/api/v1/messages/{id}", "/api/v1/messages/{id}/raw",
                     "/api/v1/messages/{id}/parts", "/api/v1/messages/{id}/parts/{index}",
                     "/api/v1/messages/{id}/html", "/api/v1/messages/{id}/release",
                     "/api/v1/clear", "/api/v1/events", "/messages", "/messages/{id}",
                     "/clear"):
            assert path in spec["paths"], path

        ui = await client.get("/")
        assert ui.status_code == 200 and "Elemta sink" in ui.text
        assert "frame-ancestors 'none'" in ui.headers["content-security-policy"]
        assert (await client.get("/static/app.js")).status_code == 200


async def test_search_filters_and_pages(sink_server):
    sink = await sink_server()
    for i in range(5):
        subject = f"Report {i}" + (" quarterly" if i % 2 == 0 else "")
        sent = await send_mail(sink.server, f"sender{i}@s{i}.example",
                               [f"user{i}@app.example"], plain(subject, f"body number {i}\n"))
        assert sent.accepted
    await sink.wait_total(5)
    async with sink.client() as client:
        async def ids(**params):
            r = await client.get("/api/v1/messages", params=params)
            assert r.status_code == 200, r.text
            return r.json()

        assert (await ids(q="quarterly"))["total"] == 3
        assert [m["subject"] for m in (await ids(q="quarterly", limit=2))["messages"]] == \
            ["Report 4 quarterly", "Report 2 quarterly"]          # newest first
        assert (await ids(q="quarterly", limit=2, offset=2))["messages"][0]["subject"] == \
            "Report 0 quarterly"
        assert [m["subject"] for m in (await ids(to="user3@"))["messages"]] == ["Report 3"]
        assert [m["subject"] for m in (await ids(**{"from": "sender1@"}))["messages"]] == \
            ["Report 1"]
        now = datetime.now(timezone.utc)
        assert (await ids(since=(now - timedelta(minutes=5)).isoformat()))["total"] == 5
        assert (await ids(since=(now + timedelta(minutes=5)).isoformat()))["total"] == 0
        assert (await ids(before="2000-01-01"))["total"] == 0
        assert (await ids(before=str(int(now.timestamp()) + 300)))["total"] == 5
        assert (await ids(q="nothing-matches-this"))["total"] == 0
        # search syntax is never an error: operators and stray quotes are words
        assert (await ids(q='"unbalanced AND OR * NEAR('))["total"] == 0
        assert (await ids(q="report*"))["total"] == 5
        # a page size beyond the maximum is clamped to it, and says so
        clamped = await ids(limit=1_000_000)
        assert clamped["limit"] == 500 and clamped["count"] == 5
        assert (await ids(limit=2))["count"] == 2


async def test_page_size_is_clamped_to_the_configured_maximum(sink_server):
    sink = await sink_server(sink={"page_size": 2, "max_page_size": 3})
    for i in range(4):
        assert (await send_mail(sink.server, "a@s.example", ["b@app.example"],
                                plain(f"m{i}"))).accepted
    await sink.wait_total(4)
    async with sink.client() as client:
        default = (await client.get("/api/v1/messages")).json()
        assert default["limit"] == 2 and default["count"] == 2 and default["total"] == 4
        big = (await client.get("/api/v1/messages?limit=50")).json()
        assert big["limit"] == 3 and big["count"] == 3


async def test_unknown_ids_are_404_and_bad_queries_400(sink_server):
    sink = await sink_server()
    assert (await send_mail(sink.server, "a@s.example", ["b@app.example"],
                            plain("only text"))).accepted
    [m] = (await sink.wait_total(1))["messages"]
    async with sink.client() as client:
        for method, path in [("GET", "/api/v1/messages/999999"),
                             ("GET", "/api/v1/messages/abc"),
                             ("GET", "/messages/999999"),
                             ("GET", "/api/v1/messages/999999/raw"),
                             ("GET", "/api/v1/messages/999999/parts"),
                             ("GET", "/api/v1/messages/999999/parts/0"),
                             ("GET", "/api/v1/messages/999999/html"),
                             ("DELETE", "/api/v1/messages/999999"),
                             ("GET", f"/api/v1/messages/{m['id']}/parts/99"),
                             ("GET", f"/api/v1/messages/{m['id']}/parts/x"),
                             ("GET", f"/api/v1/messages/{m['id']}/html"),   # no HTML part
                             ("GET", "/api/v2/nothing")]:
            r = await client.request(method, path)
            assert r.status_code == 404, (method, path, r.text)
            assert r.json()["error"]
        r = await client.post("/api/v1/messages/999999/release", json={"to": ["x@y.example"]})
        assert r.status_code == 404

        for query in ["limit=abc", "limit=0", "limit=-3", "offset=-1", "offset=1.5",
                      "since=yesterday", "before=2026-13-45", "colour=blue",
                      "q=" + "x" * 1001]:
            r = await client.get("/api/v1/messages?" + query)
            assert r.status_code == 400, (query, r.text)
            assert r.json()["error"]
        assert (await client.get("/messages?limit=abc")).status_code == 400

        release = f"/api/v1/messages/{m['id']}/release"
        for body in [b"not json", json.dumps({"to": []}).encode(), json.dumps([1]).encode(),
                     json.dumps({"to": ["not an address"]}).encode(),
                     json.dumps({"to": ["a@b.example\r\nRCPT TO:<c@d.example>"]}).encode(),
                     json.dumps({"to": [f"u{i}@x.example" for i in range(51)]}).encode()]:
            r = await client.post(release, content=body,
                                  headers={"content-type": "application/json"})
            assert r.status_code == 400, (body, r.text)
        assert (await client.put("/api/v1/clear")).status_code == 405
        # nothing of the above changed the store
        assert (await client.get("/api/v1/messages")).json()["total"] == 1


async def test_delete_one_and_clear_all(sink_server):
    sink = await sink_server()
    for i in range(3):
        assert (await send_mail(sink.server, "a@s.example", ["b@app.example"],
                                plain(f"m{i}"))).accepted
    page = await sink.wait_total(3)
    first = page["messages"][0]["id"]
    async with sink.client() as client:
        r = await client.delete(f"/api/v1/messages/{first}")
        assert r.status_code == 200 and r.json() == {"deleted": first}
        assert (await client.get(f"/api/v1/messages/{first}")).status_code == 404
        assert (await client.delete(f"/api/v1/messages/{first}")).status_code == 404
        assert (await client.get("/api/v1/messages")).json()["total"] == 2
        r = await client.post("/api/v1/clear")
        assert r.status_code == 200 and r.json() == {"deleted": 2}
        assert (await client.get("/api/v1/messages")).json()["total"] == 0
        # the alias
        assert (await send_mail(sink.server, "a@s.example", ["b@app.example"],
                                plain("again"))).accepted
        await sink.wait_total(1)
        assert (await client.post("/clear")).json() == {"deleted": 1}


async def test_release_sends_a_stored_message_on_to_a_real_address(sink_server):
    async with Sink() as remote:
        metrics = free_port()
        sink = await sink_server(config={"delivery": {"routes": {
            "remote.example": {"host": remote.address, "tls": "none"}}},
            "metrics": {"address": f"127.0.0.1:{metrics}"}})
        sent = await send_mail(sink.server, "alice@sender.example",
                               ["someone@remote.example"], rich_message("Release me"))
        assert sent.accepted
        # captured: the route of remote.example is not taken while it is a sink
        [m] = (await sink.wait_total(1))["messages"]
        await asyncio.sleep(0.3)
        assert remote.messages == []
        async with sink.client() as client:
            r = await client.post(f"/api/v1/messages/{m['id']}/release",
                                  json={"to": ["qa@remote.example"]})
            assert r.status_code == 202, r.text
            assert r.json()["to"] == ["qa@remote.example"] and r.json()["queue_id"]
        [out] = await remote.wait_for(1)
        assert out.recipients == ["qa@remote.example"]
        assert out.sender == "alice@sender.example"
        assert b"Subject: Release me" in out.content
        # it left; the store did not get a second copy
        await asyncio.sleep(0.3)
        assert (await sink.wait_total(1))["messages"][0]["id"] == m["id"]
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"http://127.0.0.1:{metrics}/metrics")).text
        assert 'elemta_sink_releases_total{result="queued"} 1.0' in text


async def test_without_capture_all_mail_is_not_captured(sink_server):
    """The one setting: without it the store takes only what it routes (local domains),
    and the relay policy refuses other domains from a client that may not relay."""
    sink = await sink_server(sink={"capture_all": False},
                             config={"server": {"relay_networks": []}})
    refused = await send_mail(sink.server, "a@s.example", ["x@remote.example"], plain("no"))
    assert refused.reply.code == 550
    sink_on = await sink_server(config={"server": {"relay_networks": []}})
    taken = await send_mail(sink_on.server, "a@s.example", ["x@remote.example"], plain("yes"))
    assert taken.accepted
    await sink_on.wait_total(1)


async def test_read_only_refuses_changes(sink_server):
    sink = await sink_server(sink={"read_only": True})
    assert (await send_mail(sink.server, "a@s.example", ["b@app.example"],
                            plain("keep"))).accepted
    [m] = (await sink.wait_total(1))["messages"]
    async with sink.client() as client:
        assert (await client.get("/api/v1/info")).json()["read_only"] is True
        for method, path, body in [("DELETE", f"/api/v1/messages/{m['id']}", None),
                                   ("POST", "/api/v1/clear", None),
                                   ("POST", "/clear", None),
                                   ("POST", f"/api/v1/messages/{m['id']}/release",
                                    {"to": ["x@remote.example"]})]:
            r = await client.request(method, path, json=body)
            assert r.status_code == 403, (path, r.text)
            assert "read-only" in r.json()["error"]
        assert (await client.get(f"/api/v1/messages/{m['id']}")).status_code == 200
        assert (await client.get("/api/v1/messages")).json()["total"] == 1


async def test_basic_auth_with_an_argon2_hash(sink_server):
    from argon2 import PasswordHasher

    hashed = PasswordHasher(time_cost=1, memory_cost=8192).hash("s3cret pass")
    sink = await sink_server(sink={"username": "dev", "password_hash": hashed})
    async with sink.client() as client:
        r = await client.get("/api/v1/messages")
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith("Basic ")
        assert (await client.get("/", auth=("dev", "wrong"))).status_code == 401
        assert (await client.get("/", auth=("root", "s3cret pass"))).status_code == 401
        assert (await client.get("/api/v1/events",
                                 headers={"authorization": "Basic %%%"})).status_code == 401
        for _ in range(2):     # the second time from the cache of verified credentials
            ok = await client.get("/api/v1/messages", auth=("dev", "s3cret pass"))
            assert ok.status_code == 200 and ok.json()["total"] == 0


async def test_events_stream_tells_of_stored_deleted_and_cleared(sink_server):
    sink = await sink_server()
    events: list[tuple[str, dict]] = []

    async def listen(client: httpx.AsyncClient) -> None:
        async with client.stream("GET", "/api/v1/events") as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            kind = None
            async for line in r.aiter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    events.append((kind, json.loads(line[6:])))
                    if kind == "cleared":
                        return

    async with sink.client() as client:
        task = asyncio.create_task(listen(client))
        await asyncio.sleep(0.3)
        assert (await send_mail(sink.server, "a@s.example", ["b@app.example"],
                                plain("live"))).accepted
        [m] = (await sink.wait_total(1))["messages"]
        assert (await client.delete(f"/api/v1/messages/{m['id']}")).status_code == 200
        assert (await client.post("/api/v1/clear")).status_code == 200
        await asyncio.wait_for(task, 10)
    kinds = [k for k, _ in events]
    assert kinds == ["stored", "deleted", "cleared"], events
    assert events[0][1]["id"] == m["id"] and events[1][1]["id"] == m["id"]


async def test_shutdown_ends_open_event_streams(sink_server):
    sink = await sink_server()
    async with sink.client() as client:
        async with client.stream("GET", "/api/v1/events") as r:
            lines = r.aiter_lines()
            assert (await anext(lines)).startswith("retry:")
            started = asyncio.get_running_loop().time()
            await sink.server.app.stop(grace=1)
            with pytest.raises((StopAsyncIteration, httpx.HTTPError)):
                while True:
                    await asyncio.wait_for(anext(lines), 10)
            assert asyncio.get_running_loop().time() - started < 8
    with pytest.raises(httpx.ConnectError):
        async with sink.client() as client:
            await client.get("/api/v1/messages")


async def test_metrics_count_requests_and_event_streams(sink_server):
    metrics = free_port()
    sink = await sink_server(config={"metrics": {"address": f"127.0.0.1:{metrics}"}})
    async with sink.client() as client:
        await client.get("/api/v1/messages")
        await client.get("/api/v1/messages/424242")
        async with client.stream("GET", "/api/v1/events") as r:
            await anext(r.aiter_lines())
            text = (await client.get(f"http://127.0.0.1:{metrics}/metrics")).text
            assert "elemta_sink_event_streams 1.0" in text
    assert 'elemta_sink_http_requests_total{endpoint="list_messages",status="200"} 1.0' in text
    assert 'elemta_sink_http_requests_total{endpoint="get_message",status="404"} 1.0' in text


async def test_the_store_must_be_enabled_and_the_port_free(elemta_server, sink_server):
    with pytest.raises(StartupError, match="store plugin is not enabled"):
        await elemta_server(config={"plugins": {"enabled": ["sink"]}})
    sink = await sink_server()
    taken = sink.base.rsplit(":", 1)[1]
    with pytest.raises(StartupError, match=f"cannot listen on 127.0.0.1:{taken}"):
        await elemta_server(config={"plugins": {
            "enabled": ["store", "sink"], "sink": {"address": f"127.0.0.1:{taken}"}}})


@pytest.mark.parametrize("table,problem", [
    ({"address": "8025"}, "is not host:port"),
    ({"address": "mail.example:8025"}, "must be an IP address"),
    ({"username": "dev"}, "set both username and password_hash"),
    ({"username": "dev", "password_hash": "plain"}, "not an argon2 hash"),
    ({"page_size": 100, "max_page_size": 10}, "larger than max_page_size"),
])
async def test_settings_mistakes_name_the_fix(elemta_server, table, problem):
    with pytest.raises(ConfigError, match=problem):
        await elemta_server(config={"plugins": {"enabled": ["store", "sink"], "sink": table}})


def test_hash_password_command_makes_a_hash_that_verifies(elemta_config):
    from argon2 import PasswordHasher

    config = elemta_config({"plugins": {"enabled": ["store", "sink"]}})
    result = run_cli("sink", "hash-password", "--password-stdin", config=config,
                     input="correct horse\n")
    assert result.exit_code == 0, result.stderr
    hashed = result.stdout.strip().splitlines()[-1]
    assert hashed.startswith("$argon2id$")
    assert PasswordHasher().verify(hashed, "correct horse")


def test_authentication_results_are_parsed_readably():
    field = parse_authres("mx.example.org (comment) 1; spf=softfail (domain of x does not "
                          "designate 192.0.2.1) smtp.mailfrom=\"a;b\"@x.example; "
                          "dkim=none; arc=pass")
    assert field["authserv_id"] == "mx.example.org"
    assert [(r["method"], r["result"]) for r in field["results"]] == \
        [("spf", "softfail"), ("dkim", "none"), ("arc", "pass")]
    assert field["results"][0]["properties"] == {"smtp.mailfrom": "a;b@x.example"}
    assert parse_authres("mx.example.org; none")["results"] == []
    [broken] = authentication_results([("Authentication-Results", "mx; spf")])
    assert broken["error"] and broken["raw"] == "mx; spf"
