"""SIGKILL while a POST is in flight: after a restart on the same spool, the message is
posted again and every message reaches the receiver; none is lost.

A real ``elemta serve`` process delivers to a receiver in this process (which
outlives it). The receiver answers the first POST with nothing, holding it open;
once it holds it and has taken some of the other messages, the server is
killed. A second server with the same configuration and spool finishes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from pathlib import Path

import aiosmtplib
from conftest import SECRET
from webhook_receiver import Hold

from elemta.testing import free_port, listener, write_config

MESSAGES = 12
SENDER = "alice@sender.example"
DRAIN_TIMEOUT = 20.0


def config_for(root: Path, port: int, url: str) -> Path:
    (root / "webhook.secret").parent.mkdir(parents=True, exist_ok=True)
    (root / "webhook.secret").write_text(SECRET + "\n")
    os.chmod(root / "webhook.secret", 0o600)
    return write_config(root, {
        "server": {"shutdown_grace_seconds": 2.0},
        "listeners": [listener("mx", port)],
        "metrics": {"enabled": False},
        "log": {"level": "info"},
        "delivery": {"enabled": True, "retry_intervals_seconds": [0.2, 0.5]},
        "plugins": {"enabled": ["webhook"],
                    "webhook": {"targets": [{"name": "helpdesk", "url": url,
                                             "secret": {"file": "webhook.secret"},
                                             "max_connections": 4}]}},
    })


def queued(spool: Path) -> int:
    return sum(1 for state in ("ready", "deferred")
               for name in os.listdir(spool / state) if name.endswith(".json"))


async def test_sigkill_during_a_post_reposts_the_message_and_loses_nothing(
        tmp_path: Path, start_server, receiver) -> None:
    rx = await receiver()
    held = Hold()
    rx.answers = [held]
    port = free_port()
    root = tmp_path / "srv"
    config = config_for(root, port, rx.url)

    victim = start_server(config)
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False,
                               timeout=15) as client:
        for n in range(MESSAGES):
            errors, reply = await client.sendmail(
                SENDER, [f"user{n}@example.test"],
                f"From: {SENDER}\r\nSubject: crash test {n}\r\n\r\nbody {n}\r\n")
            assert not errors and reply.startswith("2"), (errors, reply)
    async with asyncio.timeout(DRAIN_TIMEOUT):
        await rx.held.wait()
        while len(rx.delivered()) < MESSAGES // 2:
            await asyncio.sleep(0.005)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(10)
    await asyncio.sleep(0.2)        # the receiver notices the connection is gone
    first = rx.requests[0]
    assert first.answered is None, "the held POST was answered"
    before = len(rx.requests)

    survivor = start_server(config)
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while queued(root / "queue"):
        assert time.monotonic() < deadline, (
            f"{queued(root / 'queue')} messages still queued {DRAIN_TIMEOUT}s after the "
            f"restart\n{survivor.output()}")
        await asyncio.sleep(0.05)
    survivor.send_signal(signal.SIGTERM)
    assert survivor.wait(20) == 0, survivor.output()

    assert rx.refused == []
    delivered = Counter(r.document["id"] for r in rx.delivered())
    subjects = {r.document["subject"] for r in rx.delivered()}
    assert subjects == {f"crash test {n}" for n in range(MESSAGES)}, "a message was lost"
    assert len(delivered) == MESSAGES
    # the held message was posted again after the restart, with the same key
    again = [r for r in rx.requests[before:] if r.document["id"] == first.document["id"]]
    assert again and again[-1].answered == 200
    assert again[-1].headers["idempotency-key"] == first.headers["idempotency-key"]
    # a repeat is allowed only for a POST the kill may have cut between the answer and
    # the spool's record of it: at most one per connection the server had open
    repeats = sum(n - 1 for n in delivered.values())
    assert repeats <= 4, delivered
