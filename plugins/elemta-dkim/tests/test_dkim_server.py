"""elemta-dkim in a real server on loopback: signing at submission, verification at the MX."""

from __future__ import annotations

import re

import pytest
from dkim_support import (MESSAGE, USERS, Users, key_records, only_signature, opendkim_verify,
                          results, server_config, verify)

from elemta import StartupError
from elemta.testing import Outbox, Sink, send_mail
from elemta_dkim import DkimPlugin

ALICE = ("alice@example.com", USERS["alice@example.com"])
# no Message-ID and no Date: the submission listener adds them before the data hooks
SUBMITTED = (b"From: Alice <alice@example.com>\r\n"
             b"To: Bob <bob@example.org>\r\n"
             b"Subject: Lunch?\r\n"
             b"\r\n"
             b"Noon at the usual place?  \r\n"
             b"\r\n")


async def submit(server, message=SUBMITTED, sender="alice@example.com"):
    sent = await send_mail(server, sender, ["bob@example.org"], message,
                           listener="submission", starttls=True, auth=ALICE)
    assert sent.accepted, sent.reply
    return sent


def signatures(content: bytes) -> list[dict[str, str]]:
    head = content.split(b"\r\n\r\n", 1)[0].decode()
    out = []
    for m in re.finditer(r"^DKIM-Signature:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", head, re.M | re.I):
        value = re.sub(r"\s+", "", m.group(1))
        out.append(dict(t.split("=", 1) for t in value.strip(";").split(";")))
    return out


def authentication_results(content: bytes) -> str:
    m = re.search(rb"^Authentication-Results:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", content, re.M)
    assert m, content[:500]
    return m.group(1).decode()


async def test_a_submission_leaves_signed_with_rsa_and_ed25519_and_verifies(
        elemta_server, elemta_outbox, dns_server, signing_keys, tmp_path):
    server = await elemta_server(config=server_config(dns_server, signing_keys),
                                 enabled=["dkim"], plugins=[("users", Users())],
                                 outbox=elemta_outbox)
    await submit(server)
    [delivered] = await elemta_outbox.wait(1)
    content = delivered.content

    sigs = signatures(content)
    assert sorted(s["a"] for s in sigs) == ["ed25519-sha256", "rsa-sha256"]
    assert {s["s"] for s in sigs} == {"rsa2026", "ed2026"}
    assert all(s["d"] == "example.com" and s["c"] == "relaxed/relaxed" for s in sigs)
    # the Message-ID and Date the core added are signed, and From/To/Subject/Date
    # are over-signed
    h = sigs[0]["h"].split(":")
    assert delivered.header("Message-ID") and delivered.header("Date")
    assert "message-id" in h and h.count("date") == 2 and h.count("from") == 2
    assert h.count("subject") == 2 and h.count("to") == 2

    # what was spooled and handed to delivery verifies
    assert results(await verify(dns_server, content)) == ["pass", "pass"]


async def test_a_submission_signed_by_us_verifies_in_opendkim(
        elemta_server, elemta_outbox, dns_server, signing_keys, namespace, tmp_path):
    server = await elemta_server(config=server_config(dns_server, signing_keys),
                                 enabled=["dkim"], plugins=[("users", Users())],
                                 outbox=elemta_outbox)
    await submit(server)
    [delivered] = await elemta_outbox.wait(1)
    records = key_records("example.com", {"rsa2026": signing_keys.rsa,
                                          "ed2026": signing_keys.ed})

    # each signature alone: opendkim-testmsg's exit status tells only whether one passed
    checked = opendkim_verify(namespace, tmp_path, [
        only_signature(delivered.content, 0), only_signature(delivered.content, 1),
        only_signature(delivered.content.replace(b"Noon", b"Two p.m."), 0)], records)

    assert checked[:2] == [(0, ""), (0, "")]
    assert checked[2][0] != 0 and "Bad signature" in checked[2][1]


async def test_signed_mail_delivered_over_smtp_verifies_at_the_other_end(
        elemta_server, dns_server, signing_keys):
    async with Sink() as sink:
        config = server_config(dns_server, signing_keys)
        config["delivery"] = {"enabled": True, "routes": {"*": {"host": sink.address,
                                                                "tls": "none"}}}
        server = await elemta_server(config=config, enabled=["dkim"],
                                     plugins=[("users", Users())])
        # a long line, tabs and trailing blanks: all of it must arrive as it was signed
        body = (b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: report\r\n\r\n"
                + b"\tcolumn one\t  column two   \r\n" * 200 + b"x" * 900 + b"\r\n")
        await submit(server, body)
        await server.flush()
        [received] = await sink.wait_for(1)

    assert len(signatures(received.content)) == 2
    assert results(await verify(dns_server, received.content)) == ["pass", "pass"]


async def test_a_message_altered_in_transit_fails_at_the_receiving_mx(
        elemta_server, elemta_outbox, dns_server, signing_keys):
    sender = await elemta_server(config=server_config(dns_server, signing_keys),
                                 enabled=["dkim"], plugins=[("users", Users())],
                                 outbox=elemta_outbox)
    await submit(sender)
    [delivered] = await elemta_outbox.wait(1)
    inbox = Outbox()
    receiver = await elemta_server(config=server_config(dns_server), enabled=["dkim"],
                                   outbox=inbox)

    # the signed message as it left, then with one word of its body changed
    intact = await send_mail(receiver, "alice@example.com", ["user@example.test"],
                             delivered.content)
    altered = await send_mail(receiver, "alice@example.com", ["user@example.test"],
                              delivered.content.replace(b"Noon", b"Two p.m."))
    assert intact.accepted and altered.accepted
    first, second = await inbox.wait(2)

    good = authentication_results(first.content)
    bad = authentication_results(second.content)
    assert good.count("dkim=pass") == 2
    assert bad.count("dkim=fail") == 2 and "dkim=pass" not in bad
    assert 'reason="body hash mismatch' in bad
    assert "header.d=example.com" in bad and "header.s=rsa2026" in bad
    assert "header.a=ed25519-sha256" in bad
    # the receiver signs nothing: the MX session is not authenticated
    assert len(signatures(second.content)) == 2


async def test_unauthenticated_mx_mail_is_not_signed(elemta_server, elemta_outbox, dns_server,
                                                     signing_keys):
    server = await elemta_server(config=server_config(dns_server, signing_keys),
                                 enabled=["dkim"], outbox=elemta_outbox)
    sent = await send_mail(server, "alice@example.com", ["user@example.test"], MESSAGE)
    assert sent.accepted
    [delivered] = await elemta_outbox.wait(1)
    assert signatures(delivered.content) == []
    assert "dkim=none" in authentication_results(delivered.content)


async def test_relayed_mail_is_signed_only_when_configured(elemta_server, elemta_outbox,
                                                           dns_server, signing_keys):
    base = server_config(dns_server, signing_keys)
    base["server"] = {"relay_networks": ["127.0.0.0/8"]}
    off = await elemta_server(config=base, enabled=["dkim"], outbox=elemta_outbox)
    on_config = server_config(dns_server, signing_keys, sign_relay=True)
    on_config["server"] = base["server"]
    on = await elemta_server(config=on_config, enabled=["dkim"], outbox=elemta_outbox)

    for server in (off, on):
        sent = await send_mail(server, "alice@example.com", ["carol@remote.example"],
                               MESSAGE)
        assert sent.accepted, sent.reply
    first, second = await elemta_outbox.wait(2)
    by_count = sorted(len(signatures(m.content)) for m in (first, second))
    assert by_count == [0, 2]


async def test_authenticated_mail_for_a_domain_without_keys_is_not_signed(
        elemta_server, elemta_outbox, dns_server, signing_keys):
    server = await elemta_server(config=server_config(dns_server, signing_keys),
                                 enabled=["dkim"], plugins=[("users", Users())],
                                 outbox=elemta_outbox)
    await submit(server, SUBMITTED.replace(b"alice@example.com", b"alice@elsewhere.example"))
    [delivered] = await elemta_outbox.wait(1)
    assert signatures(delivered.content) == []


async def test_headers_a_data_plugin_added_before_dkim_are_signed_as_spooled(
        elemta_server, elemta_outbox, dns_server, signing_keys):
    from elemta import hookimpl

    class Tagger:
        @hookimpl
        def data(self, message):
            # an over-signed field, added above the message by an earlier plugin
            message.add_header("To", "Team <team@example.com>")

    config = server_config(dns_server, signing_keys)
    server = await elemta_server(config=config, enabled=[],
                                 plugins=[("users", Users()), ("tagger", Tagger()),
                                          ("dkim", DkimPlugin())],
                                 outbox=elemta_outbox)
    await submit(server)
    [delivered] = await elemta_outbox.wait(1)
    assert len(delivered.headers("To")) == 2
    assert signatures(delivered.content)[0]["h"].split(":").count("to") == 3
    assert results(await verify(dns_server, delivered.content)) == ["pass", "pass"]


async def test_metrics_count_results_by_bounded_domain(elemta_server, dns_server,
                                                       signing_keys, elemta_outbox):
    signer = await elemta_server(config=server_config(dns_server, signing_keys),
                                 enabled=["dkim"], plugins=[("users", Users())],
                                 outbox=elemta_outbox)
    await submit(signer)
    [delivered] = await elemta_outbox.wait(1)
    plugin = DkimPlugin()
    receiver = await elemta_server(
        config=server_config(dns_server, metrics_domains=["example.com"]), enabled=[],
        plugins=[("dkim", plugin)])
    for content in (delivered.content, delivered.content.replace(b"Noon", b"Two p.m."),
                    MESSAGE):
        sent = await send_mail(receiver, "alice@example.com", ["user@example.test"], content)
        assert sent.accepted

    def count(domain, result):
        return plugin.results.labels(domain, result)._value.get()

    assert count("example.com", "pass") == 2
    assert count("example.com", "fail") == 2
    assert count("example.com", "none") == 1   # MESSAGE, unsigned, From: example.com
    assert signer.app is not receiver.app


async def test_a_crafted_selector_cannot_inject_a_result(elemta_server, elemta_outbox,
                                                         dns_server):
    crafted = (b"DKIM-Signature: v=1; a=rsa-sha256; d=bank.example(x;\r\n"
               b"\ts=x dkim=pass header.d=bank.example; h=from; bh=AAAA; b=AAAA\r\n")
    server = await elemta_server(config=server_config(dns_server), enabled=["dkim"],
                                 outbox=elemta_outbox)
    sent = await send_mail(server, "a@bank.example", ["user@example.test"], crafted + MESSAGE)
    assert sent.accepted
    [delivered] = await elemta_outbox.wait(1)
    header = authentication_results(delivered.content)

    assert 'header.s="x dkim=pass header.d=bank.example"' in header
    assert 'header.d="bank.example(x"' in header
    # with the quoted strings taken out, exactly one dkim result remains, and no pass
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', header)
    assert bare.count("dkim=") == 1 and "dkim=pass" not in bare
    assert "dkim=neutral" in bare


async def test_a_key_file_others_can_read_stops_startup(elemta_server, dns_server,
                                                        signing_keys):
    path = signing_keys.folder / "example.com.rsa2026.key"
    path.chmod(0o644)
    with pytest.raises(StartupError) as e:
        await elemta_server(config=server_config(dns_server, signing_keys), enabled=["dkim"])
    assert str(path) in str(e.value) and f"chmod 600 {path}" in str(e.value)


async def test_a_missing_key_file_stops_startup(elemta_server, dns_server, signing_keys):
    (signing_keys.folder / "example.com.ed2026.key").unlink()
    with pytest.raises(StartupError) as e:
        await elemta_server(config=server_config(dns_server, signing_keys), enabled=["dkim"])
    assert "example.com.ed2026.key: no such key file" in str(e.value)
    assert "elemta dkim keygen" in str(e.value)


async def test_a_misspelled_key_is_a_configuration_error(elemta_server, dns_server):
    from elemta import ConfigError

    with pytest.raises(ConfigError) as e:
        await elemta_server(config=server_config(dns_server, sign_relays=True),
                            enabled=["dkim"])
    assert any("sign_relays" in p for p in e.value.problems)
