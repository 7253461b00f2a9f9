"""elemta-lmtp end to end: a real server in the test's loop delivering to aiosmtpd's LMTP.

Mail is sent with aiosmtplib to the MX listener; bounces go through
``[delivery.routes]`` to an SMTP sink standing in for the sender's MX.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
from pathlib import Path

import aiosmtplib
import pytest

from elemta import Route, hookimpl
from elemta.testing import Sink, parse_dsn
from elemta_lmtp.testing import LMTPSink

SENDER = "alice@origin.example"
MSG = b"Subject: hello\r\nMessage-ID: <m1@origin.example>\r\n\r\nbody\r\n"


def lmtp_config(address: str, bounces: Sink | None = None, **lmtp) -> dict:
    delivery: dict = {"enabled": True, "workers": 4, "retry_intervals_seconds": [0.3]}
    if bounces is not None:
        delivery["routes"] = {"origin.example": {"host": bounces.address, "tls": "none"}}
    return {"delivery": delivery, "plugins": {"lmtp": {"address": address, **lmtp}}}


async def submit(server, rcpts: list[str], data: bytes = MSG, **options) -> str:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=server.port("mx"), start_tls=False) as client:
        errors, reply = await client.sendmail(SENDER, rcpts, data, **options)
    assert not errors, errors
    await server.app.spool.checkpoint()  # hand it to the runner now, not at the next tick
    return reply.rsplit(" ", 1)[1]


def envelope(server, queue_id: str) -> tuple[str | None, dict | None]:
    for state in ("ready", "deferred", "hold", "failed"):
        path = server.spool_path / state / f"{queue_id}.json"
        if path.exists():
            return state, json.loads(path.read_bytes())
    return None, None


async def wait_gone(server, queue_id: str, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while envelope(server, queue_id)[0] is not None:
            await asyncio.sleep(0.02)


async def wait_deferred(server, queue_id: str, timeout: float = 10.0) -> dict:
    async with asyncio.timeout(timeout):
        while True:
            state, env = envelope(server, queue_id)
            if state == "deferred" and env["attempts"] >= 1:
                return env
            await asyncio.sleep(0.01)


class Watch:
    """Records every outcome the runner applies to a local recipient (not to bounces)."""

    def __init__(self) -> None:
        self.outcomes: list[tuple[str, str, int, str, str | None]] = []

    async def settled(self, n: int, timeout: float = 5.0) -> None:
        """Wait for ``n`` outcomes: delivered/bounced come after the envelope is rewritten."""
        async with asyncio.timeout(timeout):
            while len(self.outcomes) < n:
                await asyncio.sleep(0.01)

    def _record(self, fate: str, recipient, outcome) -> None:
        if recipient.address.endswith("@example.test"):
            self.outcomes.append((fate, recipient.address, outcome.code, outcome.text,
                                  outcome.remote))

    @hookimpl
    def delivered(self, recipient, outcome):
        self._record("delivered", recipient, outcome)

    @hookimpl
    def deferred(self, recipient, outcome):
        self._record("deferred", recipient, outcome)

    @hookimpl
    def bounced(self, recipient, outcome):
        self._record("bounced", recipient, outcome)


@pytest.fixture
def socket_path(tmp_path: Path) -> Path:
    """Where the first ``elemta_server`` of a test keeps its ``elemta.toml`` (and a socket)."""
    return tmp_path / "server0" / "lmtp.sock"


# ------------------------------------------------------------------ transports


async def test_lmtp_delivery_over_a_unix_socket_is_byte_exact(elemta_server, socket_path):
    content = (b"From: alice@origin.example\r\nTo: bob@example.test\r\n"
               b"Subject: caf\xc3\xa9 8-bit\r\nMessage-ID: <exact@origin.example>\r\n\r\n"
               b".a line starting with a dot\r\n..two dots\r\n.\r\n"
               b"\xc3\xa9t\xc3\xa9 \xe2\x82\xac 8-bit text\r\n"
               + b"x" * 998 + b"\r\n\r\n  trailing blanks  \r\nlast line\r\n")
    watch = Watch()
    socket_path.parent.mkdir(parents=True)
    async with LMTPSink(path=str(socket_path)) as lmtp:
        # a relative socket path is relative to the folder of elemta.toml
        server = await elemta_server(lmtp_config("unix:lmtp.sock"), enabled=["lmtp"],
                                     plugins=[("watch", watch)])
        queue_id = await submit(server, ["bob@example.test"], content,
                                mail_options=["BODY=8BITMIME"])
        [got] = await lmtp.wait_for(1)
        await wait_gone(server, queue_id)
        await watch.settled(1)
    assert got.recipient == "bob@example.test" and got.sender == SENDER
    assert got.content.endswith(b"\r\n" + content) and got.content.startswith(b"Received: ")
    assert "BODY=8BITMIME" in got.mail_options
    assert lmtp.lhlo == ["mx.example.test"]  # [server] hostname
    # a socket path names no mail server: the LMTP server is named after this host
    assert watch.outcomes == [("delivered", "bob@example.test", 250,
                               "<bob@example.test> Saved", "mx.example.test")]


@pytest.mark.parametrize("offered", [True, False])
async def test_lmtp_smtputf8_message_is_delivered_whether_offered_or_not(elemta_server, offered):
    content = b"Subject: =?utf-8?q?x?= caf\xc3\xa9\r\nFrom: \xc3\xa9l\xc3\xa8ve <a@origin.example>\r\n\r\nbody\r\n"
    async with LMTPSink(smtputf8=offered) as lmtp:
        server = await elemta_server(lmtp_config(lmtp.address), enabled=["lmtp"])
        queue_id = await submit(server, ["bob@example.test"], content,
                                mail_options=["SMTPUTF8", "BODY=8BITMIME"])
        [got] = await lmtp.wait_for(1)
        await wait_gone(server, queue_id)
    assert got.content.endswith(content)
    assert ("SMTPUTF8" in got.mail_options) == offered


async def test_lmtp_delivery_over_tcp_one_transaction_for_all_recipients(elemta_server):
    async with LMTPSink() as lmtp:
        server = await elemta_server(lmtp_config(lmtp.address, lhlo_name="relay.example.test"),
                                     enabled=["lmtp"])
        queue_id = await submit(server, ["bob@example.test", "carol@example.test"])
        await lmtp.wait_for(2)
        await wait_gone(server, queue_id)
    assert sorted(s.recipient for s in lmtp.stored) == ["bob@example.test", "carol@example.test"]
    assert lmtp.stored[0].content == lmtp.stored[1].content
    assert lmtp.stored[0].content.endswith(b"\r\n" + MSG)
    assert lmtp.sessions == 1 and lmtp.lhlo == ["relay.example.test"]


# ------------------------------------------------------------------ per-recipient replies


async def test_lmtp_each_recipient_gets_its_own_reply_after_data(elemta_server):
    watch = Watch()
    async with LMTPSink() as lmtp, Sink() as origin:
        lmtp.data_replies["later@example.test"] = ["452 4.2.2 <later@example.test> Mailbox full"]
        lmtp.data_replies["gone@example.test"] = "550 5.1.1 <gone@example.test> User unknown"
        server = await elemta_server(lmtp_config(lmtp.address, bounces=origin),
                                     enabled=["lmtp"], plugins=[("watch", watch)])
        queue_id = await submit(server, ["ok@example.test", "later@example.test",
                                         "gone@example.test"])
        env = await wait_deferred(server, queue_id)
        fates = {r["address"]: r["state"] for r in env["recipients"]}
        assert fates == {"ok@example.test": "delivered", "later@example.test": "pending",
                         "gone@example.test": "failed"}
        assert "452 4.2.2" in env["recipients"][1]["last_error"]
        [bounce] = await origin.wait_for(1)
        await wait_gone(server, queue_id)  # the retry delivers the deferred one
        await watch.settled(4)
    assert lmtp.delivered("ok@example.test") == [lmtp.stored[0].content]  # never redelivered
    assert len(lmtp.delivered("later@example.test")) == 1
    assert lmtp.delivered("gone@example.test") == []
    assert [s.session for s in lmtp.stored] == [1, 1]  # the retry reused the session
    assert bounce.sender == "" and bounce.recipients == [SENDER]
    [fields] = parse_dsn(bounce.content)
    assert fields["Final-Recipient"] == "rfc822; gone@example.test"
    assert fields["Action"] == "failed" and fields["Status"] == "5.1.1"
    assert fields["Diagnostic-Code"] == "smtp; 550 5.1.1 <gone@example.test> User unknown"
    assert [o[:3] for o in watch.outcomes] == [
        ("deferred", "later@example.test", 452), ("bounced", "gone@example.test", 550),
        ("delivered", "ok@example.test", 250), ("delivered", "later@example.test", 250)]


async def test_lmtp_a_recipient_refused_at_rcpt_bounces_with_that_reply(elemta_server):
    watch = Watch()
    async with LMTPSink() as lmtp, Sink() as origin:
        lmtp.rcpt_replies["ghost@example.test"] = "550 5.1.1 <ghost@example.test> Unknown user"
        server = await elemta_server(lmtp_config(lmtp.address, bounces=origin),
                                     enabled=["lmtp"], plugins=[("watch", watch)])
        queue_id = await submit(server, ["ghost@example.test", "bob@example.test"])
        [bounce] = await origin.wait_for(1)
        await wait_gone(server, queue_id)
        await watch.settled(2)
    assert [s.recipient for s in lmtp.stored] == ["bob@example.test"]
    assert sorted(o[:4] for o in watch.outcomes) == [
        ("bounced", "ghost@example.test", 550, "<ghost@example.test> Unknown user"),
        ("delivered", "bob@example.test", 250, "<bob@example.test> Saved")]
    assert parse_dsn(bounce.content)[0]["Final-Recipient"] == "rfc822; ghost@example.test"


async def test_lmtp_a_bounce_names_this_host_not_the_socket(elemta_server, socket_path):
    """A socket path is no mail server's name: Remote-MTA is ``[server] hostname``."""
    socket_path.parent.mkdir(parents=True)
    async with LMTPSink(path=str(socket_path)) as lmtp, Sink() as origin:
        lmtp.data_replies["gone@example.test"] = "550 5.1.1 <gone@example.test> User unknown"
        server = await elemta_server(lmtp_config(f"unix:{socket_path}", bounces=origin),
                                     enabled=["lmtp"])
        queue_id = await submit(server, ["gone@example.test"])
        [bounce] = await origin.wait_for(1)
        await wait_gone(server, queue_id)
    [fields] = parse_dsn(bounce.content)
    assert fields["Remote-MTA"] == "dns; mx.example.test"
    text = email.message_from_bytes(bounce.content, policy=email.policy.default)
    shown = "".join(p.get_content() for p in text.walk() if p.get_content_maintype() == "text")
    assert "reply from mx.example.test:" in shown
    assert str(socket_path) not in shown and "lmtp:unix" not in shown


# ------------------------------------------------------------------ server down, reuse


async def test_lmtp_server_down_defers_then_delivers_once_it_is_up(elemta_server, socket_path):
    socket_path.parent.mkdir(parents=True)
    lmtp = LMTPSink(path=str(socket_path))
    server = await elemta_server(lmtp_config(f"unix:{socket_path}"), enabled=["lmtp"])
    queue_id = await submit(server, ["bob@example.test", "carol@example.test"])
    env = await wait_deferred(server, queue_id)
    for rcpt in env["recipients"]:
        assert rcpt["state"] == "pending"
        assert rcpt["last_error"].startswith(
            "451 4.4.1 connect to the LMTP server on mx.example.test: ")
        assert str(socket_path) not in rcpt["last_error"]
    async with lmtp:
        await lmtp.wait_for(2)
        await wait_gone(server, queue_id)
    assert sorted(s.recipient for s in lmtp.stored) == ["bob@example.test", "carol@example.test"]


@pytest.mark.parametrize("reuse, sessions", [(True, 1), (False, 3)])
async def test_lmtp_sessions_are_reused_across_messages(elemta_server, reuse, sessions):
    async with LMTPSink() as lmtp:
        server = await elemta_server(lmtp_config(lmtp.address, reuse_connections=reuse),
                                     enabled=["lmtp"])
        for n in range(3):
            queue_id = await submit(server, ["bob@example.test"], MSG + b"%d\r\n" % n)
            await lmtp.wait_for(n + 1)
            await wait_gone(server, queue_id)
        plugin = server.app.pm.get_plugin("lmtp")
        assert plugin.transport.idle_sessions == (1 if reuse else 0)
    assert lmtp.sessions == sessions
    assert [s.content.endswith(b"body\r\n%d\r\n" % n) for n, s in enumerate(lmtp.stored)] == [
        True] * 3


# ------------------------------------------------------------------ transport names


async def test_lmtp_delivers_only_the_routes_of_its_transport(elemta_server):
    class Router:
        @hookimpl
        def route(self, recipient):
            if recipient.address.startswith("imap-"):
                return Route(transport="dovecot", destination="example.test")
            return None

    async with LMTPSink() as lmtp:
        server = await elemta_server(lmtp_config(lmtp.address, transport="dovecot"),
                                     enabled=["lmtp"], plugins=[("router", Router())])
        local_id = await submit(server, ["bob@example.test"])  # transport "local": not ours
        routed_id = await submit(server, ["imap-bob@example.test"])
        await lmtp.wait_for(1)
        await wait_gone(server, routed_id)
        env = await wait_deferred(server, local_id)
    assert [s.recipient for s in lmtp.stored] == ["imap-bob@example.test"]
    assert "no transport accepted this route" in env["recipients"][0]["last_error"]
