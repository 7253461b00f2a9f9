"""elemta-policy against a real postgrey (Debian's, in Perl), through a real Elemta server."""

from __future__ import annotations

import asyncio

from elemta.testing import RawSMTP

from policy_support import MESSAGE, config, metric, rcpt


async def test_postgrey_defers_the_first_try_and_lets_the_retry_through(
        elemta_server, elemta_outbox, dns_server, postgrey):
    server = await elemta_server(
        config(dns_server, {"name": "postgrey", "address": postgrey.address}),
        enabled=["policy"], outbox=elemta_outbox)
    sender, recipient = "first@origin.example", "user@example.test"

    first = await rcpt(server, recipient, sender)
    # postgrey answers "DEFER_IF_PERMIT 4.2.0 Greylisted, see http://postgrey…" (4.2.0
    # rather than 4.7.1 because we send etrn_domain, as Postfix 2.3 and later do)
    assert (first.code, first.enhanced) == (451, "4.2.0"), first
    assert first.text.startswith("4.2.0 Greylisted, see http://postgrey"), first
    again = await rcpt(server, recipient, sender)            # too early: deferred again
    assert again.code == 451, again

    await asyncio.sleep(postgrey.delay + 1.2)                # postgrey counts whole seconds
    async with RawSMTP(server.port("mx"), source="127.0.0.2") as c:
        await c.cmd("EHLO client.example.org")
        reply = await c.send_message(sender, [recipient], MESSAGE)
    assert reply.code == 250, reply

    [delivered] = await elemta_outbox.wait(1)
    assert delivered.recipients == [recipient]
    # postgrey's PREPEND at RCPT, carried to the message by the plugin's data hook
    x_greylist = delivered.header("X-Greylist")
    assert x_greylist is not None and x_greylist.startswith("delayed ")
    assert "by postgrey-" in x_greylist and "at policy-test" in x_greylist

    log = postgrey.output()
    assert "action=greylist, reason=new" in log and "action=pass, reason=triplet found" in log
    assert "client_address=127.0.0.2" in log and f"sender={sender}" in log
    actions = {a: metric(server, "smtp_policy_actions_total", service="postgrey", action=a)
               for a in ("defer_if_permit", "prepend")}
    assert actions == {"defer_if_permit": 2, "prepend": 1}
    # three sessions, one connection to postgrey
    assert metric(server, "smtp_policy_connections_total", service="postgrey") == 1


async def test_postgrey_is_not_asked_about_authenticated_or_exempt_clients(
        elemta_server, dns_server, postgrey):
    server = await elemta_server(
        config(dns_server, {"name": "postgrey", "address": postgrey.address,
                            "exempt_networks": ["127.0.0.3/32"]}),
        enabled=["policy"])

    exempt = await rcpt(server, "user@example.test", "exempt@origin.example", source="127.0.0.3")
    assert exempt.code == 250, exempt
    greylisted = await rcpt(server, "user@example.test", "exempt@origin.example")
    assert greylisted.code == 451, greylisted
    assert metric(server, "smtp_policy_exempt_total", service="postgrey", reason="network") == 1
    assert "exempt@origin.example" in postgrey.output()
    assert "client_address=127.0.0.3" not in postgrey.output()
