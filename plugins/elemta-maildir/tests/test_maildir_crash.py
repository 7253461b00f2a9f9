"""SIGKILL while the maildir plugin delivers: after a restart every mailbox has every message once.

A server with delivery off fills the spool (a clean stop checkpoints every
message). A second server delivers into three mailboxes and is killed once
the first files have appeared in them, so deliveries are cut at every step:
half-written in ``tmp/``, renamed into ``new/`` but not yet recorded in the
spool, recorded; its delivery helper process is either left to finish the
batch it has or killed with it. A third server with the same configuration finishes. Each
message carries a unique marker header; every (mailbox, marker) pair must
be found exactly once in ``new/`` + ``cur/``, every file whole, and nothing may
be left in ``tmp/`` (a stale partial copy is replaced by the retry, which
uses the same name).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import uuid
from collections import Counter
from pathlib import Path

import aiosmtplib
import pytest

from elemta.testing import free_port, listener, write_config

MESSAGES = 300
SUBMITTERS = 8
USERS = ("u0", "u1", "u2")
SENDER = "sender@origin.example"
DRAIN_TIMEOUT = 20.0
MARKER = re.compile(rb"^X-Marker: (\S+)\r$", re.MULTILINE)


def recipients_of(n: int) -> list[str]:
    """One, two or three of the mailboxes."""
    return [f"{USERS[(n + k) % 3]}@example.test" for k in range(1 + n % 3)]


def build_message(n: int, marker: str) -> bytes:
    return (f"From: {SENDER}\r\nSubject: maildir crash test {n}\r\nX-Marker: {marker}\r\n"
            f"Message-ID: <{marker}@origin.example>\r\n\r\n"
            + "".join(f"line {i} of message {n}\r\n" for i in range(60))
            + "end of message\r\n").encode()


def config_for(root: Path, port: int, delivery: bool) -> Path:
    return write_config(root, {
        "server": {"shutdown_grace_seconds": 2.0},
        "listeners": [listener("mx", port)],
        "metrics": {"enabled": False},
        "log": {"level": "info"},  # the survivor's "already delivered" lines are counted
        "delivery": {"enabled": delivery, "workers": 20,
                     "retry_intervals_seconds": [0.2, 0.5]},
        "plugins": {"enabled": ["maildir"],
                    "maildir": {"path": str(root / "vmail" / "{domain}" / "{user}"),
                                "create_mailboxes": True}},
    })


async def submit_all(port: int, expected: dict[str, list[str]]) -> None:
    numbers = iter(range(MESSAGES))

    async def one_connection() -> None:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False,
                                   timeout=15) as client:
            for n in numbers:
                marker = f"m{n:04d}.{uuid.uuid4().hex}"
                rcpts = recipients_of(n)
                errors, reply = await client.sendmail(SENDER, rcpts, build_message(n, marker))
                assert not errors and reply.startswith("2"), (errors, reply)
                expected[marker] = rcpts

    await asyncio.gather(*(one_connection() for _ in range(SUBMITTERS)))


def queued(spool: Path) -> int:
    return sum(1 for state in ("ready", "deferred")
               for name in os.listdir(spool / state) if name.endswith(".json"))


def mailbox(root: Path, user: str) -> Path:
    return root / "vmail" / "example.test" / user


def listing(root: Path, sub: str) -> list[Path]:
    out = []
    for user in USERS:
        try:
            out += [mailbox(root, user) / sub / n for n in os.listdir(mailbox(root, user) / sub)]
        except FileNotFoundError:
            pass
    return out


def children(pid: int) -> list[int]:
    """The processes ``pid`` started (its delivery and removal helpers)."""
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(p) for p in f.read().split()]
    return out


@pytest.mark.parametrize("helpers", ["live on", "killed too"])
async def test_sigkill_during_maildir_delivery_delivers_every_copy_once(tmp_path: Path,
                                                                        start_server,
                                                                        helpers: str) -> None:
    """``live on``: the delivery helper finishes the batch it has after the server died;
    ``killed too``: it dies with the server, in the middle of a batch."""
    expected: dict[str, list[str]] = {}
    wanted = sum(len(recipients_of(n)) for n in range(MESSAGES))
    port = free_port()
    root = tmp_path / "srv"
    spool = root / "queue"

    # 1. fill the spool
    filler = start_server(config_for(root, port, delivery=False))
    await submit_all(port, expected)
    filler.send_signal(signal.SIGTERM)
    assert filler.wait(20) == 0, filler.output()
    assert queued(spool) == MESSAGES

    # 2. deliver, and kill the server while files are appearing
    config = config_for(root, port, delivery=True)
    victim = start_server(config)
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while len(listing(root, "new")) < wanted // 4:
        assert time.monotonic() < deadline, (
            f"only {len(listing(root, 'new'))} files delivered in {DRAIN_TIMEOUT}s\n"
            f"{victim.output()}")
        await asyncio.sleep(0.001)
    doomed = children(victim.pid) if helpers == "killed too" else []
    assert helpers == "live on" or any(
        b"elemta_maildir" in open(f"/proc/{pid}/cmdline", "rb").read() for pid in doomed), \
        "the delivery helper is not running"
    for pid in [*doomed, victim.pid]:
        os.kill(pid, signal.SIGKILL)
    victim.wait(10)
    at_kill = len(listing(root, "new"))
    left_in_tmp = len(listing(root, "tmp"))
    assert queued(spool) > 0, "everything was delivered before the kill"

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
    # copies the victim had renamed into new/ but not yet recorded in the spool
    found_again = survivor.output().count("already delivered to")

    found: Counter[tuple[str, str]] = Counter()
    for path in listing(root, "new") + listing(root, "cur"):
        raw = path.read_bytes()
        assert len(raw) == int(path.name.rsplit(",S=", 1)[1].split(":")[0]), path
        assert raw.endswith(b"end of message\r\n"), f"{path} is truncated"
        user = path.parent.parent.name
        [marker] = MARKER.findall(raw)
        assert raw.startswith(b"Return-Path: <%s>\r\nDelivered-To: %s@example.test\r\n"
                              % (SENDER.encode(), user.encode()))
        found[(f"{user}@example.test", marker.decode())] += 1
    want = Counter((r, marker) for marker, rcpts in expected.items() for r in rcpts)
    summary = (f"{wanted} copies wanted; {at_kill} files in new/ and {left_in_tmp} in tmp/ "
               f"when the server was killed; {found_again} found already delivered after "
               f"the restart")
    print(summary)
    missing = want - found
    extra = found - want
    assert not missing, f"{summary}: {sum(missing.values())} copies missing, e.g. " \
                        f"{sorted(missing)[:3]}"
    assert not extra, f"{summary}: {sum(extra.values())} copies too many, e.g. " \
                      f"{sorted(extra)[:3]}"
    assert listing(root, "tmp") == [], "a partial copy was left in tmp/"
    assert os.listdir(spool / "failed") == [] and os.listdir(spool / "messages") == []
