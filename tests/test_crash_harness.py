"""The crash harness: SIGKILL, again and again, while mail is accepted and delivered.

One server configuration, a relay to a counting sink in this process.
Clients submit messages without pause, each carrying a token in its
Message-ID; the server delivers them to the sink as they come. The server is
killed with SIGKILL ``KILLS`` times, each time once it has both acknowledged
and delivered mail since its last start, and started again on the same spool.
Clients that lose their connection reconnect once it is back. At the end the
server drains its queue and stops.

What must hold:

* every message the server acknowledged with a 250 reached the sink, for
  every recipient, byte for byte (after the trace header the server adds);
* nothing reached the sink that nobody sent;
* a message is repeated only within the in-flight window (RFC 1047): every
  copy but the last was the last thing on a connection the kill cut, and the
  sink saw nothing more from that client; at most one repeat per connection
  the runner may have open at a kill.

It runs twice: with a sink that answers at once, and with a slow one (50 ms
per message) behind which a backlog older than the spool's checkpoint interval
builds up, so that resident messages are carried from segment to segment while
the kills come (the server's debug log must show carries).

The figures (acknowledged, delivered, repeats, unacknowledged messages that
were delivered all the same) are printed and attached to the test report.
The size is small in CI; ``ELEMTA_CRASH_KILLS`` and ``ELEMTA_CRASH_MESSAGES``
make it as large as one likes::

    ELEMTA_CRASH_KILLS=14 ELEMTA_CRASH_MESSAGES=14000 \\
        .venv/bin/pytest -s tests/test_crash_harness.py
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import aiosmtplib
import pytest

from elemta.testing.fixtures import write_config
from elemta.testing.process import free_port, listener

from .counting_sink import CountingSink, queued

pytestmark = pytest.mark.slow

KILLS = int(os.environ.get("ELEMTA_CRASH_KILLS", "4"))
MESSAGES = int(os.environ.get("ELEMTA_CRASH_MESSAGES", "1200"))
CLIENTS = 8
BACKLOG = 100            # clients wait while this many acknowledged messages are undelivered
SLOW_BACKLOG = 600       # with the slow sink: seconds of delivery, older than a seal
SLOW_DELAY = 0.05        # the slow sink's pause before each 250
MAX_PER_DESTINATION = 10
SENDER = "sender@origin.example"
ROUND_TIMEOUT = 30.0
DRAIN_TIMEOUT = 60.0


def recipients_of(n: int) -> list[str]:
    # one, two or three recipients; every second message spills its body to disk
    return [f"user{n}-{k}@remote{k}.example" for k in range(1 + n % 3)]


def build_message(n: int, token: str, rcpts: list[str]) -> bytes:
    lines = 600 if n % 2 else 20      # ~40 KB, above memory_bytes; or ~1 KB
    head = (f"From: {SENDER}\r\nTo: {', '.join(rcpts)}\r\nSubject: crash harness {n}\r\n"
            f"Message-ID: <{token}@origin.example>\r\n"
            f"Date: Thu, 1 Jan 2026 00:00:00 +0000\r\n\r\n")
    body = "".join(f"line {i} of {token} " + "x" * 30 + "\r\n" for i in range(lines))
    return (head + body + f"END {token}\r\n").encode()


class Traffic:
    """Clients that keep submitting, across kills, until the budget is spent."""

    def __init__(self, port: int, sink: CountingSink, backlog: int = BACKLOG) -> None:
        self.port = port
        self.sink = sink
        self.backlog = backlog
        self.up = asyncio.Event()
        self.numbers: Iterator[int] = iter(range(MESSAGES))
        self.acked: dict[str, tuple[list[str], bytes]] = {}   # message id → recipients, bytes
        self.sent: dict[str, tuple[list[str], bytes]] = {}    # everything put on the wire
        self.refused: list[str] = []                          # replies that were not 250

    async def client(self) -> None:
        pending: int | None = None          # a message whose fate was not learnt: send anew
        while True:
            await self.up.wait()
            client = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.port, start_tls=False,
                                     timeout=15)
            try:
                await client.connect()
                while True:
                    # acceptance and delivery both at work: keep the queue short
                    while len(self.acked) - len(self.sink.message_ids) > self.backlog:
                        await asyncio.sleep(0.005)
                    n = pending if pending is not None else next(self.numbers, None)
                    if n is None:
                        return
                    pending = n
                    message_id = f"<h{n:06d}.{uuid.uuid4().hex}@origin.example>"
                    token = message_id[1:].split("@")[0]
                    rcpts = recipients_of(n)
                    data = build_message(n, token, rcpts)
                    self.sent[message_id] = (rcpts, data)
                    errors, reply = await client.sendmail(SENDER, rcpts, data)
                    if errors or not reply.startswith("2"):
                        self.refused.append(f"{errors} {reply}")
                        return
                    self.acked[message_id] = (rcpts, data)
                    pending = None
            except (aiosmtplib.SMTPException, OSError):
                await asyncio.sleep(0.05)       # the server died; wait for the next one
            finally:
                client.close()


async def until(predicate: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(what())
        await asyncio.sleep(0.005)


def config_for(root: Path, port: int, sink_port: int, log_level: str = "warning",
               transport_process: bool = False) -> Path:
    return write_config(root, {
        "server": {"relay_networks": ["127.0.0.0/8"], "shutdown_grace_seconds": 2.0},
        "listeners": [listener("mx", port)],
        "metrics": {"enabled": False},
        "log": {"level": log_level},
        "spool": {"memory_bytes": 16384},
        "delivery": {
            "enabled": True,
            "workers": 20,
            "max_per_destination": MAX_PER_DESTINATION,
            "retry_intervals_seconds": [0.2, 0.5, 1.0],
            "routes": {"*": {"host": f"127.0.0.1:{sink_port}", "tls": "none"}},
            "transport_process": transport_process,
        },
    })


@pytest.mark.parametrize("next_hop", ["fast", "slow", "fast, transport process",
                                      "slow, transport process"])
async def test_repeated_sigkill_during_acceptance_and_delivery_loses_nothing(
        tmp_path: Path, start_server: Any, record_property: Any, next_hop: str) -> None:
    """The ``transport process`` runs use ``[delivery] transport_process``: the SMTP
    transport's helper dies with the server, and keeps a connection from its next command
    until the server has taken the outcome, so the same rules hold."""
    slow = next_hop.startswith("slow")
    sink = await CountingSink(keep_content=True, delay=SLOW_DELAY if slow else 0.0).start()
    port = free_port()
    root = tmp_path / "srv"
    config = config_for(root, port, sink.port, log_level="debug" if slow else "warning",
                        transport_process=next_hop.endswith("transport process"))
    traffic = Traffic(port, sink, SLOW_BACKLOG if slow else BACKLOG)
    carries = 0
    rng = random.Random(int(os.environ.get("ELEMTA_CRASH_SEED", "0")) or None)
    kills: list[str] = []
    server = await asyncio.to_thread(start_server, config)
    traffic.up.set()
    clients = [asyncio.create_task(traffic.client()) for _ in range(CLIENTS)]
    try:
        for round_ in range(KILLS):
            acked, delivered = len(traffic.acked), len(sink.copies)
            share = MESSAGES // (KILLS + 2)
            # both at work since the last start: new mail acknowledged, queued mail delivered
            await until(lambda: len(traffic.acked) >= acked + share // 2
                        and len(sink.copies) >= delivered + share // 4
                        or all(c.done() for c in clients), ROUND_TIMEOUT,
                        lambda: f"round {round_}: {len(traffic.acked) - acked} acknowledged, "
                                f"{len(sink.copies) - delivered} delivered in "
                                f"{ROUND_TIMEOUT}s\n{server.output()}")
            assert not traffic.refused, traffic.refused[:5]
            if all(c.done() for c in clients):
                break
            await asyncio.sleep(rng.uniform(0, 0.1))
            traffic.up.clear()
            os.kill(server.pid, signal.SIGKILL)
            await asyncio.to_thread(server.wait, 10)
            carries += server.output().count("still in memory carried from")
            kills.append(f"kill {round_ + 1}: {len(traffic.acked)} acknowledged, "
                         f"{len(sink.copies)} copies delivered")
            server = await asyncio.to_thread(start_server, config)
            traffic.up.set()
        for task in clients:
            if task.done():
                task.result()               # a client's own failure, not a kill
        assert len(kills) == KILLS, (
            f"the clients ran out of messages after {len(kills)} kills ({len(traffic.acked)} "
            f"acknowledged, {len(sink.copies)} delivered); raise ELEMTA_CRASH_MESSAGES\n"
            f"{server.output()}")
        # the rest of the budget goes at the sink's pace when the sink is slow
        rest = ROUND_TIMEOUT + (2 * MESSAGES * SLOW_DELAY / MAX_PER_DESTINATION if slow else 0)
        done, running = await asyncio.wait(clients, timeout=rest)
        assert not running, f"clients still sending after {rest:.0f}s\n{server.output()}"
        for task in done:
            task.result()
        assert not traffic.refused, traffic.refused[:5]

        wanted = {(mid, r) for mid, (rcpts, _) in traffic.acked.items() for r in rcpts}
        await until(lambda: not wanted - set(sink.counts()), DRAIN_TIMEOUT,
                    lambda: f"{len(wanted - set(sink.counts()))} acknowledged recipients "
                            f"never got their message, {DRAIN_TIMEOUT}s after the last "
                            f"submission\n{server.output()}")
        server.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(server.wait, 20) == 0, server.output()
        carries += server.output().count("still in memory carried from")
    finally:
        for task in clients:
            task.cancel()
        await sink.stop()

    assert queued(root / "queue") == 0, "the queue is not empty after every message arrived"
    counts = sink.counts()
    unknown = {mid for mid, _ in counts} - set(traffic.sent)
    assert not unknown, f"the sink got mail nobody sent (bounces?): {sorted(unknown)[:5]}"
    by_message = sink.by_message()
    for mid, (rcpts, data) in traffic.acked.items():
        for copy in by_message[mid]:
            # the server prepends its trace headers and changes nothing else
            assert copy.content.endswith(data), f"{mid}: the delivered content differs"

    repeated = {mid: cs for mid, cs in by_message.items() if len(cs) > 1}
    unacknowledged = set(by_message) - set(traffic.acked)
    summary = (f"{next_hop} next hop: "
               f"{KILLS} kills, {len(traffic.acked)} messages acknowledged "
               f"({len(wanted)} recipients), 0 lost; {len(repeated)} delivered twice "
               f"({sum(n - 1 for n in counts.values())} extra recipient copies); "
               f"{len(unacknowledged)} unacknowledged messages (killed before the 250) "
               f"delivered all the same"
               + (f"; {carries} carries of messages in memory" if slow else ""))
    print("\n" + "\n".join(kills) + "\n" + summary)
    record_property("crash_harness", summary)
    read_then_repeated = {mid: [(c.connection, c.confirmed) for c in cs]
                          for mid, cs in repeated.items() if any(c.confirmed for c in cs[:-1])}
    assert not read_then_repeated, (
        f"{summary}: delivered again after the server had read the 250: "
        f"{list(read_then_repeated.items())[:3]}")
    assert all(len(cs) == 2 for cs in repeated.values()), summary
    cut = {c.connection for cs in repeated.values() for c in cs[:-1]}
    assert len(cut) == len(repeated), summary
    assert len(repeated) <= KILLS * MAX_PER_DESTINATION, summary
    if slow:
        assert carries, f"{summary}: the backlog never outlived a seal: nothing was carried"

