"""DATA streams into the spool: a big message does not grow the server's memory."""

from __future__ import annotations

import asyncio
from pathlib import Path

from elemta.testing.client import RawSMTP
from elemta.testing.fixtures import write_config

from elemta.testing.process import free_port, listener, wait_until

MIB = 1 << 20


def rss_peak_kib(pid: int) -> int:
    """VmHWM: the highest resident set size the process ever had."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc status")


async def test_20_mib_message_grows_peak_rss_by_less_than_5_mib(tmp_path, start_server):
    port = free_port()
    config = write_config(tmp_path / "srv", {
        "server": {"max_message_bytes": 64 * MIB},
        "listeners": [listener("mx", port)],
        "metrics": {"enabled": False},
        "log": {"level": "warning"},
    })
    server = start_server(config)
    line = b"x" * 76 + b"\r\n"
    chunk = line * (64 * 1024 // len(line))
    async with RawSMTP(port) as c:
        await c.cmd("EHLO client.example")
        # one small message first, so lazily imported code is already resident
        assert (await c.send_message("a@b.example", ["u@example.test"],
                                     b"Subject: warm-up\r\n\r\nhi\r\n.\r\n")).code == 250
        await asyncio.sleep(0.2)
        before = rss_peak_kib(server.pid)
        await c.cmd("MAIL FROM:<a@b.example> SIZE=21000000")
        await c.cmd("RCPT TO:<u@example.test>")
        assert (await c.cmd("DATA")).code == 354
        await c.send(b"Subject: big\r\n\r\n")
        sent = 0
        while sent < 20 * MIB:
            await c.send(chunk)
            sent += len(chunk)
        await c.send(b".\r\n")
        reply = await c.read_reply()
        assert reply.code == 250, str(reply)
    growth_mib = (rss_peak_kib(server.pid) - before) / 1024
    assert growth_mib < 5, f"peak RSS grew by {growth_mib:.1f} MiB for a 20 MiB message"
    queue_id = reply.text.rsplit(" ", 1)[1]
    spool = tmp_path / "srv" / "queue"
    wait_until(lambda: (spool / "ready" / f"{queue_id}.json").exists(), what="envelope written")
    stored = (spool / "messages" / queue_id).stat().st_size
    assert stored > sent


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc status")


async def test_idle_tls_sessions_cost_under_100_kib_each_and_are_given_back(tmp_path,
                                                                           start_server):
    """bench/tls_memory.py measures a thousand; this holds the line at 300."""
    import ssl

    port = free_port()
    config = write_config(tmp_path / "srv", {
        "server": {"max_connections": 1000, "max_connections_per_ip": 1000},
        "listeners": [listener("smtps", port, tls="implicit")],
        "metrics": {"enabled": False},
        "log": {"level": "warning"},
    })
    server = start_server(config)
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE

    async def session():
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                       server_hostname="mx.example.test")
        assert (await reader.readline()).startswith(b"220")
        return writer

    await asyncio.sleep(0.5)
    base = rss_kib(server.pid)
    writers = []
    for _ in range(6):
        writers += await asyncio.gather(*(session() for _ in range(50)))
    await asyncio.sleep(1)
    per_session = (rss_kib(server.pid) - base) / len(writers)
    for w in writers:
        w.transport.abort()
    # the sessions' memory is collected and handed back a moment after they close
    left = await asyncio.to_thread(
        wait_until, lambda: (rss_kib(server.pid) - base < 8 * 1024) and rss_kib(server.pid),
        10, "the memory of the closed sessions given back")
    assert per_session < 100, f"{per_session:.0f} KiB per idle TLS session"
    assert left


def test_the_trimmer_trims_once_sessions_fell_to_half_of_a_peak_worth_it():
    from elemta.memory import MIN_INTERVAL_SECONDS, TRIM_AFTER_PEAK, Trimmer

    calls = []
    now = [1000.0]
    trimmer = Trimmer(trim=lambda pad: calls.append(pad) or 1, clock=lambda: now[0])
    for n in range(1, TRIM_AFTER_PEAK // 2):
        trimmer.opened(n)
    assert trimmer.closed(0) is None  # a small peak is not worth it
    for n in range(1, 201):
        trimmer.opened(n)
    assert trimmer.closed(150) is None
    assert trimmer.closed(100) == 0.0  # half of the peak of 200: now
    assert trimmer.closed(99) is None  # and not again until a new peak has halved
    trimmer.trim()
    assert calls == [0] and trimmer.trims == 1
    # a steady load that rises and halves again: not before MIN_INTERVAL_SECONDS
    now[0] += 5
    for n in range(99, 201):
        trimmer.opened(n)
    assert trimmer.closed(100) == MIN_INTERVAL_SECONDS - 5
    now[0] += MIN_INTERVAL_SECONDS
    for n in range(100, 201):
        trimmer.opened(n)
    assert trimmer.closed(90) == 0.0
