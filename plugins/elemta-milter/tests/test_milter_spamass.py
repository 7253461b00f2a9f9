"""spamass-milter on a unix socket, with spamd on loopback: GTUBE is rejected, a normal
message is tagged with SpamAssassin's headers."""

from __future__ import annotations

from typing import Any

from milter_support import GTUBE, HAM, milter_config

from elemta.testing import send_mail


def spamass_milter(spamassassin: Any) -> dict[str, Any]:
    # spamd takes a second or two per message on a busy machine
    return {"name": "spamassassin", "address": spamassassin.address,
            "command_timeout_seconds": 20, "end_timeout_seconds": 25}


PLUGIN_TIMEOUT = {"timeouts": {"milter": 60}}


async def test_gtube_is_rejected(elemta_server, spamassassin):
    config = milter_config(spamass_milter(spamassassin))
    config["plugins"].update(PLUGIN_TIMEOUT)
    server = await elemta_server(config=config)
    spam = HAM.replace("are we still on", f"{GTUBE}\r\nare we still on")

    sent = await send_mail(server, "alice@example.org", ["bob@example.test"], spam)

    assert sent.reply.code == 550, sent.replies
    assert sent.reply.enhanced == "5.7.1"
    assert "spam" in sent.reply.text.lower()


async def test_a_normal_message_is_tagged(elemta_server, elemta_outbox, spamassassin):
    config = milter_config(spamass_milter(spamassassin))
    config["plugins"].update(PLUGIN_TIMEOUT)
    server = await elemta_server(config=config, outbox=elemta_outbox)

    sent = await send_mail(server, "alice@example.org", ["bob@example.test"], HAM)

    assert sent.accepted, sent.replies
    [delivered] = await elemta_outbox.wait(1)
    assert delivered.header("X-Spam-Checker-Version", ) is not None, delivered.content.decode()
    status = delivered.header("X-Spam-Status")
    assert status is not None and status.startswith("No,"), status
