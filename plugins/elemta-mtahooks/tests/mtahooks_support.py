"""Helpers of the elemta-mtahooks tests: configuration, SMTP conversations, the spool,
metrics."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from elemta.testing import RawSMTP, data_bytes

SECRET = "test-secret-0123456789abcdef"
SENDER = "a@example.org"
MESSAGE = ("From: a@example.org\nTo: user@example.test\nSubject: hello\n"
           "Message-ID: <m1@example.org>\n\nHello there.\n")
USERS = {"alice@example.test": "correct horse"}


def hook(service: Any, *stages: str, **more: Any) -> dict[str, Any]:
    """One [[plugins.mtahooks.hooks]] entry for ``service``."""
    return {"name": more.pop("name", "policy"), "url": service.url, "stages": list(stages),
            "secret": more.pop("secret", SECRET), **more}


async def start(elemta_server: Any, *hooks: dict[str, Any], outbox: Any = None,
                plugins: Any = (), **config: Any) -> Any:
    return await elemta_server({"plugins": {"mtahooks": {"hooks": list(hooks)}}, **config},
                               enabled=["mtahooks"], outbox=outbox, plugins=plugins)


async def converse(server: Any, rcpts: tuple[str, ...] = ("user@example.test",),
                   message: str | bytes = MESSAGE, *, closed: bool = False) -> dict[str, Any]:
    """One SMTP conversation on the mx listener: the reply at each stage up to the first
    refusal (``rcpt``: a list), and with ``closed`` whether the server then hung up."""
    got: dict[str, Any] = {}
    async with RawSMTP(server.port("mx")) as c:
        got["connect"] = reply = c.greeting
        if reply.code < 400:
            for stage, line in (("ehlo", "EHLO client.example"),
                                ("mail", f"MAIL FROM:<{SENDER}>")):
                got[stage] = reply = await c.cmd(line)
                if reply.code >= 400:
                    break
            else:
                got["rcpt"] = [await c.cmd(f"RCPT TO:<{r}>") for r in rcpts]
                if any(r.code == 250 for r in got["rcpt"]):
                    reply = await c.cmd("DATA")
                    if reply.code == 354:
                        await c.send(data_bytes(message))
                        reply = await c.read_reply()
                    got["data"] = reply
        if closed:
            got["closed"] = await c.closed(3.0)
    return got


def queue_id(reply: Any) -> str:
    assert reply.code == 250 and "queued as" in reply.text, str(reply)
    return reply.text.rsplit(" ", 1)[1]


def spooled(server: Any, qid: str) -> tuple[str | None, dict[str, Any] | None]:
    """The state and envelope of a spooled message, or (None, None)."""
    server.app.spool.wait_written()
    for state in ("ready", "deferred", "hold", "failed"):
        path = server.spool_path / state / f"{qid}.json"
        if path.exists():
            return state, json.loads(path.read_bytes())
    return None, None


async def metric(server: Any, name: str, **labels: str) -> float | None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.metrics_port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    body = (await reader.read()).decode()
    writer.close()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in body.splitlines():
        if line.startswith(f"{name}{{"):
            got = line[len(name) + 1:line.index("}")]
            if ",".join(sorted(got.split(","))) == want:
                return float(line.rsplit(" ", 1)[1])
    return None


def at(stage: str, answer: dict[str, Any]):
    """An answer function: ``answer`` at ``stage``, continue elsewhere."""
    return lambda doc: answer if doc["stage"] == stage else {"action": "continue"}
