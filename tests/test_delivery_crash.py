"""SIGKILL during delivery: after a restart every recipient gets its message, and none twice.

The spool is filled by a server with delivery off, so that every message is
checkpointed and waiting. A second server delivers them to a sink in this
process (it outlives the servers, which are subprocesses) and is killed once
the sink has taken some of them. A third server, with the same configuration,
delivers the rest. The sink counts what it accepted per (Message-ID,
recipient).

One repeat no MTA can avoid: the message went out whole, the remote accepted
it, and the sender died before it read the 250 (RFC 1047). The sink therefore
also notes, for every message it accepted, whether the client said anything
more on that connection after the 250 (the next MAIL, RSET or QUIT). A client
that did had read the reply, and the runner must have recorded the delivery
by then: nothing else may run on its event loop between reading a 250 and
updating the envelope, so no other task can have used the connection first.
A copy like that must never be followed by another one. A repeat of a copy
whose 250 was the last thing on a connection the kill cut is allowed, at most
one per connection the runner may have open.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from pathlib import Path

import aiosmtplib

from elemta.testing.fixtures import write_config
from elemta.testing.process import free_port, listener

from .counting_sink import CountingSink, queued

MESSAGES = 400
SUBMITTERS = 8
MAX_PER_DESTINATION = 10
SENDER = "sender@origin.example"
DRAIN_TIMEOUT = 20.0


# ------------------------------------------------------------------ the servers


def recipients_of(n: int) -> list[str]:
    # one, two or three recipients, all behind the one static route
    return [f"user{n}-{k}@remote{k}.example" for k in range(1 + n % 3)]


def build_message(n: int, marker: str, rcpts: list[str]) -> bytes:
    return (f"From: {SENDER}\r\nTo: {', '.join(rcpts)}\r\nSubject: crash test {n}\r\n"
            f"Message-ID: <{marker}@origin.example>\r\n"
            f"Date: Thu, 1 Jan 2026 00:00:00 +0000\r\n\r\n"
            + "".join(f"line {i} of message {n}\r\n" for i in range(40))).encode()


def config_for(root: Path, port: int, sink_port: int, delivery: bool) -> Path:
    return write_config(root, {
        "server": {"relay_networks": ["127.0.0.0/8"], "shutdown_grace_seconds": 2.0},
        "listeners": [listener("mx", port)],
        "metrics": {"enabled": False},
        "log": {"level": "warning"},
        "delivery": {
            "enabled": delivery,
            "workers": 20,
            "max_per_destination": MAX_PER_DESTINATION,
            "retry_intervals_seconds": [0.2, 0.5],
            "routes": {"*": {"host": f"127.0.0.1:{sink_port}", "tls": "none"}},
        },
    })


async def submit_all(port: int, expected: dict[str, list[str]]) -> None:
    """Submit MESSAGES messages over SUBMITTERS connections; record their recipients."""
    numbers = iter(range(MESSAGES))

    async def one_connection() -> None:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False,
                                   timeout=15) as client:
            for n in numbers:
                marker = f"c{n:04d}.{uuid.uuid4().hex}"
                rcpts = recipients_of(n)
                errors, reply = await client.sendmail(SENDER, rcpts,
                                                      build_message(n, marker, rcpts))
                assert not errors and reply.startswith("2"), (errors, reply)
                expected[f"<{marker}@origin.example>"] = rcpts

    await asyncio.gather(*(one_connection() for _ in range(SUBMITTERS)))


# ------------------------------------------------------------------ the test


async def test_sigkill_during_delivery_delivers_everything_once(tmp_path: Path,
                                                                start_server) -> None:
    expected: dict[str, list[str]] = {}
    sink = await CountingSink().start()
    try:
        port = free_port()
        root = tmp_path / "srv"
        spool = root / "queue"

        # 1. fill the spool; a clean stop checkpoints every message
        filler = start_server(config_for(root, port, sink.port, delivery=False))
        await submit_all(port, expected)
        filler.send_signal(signal.SIGTERM)
        assert filler.wait(20) == 0, filler.output()
        assert queued(spool) == MESSAGES

        # 2. deliver, and kill the server part-way through
        config = config_for(root, port, sink.port, delivery=True)
        victim = start_server(config)
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while len(sink.copies) < MESSAGES // 3:
            assert time.monotonic() < deadline, (
                f"only {len(sink.copies)} messages delivered in {DRAIN_TIMEOUT}s\n"
                f"{victim.output()}")
            await asyncio.sleep(0.002)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        # whatever the dead server had sent is still in the sink's buffers
        await asyncio.sleep(0.2)
        before_restart = len(sink.copies)
        assert before_restart < MESSAGES, "everything was delivered before the kill"

        # 3. restart with the same configuration and let it finish
        survivor = start_server(config)
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while queued(spool):
            assert time.monotonic() < deadline, (
                f"{queued(spool)} messages still queued {DRAIN_TIMEOUT}s after the restart\n"
                f"{survivor.output()}")
            await asyncio.sleep(0.02)
        survivor.send_signal(signal.SIGTERM)
        assert survivor.wait(20) == 0, survivor.output()
    finally:
        await sink.stop()

    counts = sink.counts()
    wanted = {(mid, r) for mid, rcpts in expected.items() for r in rcpts}
    missing = wanted - set(counts)
    unexpected = set(counts) - wanted
    assert not missing, f"{len(missing)} of {len(wanted)} recipients never got their message"
    assert not unexpected, f"the sink got mail nobody sent (bounces?): {sorted(unexpected)[:5]}"

    copies = sink.by_message()
    repeated = {mid: cs for mid, cs in copies.items() if len(cs) > 1}
    after_a_read_250 = {mid: cs for mid, cs in repeated.items()
                        if any(c.confirmed for c in cs[:-1])}
    summary = (f"{len(repeated)} of {MESSAGES} messages delivered more than once "
               f"({sum(n - 1 for n in counts.values())} extra copies for recipients), "
               f"{len(after_a_read_250)} of them after the server had read the 250; "
               f"the sink had {before_restart} messages when the server was restarted")
    print(summary)
    examples = [(mid, [(c.connection, c.confirmed) for c in cs])
                for mid, cs in list(after_a_read_250.items())[:3]]
    assert not after_a_read_250, (
        f"{summary}: the runner delivered again what it had seen accepted; (message, "
        f"[(sink connection, client spoke after the 250)…]): {examples}")
    cut = {c.connection for cs in repeated.values() for c in cs[:-1]}
    assert len(repeated) <= MAX_PER_DESTINATION and len(cut) == len(repeated), summary
    assert all(len(cs) == 2 for cs in repeated.values()), summary
    assert os.listdir(spool / "failed") == [] and os.listdir(spool / "hold") == []
    assert os.listdir(spool / "messages") == []
