"""The SMTP protocol as a client sees it: replies, limits, bad input, TLS, AUTH."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import pytest

from elemta import Accept, ConfigError, Reject, hookimpl
from elemta.config import parse_settings
from elemta.testing import send_mail
from elemta.testing.client import RawSMTP, unverified_context

MSG = b"Subject: test\r\n\r\nhello\r\n.\r\n"


def spooled(server, state: str = "ready") -> list[dict]:
    server.app.spool.wait_written()  # a 250 means "journaled"; the files follow
    d = server.spool_path / state
    return [json.loads(p.read_bytes()) for p in sorted(d.glob("*.json"))]


def content(server, queue_id: str) -> bytes:
    server.app.spool.wait_written()
    return (server.spool_path / "messages" / queue_id).read_bytes()


def body_of(raw: bytes) -> bytes:
    """The stored message minus the trace headers this server prepended."""
    lines = raw.split(b"\r\n")
    i = 0
    while lines[i].startswith((b"Received:", b"\t", b"Authentication-Results:")):
        i += 1
    return b"\r\n".join(lines[i:])


class Auth:
    """An auth plugin accepting alice/secret."""

    @hookimpl
    async def auth(self, credentials):
        await asyncio.sleep(0)
        if credentials.login == "alice" and credentials.password == "secret":
            return Accept()
        return Reject(535, "5.7.8", "no")


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


# ------------------------------------------------------------------ greeting, EHLO


async def test_greeting_and_ehlo_advertise_extensions(elemta_server):
    server = await elemta_server()
    async with RawSMTP(server.port("mx")) as c:
        assert c.greeting.code == 220
        assert c.greeting.lines[0].startswith("mx.example.test ")
        ehlo = await c.cmd("EHLO client.example")
        assert ehlo.code == 250
        assert ehlo.lines[0] == "mx.example.test"
        for ext in ("PIPELINING", "ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8", "STARTTLS",
                    f"SIZE {server.settings.server.max_message_bytes}"):
            assert ext in ehlo.lines
        assert not any(line.startswith("AUTH") for line in ehlo.lines), "AUTH over plaintext"


async def test_every_reply_after_the_greeting_has_an_enhanced_status_code(elemta_server):
    server = await elemta_server()
    async with RawSMTP(server.port("mx")) as c:
        commands = ["MAIL FROM:<a@b.example>", "HELO client.example", "NOOP", "VRFY bob",
                    "EXPN list", "HELP", "RSET", "BOGUS", "RCPT TO:<x@example.test>",
                    "MAIL FROM:<a@b.example>", "MAIL FROM:<a@b.example>",
                    "RCPT TO:<x@elsewhere.example>", "RCPT TO:<x@example.test>",
                    "DATA extra", "STARTTLS now", "AUTH PLAIN", "MAIL FROM:<broken"]
        for line in commands:
            reply = await c.cmd(line)
            if line.startswith("HELO"):
                continue
            assert reply.enhanced is not None, f"{line!r} -> {reply}"
            assert reply.enhanced[0] == str(reply.code)[0]
        assert (await c.cmd("QUIT")).enhanced == "2.0.0"


async def test_vrfy_answers_252_without_revealing_users(elemta_server):
    server = await elemta_server()
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        a = await c.cmd("VRFY root")
        b = await c.cmd("VRFY no-such-user-at-all")
        assert a.code == b.code == 252
        assert a.text == b.text


async def test_helo_requires_an_argument(elemta_server):
    server = await elemta_server()
    async with RawSMTP(server.port("mx")) as c:
        assert (await c.cmd("EHLO")).code == 501
        assert (await c.cmd("HELO")).code == 501
        assert (await c.cmd("MAIL FROM:<a@b.example>")).code == 503


# ------------------------------------------------------------------ transactions


async def test_pipelined_transaction_gets_replies_in_order(elemta_server):
    server = await elemta_server()
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        await c.send("MAIL FROM:<a@b.example>\r\nRCPT TO:<one@example.test>\r\n"
                     "RCPT TO:<nobody@elsewhere.example>\r\nRCPT TO:<two@example.test>\r\n"
                     "DATA\r\n")
        codes = [(await c.read_reply()).code for _ in range(5)]
        assert codes == [250, 250, 550, 250, 354]
        await c.send(MSG)
        reply = await c.read_reply()
        assert reply.code == 250 and "queued as" in reply.text
    [env] = spooled(server)
    assert [r["address"] for r in env["recipients"]] == ["one@example.test", "two@example.test"]


async def test_nested_mail_and_data_without_recipients_are_refused(elemta_server):
    server = await elemta_server()
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        assert (await c.cmd("RCPT TO:<x@example.test>")).code == 503
        assert (await c.cmd("DATA")).code == 503
        assert (await c.cmd("MAIL FROM:<a@b.example>")).code == 250
        assert (await c.cmd("MAIL FROM:<a@b.example>")).code == 503
        assert (await c.cmd("RCPT TO:<x@elsewhere.example>")).code == 550
        assert str(await c.cmd("DATA")).startswith("554 5.5.1")
        assert (await c.cmd("RSET")).code == 250
        assert (await c.cmd("MAIL FROM:<a@b.example>")).code == 250


async def test_message_is_spooled_with_envelope_facts(elemta_server):
    server = await elemta_server()
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        reply = await c.send_message("sender@b.example", ["user@example.test"], MSG)
    queue_id = reply.text.rsplit(" ", 1)[1]
    [env] = spooled(server)
    assert env["id"] == queue_id
    assert env["sender"] == "sender@b.example"
    assert env["helo"] == "client.example"
    assert env["listener"] == "mx"
    assert env["peer"]["ip"] == "127.0.0.1"
    assert env["recipients"][0]["state"] == "pending"
    assert env["tls"] is None and env["auth"] is None
    raw = content(server, queue_id)
    assert raw.startswith(b"Received: from client.example (unknown [127.0.0.1])\r\n\tby mx.example.test")
    assert body_of(raw) == b"Subject: test\r\n\r\nhello\r\n"


async def test_null_sender_is_accepted_but_not_as_recipient(elemta_server):
    server = await elemta_server()
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        assert (await c.cmd("MAIL FROM:<>")).code == 250
        reply = await c.cmd("RCPT TO:<>")
        assert reply.code in (501, 553) and reply.enhanced
        assert (await c.cmd("RCPT TO:<Postmaster>")).code == 250


@pytest.mark.parametrize("line, code, enhanced", [
    ("MAIL FROM:a@b.example", 501, "5.5.4"),
    ("MAIL FROM:<a@b.example", 501, None),
    ("MAIL TO:<a@b.example>", 501, "5.5.4"),
    ("MAIL FROM:<" + "l" * 65 + "@b.example>", 553, "5.1.7"),
    ("MAIL FROM:<a@" + ".".join(["d" * 63] * 4) + ">", 553, "5.1.7"),
    ("MAIL FROM:<a@b.example> FROB=1", 555, "5.5.4"),
    ("MAIL FROM:<a@b.example> BODY=9BIT", 501, "5.5.4"),
    ("MAIL FROM:<a@b.example> SIZE=abc", 501, "5.5.4"),
    ("MAIL FROM:<jörg@b.example>", 553, "5.6.7"),
])
async def test_malformed_mail_from_is_refused(elemta_server, line, code, enhanced):
    server = await elemta_server()
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        reply = await c.cmd(line)
        assert reply.code == code, str(reply)
        if enhanced:
            assert reply.enhanced == enhanced
        assert (await c.cmd("MAIL FROM:<ok@b.example>")).code == 250, "session still usable"


@pytest.mark.parametrize("line, code", [
    ("RCPT TO:user@example.test", 501),
    ("RCPT TO:<" + "l" * 65 + "@example.test>", 553),
    ("RCPT TO:<user>", 553),
    ("RCPT TO:<user@example.test> XFOO=1", 555),
    ("RCPT TO:<user@example.test> NOTIFY=NEVER,SUCCESS", 501),
    ("RCPT TO:<us er@example.test>", 553),
])
async def test_malformed_rcpt_to_is_refused(elemta_server, line, code):
    server = await elemta_server()
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        await c.cmd("MAIL FROM:<a@b.example>")
        reply = await c.cmd(line)
        assert reply.code == code, str(reply)
        assert reply.enhanced
        assert (await c.cmd("RCPT TO:<ok@example.test>")).code == 250


async def test_mail_parameters_are_parsed(elemta_server):
    server = await elemta_server()
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        assert (await c.cmd("MAIL FROM:<jörg@b.example> BODY=8BITMIME SMTPUTF8 SIZE=100")).code == 250
        assert (await c.cmd("RCPT TO:<jürgen@example.test>")).code == 250
        await c.cmd("DATA")
        await c.send("Subject: ü\r\n\r\nÜber\r\n.\r\n".encode())
        assert (await c.read_reply()).code == 250
    [env] = spooled(server)
    assert env["mail_params"] == {"BODY": "8BITMIME", "SMTPUTF8": None, "SIZE": "100"}
    assert env["sender"] == "jörg@b.example"


async def test_mail_parameters_need_ehlo(elemta_server):
    server = await elemta_server()
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("HELO client.example")
        assert (await c.cmd("MAIL FROM:<a@b.example> SIZE=10")).code == 555


# ------------------------------------------------------------------ limits


async def test_size_parameter_over_the_limit_is_552_and_session_goes_on(elemta_server):
    server = await elemta_server({"server": {"max_message_bytes": 1000}})
    async with RawSMTP(server.port("mx")) as c:
        ehlo = await c.cmd("EHLO client.example")
        assert "SIZE 1000" in ehlo.lines
        assert str(await c.cmd("MAIL FROM:<a@b.example> SIZE=1001")).startswith("552 5.3.4")
        assert (await c.send_message("a@b.example", ["u@example.test"], MSG)).code == 250


async def test_data_over_the_limit_is_552_after_the_data_and_session_goes_on(elemta_server):
    server = await elemta_server({"server": {"max_message_bytes": 1000}})
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        big = b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n"
        reply = await c.send_message("a@b.example", ["u@example.test"], big * 50 + b".\r\n")
        assert str(reply).startswith("552 5.3.4")
        assert (await c.send_message("a@b.example", ["u@example.test"], MSG)).code == 250
    assert len(spooled(server)) == 1
    assert list((server.spool_path / "tmp").iterdir()) == []


async def test_recipients_over_the_limit_get_452(elemta_server):
    server = await elemta_server({"server": {"max_recipients": 3}})
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        await c.cmd("MAIL FROM:<a@b.example>")
        codes = [(await c.cmd(f"RCPT TO:<u{i}@example.test>")) for i in range(5)]
        assert [r.code for r in codes] == [250, 250, 250, 452, 452]
        assert codes[3].enhanced == "4.5.3"
        await c.cmd("DATA")
        await c.send(MSG)
        assert (await c.read_reply()).code == 250
    assert len(spooled(server)[0]["recipients"]) == 3


async def test_command_line_too_long_is_500_and_session_goes_on(elemta_server):
    server = await elemta_server()
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        reply = await c.cmd("NOOP " + "x" * 100_000)
        assert str(reply).startswith("500 5.5.2")
        assert (await c.cmd("NOOP")).code == 250


async def test_too_many_bad_commands_disconnect(elemta_server):
    server = await elemta_server({"server": {"max_bad_commands": 3}})
    async with RawSMTP(server.port("mx")) as c:
        assert (await c.cmd("FOO")).code == 500
        assert (await c.cmd("BAR")).code == 500
        assert str(await c.cmd("BAZ")).startswith("500")
        assert str(await c.read_reply()).startswith("421 4.7.0")
        assert await c.closed()


async def test_idle_client_gets_421_4_4_2(elemta_server):
    server = await elemta_server({"server": {"command_timeout_seconds": 0.3}})
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        reply = await c.read_reply()
        assert reply.code == 421 and reply.enhanced == "4.4.2"
        assert await c.closed()


async def test_stalled_data_gets_421_4_4_2(elemta_server):
    server = await elemta_server({"server": {"data_timeout_seconds": 0.3}})
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        await c.cmd("MAIL FROM:<a@b.example>")
        await c.cmd("RCPT TO:<u@example.test>")
        await c.cmd("DATA")
        await c.send(b"Subject: slow\r\n\r\npart")
        reply = await c.read_reply()
        assert reply.code == 421 and reply.enhanced == "4.4.2"
    await asyncio.sleep(0.1)
    assert spooled(server) == []
    assert list((server.spool_path / "tmp").iterdir()) == []


async def test_per_ip_connection_limit_answers_421(elemta_server):
    server = await elemta_server({"server": {"max_connections_per_ip": 2}})
    port = server.port("mx")
    async with RawSMTP(port) as a, RawSMTP(port) as b:
        assert a.greeting.code == b.greeting.code == 220
        c = RawSMTP(port)
        greeting = await c.connect()
        assert greeting.code == 421 and greeting.enhanced == "4.7.0"
        assert await c.closed()
    await asyncio.sleep(0.1)
    async with RawSMTP(port) as d:
        assert d.greeting.code == 220, "slots are released when sessions end"


async def test_global_connection_limit_answers_421(elemta_server):
    server = await elemta_server({"server": {"max_connections": 1}})
    async with RawSMTP(server.port("mx")) as a:
        assert a.greeting.code == 220
        other = RawSMTP(server.port("submission"))
        assert (await other.connect()).code == 421
        other.close()


# ------------------------------------------------------------------ DATA content


async def test_long_lines_are_accepted_byte_exact(elemta_server):
    server = await elemta_server()
    line = b"y" * 5000
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        reply = await c.send_message("a@b.example", ["u@example.test"],
                                     b"Subject: long\r\n\r\n" + line + b"\r\nend\r\n.\r\n")
        assert reply.code == 250
    [env] = spooled(server)
    assert body_of(content(server, env["id"])) == b"Subject: long\r\n\r\n" + line + b"\r\nend\r\n"


async def test_dot_stuffing_is_undone_and_an_empty_message_is_accepted(elemta_server):
    server = await elemta_server()
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        r1 = await c.send_message("a@b.example", ["u@example.test"],
                                  b"..starts with a dot\r\n...two\r\n.\r\n")
        r2 = await c.send_message("a@b.example", ["u@example.test"], b".\r\n")
        assert r1.code == r2.code == 250
    bodies = {e["id"]: body_of(content(server, e["id"])) for e in spooled(server)}
    assert sorted(bodies.values()) == [b"", b".starts with a dot\r\n..two\r\n"]


@pytest.mark.parametrize("smuggle", [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r"])
async def test_bare_lf_or_cr_never_ends_data(elemta_server, smuggle):
    """SMTP smuggling: only CRLF . CRLF ends DATA; the rest is refused as a whole."""
    server = await elemta_server()
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        payload = (b"Subject: a\r\n\r\nfirst" + smuggle +
                   b"MAIL FROM:<evil@b.example>\r\nRCPT TO:<victim@example.test>\r\n"
                   b"DATA\r\nSubject: smuggled\r\n\r\n.\r\n")
        reply = await c.send_message("a@b.example", ["u@example.test"], payload)
        assert str(reply).startswith("550 5.5.2"), str(reply)
        assert (await c.cmd("NOOP")).code == 250, "no smuggled commands were run"
    assert spooled(server) == []


async def test_bare_newlines_can_be_normalized(elemta_server):
    server = await elemta_server({"server": {"bare_newline": "normalize"}})
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        reply = await c.send_message("a@b.example", ["u@example.test"],
                                     b"Subject: a\r\n\r\none\ntwo\rthree\n.\nfour\r\n.\r\n")
        assert reply.code == 250
    [env] = spooled(server)
    assert body_of(content(server, env["id"])) == (
        b"Subject: a\r\n\r\none\r\ntwo\r\nthree\r\n.\r\nfour\r\n")


async def test_client_disconnecting_during_data_leaves_nothing(elemta_server):
    server = await elemta_server({"spool": {"memory_bytes": 0}})
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        await c.cmd("MAIL FROM:<a@b.example>")
        await c.cmd("RCPT TO:<u@example.test>")
        await c.cmd("DATA")
        await c.send(b"Subject: cut\r\n\r\n" + b"z" * 200_000)
    for _ in range(50):
        if not list((server.spool_path / "tmp").iterdir()):
            break
        await asyncio.sleep(0.05)
    assert list((server.spool_path / "tmp").iterdir()) == []
    assert spooled(server) == []


# ------------------------------------------------------------------ relay policy


async def test_foreign_recipient_without_auth_is_relay_denied(elemta_server):
    server = await elemta_server()
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        await c.cmd("MAIL FROM:<a@b.example>")
        assert str(await c.cmd("RCPT TO:<x@elsewhere.example>")) == "550 5.7.1 Relaying denied"
        assert (await c.cmd("RCPT TO:<x@EXAMPLE.test>")).code == 250


async def test_relay_networks_may_relay(elemta_server):
    server = await elemta_server({"server": {"relay_networks": ["127.0.0.0/8"]}})
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        await c.cmd("MAIL FROM:<a@b.example>")
        assert (await c.cmd("RCPT TO:<x@elsewhere.example>")).code == 250


# ------------------------------------------------------------------ STARTTLS


async def test_starttls_resets_the_session_and_cannot_be_repeated(elemta_server):
    server = await elemta_server()
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        await c.cmd("MAIL FROM:<a@b.example>")
        assert str(await c.starttls(unverified_context())).startswith("220 2.0.0")
        assert (await c.cmd("MAIL FROM:<a@b.example>")).code == 503, "EHLO again after TLS"
        ehlo = await c.cmd("EHLO client.example")
        assert "STARTTLS" not in ehlo.lines
        assert str(await c.cmd("STARTTLS")).startswith("503 5.5.1")
        reply = await c.send_message("a@b.example", ["u@example.test"], MSG)
        assert reply.code == 250
    [env] = spooled(server)
    assert env["tls"]["version"] in ("TLSv1.2", "TLSv1.3")
    raw = content(server, env["id"])
    assert b"with ESMTPS id" in raw and b"cipher=" in raw


async def test_commands_pipelined_with_starttls_are_discarded(elemta_server):
    """CVE-2024-34083 style: plaintext sent after STARTTLS must not run inside TLS."""
    server = await elemta_server()
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        await c.send("STARTTLS\r\nMAIL FROM:<injected@b.example>\r\n")
        assert (await c.read_reply()).code == 220
        await c.writer.start_tls(unverified_context(), server_hostname="localhost")
        await c.cmd("EHLO client.example")
        assert (await c.cmd("RCPT TO:<u@example.test>")).code == 503, "no injected MAIL"


async def test_broken_tls_handshake_is_logged_and_closed(elemta_server):
    server = await elemta_server()
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        assert (await c.cmd("STARTTLS")).code == 220
        await c.send(b"this is not a TLS client hello\r\n" * 10)
        assert await c.closed()
    async with RawSMTP(server.port("mx")) as c:
        assert (await c.cmd("EHLO client.example")).code == 250, "server still serves"


async def test_submission_requires_starttls_then_auth(elemta_server):
    server = await elemta_server(plugins=[("auth", Auth())])
    async with RawSMTP(server.port("submission")) as c:
        ehlo = await c.cmd("EHLO client.example")
        assert "STARTTLS" in ehlo.lines
        assert not any(line.startswith("AUTH") for line in ehlo.lines)
        assert str(await c.cmd("MAIL FROM:<alice@example.test>")).startswith("530 5.7.0")
        assert str(await c.cmd(f"AUTH PLAIN {plain('alice', 'secret')}")).startswith("530 5.7.0")
        await c.starttls(unverified_context())
        ehlo = await c.cmd("EHLO client.example")
        assert "AUTH PLAIN LOGIN" in ehlo.lines
        assert str(await c.cmd("MAIL FROM:<alice@example.test>")).startswith("530 5.7.0")
        assert (await c.cmd(f"AUTH PLAIN {plain('alice', 'secret')}")).code == 235
        reply = await c.send_message("alice@example.test", ["bob@elsewhere.example"], MSG)
        assert reply.code == 250, "authenticated sessions may relay"
    [env] = spooled(server)
    assert env["auth"] == "alice"
    raw = content(server, env["id"])
    assert b"with ESMTPSA id" in raw
    assert b"alice" not in raw.split(b"\r\n\r\n")[0].split(b"Received:")[1][:300]


async def test_auth_on_plaintext_smtp_listener_is_538(elemta_server):
    server = await elemta_server(plugins=[("auth", Auth())])
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        assert str(await c.cmd(f"AUTH PLAIN {plain('alice', 'secret')}")).startswith("538 5.7.11")


# ------------------------------------------------------------------ AUTH


async def _tls_session(server, listener="submission"):
    c = RawSMTP(server.port(listener))
    await c.connect()
    await c.cmd("EHLO client.example")
    await c.starttls(unverified_context())
    await c.cmd("EHLO client.example")
    return c


async def test_auth_without_any_datasource_is_not_offered_and_never_succeeds(elemta_server):
    server = await elemta_server()
    c = await _tls_session(server)
    assert not any(line.startswith("AUTH") for line in (await c.cmd("EHLO c.example")).lines)
    assert str(await c.cmd(f"AUTH PLAIN {plain('alice', 'secret')}")).startswith("502 5.5.1")
    c.close()


async def test_auth_plain_and_login_dialogues(elemta_server):
    server = await elemta_server(plugins=[("auth", Auth())])
    c = await _tls_session(server)
    assert (await c.cmd("AUTH PLAIN")).code == 334
    assert (await c.cmd(plain("alice", "wrong"))).code == 535
    assert (await c.cmd("AUTH LOGIN")).text == "VXNlcm5hbWU6"
    assert (await c.cmd(base64.b64encode(b"alice").decode())).text == "UGFzc3dvcmQ6"
    assert str(await c.cmd(base64.b64encode(b"secret").decode())).startswith("235 2.7.0")
    assert (await c.cmd(f"AUTH PLAIN {plain('alice', 'secret')}")).code == 503
    c.close()


@pytest.mark.parametrize("line, answer, code", [
    ("AUTH PLAIN", "*", 501),
    ("AUTH PLAIN", "not base64!", 501),
    ("AUTH PLAIN", base64.b64encode(b"no-nuls").decode(), 501),
    ("AUTH CRAM-MD5", None, 504),
    ("AUTH", None, 501),
])
async def test_malformed_auth_is_refused(elemta_server, line, answer, code):
    server = await elemta_server(plugins=[("auth", Auth())])
    c = await _tls_session(server)
    reply = await c.cmd(line)
    if answer is not None:
        assert reply.code == 334
        reply = await c.cmd(answer)
    assert reply.code == code and reply.enhanced, str(reply)
    assert (await c.cmd(f"AUTH PLAIN {plain('alice', 'secret')}")).code == 235
    c.close()


async def test_repeated_auth_failures_disconnect(elemta_server):
    server = await elemta_server({"server": {"max_auth_failures": 2}}, plugins=[("auth", Auth())])
    c = await _tls_session(server)
    assert (await c.cmd(f"AUTH PLAIN {plain('alice', 'x')}")).code == 535
    assert (await c.cmd(f"AUTH PLAIN {plain('alice', 'y')}")).code == 535
    assert str(await c.read_reply()).startswith("421 4.7.0")
    assert await c.closed()


async def test_auth_password_never_reaches_the_log(elemta_server, caplog):
    server = await elemta_server(plugins=[("auth", Auth())])
    caplog.set_level("DEBUG")
    c = await _tls_session(server)
    await c.cmd(f"AUTH PLAIN {plain('alice', 'hunter2-secret')}")
    await c.cmd("AUTH LOGIN")
    await c.cmd(base64.b64encode(b"alice").decode())
    await c.cmd(base64.b64encode(b"hunter3-secret").decode())
    c.close()
    text = caplog.text
    assert "hunter2" not in text and "hunter3" not in text
    assert plain("alice", "hunter2-secret") not in text


async def test_implicit_tls_listener(elemta_server):
    server = await elemta_server(plugins=[("auth", Auth())])
    async with RawSMTP(server.port("smtps"), tls=unverified_context()) as c:
        assert c.greeting.code == 220
        ehlo = await c.cmd("EHLO client.example")
        assert "STARTTLS" not in ehlo.lines and "AUTH PLAIN LOGIN" in ehlo.lines
        assert (await c.cmd(f"AUTH PLAIN {plain('alice', 'secret')}")).code == 235
        assert (await c.send_message("alice@example.test", ["b@elsewhere.example"], MSG)).code == 250
    [env] = spooled(server)
    assert env["tls"]["implicit"] is True


async def test_plaintext_client_on_implicit_tls_port_is_dropped(elemta_server):
    server = await elemta_server()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port("smtps"))
    writer.write(b"EHLO client.example\r\n")
    data = await asyncio.wait_for(reader.read(100), 10)
    assert not data.startswith(b"250")
    writer.close()


async def test_one_log_line_per_transaction_with_its_queue_id(elemta_server, caplog):
    server = await elemta_server()
    caplog.set_level("INFO", logger="elemta.smtp")
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        reply = await c.send_message("a@b.example", ["u@example.test"], MSG)
        await c.cmd("MAIL FROM:<a@b.example>")
        await c.cmd("RCPT TO:<x@elsewhere.example>")
    queue_id = reply.text.rsplit(" ", 1)[1]
    lines = [r.getMessage() for r in caplog.records if queue_id in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith(f"{queue_id}: queued from=<a@b.example> nrcpt=1")
    refused = [r.getMessage() for r in caplog.records if "rcpt refused with 550" in r.getMessage()]
    assert len(refused) == 1 and "from=<a@b.example>" in refused[0]


# ------------------------------------------------------------------ postmaster (RFC 5321 §4.5.1)


class RefuseEveryone:
    @hookimpl
    def rcpt(self, recipient):
        return Reject(550, "5.1.1", "No such user")


@pytest.mark.parametrize("rcpt", ["Postmaster", "POSTMASTER", "postmaster@mx.example.test",
                                  "PostMaster@example.test"])
async def test_postmaster_is_always_accepted_and_goes_to_the_configured_mailbox(
        elemta_server, elemta_outbox, rcpt):
    server = await elemta_server({"server": {"postmaster": "admin@example.test"}},
                                 plugins=[("refuse", RefuseEveryone())], outbox=elemta_outbox)

    sent = await send_mail(server, "someone@remote.example", [rcpt], "Subject: hi\n\nhi\n")

    assert sent.accepted, sent.replies
    [delivered] = await elemta_outbox.wait(1)
    assert delivered.recipients == ["admin@example.test"]
    assert delivered.route.transport == "local"  # never looked up as a domain
    assert delivered.envelope.recipients[0].original.lower() == rcpt.lower()


async def test_postmaster_defaults_to_the_first_local_domain(elemta_server, elemta_outbox):
    server = await elemta_server(outbox=elemta_outbox)
    assert (await send_mail(server, "a@remote.example", ["Postmaster"], "x\n")).accepted
    [delivered] = await elemta_outbox.wait(1)
    assert delivered.recipients == ["postmaster@example.test"]


async def test_postmaster_at_a_foreign_domain_is_not_relayed(elemta_server):
    server = await elemta_server()
    sent = await send_mail(server, "a@remote.example", ["postmaster@foreign.example"], "x\n")
    assert (sent.reply.code, sent.reply.enhanced) == (550, "5.7.1")


def test_postmaster_setting_must_be_an_address():
    with pytest.raises(ConfigError, match="postmaster must be a mail address"):
        parse_settings('[server]\npostmaster = "admin"\n', Path("e.toml"))


async def test_relay_networks_set_relay_allowed_before_any_plugin_is_asked(elemta_server):
    from elemta import hookimpl

    seen = []

    class Watch:
        @hookimpl
        def connect(self, session):
            seen.append((session.peer_ip, session.relay_allowed))

    server = await elemta_server({"server": {"relay_networks": ["127.0.0.2/32"]}},
                                 plugins=[("watch", Watch())])
    for source in ("127.0.0.2", "127.0.0.3"):
        async with RawSMTP(server.port("mx"), source=source) as c:
            await c.cmd("QUIT")
    assert seen == [("127.0.0.2", True), ("127.0.0.3", False)]


async def test_a_nul_in_data_is_refused_after_the_message_is_read(elemta_server):
    """RFC 5322 §2.1: no NUL in a message; refused (554 5.6.0), not silently stripped, and
    the session goes on."""
    server = await elemta_server()
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        reply = await c.send_message("a@example.org", ["b@example.test"],
                                     b"Subject: nul\r\n\r\nbefore\0after\r\n.\r\n")
        assert (reply.code, reply.enhanced) == (554, "5.6.0"), reply
        assert (await c.send_message("a@example.org", ["b@example.test"],
                                     b"Subject: fine\r\n\r\nok\r\n.\r\n")).code == 250
    server.app.spool.wait_written()
    assert len(list((server.spool_path / "ready").glob("*.json"))) == 1
