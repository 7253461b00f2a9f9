"""What the sender hears back, by NOTIFY and RET (RFC 3461), ENVID and ORCPT in the reports.

Sinks stand in for the remote hosts: ``origin`` receives the reports, ``remote``
takes or refuses the message (it does not offer DSN, so success there is
"relayed"); a local transport plugin delivers ``example.test`` ("delivered").
"""

from __future__ import annotations

import asyncio

import pytest

from elemta import Outcome, hookimpl
from elemta.delivery.dsn import parse_dsn
from elemta.testing.client import RawSMTP
from elemta.testing.mail import run_cli
from elemta.testing.sink import Sink

MSG = (b"Subject: report me\r\nMessage-ID: <n1@origin.test>\r\n\r\n"
       b"the body, which only RET=FULL returns\r\n")


class Mailbox:
    """A local transport: every recipient of example.test is delivered."""

    @hookimpl
    def deliver(self, route, recipients):
        if route.transport != "local":
            return None
        return [Outcome(r.address, 250, "2.0.0", "saved to mailbox") for r in recipients]


def config(origin: Sink, remote: Sink, **delivery) -> dict:
    return {
        "server": {"relay_networks": ["127.0.0.0/8"]},
        "delivery": {"enabled": True, "workers": 2, "retry_intervals_seconds": [0.3],
                     "idle_connection_seconds": 0,
                     "routes": {"remote.test": {"host": remote.address, "tls": "none"},
                                "origin.test": {"host": origin.address, "tls": "none"}},
                     **delivery},
    }


async def submit(server, mail: str, *rcpts: str) -> str:
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.origin.test")
        for line in [f"MAIL FROM:<alice@origin.test>{mail}"] + [f"RCPT TO:<{r}" for r in rcpts]:
            reply = await c.cmd(line)
            assert reply.code == 250, (line, str(reply))
        assert (await c.cmd("DATA")).code == 354
        await c.send(MSG + b".\r\n")
        reply = await c.read_reply()
    assert reply.code == 250, str(reply)
    await server.app.spool.checkpoint()
    return reply.text.rsplit(" ", 1)[1]


async def gone(server, queue_id: str, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while any((server.spool_path / s / f"{queue_id}.json").exists()
                  for s in ("ready", "deferred")):
            await asyncio.sleep(0.02)


def parts(report: bytes) -> list[str]:
    import email
    import email.policy
    msg = email.message_from_bytes(report, policy=email.policy.default)
    return [p.get_content_type() for p in msg.iter_parts()]


async def test_success_reports_say_delivered_or_relayed_with_envid_and_orcpt(
        elemta_server):
    async with Sink() as origin, Sink() as remote:
        server = await elemta_server(config(origin, remote), plugins=[("mailbox", Mailbox())])
        queue_id = await submit(
            server, " ENVID=QQ314159+2Bx RET=FULL",
            "bob@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;robert@example.test",
            "carol@remote.test> NOTIFY=SUCCESS", "dave@remote.test>")
        await gone(server, queue_id)
        [report] = await origin.wait_for(1)
        await asyncio.sleep(0.3)
        assert len(origin.messages) == 1, "one report for the attempt"
    assert report.sender == "" and report.recipients == ["alice@origin.test"]
    by_rcpt = {f["Final-Recipient"]: f for f in parse_dsn(report.content)}
    assert set(by_rcpt) == {"rfc822; bob@example.test", "rfc822; carol@remote.test"}
    bob, carol = by_rcpt["rfc822; bob@example.test"], by_rcpt["rfc822; carol@remote.test"]
    assert (bob["Action"], bob["Status"]) == ("delivered", "2.0.0")
    assert bob["Original-Recipient"] == "rfc822; robert@example.test"
    assert (carol["Action"], carol["Status"]) == ("relayed", "2.0.0")
    assert carol["Remote-MTA"].startswith("dns; ")
    assert b"Original-Envelope-Id: QQ314159+x" in report.content
    # a success report returns headers only, whatever RET says
    assert parts(report.content)[-1] == "text/rfc822-headers"
    assert b"Subject: report me" in report.content
    assert b"only RET=FULL returns" not in report.content


async def test_no_success_report_unless_asked(elemta_server):
    async with Sink() as origin, Sink() as remote:
        server = await elemta_server(config(origin, remote), plugins=[("mailbox", Mailbox())])
        queue_id = await submit(server, "", "bob@example.test> NOTIFY=FAILURE",
                                "carol@remote.test>")
        await gone(server, queue_id)
        await asyncio.sleep(0.5)
    assert origin.messages == [] and len(remote.messages) == 1


@pytest.mark.parametrize("notify, reported", [
    ("", True), (" NOTIFY=FAILURE", True), (" NOTIFY=SUCCESS", False),
    (" NOTIFY=NEVER", False), (" NOTIFY=DELAY", False),
])
async def test_failure_reports_follow_notify(elemta_server, notify, reported):
    async with Sink() as origin, Sink() as remote:
        remote.rcpt_replies["bob@remote.test"] = "550 5.1.1 No such user"
        server = await elemta_server(config(origin, remote))
        queue_id = await submit(server, "", f"bob@remote.test>{notify}")
        await gone(server, queue_id)
        if reported:
            [bounce] = await origin.wait_for(1)
            [fields] = parse_dsn(bounce.content)
            assert (fields["Action"], fields["Status"]) == ("failed", "5.1.1")
        else:
            await asyncio.sleep(0.5)
            assert origin.messages == []


@pytest.mark.parametrize("notify, warned", [("", True), (" NOTIFY=FAILURE", False),
                                            (" NOTIFY=DELAY,FAILURE", True)])
async def test_delay_reports_follow_notify(elemta_server, notify, warned):
    async with Sink() as origin, Sink() as remote:
        remote.rcpt_replies["bob@remote.test"] = "451 4.3.0 Try later"
        # the notice goes out with the first attempt at least 0.1 s after arrival
        server = await elemta_server(config(origin, remote, delay_notice_after_seconds=0.1,
                                            retry_intervals_seconds=[0.2]))
        await submit(server, "", f"bob@remote.test>{notify}")
        if warned:
            [warning] = await origin.wait_for(1)
            [fields] = parse_dsn(warning.content)
            assert fields["Action"] == "delayed"
        else:
            await asyncio.sleep(1.0)
            assert origin.messages == []


@pytest.mark.parametrize("ret, whole", [(" RET=FULL", True), (" RET=HDRS", False), ("", False)])
async def test_ret_full_returns_the_message_and_hdrs_its_headers(elemta_server, ret, whole):
    async with Sink() as origin, Sink() as remote:
        remote.rcpt_replies["bob@remote.test"] = "550 5.1.1 No such user"
        server = await elemta_server(config(origin, remote))
        await submit(server, ret, "bob@remote.test>")
        [bounce] = await origin.wait_for(1)
    assert parts(bounce.content)[-1] == ("message/rfc822" if whole else "text/rfc822-headers")
    assert (b"only RET=FULL returns" in bounce.content) == whole
    assert b"Subject: report me" in bounce.content


async def test_queue_show_displays_the_dsn_parameters(elemta_server):
    server = await elemta_server({"server": {"relay_networks": ["127.0.0.0/8"]}})
    queue_id = await submit(server, " RET=HDRS ENVID=QQ314159+2Bx",
                            "bob@remote.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;robert@remote.test",
                            "carol@remote.test>")
    server.app.spool.wait_written()
    shown = await asyncio.to_thread(run_cli, "queue", "show", queue_id,
                                    config=server.config_path)
    assert shown.exit_code == 0, shown.stderr
    out = " ".join(shown.stdout.split())
    assert "DSN envelope ID QQ314159+x" in out
    assert "DSN returns headers only" in out
    assert "NOTIFY=SUCCESS,DELAY ORCPT=rfc822;robert@remote.test" in out


def test_ret_full_falls_back_to_headers_for_a_large_or_binary_message():
    from elemta.delivery.dsn import MAX_RETURNED_MESSAGE_BYTES, RecipientOutcome, build_dsn
    from elemta.spool.envelope import Envelope, RecipientState

    def bounce(content: bytes, **params: str) -> bytes:
        env = Envelope(id="Q1", sender="alice@origin.test",
                       recipients=[RecipientState("bob@remote.test")], received_at=0,
                       size=len(content), mail_params={"RET": "FULL", **params})
        built = build_dsn(envelope=env, outcomes=[RecipientOutcome(
            "bob@remote.test", "failed", "5.1.1", "550 5.1.1 no")], reporting_mta="mx.test",
            original_headers=content, now=0)
        assert built is not None
        return built[2]

    small = bounce(MSG)
    assert parts(small)[-1] == "message/rfc822" and b"only RET=FULL returns" in small
    big = MSG + b"z" * 76 * (MAX_RETURNED_MESSAGE_BYTES // 76)
    for report in (bounce(big), bounce(MSG + b"\0", BODY="BINARYMIME")):
        assert parts(report)[-1] == "text/rfc822-headers"
        text = b" ".join(report.replace(b"=\r\n", b"").split())
        assert b"zzzz" not in report and b"its header section is attached" in text
