"""A full spool disk, a crash on top of it, and the way back, with the real server process.

The spool lives on a small tmpfs. Mail keeps coming while nothing can be
delivered (the next hop is down) until the server refuses it with 452 4.3.1;
then the server is killed, and started again with nothing freed. It must start,
refuse new mail while there is no room, deliver once the next hop is back, and
take mail again when the room is back; every message it acknowledged arrives,
checked by content.
"""

from __future__ import annotations

import asyncio
import re
import signal
import smtplib
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from elemta.testing import Sink, free_port, listener, wait_until, write_config

pytestmark = pytest.mark.slow

TOKEN = re.compile(rb"token=(\w+)")
BODY = b"".join(b"line %05d of a message that takes room in the spool\r\n" % i
                for i in range(1500))  # about 80 KiB


def message(token: str) -> bytes:
    return (f"Subject: disk {token}\r\nMessage-ID: <{token}@client.example>\r\n\r\n"
            f"token={token}\r\n").encode() + BODY


def send(port: int, token: str) -> tuple[int, str]:
    """The reply to MAIL if it refused, else the reply after DATA."""
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
            client.ehlo("client.example")
            code, text = client.mail("a@client.example")
            if code != 250:
                return code, text.decode()
            client.rcpt("bob@remote.example")
            code, text = client.data(message(token))
            return code, text.decode()
    except smtplib.SMTPResponseException as e:
        return e.smtp_code, e.smtp_error.decode()


def ready(metrics_port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz",
                                    timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


async def test_full_disk_then_kill_then_restart_loses_nothing(tmp_path: Path, start_server,
                                                              small_filesystem) -> None:
    disk = small_filesystem("6m")
    port, metrics_port, next_hop = free_port(), free_port(), free_port()
    config = write_config(tmp_path / "srv", {
        "server": {"max_message_bytes": 1 << 20, "relay_networks": ["127.0.0.0/8"]},
        "listeners": [listener("mx", port)],
        "metrics": {"enabled": True, "address": f"127.0.0.1:{metrics_port}"},
        "spool": {"path": str(disk / "queue"), "min_free_bytes": 1 << 20,
                  "min_free_inodes": 50},
        "delivery": {"enabled": True, "retry_intervals_seconds": [0.5],
                     "bounce_after_seconds": 3600,
                     "routes": {"*": {"host": f"127.0.0.1:{next_hop}", "tls": "none"}}},
    })
    server = start_server(config)

    acknowledged: list[str] = []

    async def fill_up(prefix: str) -> None:
        """Send until the spool refuses three times in a row with 452 4.3.1."""
        refusals = 0
        for n in range(200):
            code, text = await asyncio.to_thread(send, port, f"{prefix}{n:03d}")
            if code == 250:
                acknowledged.append(f"{prefix}{n:03d}")
                refusals = 0
                continue
            assert (code, text.split(" ", 1)[0]) == (452, "4.3.1"), (code, text)
            refusals += 1
            if refusals == 3:
                return
        raise AssertionError("the spool never filled up")

    # 1. mail comes in while the next hop is down, until the spool refuses it
    await fill_up("a")
    assert len(acknowledged) >= 20
    status, reason = ready(metrics_port)
    assert status == 503 and "new mail is refused" in reason

    # 2. killed, and started again with nothing freed: it starts, takes what room its own
    # journal gave back, and refuses again
    server.send_signal(signal.SIGKILL)
    server.wait(10)
    server = start_server(config)
    assert "Traceback" not in server.output()
    await fill_up("b")
    assert ready(metrics_port)[0] == 503

    # 3. the next hop is back: everything is delivered, the room comes back, mail is taken
    async with Sink(port=next_hop) as sink:
        late = await asyncio.to_thread(
            wait_until, lambda: (r := send(port, "late"))[0] == 250 and r, 60,
            "the spool taking mail again")
        assert late[0] == 250
        await sink.wait_for_tokens(set(acknowledged) | {"late"}, TOKEN, timeout=60)
        arrived = [TOKEN.search(m.content).group(1).decode() for m in sink.messages]
    for m in sink.messages:
        token = TOKEN.search(m.content).group(1).decode()
        assert m.content.endswith(message(token).split(b"\r\n\r\n", 1)[1]), token
    duplicates = len(arrived) - len(set(arrived))
    assert set(arrived) == set(acknowledged) | {"late"}, "an acknowledged message was lost"
    assert duplicates <= 5, f"{duplicates} duplicates"
    assert ready(metrics_port)[0] == 200
    server.send_signal(signal.SIGTERM)
    assert server.wait(40) == 0, server.output()
