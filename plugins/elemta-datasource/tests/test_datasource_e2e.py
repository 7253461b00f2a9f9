"""End to end: swaks → the MX listener → datasource → spool → runner → maildir / outside sink.

The issue's proof: a mailbox, an alias expanding to two mailboxes and one outside address
(which reaches an aiosmtpd sink through the runner), a catch-all, an unknown user (550 at
RCPT), a redirect and a quarantine rule; delivered files are byte-exact apart from the trace
headers, in new/, with valid maildir names.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from elemta.testing import Sink
from elemta_datasource.directory import Domain, Rule, check_rule
from elemta_datasource.sql import SQLiteBackend

NAME = re.compile(r"^(\d+)\.M(\d+)Q([0-9A-Z]{20})R([0-9a-f]{12})\.mx\.example\.test,S=(\d+)$")


def wire(marker: str) -> bytes:
    """What swaks puts on the wire for ``body(marker)``: it adds CRLF before the final dot."""
    return body(marker) + b"\r\n"


def body(marker: str) -> bytes:
    return (f"From: Sender <s@origin.example>\r\nTo: someone\r\nSubject: {marker}\r\n"
            f"Message-ID: <{marker}@origin.example>\r\n\r\n"
            f"Hello {marker}.\r\n.a line that starts with a dot\r\n"
            + "long " * 300 + "\r\nend\r\n").encode()


@pytest.fixture
async def mx(elemta_server, tmp_path: Path):
    db = tmp_path / "ds.sqlite3"
    b = SQLiteBackend(db)
    await b.open()
    await b.add_domain(Domain("example.test", catch_all="catchall@example.test"))
    for box in ("alice", "bob", "carol", "catchall", "quarantined"):
        await b.add_mailbox(f"{box}@example.test")
    await b.add_alias("team@example.test", ["alice@example.test", "carol@example.test",
                                            "dave@partner.example"])
    await b.set_rule(check_rule(Rule("nobody@example.test", "reject", code=550,
                                     enhanced="5.1.1", text="No such user here")))
    await b.set_rule(check_rule(Rule("sales@example.test", "redirect", ("bob@example.test",))))
    await b.set_rule(check_rule(Rule("quarantined@example.test", "quarantine",
                                     text="held for review")))
    await b.close()
    async with Sink() as sink:
        server = await elemta_server({
            "domains": {},
            "delivery": {"enabled": True, "workers": 4, "retry_intervals_seconds": [0.5],
                         "idle_connection_seconds": 0,
                         "routes": {"*": {"host": f"127.0.0.1:{sink.port}", "tls": "none"}}},
            "plugins": {"datasource": {"sqlite_path": str(db)},
                        "maildir": {"path": str(tmp_path / "mail/{domain}/{user}/Maildir"),
                                    "create_mailboxes": True}},
        }, enabled=["datasource", "maildir"])
        yield server, sink, tmp_path / "mail" / "example.test"


async def swaks(require_tool, port: int, to: str, data: bytes, tmp: Path) -> tuple[int, str]:
    path = require_tool("swaks")
    msg = tmp / f"msg-{to}.eml"
    msg.write_bytes(data)
    proc = await asyncio.create_subprocess_exec(
        path, "--server", "127.0.0.1", "--port", str(port), "--timeout", "20",
        "--helo", "client.origin.example", "--from", "s@origin.example", "--to", to,
        "--data", str(msg),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(errors="replace")


def delivered(mail: Path, user: str) -> list[Path]:
    return sorted((mail / user / "Maildir" / "new").glob("*")) if (mail / user).exists() else []


async def wait_for_files(mail: Path, want: dict[str, int], timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while {u: len(delivered(mail, u)) for u in want} != want:
            await asyncio.sleep(0.05)


def check_file(path: Path, sent: bytes, recipient: str, original: str | None = None) -> None:
    m = NAME.match(path.name)
    assert m is not None, f"not a valid maildir name: {path.name}"
    raw = path.read_bytes()
    assert int(m.group(5)) == len(raw), ",S= is the file's size"
    head = f"Return-Path: <s@origin.example>\r\nDelivered-To: {recipient}\r\n"
    if original:
        head += f"X-Original-To: {original}\r\n"
    assert raw.startswith(head.encode())
    rest = raw[len(head):]
    assert rest.startswith(b"Received: from client.origin.example")
    # the message as sent, byte for byte, after the trace headers added on receipt
    assert rest.endswith(sent), "content changed in transit"
    between = rest[:-len(sent)]
    assert all(line.startswith((b"Received:", b"\t", b" ", b"Authentication-Results:"))
               for line in between.split(b"\r\n") if line), between


async def test_swaks_to_mailboxes_aliases_catch_all_rules(mx, require_tool, tmp_path) -> None:
    server, sink, mail = mx
    port = server.port("mx")

    rc, out = await swaks(require_tool, port, "alice@example.test", body("m1"), tmp_path)
    assert rc == 0, out
    rc, out = await swaks(require_tool, port, "team@example.test", body("m2"), tmp_path)
    assert rc == 0, out
    rc, out = await swaks(require_tool, port, "whoever@example.test", body("m3"), tmp_path)
    assert rc == 0, out
    rc, out = await swaks(require_tool, port, "sales@example.test", body("m4"), tmp_path)
    assert rc == 0, out
    rc, out = await swaks(require_tool, port, "ghost@elsewhere.example", body("x"), tmp_path)
    assert rc != 0 and "550 5.7.1" in out, "not ours, not relayed"
    rc, out = await swaks(require_tool, port, "nobody@example.test", body("x"), tmp_path)
    assert rc != 0 and "550 5.1.1" in out, out
    rc, out = await swaks(require_tool, port, "quarantined@example.test", body("m5"), tmp_path)
    assert rc == 0, out
    await server.app.spool.checkpoint()

    await wait_for_files(mail, {"alice": 2, "carol": 1, "catchall": 1, "bob": 1})
    [outside] = await sink.wait_for(1)
    assert outside.recipients == ["dave@partner.example"]
    # (outbound SMTP wraps the 1500-octet line, as RFC 5321 §4.5.3.1.6 requires)
    assert b"Message-ID: <m2@origin.example>\r\n\r\nHello m2.\r\n" in outside.content

    a1, a2 = delivered(mail, "alice")
    by_subject = {p: p.read_bytes() for p in (a1, a2)}
    m1 = next(p for p, raw in by_subject.items() if b"Subject: m1" in raw)
    m2 = next(p for p, raw in by_subject.items() if b"Subject: m2" in raw)
    check_file(m1, wire("m1"), "alice@example.test")
    check_file(m2, wire("m2"), "alice@example.test", "team@example.test")
    check_file(delivered(mail, "carol")[0], wire("m2"), "carol@example.test",
               "team@example.test")
    check_file(delivered(mail, "catchall")[0], wire("m3"), "catchall@example.test",
               "whoever@example.test")
    check_file(delivered(mail, "bob")[0], wire("m4"), "bob@example.test", "sales@example.test")

    # the quarantined message is on hold, delivered nowhere
    assert delivered(mail, "quarantined") == []
    held = [json.loads(p.read_bytes()) for p in (server.spool_path / "hold").glob("*.json")]
    assert [h["hold_reason"] for h in held] == ["quarantined@example.test: held for review"]
    # and nothing local ever went to the outbound SMTP transport
    await asyncio.sleep(0.3)
    assert [m.recipients for m in sink.messages] == [["dave@partner.example"]]
    assert not list((server.spool_path / "ready").glob("*.json"))
    assert not list((server.spool_path / "deferred").glob("*.json"))
