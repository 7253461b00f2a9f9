"""DSN parameters (RFC 3461) in and out, BDAT to a real Postfix, SMTPUTF8 and BINARYMIME refusals.

Postfix (Debian's, a private instance on a loopback port, see ``postfix_instance.py``)
is the next hop: it offers CHUNKING and DSN but not BINARYMIME, and SMTPUTF8
only when told to.
"""

from __future__ import annotations

import asyncio

import pytest

from elemta.delivery.dsn import parse_dsn
from elemta.testing.client import RawSMTP
from elemta.testing.sink import Sink

from tests.postfix_instance import Postfix


MSG = b"Subject: relay me\r\nMessage-ID: <r1@origin.test>\r\n\r\n.a line with a dot\r\nbody\r\n"


def relay_config(postfix: Postfix, origin: Sink, **delivery) -> dict:
    return {
        "server": {"relay_networks": ["127.0.0.0/8"]},
        "delivery": {"enabled": True, "workers": 2, "retry_intervals_seconds": [0.3],
                     "idle_connection_seconds": 0,
                     "routes": {"remote.test": {"host": f"127.0.0.1:{postfix.port}",
                                                "tls": "none"},
                                "origin.test": {"host": origin.address, "tls": "none"}},
                     **delivery},
    }


async def submit(server, lines: list[str], content: bytes, bdat: bool = False) -> str:
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.origin.test")
        for line in lines:
            reply = await c.cmd(line)
            assert reply.code == 250, (line, str(reply))
        if bdat:
            await c.send(f"BDAT {len(content)} LAST\r\n".encode() + content)
        else:
            assert (await c.cmd("DATA")).code == 354
            await c.send(content.replace(b"\r\n.", b"\r\n..") + b".\r\n")
        reply = await c.read_reply()
    assert reply.code == 250, str(reply)
    await server.app.spool.checkpoint()
    return reply.text.rsplit(" ", 1)[1]


@pytest.mark.parametrize("line, code", [
    ("MAIL FROM:<a@origin.test> RET=FULL", 250),
    ("MAIL FROM:<a@origin.test> RET=hdrs", 250),
    ("MAIL FROM:<a@origin.test> RET=BODY", 501),
    ("MAIL FROM:<a@origin.test> RET", 501),
    ("MAIL FROM:<a@origin.test> ENVID=QQ314159+2Bx", 250),
    ("MAIL FROM:<a@origin.test> ENVID=" + "x" * 101, 501),
    ("MAIL FROM:<a@origin.test> ENVID=bad+zz", 501),
    ("MAIL FROM:<a@origin.test> ENVID=a+2b", 501),     # xtext hex is upper case
])
async def test_mail_dsn_parameters_are_checked(elemta_server, line, code):
    server = await elemta_server()
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.origin.test")
        reply = await c.cmd(line)
    assert reply.code == code, str(reply)
    if code == 501:
        assert reply.enhanced == "5.5.4"


@pytest.mark.parametrize("params, code", [
    ("NOTIFY=NEVER", 250),
    ("NOTIFY=success,delay", 250),
    ("NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=rfc822;bob+2Bx@remote.test", 250),
    ("ORCPT=utf-8;j\\x{F6}rg@remote.test", 250),
    ("NOTIFY=NEVER,FAILURE", 501),
    ("NOTIFY=SUCCESS,SUCCESS", 501),
    ("NOTIFY=SOMETIMES", 501),
    ("NOTIFY", 501),
    ("ORCPT=bob@remote.test", 501),       # no address type
    ("ORCPT=rfc822;", 501),
    ("ORCPT=rfc822;" + "b" * 500, 501),
    ("XNOTIFY=NEVER", 555),
])
async def test_rcpt_dsn_parameters_are_checked(elemta_server, params, code):
    server = await elemta_server({"server": {"relay_networks": ["127.0.0.0/8"]}})
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.origin.test")
        await c.cmd("MAIL FROM:<a@origin.test>")
        reply = await c.cmd(f"RCPT TO:<bob@remote.test> {params}")
        assert reply.code == code, str(reply)
        assert (await c.cmd("RCPT TO:<carol@remote.test>")).code == 250, "session goes on"


async def test_swaks_sends_dsn_parameters_that_are_kept_per_recipient(elemta_server,
                                                                      require_tool):
    swaks = require_tool("swaks")
    server = await elemta_server({"server": {"relay_networks": ["127.0.0.0/8"]}})
    # swaks has no DSN options; its --from/--to go verbatim between the angle brackets
    # (so the last parameter gets swaks' closing ">") and a comma splits recipients
    proc = await asyncio.create_subprocess_exec(
        swaks, "--server", "127.0.0.1", "--port", str(server.port("mx")),
        "--ehlo", "client.origin.test", "--from", "a@origin.test> RET=HDRS ENVID=env+2B1",
        "--to", "bob@remote.test> NOTIFY=SUCCESS ORCPT=rfc822;<robert@remote.test",
        "--header", "Subject: dsn", "--body", "hello",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, out.decode(errors="replace")
    server.app.spool.wait_written()
    [(_, env)] = list(server.app.spool.iter_envelopes("ready"))
    assert env.mail_params["RET"] == "HDRS" and env.mail_params["ENVID"] == "env+2B1>"
    [rcpt] = env.recipients
    assert rcpt.params == {"NOTIFY": "SUCCESS", "ORCPT": "rfc822;<robert@remote.test>"}


async def test_bdat_and_dsn_parameters_reach_postfix(elemta_server):
    async with Sink() as origin:
        with Postfix() as postfix:
            server = await elemta_server(relay_config(postfix, origin, chunking=True))
            await submit(server, ["MAIL FROM:<a@origin.test> RET=HDRS ENVID=env+2B7",
                                  "RCPT TO:<bob@remote.test> NOTIFY=SUCCESS,FAILURE "
                                  "ORCPT=rfc822;robert@remote.test",
                                  "RCPT TO:<carol@remote.test>"], MSG, bdat=True)
            [held] = await asyncio.to_thread(postfix.wait_held, 1)
            record = postfix.postcat(held["queue_id"])
            log = postfix.log()
    assert "envelope_id=env+7" in record        # Postfix decodes the xtext
    assert "ret_flags=2" in record              # HDRS
    assert "notify_flags=6" in record           # SUCCESS|FAILURE
    assert "dsn_orig_rcpt=rfc822;robert@remote.test" in record
    assert "\n.a line with a dot\nbody\n" in record, record
    commands = [line.split(": ", 2)[-1] for line in log.splitlines() if "]: BDAT " in line]
    assert commands and commands[-1].endswith(" LAST"), log[-2000:]
    assert not any("DATA" == line.rsplit(": ", 1)[-1] for line in log.splitlines())


async def test_without_chunking_configured_text_goes_with_data(elemta_server):
    async with Sink() as origin:
        with Postfix() as postfix:
            server = await elemta_server(relay_config(postfix, origin))
            await submit(server, ["MAIL FROM:<a@origin.test>", "RCPT TO:<bob@remote.test>"],
                         MSG, bdat=True)
            await asyncio.to_thread(postfix.wait_held, 1)
            log = postfix.log()
    assert "]: DATA" in log and "]: BDAT" not in log


async def test_utf8_addresses_to_a_server_without_smtputf8_bounce_with_5_6_7(elemta_server):
    async with Sink() as origin:
        with Postfix(smtputf8=False) as postfix:
            server = await elemta_server(relay_config(postfix, origin))
            await submit(server, ["MAIL FROM:<a@origin.test> SMTPUTF8",
                                  "RCPT TO:<jörg@remote.test>"], MSG)
            [bounce] = await origin.wait_for(1)
            held = postfix.held()
    assert held == [], "nothing may reach a server that cannot take UTF-8 addresses"
    [fields] = parse_dsn(bounce.content)
    assert fields["Action"] == "failed" and fields["Status"] == "5.6.7"
    assert fields["Diagnostic-Code"].startswith("X-Elemta; ") or "553" in fields[
        "Diagnostic-Code"]
    assert fields["Final-Recipient"] == "utf-8; j\\x{F6}rg@remote.test"


async def test_binary_content_to_a_server_without_binarymime_bounces_with_5_6_3(elemta_server):
    async with Sink() as origin:
        with Postfix() as postfix:
            server = await elemta_server(relay_config(postfix, origin))
            await submit(server, ["MAIL FROM:<a@origin.test> BODY=BINARYMIME",
                                  "RCPT TO:<bob@remote.test>"], MSG + b"\0\n\r", bdat=True)
            [bounce] = await origin.wait_for(1)
            held = postfix.held()
    assert held == []
    [fields] = parse_dsn(bounce.content)
    assert fields["Status"] == "5.6.3" and fields["Action"] == "failed"


async def test_no_success_report_when_the_next_hop_takes_the_dsn_parameters(
        elemta_server):
    async with Sink() as origin:
        with Postfix() as postfix:
            server = await elemta_server(relay_config(postfix, origin))
            queue_id = await submit(server, ["MAIL FROM:<a@origin.test>",
                                             "RCPT TO:<bob@remote.test> NOTIFY=SUCCESS"], MSG)
            [held] = await asyncio.to_thread(postfix.wait_held, 1)
            record = postfix.postcat(held["queue_id"])
            async with asyncio.timeout(10):
                while (server.spool_path / "ready" / f"{queue_id}.json").exists():
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
    assert "notify_flags=2" in record           # SUCCESS went on; Postfix reports from there
    assert origin.messages == []


@pytest.mark.parametrize("header, bounced", [
    ("Subject: caf\u00e9", True),     # UTF-8 in a header field: X.6.9, nothing sent
    ("Subject: plain", False),        # SMTPUTF8 asked for, nothing needs it: sent as it is
])
async def test_smtputf8_mail_with_ascii_addresses_to_a_server_without_it(elemta_server, header,
                                                                         bounced):
    async with Sink() as origin:
        with Postfix(smtputf8=False) as postfix:
            server = await elemta_server(relay_config(postfix, origin))
            await submit(server, ["MAIL FROM:<a@origin.test> SMTPUTF8",
                                  "RCPT TO:<bob@remote.test>"],
                         header.encode() + b"\r\n\r\nbody\r\n")
            if bounced:
                [bounce] = await origin.wait_for(1)
                [fields] = parse_dsn(bounce.content)
                assert (fields["Action"], fields["Status"]) == ("failed", "5.6.9")
                assert postfix.held() == []
            else:
                [held] = await asyncio.to_thread(postfix.wait_held, 1)
                assert "Subject: plain" in postfix.postcat(held["queue_id"])


async def test_rcpt_parameters_need_ehlo(elemta_server):
    server = await elemta_server({"server": {"relay_networks": ["127.0.0.0/8"]}})
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("HELO client.origin.test")
        await c.cmd("MAIL FROM:<a@origin.test>")
        reply = await c.cmd("RCPT TO:<bob@remote.test> NOTIFY=NEVER")
        assert (reply.code, reply.enhanced) == (555, "5.5.4"), reply
        assert (await c.cmd("RCPT TO:<bob@remote.test>")).code == 250


async def test_utf8_dsn_values_to_a_server_without_smtputf8_are_made_ascii(elemta_server):
    async with Sink() as origin:
        with Postfix(smtputf8=False) as postfix:
            server = await elemta_server(relay_config(postfix, origin))
            # SMTPUTF8 only for the DSN values: addresses and header fields are ASCII
            await submit(server, ["MAIL FROM:<a@origin.test> SMTPUTF8 ENVID=caf\u00e9",
                                  "RCPT TO:<bob@remote.test> ORCPT=utf-8;j\u00f6rg@remote.test"],
                         MSG)
            [held] = await asyncio.to_thread(postfix.wait_held, 1)
            record = postfix.postcat(held["queue_id"])
    assert "envelope_id" not in record      # a non-ASCII ENVID cannot go without SMTPUTF8
    # sent as utf-8;j\\x{F6}rg@remote.test (RFC 6533), which Postfix decodes
    assert "dsn_orig_rcpt=utf-8;j\u00f6rg@remote.test" in record
