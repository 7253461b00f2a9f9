"""rspamd through its milter protocol: GTUBE is rejected, a normal message is tagged."""

from __future__ import annotations

from typing import Any

import pytest
from milter_support import GTUBE, HAM, metric, milter_config, spooled

from elemta.testing import send_mail

# rspamd loads its rules for 10 to 20 seconds when the first of these starts it
pytestmark = pytest.mark.slow


def rspamd_milter(rspamd: Any) -> dict[str, Any]:
    return {"name": "rspamd", "address": rspamd.address, "end_timeout_seconds": 20}


async def test_gtube_is_rejected(elemta_server, rspamd):
    server = await elemta_server(config=milter_config(rspamd_milter(rspamd)))
    spam = HAM.replace("Subject: Lunch on Thursday", "Subject: Test spam").replace(
        "are we still on", f"{GTUBE}\r\nare we still on")

    sent = await send_mail(server, "alice@example.org", ["bob@example.test"], spam)

    assert sent.reply.code == 554, sent.replies
    assert sent.reply.enhanced == "5.7.1"
    assert "Gtube pattern" in sent.reply.text or "Spam message rejected" in sent.reply.text
    await server.flush()
    assert spooled(server) == []
    for stage in ("connect", "helo", "mail", "rcpt", "data"):
        assert await metric(server, "smtp_milter_calls_total", milter="rspamd",
                            stage=stage) == 1, stage
    assert await metric(server, "smtp_milter_results_total", milter="rspamd", stage="data",
                        result="replycode") == 1
    assert await metric(server, "smtp_milter_latency_seconds_count", milter="rspamd",
                        stage="data") == 1


async def test_a_normal_message_gets_rspamds_headers(elemta_server, elemta_outbox, rspamd):
    server = await elemta_server(config=milter_config(rspamd_milter(rspamd)),
                                 outbox=elemta_outbox)

    sent = await send_mail(server, "alice@example.org", ["bob@example.test"], HAM)

    assert sent.accepted, sent.replies
    [delivered] = await elemta_outbox.wait(1)
    result = delivered.header("X-Spamd-Result")
    assert result is not None and result.startswith("default: False"), \
        delivered.content.decode()
    assert delivered.header("X-Spam-Status", ) is not None
    assert delivered.header("Subject") == "Lunch on Thursday"
