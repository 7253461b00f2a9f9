"""elemta-spf end to end: a real server, real clients on other loopback addresses, real DNS.

Each test starts a server with the installed ``spf`` plugin, its ``[dns]``
pointed at the test's :class:`~elemta.testing.ZoneServer`, and connects from
``127.0.0.2``, ``127.0.0.3``… so that the zone's ``ip4:`` terms decide the
result. What the message carries is read from the spool, as committed.
"""

from __future__ import annotations

import asyncio
import re
import urllib.request

import pytest

from elemta import Accept, ConfigError, StartupError, hookimpl
from elemta.testing import RawSMTP, data_bytes, send_mail

MESSAGE = "From: a@example.org\nTo: user@example.test\nSubject: hello\n\nHello.\n"

# example.org: 127.0.0.2 sends for it, 127.0.0.3 is discouraged, the rest refused
ORG_POLICY = "v=spf1 ip4:127.0.0.2 ~ip4:127.0.0.3 -all"
# the HELO names of the clients
HELO_POLICY = "v=spf1 ip4:127.0.0.2 ip4:127.0.0.3 ip4:127.0.0.4 -all"


def publish(dns_server) -> None:
    dns_server.zone("example.org")
    dns_server.add("example.org", "TXT", ORG_POLICY)
    dns_server.add("mail.example.org", "TXT", HELO_POLICY)
    dns_server.zone("example.net")
    dns_server.add("example.net", "TXT", "v=spf1 ip4:127.0.0.2 -all")


async def start(elemta_server, dns_server, plugins=(), config=None, **spf):
    publish(dns_server)
    base = {"dns": {"nameservers": [dns_server.nameserver], "timeout_seconds": 1,
                    "attempts": 1},
            "plugins": {"spf": spf}}
    for key, value in (config or {}).items():
        base[key] = {**base.get(key, {}), **value}
    return await elemta_server(base, plugins=plugins, enabled=["spf"])


async def send(server, source: str, sender: str, recipients: list[str], *,
               helo: str = "mail.example.org", message: str = MESSAGE) -> list:
    """One transaction from ``source``: every reply, from EHLO to the end of DATA."""
    replies = []
    async with RawSMTP(server.port("mx"), source=source) as c:
        replies.append(await c.cmd(f"EHLO {helo}"))
        replies.append(await c.cmd(f"MAIL FROM:<{sender}>"))
        if replies[-1].code != 250:
            return replies
        accepted = 0
        for rcpt in recipients:
            replies.append(await c.cmd(f"RCPT TO:<{rcpt}>"))
            accepted += replies[-1].code == 250
        if not accepted:
            return replies
        replies.append(await c.cmd("DATA"))
        if replies[-1].code == 354:
            await c.send(data_bytes(message))
            replies.append(await c.read_reply())
        await c.cmd("QUIT")
    return replies


def queue_id(reply) -> str:
    assert reply.code == 250 and "queued as" in reply.text, str(reply)
    return reply.text.rsplit(" ", 1)[1]


def stored(server, qid: str) -> str:
    """The message as spooled, headers added by the pipeline included."""
    server.app.spool.wait_written()
    return (server.spool_path / "messages" / qid).read_bytes().decode()


def header_fields(content: str, name: str) -> list[str]:
    """Every ``name:`` field of the header section, unfolded."""
    head = content.split("\r\n\r\n", 1)[0]
    unfolded = re.sub(r"\r\n[ \t]+", " ", head)
    prefix = name.lower() + ":"
    return [line.split(":", 1)[1].strip() for line in unfolded.split("\r\n")
            if line.lower().startswith(prefix)]


def spf_clause(content: str) -> str:
    [authres] = header_fields(content, "Authentication-Results")
    clauses = [c.strip() for c in split_clauses(authres)]
    assert clauses[0] == "mx.example.test"
    [spf] = [c for c in clauses[1:] if c.startswith("spf=")]
    return spf


def split_clauses(value: str) -> list[str]:
    """Authentication-Results split at ``;`` outside quoted strings (RFC 8601 §2.2)."""
    out, current, quoted, escaped = [], "", False, False
    for c in value:
        if escaped:
            current, escaped = current + c, False
        elif c == "\\" and quoted:
            current, escaped = current + c, True
        elif c == '"':
            current, quoted = current + c, not quoted
        elif c == ";" and not quoted:
            out.append(current)
            current = ""
        else:
            current += c
    out.append(current)
    return out


async def metrics(server) -> str:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    return (await asyncio.to_thread(lambda: urllib.request.urlopen(url).read())).decode()


# ------------------------------------------------------------------ the safe default


async def test_a_pass_is_recorded_in_authentication_results_and_received_spf(
        elemta_server, dns_server):
    server = await start(elemta_server, dns_server)

    replies = await send(server, "127.0.0.2", "a@example.org", ["user@example.test"])

    content = stored(server, queue_id(replies[-1]))
    assert spf_clause(content) == "spf=pass smtp.mailfrom=a@example.org smtp.helo=mail.example.org"
    received = header_fields(content, "Received-SPF")
    assert len(received) == 2, received  # one per identity checked (RFC 7208 §9.1)
    [mailfrom] = [f for f in received if "identity=mailfrom" in f]
    [helo] = [f for f in received if "identity=helo" in f]
    assert mailfrom.startswith("pass (mx.example.test: domain of example.org designates "
                               "127.0.0.2 as permitted sender)")
    assert 'envelope-from="a@example.org";' in mailfrom
    assert "client-ip=127.0.0.2;" in mailfrom and "helo=mail.example.org;" in mailfrom
    assert "receiver=mx.example.test;" in mailfrom
    assert helo.startswith("pass (mx.example.test: domain of mail.example.org designates")


@pytest.mark.parametrize(("source", "result"), [
    ("127.0.0.2", "pass"), ("127.0.0.3", "softfail"), ("127.0.0.4", "fail")])
async def test_by_default_every_result_is_only_annotated(elemta_server, dns_server, source,
                                                         result):
    server = await start(elemta_server, dns_server)

    replies = await send(server, source, "a@example.org", ["user@example.test"])

    content = stored(server, queue_id(replies[-1]))
    assert spf_clause(content).startswith(f"spf={result} smtp.mailfrom=a@example.org")


async def test_the_null_sender_is_checked_by_its_helo_name(elemta_server, dns_server):
    server = await start(elemta_server, dns_server, on_fail="reject")

    good = await send(server, "127.0.0.2", "", ["user@example.test"])
    bad = await send(server, "127.0.0.5", "", ["user@example.test"])

    content = stored(server, queue_id(good[-1]))
    assert spf_clause(content) == "spf=pass smtp.helo=mail.example.org"
    [received] = header_fields(content, "Received-SPF")
    assert 'envelope-from="";' in received and "identity=helo;" in received
    assert (bad[2].code, bad[2].enhanced) == (550, "5.7.23")
    assert "HELO mail.example.org" in bad[2].text


async def test_a_crafted_local_part_cannot_inject_a_clause(elemta_server, dns_server):
    server = await start(elemta_server, dns_server)
    sender = '"x;dkim=pass header.d=bank.example"@example.org'

    replies = await send(server, "127.0.0.4", sender, ["user@example.test"],
                         helo="evil;dkim=pass")

    content = stored(server, queue_id(replies[-1]))
    [authres] = header_fields(content, "Authentication-Results")
    clauses = [c.strip() for c in split_clauses(authres)]
    assert [c.split("=", 1)[0] for c in clauses[1:]] == ["spf"], clauses
    assert clauses[1] == ('spf=fail smtp.mailfrom="\\"x;dkim=pass header.d=bank.example\\"'
                          '@example.org" smtp.helo="evil;dkim=pass"')
    # the SPF check itself used the domain after the last "@"
    assert dns_server.count("example.org", "TXT") >= 1


# ------------------------------------------------------------------ refusals


async def test_a_fail_is_refused_at_rcpt_with_5_7_23_when_configured(elemta_server, dns_server):
    server = await start(elemta_server, dns_server, on_fail="reject")

    replies = await send(server, "127.0.0.4", "a@example.org", ["user@example.test"])

    assert replies[1].code == 250  # MAIL FROM: the refusal waits for RCPT
    refused = replies[2]
    assert (refused.code, refused.enhanced) == (550, "5.7.23")
    assert "example.org does not allow 127.0.0.4 to send as <a@example.org>" in refused.text
    assert len(replies) == 3  # no DATA: the refusal cost no message


async def test_exempt_recipients_still_get_mail_from_a_failing_sender(elemta_server, dns_server):
    server = await start(elemta_server, dns_server, on_fail="reject")

    replies = await send(server, "127.0.0.4", "a@example.org",
                         ["user@example.test", "abuse@example.test", "postmaster@example.test"])

    assert [r.code for r in replies[2:5]] == [550, 250, 250]
    content = stored(server, queue_id(replies[-1]))
    assert spf_clause(content).startswith("spf=fail ")


async def test_softfail_and_temperror_can_be_tempfailed(elemta_server, dns_server):
    server = await start(elemta_server, dns_server, on_softfail="tempfail",
                         on_temperror="tempfail")
    dns_server.zone("broken.example")
    dns_server.fail("broken.example", "SERVFAIL")

    soft = await send(server, "127.0.0.3", "a@example.org", ["user@example.test"])
    temp = await send(server, "127.0.0.2", "a@broken.example", ["user@example.test"])

    assert (soft[2].code, soft[2].enhanced) == (451, "4.7.1")
    assert (temp[2].code, temp[2].enhanced) == (451, "4.4.3")
    assert "try again later" in temp[2].text


async def test_a_temperror_is_never_a_pass(elemta_server, dns_server):
    server = await start(elemta_server, dns_server)
    dns_server.zone("slow.example")
    dns_server.fail("slow.example", "timeout")

    replies = await send(server, "127.0.0.2", "a@slow.example", ["user@example.test"])

    content = stored(server, queue_id(replies[-1]))
    assert spf_clause(content).startswith("spf=temperror smtp.mailfrom=a@slow.example")


async def test_a_permerror_can_be_refused_with_5_7_24(elemta_server, dns_server):
    server = await start(elemta_server, dns_server, on_permerror="reject")
    dns_server.zone("typo.example")
    dns_server.add("typo.example", "TXT", "v=spf1 ip4:127.0.0.2 moo -all")

    replies = await send(server, "127.0.0.2", "a@typo.example", ["user@example.test"])

    assert (replies[2].code, replies[2].enhanced) == (550, "5.7.24")
    assert "moo" in replies[2].text


async def test_enforce_helo_acts_on_a_failing_helo_name(elemta_server, dns_server):
    server = await start(elemta_server, dns_server, on_fail="reject", enforce_helo=True)

    # the sender's domain has no SPF record (none); the HELO name refuses 127.0.0.5
    replies = await send(server, "127.0.0.5", "a@nowhere.example.org", ["user@example.test"])

    assert (replies[2].code, replies[2].enhanced) == (550, "5.7.23")
    assert "HELO mail.example.org" in replies[2].text


async def test_without_enforce_helo_a_failing_helo_name_is_only_recorded(elemta_server,
                                                                          dns_server):
    server = await start(elemta_server, dns_server, on_fail="reject")

    replies = await send(server, "127.0.0.5", "a@nowhere.example.org", ["user@example.test"])

    content = stored(server, queue_id(replies[-1]))
    assert spf_clause(content).startswith("spf=none smtp.mailfrom=a@nowhere.example.org")
    [helo] = [f for f in header_fields(content, "Received-SPF") if "identity=helo" in f]
    assert helo.startswith("fail ")


# ------------------------------------------------------------------ who is not checked


class AcceptEveryLogin:
    @hookimpl
    def auth(self, credentials):
        return Accept()


class TrustedRelay:
    """A connect plugin that lets 127.0.0.6 relay."""

    @hookimpl
    def connect(self, session):
        if session.peer_ip == "127.0.0.6":
            session.relay_allowed = True


async def test_an_authenticated_submission_is_never_checked(elemta_server, dns_server):
    server = await start(elemta_server, dns_server, plugins=[("login", AcceptEveryLogin())],
                         on_fail="reject")
    dns_server.queries.clear()

    sent = await send_mail(server, "a@example.org", ["someone@example.net"], MESSAGE,
                           listener="submission", starttls=True, auth=("a@example.org", "pw"))

    assert sent.accepted, sent.reply
    content = stored(server, sent.queue_id)
    assert "spf=" not in content.split("\r\n\r\n", 1)[0]
    assert header_fields(content, "Received-SPF") == []
    assert dns_server.count(rdtype="TXT") == 0


async def test_a_client_in_exempt_networks_is_not_checked(elemta_server, dns_server):
    server = await start(elemta_server, dns_server, on_fail="reject",
                         exempt_networks=["127.0.0.4/32", "2001:db8::/32"])
    dns_server.queries.clear()

    exempt = await send(server, "127.0.0.4", "a@example.org", ["user@example.test"])
    assert dns_server.count(rdtype="TXT") == 0
    checked = await send(server, "127.0.0.5", "a@example.org", ["user@example.test"])

    content = stored(server, queue_id(exempt[-1]))
    assert "spf=" not in content.split("\r\n\r\n", 1)[0]
    assert header_fields(content, "Received-SPF") == []
    assert checked[2].code == 550


async def test_relay_clients_are_not_checked(elemta_server, dns_server):
    server = await start(elemta_server, dns_server, plugins=[("trusted", TrustedRelay())],
                         config={"server": {"relay_networks": ["127.0.0.7/32"]}},
                         on_fail="reject")

    by_plugin = await send(server, "127.0.0.6", "a@example.org", ["user@example.test"])
    by_network = await send(server, "127.0.0.7", "a@example.org", ["user@example.test"])

    for replies in (by_plugin, by_network):
        content = stored(server, queue_id(replies[-1]))
        assert "spf=" not in content.split("\r\n\r\n", 1)[0]


async def test_relay_clients_are_checked_when_their_exemption_is_off(elemta_server, dns_server):
    server = await start(elemta_server, dns_server,
                         config={"server": {"relay_networks": ["127.0.0.7/32"]}},
                         on_fail="reject", exempt_relay_clients=False)

    replies = await send(server, "127.0.0.7", "a@example.org", ["user@example.test"])

    assert replies[2].code == 550


# ------------------------------------------------------------------ metric, headers, DNS


async def test_results_are_counted_by_bounded_domain(elemta_server, dns_server):
    server = await start(elemta_server, dns_server, metrics_domains=["example.org"])

    await send(server, "127.0.0.2", "a@example.org", ["user@example.test"])
    await send(server, "127.0.0.4", "b@EXAMPLE.org", ["user@example.test"])
    await send(server, "127.0.0.4", "c@example.net", ["user@example.test"])
    await send(server, "127.0.0.4", "d@unknown-sender.example", ["user@example.test"])

    body = await metrics(server)
    assert 'smtp_spf_results_total{domain="example.org",result="pass"} 1.0' in body
    assert 'smtp_spf_results_total{domain="example.org",result="fail"} 1.0' in body
    assert 'smtp_spf_results_total{domain="other",result="fail"} 1.0' in body
    assert 'smtp_spf_results_total{domain="other",result="none"} 1.0' in body
    assert "example.net" not in "".join(l for l in body.splitlines() if "spf" in l)


async def test_received_spf_can_be_turned_off(elemta_server, dns_server):
    server = await start(elemta_server, dns_server, received_spf_header=False)

    replies = await send(server, "127.0.0.2", "a@example.org", ["user@example.test"])

    content = stored(server, queue_id(replies[-1]))
    assert header_fields(content, "Received-SPF") == []
    assert spf_clause(content).startswith("spf=pass ")


async def test_the_helo_result_is_reused_within_a_session(elemta_server, dns_server):
    server = await start(elemta_server, dns_server)

    async with RawSMTP(server.port("mx"), source="127.0.0.2") as c:
        await c.cmd("EHLO mail.example.org")
        for n in range(3):
            reply = await c.send_message(f"u{n}@example.org", ["user@example.test"],
                                         data_bytes(MESSAGE))
            assert reply.code == 250, str(reply)

    assert dns_server.count("mail.example.org", "TXT") == 1
    # the server's resolver cached example.org's record as well
    assert dns_server.count("example.org", "TXT") == 1


# ------------------------------------------------------------------ configuration


async def test_a_bad_setting_names_the_key(elemta_server, dns_server):
    with pytest.raises(ConfigError) as e:
        await start(elemta_server, dns_server, exempt_networks=["10.0.0.0/33"])
    text = str(e.value)
    assert "exempt_networks" in text and "CIDR" in text


async def test_an_unknown_action_is_refused(elemta_server, dns_server):
    with pytest.raises(ConfigError) as e:
        await start(elemta_server, dns_server, on_fail="drop")
    assert "on_fail" in str(e.value)


async def test_a_time_limit_longer_than_the_plugin_timeout_stops_startup(elemta_server,
                                                                         dns_server):
    with pytest.raises(StartupError) as e:
        await start(elemta_server, dns_server, config={"plugins": {"timeout_seconds": 10}},
                    time_limit_seconds=20)
    text = str(e.value)
    assert "time_limit_seconds = 20" in text and "at most 8" in text
