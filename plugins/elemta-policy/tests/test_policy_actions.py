"""Every action word, at RCPT and at END-OF-MESSAGE, through a real Elemta server and a policy
service written here (a real TCP or unix-socket server speaking the protocol)."""

from __future__ import annotations

import asyncio
import json

import pytest

from elemta import ConfigError, StartupError
from elemta.testing import RawSMTP, unverified_context

from policy_support import MESSAGE, config, metric, rcpt, send

#: what the service answers at RCPT, by the recipient's local part
RCPT_ACTIONS = {
    "dunno": "DUNNO",
    "ok": "OK",
    "numeric": "12345",
    "reject": "REJECT go away",
    "rejectplain": "REJECT",
    "lower": "reject lower case",
    "defer": "DEFER 4.3.2 busy",
    "deferifpermit": "DEFER_IF_PERMIT later please",
    "deferifreject": "DEFER_IF_REJECT maybe",
    "code450": "450 4.2.0 Greylisted, come back later",
    "code554": "554 5.7.1 No thanks",
    "code451": "451 try later",
    "code450mixed": "450 5.1.1 mixed classes",
    "code421": "421 4.7.0 bye now",
    "prepend": "PREPEND X-Policy-Test: at rcpt",
    "badprepend": "PREPEND no colon here",
    "hold": "HOLD looks odd",
    "discard": "DISCARD spam",
    "filter": "FILTER smtp:[127.0.0.1]:10025",
    "redirect": "REDIRECT other@example.test",
    "bcc": "BCC archive@example.test",
    "warn": "WARN unusual",
    "info": "INFO fine",
    "unknown": "permit_mynetworks",
    "empty": "",
}


def by_recipient(request: dict[str, str]) -> str:
    return RCPT_ACTIONS.get(request["recipient"].partition("@")[0], "DUNNO")


def by_sender(request: dict[str, str]) -> str:
    """END-OF-MESSAGE: the sender's local part names the action."""
    return RCPT_ACTIONS.get(request["sender"].partition("@")[0], "DUNNO")


@pytest.mark.parametrize("local,code,text", [
    ("dunno", 250, None), ("ok", 250, None), ("numeric", 250, None),
    ("reject", 550, "5.7.1 go away"),
    ("rejectplain", 550, "5.7.1 Recipient address rejected"),
    ("lower", 550, "5.7.1 lower case"),
    ("defer", 451, "4.3.2 busy"),
    ("deferifpermit", 451, "4.7.1 later please"),
    ("deferifreject", 250, None),     # nothing before it rejected: no answer
    ("code450", 450, "4.2.0 Greylisted, come back later"),
    ("code554", 554, "5.7.1 No thanks"),
    ("code451", 451, "4.7.1 try later"),
    ("code450mixed", 450, "4.1.1 mixed classes"),
    ("prepend", 250, None), ("hold", 250, None), ("discard", 250, None),
    ("filter", 250, None), ("redirect", 250, None), ("bcc", 250, None),
    ("warn", 250, None), ("info", 250, None),
    ("unknown", 451, "4.3.0 Temporary policy problem, please try again later"),
    ("empty", 451, "4.3.0 Temporary policy problem, please try again later"),
    ("badprepend", 451, "4.3.0 Temporary policy problem, please try again later"),
])
async def test_every_action_word_at_rcpt(elemta_server, dns_server, policy_server,
                                         local, code, text):
    service = await policy_server(by_recipient)
    server = await elemta_server(config(dns_server, {"name": "words",
                                                     "address": service.address}),
                                 enabled=["policy"])

    reply = await rcpt(server, f"{local}@example.test", "s@origin.example")

    assert reply.code == code, reply
    if text is not None:
        assert reply.text == text
    assert service.of("recipient") == [f"{local}@example.test"]
    action = {"code450": "4xx", "code451": "4xx", "code450mixed": "4xx", "code554": "5xx",
              "numeric": "ok", "lower": "reject", "badprepend": "none", "empty": "unknown",
              "rejectplain": "reject", "deferifpermit": "defer_if_permit",
              "deferifreject": "defer_if_reject"}.get(local, local)
    if action != "none":
        assert metric(server, "smtp_policy_actions_total", service="words", action=action) == 1
    if code == 451 and text.startswith("4.3.0"):
        reason = "protocol" if local == "badprepend" else "unknown_action"
        assert metric(server, "smtp_policy_failures_total", service="words", reason=reason,
                      handled_as="tempfail") == 1


async def test_421_from_the_service_closes_the_connection(elemta_server, dns_server,
                                                          policy_server):
    service = await policy_server(by_recipient)
    server = await elemta_server(config(dns_server, {"address": service.address}),
                                 enabled=["policy"])
    async with RawSMTP(server.port("mx"), source="127.0.0.2") as c:
        await c.cmd("EHLO client.example.org")
        await c.cmd("MAIL FROM:<s@origin.example>")
        reply = await c.cmd("RCPT TO:<code421@example.test>")
        assert (reply.code, reply.text) == (421, "4.7.0 bye now")
        assert await c.closed()


async def test_what_rcpt_answers_ask_of_the_message(elemta_server, elemta_outbox, dns_server,
                                                    policy_server):
    service = await policy_server(by_recipient)
    server = await elemta_server(config(dns_server, {"address": service.address}),
                                 enabled=["policy"], outbox=elemta_outbox)

    # PREPEND: on the message, once however many recipients were answered it
    replies = await send(server, "a@origin.example",
                         ["prepend@example.test", "dunno@example.test"])
    assert [r.code for r in replies] == [250, 250, 250]
    # REDIRECT: this recipient goes elsewhere; BCC: a copy to another address
    replies = await send(server, "b@origin.example", ["redirect@example.test"])
    assert replies[-1].code == 250
    replies = await send(server, "c@origin.example", ["bcc@example.test"])
    assert replies[-1].code == 250
    delivered = await elemta_outbox.wait(3)
    by_sender = {m.sender: m for m in delivered}
    assert by_sender["a@origin.example"].headers("X-Policy-Test") == ["at rcpt"]
    assert sorted(by_sender["a@origin.example"].recipients) == ["dunno@example.test",
                                                                "prepend@example.test"]
    assert by_sender["b@origin.example"].recipients == ["other@example.test"]
    assert sorted(by_sender["c@origin.example"].recipients) == ["archive@example.test",
                                                                "bcc@example.test"]

    # HOLD: spooled on hold, delivered nowhere
    replies = await send(server, "d@origin.example", ["hold@example.test"])
    assert replies[-1].code == 250
    # DISCARD: 250, and the message is gone
    replies = await send(server, "e@origin.example", ["discard@example.test"])
    assert replies[-1].code == 250
    server.app.spool.wait_written()
    held = [json.loads(p.read_bytes()) for p in (server.spool_path / "hold").glob("*.json")]
    assert [h["hold_reason"] for h in held] == ["looks odd"]
    await server.flush()
    await asyncio.sleep(0.5)
    assert len(elemta_outbox.messages) == 3
    assert not elemta_outbox.to("discard@example.test")
    assert not elemta_outbox.to("hold@example.test")


async def test_ok_ends_the_list_and_a_refused_recipients_hold_does_not_count(
        elemta_server, elemta_outbox, dns_server, policy_server):
    first = await policy_server(lambda r: {"trusted": "OK", "held": "HOLD from first"}.get(
        r["recipient"].partition("@")[0], "DUNNO"))
    second = await policy_server(lambda r: "REJECT by second"
                                 if r["recipient"].startswith(("held@", "trusted@")) else "DUNNO")
    server = await elemta_server(
        config(dns_server, {"name": "first", "address": first.address},
               {"name": "second", "address": second.address}),
        enabled=["policy"], outbox=elemta_outbox)

    replies = await send(server, "s@origin.example",
                         ["trusted@example.test", "held@example.test", "user@example.test"])

    assert [(r.code, r.text) for r in replies[:3]] == [
        (250, "2.1.5 Recipient OK"), (550, "5.7.1 by second"), (250, "2.1.5 Recipient OK")]
    assert replies[3].code == 250
    # OK from the first service: the second was never asked about trusted@
    assert second.of("recipient") == ["held@example.test", "user@example.test"]
    [delivered] = await elemta_outbox.wait(1)
    assert sorted(delivered.recipients) == ["trusted@example.test", "user@example.test"]
    server.app.spool.wait_written()
    assert not list((server.spool_path / "hold").glob("*.json"))


async def test_end_of_message_stage(elemta_server, elemta_outbox, dns_server, policy_server):
    service = await policy_server(by_sender)
    server = await elemta_server(
        config(dns_server, {"name": "eom", "address": service.address,
                            "stage": "end-of-message", "policy_context": "content"}),
        enabled=["policy"], outbox=elemta_outbox)

    replies = await send(server, "prepend@origin.example",
                         ["one@example.test", "two@example.test"])
    assert [r.code for r in replies] == [250, 250, 250]
    [request] = service.requests
    assert request["protocol_state"] == "END-OF-MESSAGE"
    assert request["size"] == str(len(MESSAGE) - len(b".\r\n"))
    assert (request["recipient"], request["recipient_count"]) == ("", "2")
    assert request["policy_context"] == "content"
    [delivered] = await elemta_outbox.wait(1)
    assert delivered.headers("X-Policy-Test") == ["at rcpt"]

    for sender, code, text in [("reject", 550, "5.7.1 go away"),
                               ("defer", 451, "4.3.2 busy"),
                               ("code554", 554, "5.7.1 No thanks"),
                               ("unknown", 451,
                                "4.3.0 Temporary policy problem, please try again later")]:
        replies = await send(server, f"{sender}@origin.example", ["one@example.test"])
        assert replies[0].code == 250, sender             # nothing was asked at RCPT
        assert (replies[-1].code, replies[-1].text) == (code, text), sender
    # one recipient: it is sent at END-OF-MESSAGE too
    assert (service.requests[-1]["recipient"], service.requests[-1]["recipient_count"]) == (
        "one@example.test", "1")

    for sender in ("hold", "discard", "redirect", "bcc"):
        replies = await send(server, f"{sender}@origin.example", ["one@example.test"])
        assert replies[-1].code == 250, sender
    server.app.spool.wait_written()
    held = [json.loads(p.read_bytes()) for p in (server.spool_path / "hold").glob("*.json")]
    assert [h["hold_reason"] for h in held] == ["looks odd"]
    await server.flush()
    delivered = await elemta_outbox.wait(3)
    routes = {m.sender: sorted(m.recipients) for m in delivered}
    assert routes == {"prepend@origin.example": ["one@example.test", "two@example.test"],
                      "redirect@origin.example": ["other@example.test"],
                      "bcc@origin.example": ["archive@example.test", "one@example.test"]}
    await asyncio.sleep(0.3)
    assert len(elemta_outbox.messages) == 3                 # the discarded one never came


async def test_the_request_has_every_attribute_postfix_sends(elemta_server, dns_server,
                                                             policy_server):
    dns_server.zone("in-addr.arpa")
    dns_server.zone("example.org")
    dns_server.add("127.0.0.2", "PTR", "client.example.org.")
    dns_server.add("client.example.org", "A", "127.0.0.2")
    dns_server.add("127.0.0.3", "PTR", "liar.example.org.")     # no A record: not verified
    service = await policy_server(lambda r: "DUNNO")
    server = await elemta_server(
        config(dns_server, {"address": service.address, "policy_context": "mx-in"}),
        enabled=["policy"])

    async with RawSMTP(server.port("mx"), source="127.0.0.2") as c:
        await c.cmd("EHLO client.example.org")
        await c.starttls(unverified_context())
        await c.cmd("EHLO client.example.org")
        await c.cmd("MAIL FROM:<s@origin.example> SIZE=1234")
        assert (await c.cmd("RCPT TO:<user@example.test>")).code == 250
        assert (await c.cmd("RCPT TO:<second@example.test>")).code == 250
    async with RawSMTP(server.port("mx"), source="127.0.0.3") as c:
        await c.cmd("HELO liar.example.org")
        await c.cmd("MAIL FROM:<>")
        assert (await c.cmd("RCPT TO:<user@example.test>")).code == 250

    first, second, third = service.requests
    assert list(first) == [
        "request", "protocol_state", "protocol_name", "helo_name", "queue_id", "sender",
        "recipient", "recipient_count", "client_address", "client_name",
        "reverse_client_name", "instance", "sasl_method", "sasl_username", "sasl_sender",
        "size", "ccert_subject", "ccert_issuer", "ccert_fingerprint",
        "ccert_pubkey_fingerprint", "encryption_protocol", "encryption_cipher",
        "encryption_keysize", "etrn_domain", "stress", "client_port", "policy_context",
        "server_address", "server_port"]
    assert first["request"] == "smtpd_access_policy"
    assert (first["protocol_state"], first["protocol_name"]) == ("RCPT", "ESMTP")
    assert first["helo_name"] == "client.example.org"
    assert (first["sender"], first["recipient"], first["recipient_count"]) == (
        "s@origin.example", "user@example.test", "0")
    assert (first["client_address"], first["client_name"], first["reverse_client_name"]) == (
        "127.0.0.2", "client.example.org", "client.example.org")
    assert first["size"] == "1234"
    assert first["encryption_protocol"].startswith("TLSv1")
    assert first["encryption_cipher"] and int(first["encryption_keysize"]) >= 128
    assert (first["server_address"], first["server_port"]) == ("127.0.0.1",
                                                               str(server.port("mx")))
    assert int(first["client_port"]) > 0
    assert first["policy_context"] == "mx-in"
    assert first["sasl_username"] == first["etrn_domain"] == first["ccert_subject"] == ""
    # one instance (and queue id) per message, the same for its recipients
    assert first["instance"] == second["instance"] == first["queue_id"] != third["instance"]
    assert second["recipient"] == "second@example.test"

    assert (third["protocol_name"], third["helo_name"], third["sender"]) == (
        "SMTP", "liar.example.org", "")
    assert (third["client_name"], third["reverse_client_name"]) == ("unknown",
                                                                    "liar.example.org")
    assert (third["encryption_protocol"], third["encryption_keysize"]) == ("", "0")


async def test_a_service_on_a_unix_socket(elemta_server, dns_server, policy_server):
    service = await policy_server(by_recipient, unix=True)
    server = await elemta_server(
        config(dns_server, {"name": "local", "address": service.address},
               resolve_client_name=False),
        enabled=["policy"])

    assert (await rcpt(server, "reject@example.test", "s@origin.example")).code == 550
    assert (await rcpt(server, "dunno@example.test", "s@origin.example")).code == 250
    assert service.connections == 1
    assert service.of("client_name") == ["unknown", "unknown"]


async def test_exemptions(elemta_server, dns_server, policy_server):
    service = await policy_server(lambda r: "REJECT not you")
    server = await elemta_server(
        {**config(dns_server, {"name": "strict", "address": service.address,
                               "listeners": ["mx"]}),
         "server": {"relay_networks": ["127.0.0.4/32"]}},
        enabled=["policy"])

    assert (await rcpt(server, "user@example.test", "s@origin.example")).code == 550
    # a relay client is not asked (exempt_relay_clients = true)
    assert (await rcpt(server, "user@example.test", "s@origin.example",
                       source="127.0.0.4")).code == 250
    assert len(service.requests) == 1
    assert metric(server, "smtp_policy_exempt_total", service="strict",
                  reason="relay_client") == 1


@pytest.mark.parametrize("table,expected", [
    ({}, "no policy service is configured"),
    ({"services": [{"address": "inet:127.0.0.1"}]}, "has no port"),
    ({"services": [{"address": "localhost:99999"}]}, "the port must be a number from 1 to 65535"),
    ({"services": [{"address": "unix:policy.sock"}]}, "a unix socket needs an absolute path"),
    ({"services": [{"address": "inet:::1:10023"}]}, "put an IPv6 address in brackets"),
    ({"services": [{"address": "inet:127.0.0.1:1"}, {"address": "127.0.0.1:1"}]},
     "two services are called '127.0.0.1:1'"),
    ({"services": [{"address": "127.0.0.1:1", "exempt_networks": ["10.0.0.300/8"]}]},
     "'10.0.0.300/8' is not a network"),
    ({"services": [{"address": "127.0.0.1:1", "stage": "data"}]},
     "services[0].stage: got 'data'; input should be 'rcpt' or 'end-of-message'"),
    ({"services": [{"address": "127.0.0.1:1", "timeout": 3}]}, "unknown key"),
])
async def test_configuration_mistakes_are_explained(elemta_server, table, expected):
    with pytest.raises(ConfigError) as e:
        await elemta_server({"plugins": {"enabled": ["policy"], "policy": table}},
                            enabled=["policy"])
    assert expected in str(e.value), str(e.value)


@pytest.mark.parametrize("service,expected", [
    ({"request_timeout_seconds": 40}, "not less than the plugin's timeout of 30 s"),
    ({"listeners": ["inbound"]}, "listeners ['inbound'] do not exist"),
])
async def test_startup_mistakes_are_explained(elemta_server, service, expected):
    with pytest.raises(StartupError) as e:
        await elemta_server({"plugins": {"enabled": ["policy"], "policy": {
            "services": [{"address": "127.0.0.1:10023", **service}]}}}, enabled=["policy"])
    assert expected in str(e.value), str(e.value)
