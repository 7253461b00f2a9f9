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
