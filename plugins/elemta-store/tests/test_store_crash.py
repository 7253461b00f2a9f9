"""SIGKILL while the store plugin delivers: after a restart the store has every message once.

A server with delivery off fills the spool. A second server delivers into the
SQLite store and is killed once a quarter of the messages are stored, so
deliveries are cut at every step: not yet written, committed but not yet
recorded in the spool, recorded. A third server with the same configuration
finishes. Each message carries a unique marker header; every marker must be
stored exactly once, whole, with all its recipients.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import time
import uuid
from pathlib import Path

import aiosmtplib

from elemta.testing import free_port, listener, write_config

MESSAGES = 200
SUBMITTERS = 8
SENDER = "sender@origin.example"
DRAIN_TIMEOUT = 30.0


def recipients_of(n: int) -> list[str]:
    return [f"u{(n + k) % 3}@example.test" for k in range(1 + n % 3)]


def build_message(n: int, marker: str) -> bytes:
    return (f"From: {SENDER}\r\nSubject: store crash test {n}\r\nX-Marker: {marker}\r\n"
            f"Message-ID: <{marker}@origin.example>\r\n\r\n"
            + "".join(f"line {i} of message {n}\r\n" for i in range(60))
            + "end of message\r\n").encode()


def config_for(root: Path, port: int, delivery: bool) -> Path:
    return write_config(root, {
        "server": {"shutdown_grace_seconds": 2.0},
        "listeners": [listener("mx", port)],
        "metrics": {"enabled": False},
        "delivery": {"enabled": delivery, "workers": 20,
                     "retry_intervals_seconds": [0.2, 0.5]},
        "plugins": {"enabled": ["store"], "store": {"path": "store/messages.db"}},
    })


def queued(spool: Path) -> int:
    return sum(1 for state in ("ready", "deferred")
               for name in os.listdir(spool / state) if name.endswith(".json"))


def stored(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute("SELECT messages FROM totals").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


async def submit_all(port: int, expected: dict[str, list[str]]) -> None:
    numbers = iter(range(MESSAGES))

    async def one_connection() -> None:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False,
                                   timeout=15) as client:
            for n in numbers:
                marker = f"m{n:04d}.{uuid.uuid4().hex}"
                errors, reply = await client.sendmail(SENDER, recipients_of(n),
                                                      build_message(n, marker))
                assert not errors and reply.startswith("2"), (errors, reply)
                expected[marker] = recipients_of(n)

    await asyncio.gather(*(one_connection() for _ in range(SUBMITTERS)))


async def test_sigkill_during_delivery_into_the_store_stores_every_message_once(
        tmp_path: Path, start_server) -> None:
    expected: dict[str, list[str]] = {}
    port = free_port()
    root = tmp_path / "srv"
    spool, db = root / "queue", root / "store" / "messages.db"

    filler = start_server(config_for(root, port, delivery=False))
    await submit_all(port, expected)
    filler.send_signal(signal.SIGTERM)
    assert filler.wait(20) == 0, filler.output()
    assert queued(spool) == MESSAGES

    config = config_for(root, port, delivery=True)
    victim = start_server(config)
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while stored(db) < MESSAGES // 4:
        assert time.monotonic() < deadline, f"only {stored(db)} stored\n{victim.output()}"
        await asyncio.sleep(0.002)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(10)
    at_kill = stored(db)
    assert queued(spool) > 0, "everything was delivered before the kill"

    survivor = start_server(config)
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while queued(spool):
        assert time.monotonic() < deadline, (f"{queued(spool)} still queued\n"
                                             f"{survivor.output()}")
        await asyncio.sleep(0.02)
    survivor.send_signal(signal.SIGTERM)
    assert survivor.wait(20) == 0, survivor.output()

    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT m.id, m.recipients, c.raw FROM messages m"
                            " JOIN contents c ON c.id = m.id").fetchall()
        rcpt_rows = conn.execute("SELECT count(*) FROM recipients").fetchone()[0]
        total = conn.execute("SELECT messages FROM totals").fetchone()[0]
    found: dict[str, list[str]] = {}
    for _, recipients, raw in rows:
        assert raw.endswith(b"end of message\r\n")
        marker = raw.split(b"X-Marker: ", 1)[1].split(b"\r\n", 1)[0].decode()
        assert marker not in found, f"{marker} stored twice"
        found[marker] = sorted(json.loads(recipients))
    print(f"{at_kill} of {MESSAGES} stored when the server was killed")
    assert found == {m: sorted(r) for m, r in expected.items()}
    assert total == MESSAGES
    assert rcpt_rows == sum(len(r) for r in expected.values())
    assert os.listdir(spool / "failed") == [] and os.listdir(spool / "messages") == []
