"""The outbound SMTP client against real servers on 127.0.0.1.

Most tests talk to an aiosmtpd server started in the test whose handler records
what arrives and answers as told. Conversations aiosmtpd cannot have (a 354
after every RCPT failed, a connection cut in the middle of the content, data
injected after the STARTTLS reply) use small hand-written servers. One test
uses Postfix's smtp-sink.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import ssl
import subprocess
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
from hypothesis import given, settings
from hypothesis import strategies as st

from elemta.delivery.smtp import (
    DataEncoder,
    SMTPConnection,
    SMTPError,
    Timeouts,
    TLSPolicy,
)

from elemta.testing.process import require_tool_or_skip

MX = "mx.example.test"
HELO = "client.example.org"
SENDER = "sender@example.org"
FAST = Timeouts.uniform(5)


def short(step: str) -> Timeouts:
    """FAST, except 0.3 s for one step."""
    return dataclasses.replace(FAST, **{f"{step}_seconds": 0.3})
MESSAGE = b"From: sender@example.org\r\nSubject: hello\r\n\r\nHello there.\r\n"


# ------------------------------------------------------------------ an aiosmtpd sink


@dataclass
class Received:
    sender: str
    mail_options: list[str]
    recipients: list[str]
    content: bytes
    tls: bool
    authenticated: bool


class Recorder:
    """An aiosmtpd handler that records every message and answers as the test says."""

    def __init__(self) -> None:
        self.messages: list[Received] = []
        self.commands: list[str] = []
        self.connections = 0
        self.pipelining = True
        self.omit: set[str] = set()           # EHLO keywords not to advertise
        self.ehlo_reply: str | None = None    # instead of the EHLO response
        self.mail_reply: str | None = None
        self.rcpt_replies: dict[str, str] = {}
        self.data_reply: str | None = None
        self.stall: str | None = None         # "RCPT" or "DATA": never answer it
        self.drop_after_content = False
        self.server: SMTP | None = None       # the latest connection's protocol

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        self.commands.append("EHLO")
        self.server = server
        if self.ehlo_reply:
            return [self.ehlo_reply]
        session.host_name = hostname
        kept = [r for r in responses if r[4:].split(" ", 1)[0].upper() not in self.omit]
        if self.pipelining:
            kept.insert(1, "250-PIPELINING")
        return kept

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        self.commands.append("MAIL")
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        self.commands.append("RCPT")
        if self.stall == "RCPT":
            await asyncio.sleep(3600)
        if address in self.rcpt_replies:
            return self.rcpt_replies[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        self.commands.append("DATA")
        self.messages.append(Received(envelope.mail_from, list(envelope.mail_options),
                                      list(envelope.rcpt_tos), envelope.original_content,
                                      server._tls_protocol is not None,
                                      bool(session.authenticated)))
        if self.stall == "DATA":
            await asyncio.sleep(3600)
        if self.drop_after_content:
            server.transport.close()
            await asyncio.sleep(3600)
        return self.data_reply or "250 2.0.0 queued"

    async def handle_RSET(self, server, session, envelope):
        self.commands.append("RSET")
        return "250 2.0.0 OK"

    async def handle_QUIT(self, server, session, envelope):
        self.commands.append("QUIT")
        return "221 2.0.0 Bye"


StartSink = Callable[..., Awaitable[tuple[Recorder, int]]]


@pytest.fixture
async def sink() -> AsyncIterator[StartSink]:
    """``await sink(**aiosmtpd_options)`` → (recorder, port) of a fresh aiosmtpd server."""
    servers: list[asyncio.AbstractServer] = []

    async def start(recorder: Recorder | None = None, *, smtp_class: type[SMTP] = SMTP,
                    **options) -> tuple[Recorder, int]:
        recorder = recorder or Recorder()
        options.setdefault("enable_SMTPUTF8", True)

        def factory() -> SMTP:
            recorder.connections += 1
            return smtp_class(recorder, hostname=MX, **options)

        server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        servers.append(server)
        return recorder, server.sockets[0].getsockname()[1]

    yield start
    for server in servers:
        server.close()


# ------------------------------------------------------------------ hand-written servers


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[Script], Awaitable[int]]]:
    """``await scripted(script)`` → port; each connection runs ``script(reader, writer)``."""
    servers: list[asyncio.AbstractServer] = []
    failures: list[BaseException] = []

    async def start(script: Script) -> int:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await script(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            except Exception as exc:  # noqa: BLE001 -- re-raised at teardown: a script's assertion
                failures.append(exc)
            finally:
                writer.transport.abort()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        return server.sockets[0].getsockname()[1]

    yield start
    for server in servers:
        server.close()
    if failures:
        raise failures[0]


async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                *extensions: bytes) -> None:
    writer.write(b"220 mx.example.test ESMTP scripted\r\n")
    assert (await reader.readline()).startswith(b"EHLO ")
    lines = [b"mx.example.test", *extensions]
    writer.write(b"".join(b"250" + (b" " if i == len(lines) - 1 else b"-") + line + b"\r\n"
                          for i, line in enumerate(lines)))


async def command(reader: asyncio.StreamReader, expected: bytes) -> bytes:
    line = await reader.readline()
    assert line.upper().startswith(expected), (line, expected)
    return line


# ------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def server_context(ca: trustme.CA, seen_sni: list[str | None] | None = None,
                   *names: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*(names or (MX,))).configure_cert(context)
    if seen_sni is not None:
        context.sni_callback = lambda _obj, name, _ctx: seen_sni.append(name)
    return context


async def connect(port: int, tls: str | TLSPolicy = "none", **options) -> SMTPConnection:
    options.setdefault("timeouts", FAST)
    policy = TLSPolicy(tls) if isinstance(tls, str) else tls
    return await SMTPConnection.open("127.0.0.1", port, mx_host=MX, helo=HELO, tls=policy,
                                     **options)


def spy_writes(conn: SMTPConnection) -> list[bytes]:
    """Every buffer the connection hands to its transport, in order."""
    writes: list[bytes] = []
    writer = conn.wire.writer
    assert writer is not None
    original = writer.write

    def write(data: bytes) -> None:
        writes.append(bytes(data))
        original(data)

    writer.write = write  # type: ignore[method-assign]
    return writes


def unstuff(wire: bytes) -> bytes:
    """DATA content as a server stores it: final dot removed, leading dots undone."""
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    lines = wire[:-3].split(b"\r\n")[:-1]
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)


# ------------------------------------------------------------------ content on the wire


async def test_content_arrives_byte_exact_with_crlf_line_ends_and_dots_stuffed(sink):
    recorder, port = await sink()
    content = (b"Subject: dots\n\n.leading dot\r\n..two dots\n.\nbare LF\nbare CR\rmixed\r\r\n"
               b"\xc3\xa9t\xc3\xa9 8-bit\r\nno final line end")
    async with await connect(port) as conn:
        result = await conn.send(SENDER, ["a@example.test"], content, eight_bit=True)
    assert [r.code for r in result.results] == [250]
    assert recorder.messages[0].content == (
        b"Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nbare LF\r\nbare CR\r\nmixed\r\n"
        b"\r\n\xc3\xa9t\xc3\xa9 8-bit\r\nno final line end\r\n")


async def test_content_with_crlf_only_is_sent_unchanged(sink):
    recorder, port = await sink()
    async with await connect(port) as conn:
        await conn.send(SENDER, ["a@example.test"], MESSAGE)
    assert recorder.messages[0].content == MESSAGE


async def test_empty_content_is_an_empty_message(sink):
    recorder, port = await sink()
    async with await connect(port) as conn:
        result = await conn.send(SENDER, ["a@example.test"], b"")
    assert result.results[0].delivered
    assert recorder.messages[0].content == b""


async def test_lines_over_998_octets_are_broken_with_crlf_space(sink):
    recorder, port = await sink()
    words = " ".join(f"word{i}" for i in range(300))  # about 2,400 octets, with spaces
    content = (f"Subject: {words}\r\n\r\n".encode() + b"x" * 2500 + b"\r\n"
               + "é".encode() * 1000 + b"\r\n." + b"y" * 998 + b"\r\n")
    async with await connect(port) as conn:
        result = await conn.send(SENDER, ["a@example.test"], content, eight_bit=True)
    assert result.results[0].delivered  # aiosmtpd refuses any line over 1,001 octets with 500
    received = recorder.messages[0].content
    lines = received.split(b"\r\n")
    assert max(len(line) for line in lines) <= 998
    header, body = received.split(b"\r\n\r\n", 1)
    # The header was folded before existing spaces: unfolding gives back the original.
    assert header.replace(b"\r\n", b"") == f"Subject: {words}".encode()
    body_lines = body.split(b"\r\n")
    assert body_lines[0] == b"x" * 998
    assert body_lines[1] == b" " + b"x" * 997
    assert body_lines[2] == b" " + b"x" * 505
    # A hard break never splits a UTF-8 sequence: every piece decodes.
    pieces = body_lines[3:6]
    assert all(piece.decode("utf-8") for piece in pieces)
    assert b"".join(piece.lstrip(b" ") for piece in pieces) == "é".encode() * 1000
    # The limit applies to the line as sent, with its stuffed dot (which the server removed).
    assert body_lines[6] == b"." + b"y" * 996 and body_lines[7] == b" yy"


CHUNKS = st.lists(st.sampled_from([b"a", b"b", b" ", b".", b"\r", b"\n", b"\r\n", b"\t",
                                   b"\xc3\xa9", b"x" * 400, b"z" * 997]), max_size=40)


def normalised(content: bytes) -> bytes:
    text = content.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    return text if not text or text.endswith(b"\r\n") else text + b"\r\n"


@settings(max_examples=300, deadline=None)
@given(pieces=CHUNKS, cuts=st.lists(st.integers(min_value=0, max_value=20_000), max_size=8))
def test_encoding_does_not_depend_on_where_chunks_are_cut(pieces, cuts):
    content = b"".join(pieces)
    whole = DataEncoder()
    expected = whole.feed(content) + whole.finish()
    chunked = DataEncoder()
    out, start = [], 0
    for cut in sorted(min(c, len(content)) for c in cuts) + [len(content)]:
        out.append(chunked.feed(content[start:cut]))
        start = cut
    out.append(chunked.finish())
    assert b"".join(out) == expected

    assert expected.endswith(b".\r\n") and (expected == b".\r\n" or expected.endswith(b"\r\n.\r\n"))
    body = expected[:-3]
    assert body.count(b"\r") == body.count(b"\n") == body.count(b"\r\n")
    assert all(len(line) <= 998 for line in body.split(b"\r\n"))
    if all(len(line) + line.startswith(b".") <= 998 for line in normalised(content).split(b"\r\n")):
        assert unstuff(expected) == normalised(content)
    else:  # wrapping only ever adds line breaks and spaces
        assert (unstuff(expected).replace(b"\r\n", b"").replace(b" ", b"")
                == normalised(content).replace(b"\r\n", b"").replace(b" ", b""))


@pytest.mark.parametrize("length", [997, 998, 999, 1000, 2500])
@pytest.mark.parametrize("before", [0, 1, 996, 5000])
def test_a_line_is_wrapped_only_past_998_octets(length, before):
    content = b"a" * before + b"\r\n" + b"x" * length + b"\r\nb\r\n"
    encoder = DataEncoder()
    wire = encoder.feed(content) + encoder.finish()
    assert (wire == content + b".\r\n") == (length <= 998 and before <= 998)
    assert all(len(line) <= 998 for line in wire.split(b"\r\n"))


def test_a_line_without_any_break_is_wrapped_as_it_arrives():
    encoder = DataEncoder()
    emitted = [encoder.feed(b"." + b"q" * 65_535) for _ in range(4)]
    assert all(len(part) <= 70_000 for part in emitted)  # never the whole line at once
    wire = b"".join(emitted) + encoder.finish()
    whole = DataEncoder()
    assert wire == whole.feed(b"".join([b"." + b"q" * 65_535] * 4)) + whole.finish()
    assert wire.startswith(b"..q")
    assert all(len(line) <= 998 for line in wire.split(b"\r\n"))


async def test_a_20_mib_file_is_streamed_not_loaded(scripted, tmp_path):
    block = (b"Subject: big\r\n\r\n" + b"line of text with enough words to be typical\r\n" * 2000
             + b".dot\n" + b"w" * 3000 + b"\n")
    path = tmp_path / "message"
    with path.open("wb") as f:
        while f.tell() < 20 * 1024 * 1024:
            f.write(block)
    encoder = DataEncoder()
    expected = hashlib.sha256(encoder.feed(path.read_bytes()) + encoder.finish()).hexdigest()
    received: dict[str, object] = {}

    async def script(reader, writer):
        await greet(reader, writer, b"PIPELINING", b"SIZE 104857600")
        received["mail"] = await command(reader, b"MAIL FROM:")
        await command(reader, b"RCPT TO:")
        await command(reader, b"DATA")
        writer.write(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go ahead\r\n")
        digest, tail = hashlib.sha256(), b""
        while not tail.endswith(b"\r\n.\r\n"):
            chunk = await reader.read(65_536)
            assert chunk
            digest.update(chunk)
            tail = (tail + chunk)[-5:]
        received["digest"] = digest.hexdigest()
        writer.write(b"250 2.0.0 queued\r\n")
        await command(reader, b"QUIT")
        writer.write(b"221 bye\r\n")

    port = await scripted(script)
    conn = await connect(port)
    tracemalloc.start()
    try:
        result = await conn.send(SENDER, ["a@example.test"], path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    await conn.close()
    assert result.results[0].delivered
    assert received["digest"] == expected
    assert f"SIZE={path.stat().st_size}".encode() in received["mail"]
    assert peak < 4 * 1024 * 1024, f"peak {peak} bytes while sending a 20 MiB file"


async def test_content_may_be_an_open_binary_file(sink, tmp_path):
    recorder, port = await sink()
    path = tmp_path / "message"
    path.write_bytes(MESSAGE)
    async with await connect(port) as conn:
        with path.open("rb") as stream:
            result = await conn.send(SENDER, ["a@example.test"], stream)
    assert result.results[0].delivered
    assert recorder.messages[0].content == MESSAGE
    # A stream's size is unknown: no SIZE parameter rather than a wrong one.
    assert not any(o.startswith("SIZE=") for o in recorder.messages[0].mail_options)


async def test_a_missing_file_raises_before_anything_is_sent(sink, tmp_path):
    recorder, port = await sink()
    async with await connect(port) as conn:
        with pytest.raises(FileNotFoundError):
            await conn.send(SENDER, ["a@example.test"], tmp_path / "gone")
        assert conn.usable
        assert (await conn.send(SENDER, ["a@example.test"], MESSAGE)).results[0].delivered
    assert recorder.commands.count("MAIL") == 1


async def test_a_read_error_in_the_middle_of_the_content_closes_the_connection(sink):
    class Failing:
        def __init__(self) -> None:
            self.calls = 0

        def read(self, size: int) -> bytes:
            self.calls += 1
            if self.calls > 1:
                raise OSError(5, "Input/output error")
            return MESSAGE

    recorder, port = await sink()
    conn = await connect(port)
    with pytest.raises(OSError):
        await conn.send(SENDER, ["a@example.test"], Failing())
    assert not conn.usable
    await conn.close()
    assert recorder.messages == []


# ------------------------------------------------------------------ per-recipient outcomes


async def test_recipients_get_their_own_rcpt_reply_and_accepted_ones_the_final_reply(sink):
    recorder, port = await sink()
    recorder.rcpt_replies = {"busy@example.test": "450 4.2.1 mailbox busy",
                             "gone@example.test": "550 5.1.1 no such user"}
    rcpts = ["ok@example.test", "busy@example.test", "gone@example.test", "ok2@example.test"]
    async with await connect(port) as conn:
        result = await conn.send(SENDER, rcpts, MESSAGE)
    assert [(r.recipient, r.code, r.enhanced, r.stage) for r in result.results] == [
        ("ok@example.test", 250, "2.0.0", "end_of_data"),
        ("busy@example.test", 450, "4.2.1", "rcpt"),
        ("gone@example.test", 550, "5.1.1", "rcpt"),
        ("ok2@example.test", 250, "2.0.0", "end_of_data"),
    ]
    assert [r.delivered for r in result.results] == [True, False, False, True]
    assert result.results[1].temporary and result.results[2].permanent
    assert result.results[2].text == "no such user"
    assert result.results[2].reply() == "550 5.1.1 no such user"
    assert recorder.messages[0].recipients == ["ok@example.test", "ok2@example.test"]
    assert result.remote == f"{MX}[127.0.0.1]:{port}" and result.tls is None


@pytest.mark.parametrize("reply, temporary", [("554 5.7.1 rejected as spam", False),
                                              ("451 4.3.0 try again later", True)])
async def test_the_end_of_data_reply_applies_to_every_accepted_recipient(sink, reply, temporary):
    recorder, port = await sink()
    recorder.data_reply = reply
    recorder.rcpt_replies = {"gone@example.test": "550 5.1.1 no such user"}
    async with await connect(port) as conn:
        result = await conn.send(SENDER, ["a@example.test", "gone@example.test", "b@example.test"],
                                 MESSAGE)
        assert conn.usable
    first, gone, last = result.results
    assert first.code == last.code == int(reply[:3]) and first.stage == "end_of_data"
    assert first.temporary is temporary and last.temporary is temporary
    assert gone.code == 550 and gone.stage == "rcpt"


async def test_a_refused_sender_fails_every_recipient_with_the_mail_reply(sink):
    recorder, port = await sink()
    recorder.mail_reply = "553 5.7.1 sender not allowed"
    async with await connect(port) as conn:
        result = await conn.send(SENDER, ["a@example.test", "b@example.test"], MESSAGE)
        assert conn.usable
        recorder.mail_reply = None
        again = await conn.send(SENDER, ["a@example.test"], MESSAGE)
    assert [(r.code, r.stage, r.permanent) for r in result.results] == [(553, "mail", True)] * 2
    assert again.results[0].delivered
    assert "DATA" not in recorder.commands[:recorder.commands.index("RSET")]
    assert len(recorder.messages) == 1


async def test_multi_line_replies_are_joined_and_keep_their_enhanced_code(scripted):
    async def script(reader, writer):
        await greet(reader, writer)
        await command(reader, b"MAIL FROM:")
        writer.write(b"250 ok\r\n")
        await command(reader, b"RCPT TO:")
        writer.write(b"550-5.1.1 The email account that you tried to reach does not exist.\r\n"
                     b"550-5.1.1 Please try double-checking the recipient's email\r\n"
                     b"550 5.1.1 address for typos.\r\n")
        await command(reader, b"QUIT")

    port = await scripted(script)
    async with await connect(port) as conn:
        assert not conn.pipelining
        result = await conn.send(SENDER, ["nobody@example.test"], MESSAGE)
    (only,) = result.results
    assert (only.code, only.enhanced) == (550, "5.1.1")
    assert only.text == ("The email account that you tried to reach does not exist. Please try "
                         "double-checking the recipient's email address for typos.")


async def test_an_enhanced_code_of_another_class_is_not_taken_as_one(scripted):
    async def script(reader, writer):
        await greet(reader, writer)
        await command(reader, b"MAIL FROM:")
        writer.write(b"250 ok\r\n")
        await command(reader, b"RCPT TO:")
        writer.write(b"450 2.1.5 confused server\r\n")

    port = await scripted(script)
    conn = await connect(port)
    result = await conn.send(SENDER, ["a@example.test"], MESSAGE)
    assert result.results[0].code == 450 and result.results[0].enhanced is None
    assert result.results[0].text == "2.1.5 confused server"
    await conn.close()


# ------------------------------------------------------------------ PIPELINING


async def test_pipelining_sends_mail_every_rcpt_and_data_in_one_write(sink):
    _, port = await sink()
    async with await connect(port) as conn:
        assert conn.pipelining
        writes = spy_writes(conn)
        result = await conn.send(SENDER, ["a@example.test", "b@example.test"], MESSAGE)
    assert all(r.delivered for r in result.results)
    assert writes[0] == (b"MAIL FROM:<sender@example.org> SIZE=%d\r\n" % len(MESSAGE) +
                         b"RCPT TO:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
    assert writes[1] == MESSAGE + b".\r\n"


async def test_without_pipelining_each_command_waits_for_its_reply(sink):
    recorder, port = await sink()
    recorder.pipelining = False
    async with await connect(port) as conn:
        assert not conn.pipelining
        writes = spy_writes(conn)
        result = await conn.send(SENDER, ["a@example.test", "b@example.test"], MESSAGE)
    assert all(r.delivered for r in result.results)
    assert [w.split(b":")[0].split(b"\r")[0] for w in writes[:4]] == [
        b"MAIL FROM", b"RCPT TO", b"RCPT TO", b"DATA"]


@pytest.mark.parametrize("pipelining", [True, False])
async def test_when_every_recipient_is_refused_no_content_is_sent(sink, pipelining):
    recorder, port = await sink()
    recorder.pipelining = pipelining
    recorder.rcpt_replies = {"a@example.test": "550 5.1.1 no", "b@example.test": "450 4.1.1 later"}
    async with await connect(port) as conn:
        writes = spy_writes(conn)
        result = await conn.send(SENDER, ["a@example.test", "b@example.test"], MESSAGE)
        assert conn.usable
        del recorder.rcpt_replies["a@example.test"]
        again = await conn.send(SENDER, ["a@example.test"], MESSAGE)
    assert [(r.code, r.stage) for r in result.results] == [(550, "rcpt"), (450, "rcpt")]
    assert again.results[0].delivered
    assert [w for w in writes if MESSAGE in w] == [MESSAGE + b".\r\n"]  # the second message's
    if pipelining:  # DATA went out with the RCPTs, and the RSET with the next MAIL
        assert writes[0].endswith(b"DATA\r\n") and writes[1].startswith(b"RSET\r\nMAIL FROM:")
    else:
        assert b"DATA\r\n" not in writes[:writes.index(b"RSET\r\n")]


async def test_a_354_after_every_rcpt_failed_ends_the_transaction_with_a_lone_dot(scripted):
    seen: list[bytes] = []

    async def script(reader, writer):
        await greet(reader, writer, b"PIPELINING")
        await command(reader, b"MAIL FROM:")
        await command(reader, b"RCPT TO:")
        await command(reader, b"DATA")
        writer.write(b"250 2.1.0 ok\r\n550 5.1.1 no such user\r\n354 send it anyway\r\n")
        seen.append(await reader.readline())
        writer.write(b"554 5.5.1 no valid recipients\r\n")
        await command(reader, b"RSET")
        await command(reader, b"MAIL FROM:")
        await command(reader, b"RCPT TO:")
        await command(reader, b"DATA")
        writer.write(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        seen.append(await reader.readuntil(b"\r\n.\r\n"))
        writer.write(b"250 2.0.0 queued\r\n")
        await command(reader, b"QUIT")
        writer.write(b"221 bye\r\n")

    port = await scripted(script)
    async with await connect(port) as conn:
        first = await conn.send(SENDER, ["gone@example.test"], MESSAGE)
        second = await conn.send(SENDER, ["here@example.test"], MESSAGE)
    assert (first.results[0].code, first.results[0].stage) == (550, "rcpt")
    assert seen[0] == b".\r\n"
    assert second.results[0].delivered and seen[1] == MESSAGE + b".\r\n"


async def test_a_refused_data_command_fails_the_accepted_recipients(scripted):
    async def script(reader, writer):
        await greet(reader, writer, b"PIPELINING")
        for _ in range(4):
            await reader.readline()
        writer.write(b"250 ok\r\n250 ok\r\n550 5.1.1 unknown\r\n451 4.3.0 queue full\r\n")
        await command(reader, b"RSET")
        for _ in range(3):
            await reader.readline()
        writer.write(b"250 reset\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        await reader.readuntil(b"\r\n.\r\n")
        writer.write(b"250 queued\r\n")
        await command(reader, b"QUIT")

    port = await scripted(script)
    async with await connect(port) as conn:
        refused = await conn.send(SENDER, ["a@example.test", "gone@example.test"], MESSAGE)
        again = await conn.send(SENDER, ["a@example.test"], MESSAGE)
    assert [(r.code, r.stage, r.temporary) for r in refused.results] == [
        (451, "data", True), (550, "rcpt", False)]
    assert again.results[0].delivered


# ------------------------------------------------------------------ connection reuse


async def test_one_connection_carries_several_messages(sink):
    recorder, port = await sink()
    async with await connect(port) as conn:
        for i in range(5):
            result = await conn.send(SENDER, [f"r{i}@example.test"], MESSAGE + b"%d\r\n" % i)
            assert result.results[0].delivered
        assert conn.transactions == 5 and conn.usable
    assert recorder.connections == 1
    assert [m.recipients for m in recorder.messages] == [[f"r{i}@example.test"] for i in range(5)]
    # A completed transaction resets the server by itself: no RSET needed in between.
    assert "RSET" not in recorder.commands
    assert recorder.commands[-1] == "QUIT"


async def test_reset_probes_a_cached_connection(sink):
    recorder, port = await sink()
    conn = await connect(port)
    await conn.reset()
    assert recorder.commands[-1] == "RSET"
    recorder.server.transport.close()  # as after the server's idle timeout
    await asyncio.sleep(0.05)
    with pytest.raises(SMTPError) as caught:
        await conn.reset()
    assert caught.value.temporary and caught.value.stage == "rset"
    assert not conn.usable
    await conn.close()


async def test_a_421_makes_the_connection_unusable(sink):
    recorder, port = await sink()
    recorder.rcpt_replies = {"b@example.test": "421 4.3.2 shutting down"}
    conn = await connect(port)
    result = await conn.send(SENDER, ["a@example.test", "b@example.test", "c@example.test"],
                             MESSAGE)
    assert [r.code for r in result.results] == [421, 421, 421]
    assert all(r.temporary for r in result.results)
    assert not conn.usable
    with pytest.raises(RuntimeError):
        await conn.send(SENDER, ["a@example.test"], MESSAGE)
    await conn.close()
    assert "QUIT" not in recorder.commands


async def test_a_connection_closed_while_idle_is_reported_stale(scripted):
    async def script(reader, writer):
        await greet(reader, writer, b"PIPELINING")
        for _ in range(3):
            await reader.readline()
        writer.write(b"250 ok\r\n250 ok\r\n354 go\r\n")
        await reader.readuntil(b"\r\n.\r\n")
        writer.write(b"250 queued\r\n421 4.4.2 mx.example.test Error: timeout exceeded\r\n")

    port = await scripted(script)
    conn = await connect(port)
    first = await conn.send(SENDER, ["a@example.test"], MESSAGE)
    await asyncio.sleep(0.05)
    second = await conn.send(SENDER, ["a@example.test"], MESSAGE)
    assert first.results[0].delivered and not first.stale
    assert second.stale and second.results[0].code == 421 and second.results[0].temporary
    assert not conn.usable
    await conn.close()


async def test_quit_on_close(sink):
    recorder, port = await sink()
    conn = await connect(port)
    await conn.close()
    await conn.close()  # idempotent
    await asyncio.sleep(0.05)
    assert recorder.commands == ["EHLO", "QUIT"]
    assert not conn.usable


# ------------------------------------------------------------------ lost connections, timeouts


async def test_a_connection_lost_after_the_content_is_temporary_for_every_recipient(sink):
    recorder, port = await sink()
    recorder.drop_after_content = True
    recorder.rcpt_replies = {"gone@example.test": "550 5.1.1 no such user"}
    conn = await connect(port)
    result = await conn.send(SENDER, ["a@example.test", "gone@example.test", "b@example.test"],
                             MESSAGE)
    a, gone, b = result.results
    assert (gone.code, gone.local) == (550, False)
    for r in (a, b):
        assert (r.code, r.enhanced, r.stage, r.local) == (451, "4.4.2", "end_of_data", True)
        assert r.temporary and "more than once" in r.text
        assert f"connection closed by {MX}[127.0.0.1]:{port} after the end of DATA" in r.text
    assert not result.stale
    assert not conn.usable
    await conn.close()


async def test_a_connection_cut_in_the_middle_of_the_content_is_temporary(scripted):
    async def script(reader, writer):
        await greet(reader, writer, b"PIPELINING")
        for _ in range(3):
            await reader.readline()
        writer.write(b"250 ok\r\n250 ok\r\n354 go\r\n")
        await reader.readexactly(10_000)
        writer.transport.abort()

    port = await scripted(script)
    conn = await connect(port)
    # More than the socket buffers hold, so the client is still sending when the server goes.
    result = await conn.send(SENDER, ["a@example.test"], (b"x" * 998 + b"\r\n") * 16_000)
    (only,) = result.results
    assert only.temporary and only.local and only.stage == "end_of_data"
    assert "lost connection" in only.text and "more than once" not in only.text
    assert not conn.usable
    await conn.close()


async def test_a_server_that_stops_answering_rcpt_times_out(sink):
    recorder, port = await sink()
    recorder.stall = "RCPT"
    conn = await connect(port, timeouts=short("rcpt"))
    started = time.monotonic()
    result = await conn.send(SENDER, ["a@example.test", "b@example.test"], MESSAGE)
    assert time.monotonic() - started < 3
    for r in result.results:
        assert (r.code, r.enhanced, r.stage, r.local) == (451, "4.4.2", "rcpt", True)
        assert "timed out while sending RCPT TO" in r.text
    assert not conn.usable
    await conn.close()


async def test_a_server_that_never_answers_the_dot_times_out_and_may_have_the_message(sink):
    recorder, port = await sink()
    recorder.stall = "DATA"
    conn = await connect(port, timeouts=short("data_done"))
    result = await conn.send(SENDER, ["a@example.test"], MESSAGE)
    (only,) = result.results
    assert only.temporary and only.stage == "end_of_data"
    assert "timed out" in only.text and "more than once" in only.text
    await conn.close()


async def test_a_missing_greeting_times_out(scripted):
    async def script(reader, writer):
        await asyncio.sleep(3600)

    port = await scripted(script)
    with pytest.raises(SMTPError) as caught:
        await connect(port, timeouts=short("greeting"))
    error = caught.value
    assert (error.stage, error.code, error.enhanced, error.local) == ("greeting", 451, "4.4.2", True)
    assert error.temporary and "timed out while receiving the initial server greeting" in error.text


async def test_reads_time_out_on_event_loops_in_other_threads_at_once(scripted):
    async def script(reader, writer):
        await asyncio.sleep(3600)

    port = await scripted(script)

    def in_a_thread() -> str:
        async def attempt() -> str:
            async with asyncio.timeout(5):  # a read whose deadline was lost fails, not hangs
                with pytest.raises(SMTPError) as caught:
                    await connect(port, timeouts=short("greeting"))
            return caught.value.text
        return asyncio.run(attempt())

    started = time.monotonic()
    texts = await asyncio.gather(*(asyncio.to_thread(in_a_thread) for _ in range(3)),
                                 connect(port, timeouts=short("greeting")),
                                 return_exceptions=True)
    assert all("timed out while receiving the initial server greeting" in str(t)
               for t in texts), texts
    assert time.monotonic() - started < 3  # every loop's own read deadlines fired


async def test_a_cancelled_send_leaves_the_connection_unusable(sink):
    recorder, port = await sink()
    recorder.stall = "RCPT"
    conn = await connect(port)
    task = asyncio.create_task(conn.send(SENDER, ["a@example.test"], MESSAGE))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not conn.usable
    await conn.close()


async def test_the_connection_can_be_bound_to_a_local_address(sink):
    recorder, port = await sink()
    async with await connect(port, local_address="127.0.0.1") as conn:
        assert (await conn.send(SENDER, ["a@example.test"], MESSAGE)).results[0].delivered
    assert recorder.server.session.peer[0] == "127.0.0.1"


async def test_a_refused_connection_is_a_temporary_error(unused_tcp_port):
    with pytest.raises(SMTPError) as caught:
        await connect(unused_tcp_port)
    assert caught.value.stage == "connect" and caught.value.temporary
    assert caught.value.enhanced == "4.4.1"


async def test_a_5xx_greeting_is_a_permanent_error(scripted):
    async def script(reader, writer):
        writer.write(b"554 5.7.1 go away\r\n")
        await reader.readline()

    port = await scripted(script)
    with pytest.raises(SMTPError) as caught:
        await connect(port)
    assert (caught.value.code, caught.value.stage, caught.value.temporary) == (554, "greeting", False)


async def test_a_host_name_is_refused_so_no_lookup_bypasses_the_resolver():
    with pytest.raises(ValueError):
        await SMTPConnection.open("localhost", 25, mx_host=MX, helo=HELO, tls=TLSPolicy("none"))


# ------------------------------------------------------------------ EHLO and HELO


async def test_ehlo_refused_falls_back_to_helo(sink):
    recorder, port = await sink()
    recorder.ehlo_reply = "502 5.5.1 EHLO not implemented"

    class HeloOnly(SMTP):
        async def smtp_EHLO(self, hostname):
            await self.push("502 5.5.1 EHLO not implemented")

    recorder, port = await sink(recorder, smtp_class=HeloOnly)
    async with await connect(port) as conn:
        assert conn.extensions == {}
        result = await conn.send(SENDER, ["a@example.test"], MESSAGE, eight_bit=True)
    assert result.results[0].delivered
    assert recorder.messages[0].mail_options == []


async def test_extensions_are_parsed_from_ehlo(scripted):
    async def script(reader, writer):
        await greet(reader, writer, b"PIPELINING", b"SIZE 1000", b"AUTH=LOGIN", b"auth PLAIN LOGIN",
                    b"8bitmime", b"ENHANCEDSTATUSCODES")
        await reader.readline()

    port = await scripted(script)
    conn = await connect(port)
    assert conn.extensions == {"PIPELINING": "", "SIZE": "1000", "AUTH": "PLAIN LOGIN",
                               "8BITMIME": "", "ENHANCEDSTATUSCODES": ""}
    assert conn.size_limit == 1000
    await conn.close()


# ------------------------------------------------------------------ SMTPUTF8, 8BITMIME, SIZE


async def test_smtputf8_is_passed_on_when_the_message_needs_it(sink):
    recorder, port = await sink()
    async with await connect(port) as conn:
        result = await conn.send("sénder@example.org", ["rené@exämple.test"],
                                 "Subject: é\r\n\r\nbody\r\n".encode(), utf8=True)
    assert result.results[0].delivered
    received = recorder.messages[0]
    assert "SMTPUTF8" in received.mail_options and "BODY=8BITMIME" in received.mail_options
    assert received.recipients == ["rené@exämple.test"]


@pytest.mark.parametrize("sender, rcpt, utf8, code, enhanced", [
    # the caller says the message needs it (UTF-8 header fields): RFC 6531 X.6.9
    (SENDER, "a@example.test", True, 550, "5.6.9"),
    # a non-ASCII address needs it anyway: X.6.7
    (SENDER, "rené@example.test", False, 553, "5.6.7"),
])
async def test_a_message_needing_smtputf8_is_not_sent_to_a_server_without_it(
        sink, sender, rcpt, utf8, code, enhanced):
    recorder, port = await sink(enable_SMTPUTF8=False)
    async with await connect(port) as conn:
        result = await conn.send(sender, [rcpt, "b@example.test"], MESSAGE, utf8=utf8)
        assert conn.usable
    for r in result.results:
        assert (r.code, r.enhanced, r.permanent, r.local) == (code, enhanced, True, True)
        assert "SMTPUTF8" in r.text
    assert "MAIL" not in recorder.commands


async def test_8bit_content_is_declared_with_body_8bitmime_when_offered(sink):
    recorder, port = await sink()
    async with await connect(port) as conn:
        await conn.send(SENDER, ["a@example.test"], "Subject: x\r\n\r\nété\r\n".encode(),
                        eight_bit=True)
        await conn.send(SENDER, ["a@example.test"], MESSAGE)
    assert "BODY=8BITMIME" in recorder.messages[0].mail_options
    assert not any(o.startswith("BODY") for o in recorder.messages[1].mail_options)


async def test_8bit_content_goes_out_unchanged_to_a_server_without_8bitmime(sink):
    recorder, port = await sink()
    recorder.omit = {"8BITMIME"}
    content = "Subject: x\r\n\r\nété\r\n".encode()
    async with await connect(port) as conn:
        assert "8BITMIME" not in conn.extensions
        result = await conn.send(SENDER, ["a@example.test"], content, eight_bit=True)
    assert result.results[0].delivered
    assert recorder.messages[0].content == content
    assert not any(o.startswith("BODY") for o in recorder.messages[0].mail_options)


async def test_size_is_declared_when_the_server_advertises_it(sink):
    recorder, port = await sink(data_size_limit=10_000)
    async with await connect(port) as conn:
        await conn.send(SENDER, ["a@example.test"], MESSAGE)
        await conn.send(SENDER, ["a@example.test"], MESSAGE, size=777)
    assert f"SIZE={len(MESSAGE)}" in recorder.messages[0].mail_options
    assert "SIZE=777" in recorder.messages[1].mail_options


async def test_no_size_parameter_to_a_server_without_size(sink):
    recorder, port = await sink(data_size_limit=None)
    async with await connect(port) as conn:
        assert conn.size_limit is None
        await conn.send(SENDER, ["a@example.test"], MESSAGE)
    assert recorder.messages[0].mail_options == []


async def test_a_message_over_the_servers_size_limit_fails_without_being_sent(sink):
    recorder, port = await sink(data_size_limit=1000)
    async with await connect(port) as conn:
        result = await conn.send(SENDER, ["a@example.test", "b@example.test"], MESSAGE * 30)
        assert conn.usable
    for r in result.results:
        assert (r.code, r.enhanced, r.permanent, r.local) == (552, "5.3.4", True, True)
    assert "MAIL" not in recorder.commands


async def test_the_null_sender_and_control_characters(sink):
    recorder, port = await sink()
    async with await connect(port) as conn:
        bounce = await conn.send("", ["a@example.test"], MESSAGE)
        writes = spy_writes(conn)
        injected = await conn.send(SENDER, ["a@example.test\r\nRCPT TO:<evil@example.test>",
                                            "b@example.test"], MESSAGE)
    assert bounce.results[0].delivered and recorder.messages[0].sender == "<>"
    assert [(r.code, r.permanent) for r in injected.results] == [(553, True), (451, False)]
    assert writes == [b"QUIT\r\n"]


# ------------------------------------------------------------------ STARTTLS


async def test_opportunistic_tls_is_used_when_offered_with_sni_and_a_second_ehlo(sink, ca):
    sni: list[str | None] = []
    recorder, port = await sink(tls_context=server_context(ca, sni))
    async with await connect(port, "opportunistic") as conn:
        assert conn.tls is not None and conn.tls.version.startswith("TLSv1.")
        assert "STARTTLS" not in conn.extensions  # the extensions of the second EHLO
        result = await conn.send(SENDER, ["a@example.test"], MESSAGE)
    assert result.tls == conn.tls.version
    assert recorder.messages[0].tls
    assert sni == [MX]
    assert recorder.commands[:2] == ["EHLO", "EHLO"]


async def test_opportunistic_tls_without_starttls_offered_delivers_in_plaintext(sink):
    _, port = await sink()
    async with await connect(port, "opportunistic") as conn:
        result = await conn.send(SENDER, ["a@example.test"], MESSAGE)
    assert result.results[0].delivered and result.tls is None
    assert conn.tls_failure is None


class BrokenTLS(SMTP):
    """Offers STARTTLS, says yes, then answers the handshake with garbage."""

    async def smtp_STARTTLS(self, arg):
        await self.push("220 2.0.0 Ready to start TLS")
        await asyncio.sleep(0.05)  # after the reply, or it would count as injected before TLS
        self.transport.write(b"this is not a TLS record\r\n" * 20)
        self.transport.close()


async def test_opportunistic_tls_falls_back_to_plaintext_after_a_broken_handshake(sink, ca, caplog):
    recorder, port = await sink(smtp_class=BrokenTLS, tls_context=server_context(ca))
    with caplog.at_level(logging.WARNING, "elemta.delivery.smtp"):
        async with await connect(port, "opportunistic") as conn:
            assert conn.tls is None
            assert conn.tls_failure and conn.tls_failure.startswith("TLS handshake failed")
            result = await conn.send(SENDER, ["a@example.test"], MESSAGE)
    assert result.results[0].delivered and result.tls is None
    assert recorder.connections == 2
    assert not recorder.messages[0].tls
    assert "connecting again without TLS" in caplog.text


async def test_opportunistic_tls_continues_in_plaintext_when_starttls_is_refused(scripted):
    async def script(reader, writer):
        await greet(reader, writer, b"STARTTLS")
        await command(reader, b"STARTTLS")
        writer.write(b"454 4.7.0 TLS not available due to temporary reason\r\n")
        await command(reader, b"MAIL FROM:")
        writer.write(b"250 ok\r\n")
        await command(reader, b"RCPT TO:")
        writer.write(b"250 ok\r\n")
        await command(reader, b"DATA")
        writer.write(b"354 go\r\n")
        await reader.readuntil(b"\r\n.\r\n")
        writer.write(b"250 queued\r\n")
        await command(reader, b"QUIT")

    port = await scripted(script)
    async with await connect(port, "opportunistic") as conn:
        assert conn.tls_failure and "454" in conn.tls_failure
        result = await conn.send(SENDER, ["a@example.test"], MESSAGE)
    assert result.results[0].delivered


@pytest.mark.parametrize("mode", ["required", "verify"])
async def test_required_tls_not_offered_is_a_temporary_error(sink, mode, ca_file):
    recorder, port = await sink()
    policy = TLSPolicy(mode, cafile=ca_file if mode == "verify" else None)
    with pytest.raises(SMTPError) as caught:
        await connect(port, policy)
    error = caught.value
    assert (error.stage, error.enhanced, error.temporary) == ("starttls", "4.7.4", True)
    assert "not offered" in error.text
    assert "MAIL" not in recorder.commands


async def test_required_tls_with_a_broken_handshake_is_a_temporary_error(sink, ca):
    recorder, port = await sink(smtp_class=BrokenTLS, tls_context=server_context(ca))
    with pytest.raises(SMTPError) as caught:
        await connect(port, "required")
    assert (caught.value.stage, caught.value.enhanced, caught.value.temporary) == (
        "starttls", "4.7.5", True)
    assert recorder.connections == 1


async def test_required_tls_does_not_check_the_certificate(sink):
    untrusted = trustme.CA()
    _, port = await sink(tls_context=server_context(untrusted, None, "other.example"))
    async with await connect(port, "required") as conn:
        assert conn.tls is not None
        assert (await conn.send(SENDER, ["a@example.test"], MESSAGE)).results[0].delivered


async def test_verify_accepts_a_trusted_certificate_for_the_mx_name(sink, ca, ca_file):
    _, port = await sink(tls_context=server_context(ca))
    async with await connect(port, TLSPolicy("verify", cafile=ca_file)) as conn:
        result = await conn.send(SENDER, ["a@example.test"], MESSAGE)
    assert result.results[0].delivered and result.tls is not None


@pytest.mark.parametrize("problem", ["untrusted CA", "wrong name"])
async def test_verify_refuses_a_certificate_it_cannot_trust(sink, ca, ca_file, problem):
    issuer = trustme.CA() if problem == "untrusted CA" else ca
    names = (MX,) if problem == "untrusted CA" else ("other.example.test",)
    recorder, port = await sink(tls_context=server_context(issuer, None, *names))
    with pytest.raises(SMTPError) as caught:
        await connect(port, TLSPolicy("verify", cafile=ca_file))
    error = caught.value
    assert (error.stage, error.enhanced, error.temporary) == ("starttls", "4.7.5", True)
    assert "certificate not trusted" in error.text
    assert recorder.messages == [] and "MAIL" not in recorder.commands


@pytest.mark.parametrize("mode", ["opportunistic", "required"])
async def test_data_sent_after_the_starttls_reply_is_not_trusted(scripted, mode):
    connections = []

    async def script(reader, writer):
        connections.append(writer)
        await greet(reader, writer, b"STARTTLS")
        if len(connections) > 1:  # the plaintext fallback
            await command(reader, b"QUIT")
            return
        await command(reader, b"STARTTLS")
        writer.write(b"220 go ahead\r\n250 injected before the handshake\r\n")
        await asyncio.sleep(1)

    port = await scripted(script)
    if mode == "required":
        with pytest.raises(SMTPError) as caught:
            await connect(port, mode)
        assert "after its STARTTLS reply" in caught.value.text
    else:
        async with await connect(port, mode) as conn:
            assert conn.tls is None and "after its STARTTLS reply" in conn.tls_failure
        assert len(connections) == 2


# ------------------------------------------------------------------ AUTH


class Accounts:
    """A synchronous aiosmtpd authenticator accepting alice/s3cret."""

    def __init__(self) -> None:
        self.mechanisms: list[str] = []

    def __call__(self, server, session, envelope, mechanism, auth_data):
        self.mechanisms.append(mechanism)
        ok = (isinstance(auth_data, LoginPassword) and auth_data.login == b"alice"
              and auth_data.password == b"s3cret")
        return AuthResult(success=ok, handled=False)  # handled=True would send no reply at all


@pytest.mark.parametrize("exclude, mechanism", [([], "PLAIN"), (["PLAIN"], "LOGIN")])
async def test_auth_over_tls_with_plain_or_login(sink, ca, exclude, mechanism):
    accounts = Accounts()
    recorder, port = await sink(tls_context=server_context(ca), authenticator=accounts,
                                auth_required=True, auth_exclude_mechanism=exclude)
    async with await connect(port, "required", auth=("alice", "s3cret")) as conn:
        assert conn.authenticated_as == "alice"
        result = await conn.send(SENDER, ["a@example.test"], MESSAGE)
    assert result.results[0].delivered
    assert accounts.mechanisms == [mechanism]
    assert recorder.messages[0].authenticated and recorder.messages[0].tls


async def test_a_535_to_auth_is_a_permanent_error_and_the_password_is_never_shown(sink, ca,
                                                                                   caplog):
    recorder, port = await sink(tls_context=server_context(ca), authenticator=Accounts(),
                                auth_required=True)
    with caplog.at_level(logging.DEBUG), pytest.raises(SMTPError) as caught:
        await connect(port, "required", auth=("alice", "wrong-Passw0rd"))
    error = caught.value
    assert (error.code, error.stage, error.temporary) == (535, "auth", False)
    assert error.result_for("a@example.test").permanent  # what the runner records per recipient
    assert "wrong-Passw0rd" not in caplog.text
    assert "wrong-Passw0rd" not in str(error) and "wrong-Passw0rd" not in repr(error.args)
    assert "MAIL" not in recorder.commands


async def test_credentials_are_not_sent_without_tls(sink):
    _, port = await sink(authenticator=Accounts(), auth_require_tls=False)
    with pytest.raises(SMTPError) as caught:
        await connect(port, "opportunistic", auth=("alice", "s3cret"))
    assert (caught.value.stage, caught.value.temporary) == ("auth", True)
    assert "without TLS" in caught.value.text
    with pytest.raises(ValueError):
        await connect(port, "none", auth=("alice", "s3cret"))


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")
async def test_plaintext_auth_when_explicitly_allowed(sink):
    accounts = Accounts()
    _, port = await sink(authenticator=accounts, auth_require_tls=False, auth_required=True)
    async with await connect(port, "none", auth=("alice", "s3cret"),
                             allow_plaintext_auth=True) as conn:
        result = await conn.send(SENDER, ["a@example.test"], MESSAGE)
    assert result.results[0].delivered and accounts.mechanisms == ["PLAIN"]


async def test_auth_without_a_supported_mechanism_is_a_temporary_error(scripted):
    async def script(reader, writer):
        await greet(reader, writer, b"AUTH CRAM-MD5 GSSAPI")
        await reader.readline()

    port = await scripted(script)
    with pytest.raises(SMTPError) as caught:
        await connect(port, "none", auth=("alice", "s3cret"), allow_plaintext_auth=True)
    assert caught.value.temporary and "CRAM-MD5 GSSAPI" in caught.value.text


# ------------------------------------------------------------------ uvloop


def test_tls_fallback_streaming_and_timeouts_work_on_uvloop(ca, tmp_path):
    uvloop = pytest.importorskip("uvloop")
    path = tmp_path / "message"
    path.write_bytes(b"Subject: big\n\n" + b".line\n" * 200_000)

    async def scenario() -> None:
        recorder = Recorder()
        context = server_context(ca)
        loop = asyncio.get_running_loop()
        servers = [await loop.create_server(
            lambda cls=cls: cls(recorder, hostname=MX, tls_context=context), "127.0.0.1", 0)
            for cls in (SMTP, BrokenTLS)]
        good, broken = (server.sockets[0].getsockname()[1] for server in servers)
        try:
            async with await connect(good, "opportunistic") as conn:
                assert conn.tls is not None
                assert (await conn.send(SENDER, ["a@example.test"], path)).results[0].delivered
            assert recorder.messages[-1].content == b"Subject: big\r\n\r\n" + b".line\r\n" * 200_000
            async with await connect(broken, "opportunistic") as conn:
                assert conn.tls is None
                assert (await conn.send(SENDER, ["a@example.test"], MESSAGE)).results[0].delivered
            recorder.stall = "RCPT"
            conn = await connect(good, "opportunistic", timeouts=short("rcpt"))
            result = await conn.send(SENDER, ["a@example.test"], MESSAGE)
            assert "timed out" in result.results[0].text and not conn.usable
            await conn.close()
        finally:
            for server in servers:
                server.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


# ------------------------------------------------------------------ Postfix's smtp-sink


async def test_delivery_to_postfix_smtp_sink(tmp_path, unused_tcp_port):
    smtp_sink = require_tool_or_skip("smtp-sink")
    dump = tmp_path / "dump"
    user = ["-u", "root"] if os.geteuid() == 0 else []
    proc = await asyncio.create_subprocess_exec(
        smtp_sink, *user, "-D", str(dump), f"127.0.0.1:{unused_tcp_port}", "100",
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                conn = await connect(unused_tcp_port)
                break
            except SMTPError:
                if time.monotonic() > deadline or proc.returncode is not None:
                    raise
                await asyncio.sleep(0.05)
        assert conn.pipelining
        for i in range(20):
            result = await conn.send(SENDER, ["a@example.test", "b@example.test"],
                                     b"Subject: %d\n\n.dot line\nbody\n" % i, eight_bit=True)
            assert [r.code for r in result.results] == [250, 250], result
        await conn.close()
        assert conn.transactions == 20
        await asyncio.sleep(0.2)
        dumped = dump.read_bytes()
        assert dumped.count(b"X-Mail-Args: <sender@example.org> BODY=8BITMIME\n") == 20
        assert b"Subject: 19\n\n.dot line\nbody\n" in dumped  # smtp-sink writes LF line ends
    finally:
        proc.terminate()
        await proc.wait()


# ------------------------------------------------------------------ LMTP (RFC 2033)


class LMTPRecorder(Recorder):
    """:class:`Recorder` for aiosmtpd's LMTP server: after the dot, one reply per recipient.

    ``lmtp_replies`` maps an address to its end-of-data reply (250 when absent).
    """

    def __init__(self) -> None:
        super().__init__()
        self.lmtp_replies: dict[str, str] = {}

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        kept = await super().handle_EHLO(server, session, envelope, hostname, responses)
        self.commands[-1] = "LHLO"  # aiosmtpd's LMTP answers LHLO through this hook
        return kept

    async def handle_DATA(self, server, session, envelope):
        await super().handle_DATA(server, session, envelope)
        replies = [self.lmtp_replies.get(r, f"250 2.0.0 <{r}> saved") for r in envelope.rcpt_tos]
        for reply in replies[:-1]:
            await server.push(reply)
        return replies[-1]


@pytest.fixture
async def lmtp_unix(
        tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[tuple[LMTPRecorder, str]]]]:
    """``await lmtp_unix(pipelining=True)`` → (recorder, socket path) of aiosmtpd's LMTP server."""
    from aiosmtpd.lmtp import LMTP

    servers: list[asyncio.AbstractServer] = []

    async def start(pipelining: bool = True) -> tuple[LMTPRecorder, str]:
        recorder = LMTPRecorder()
        recorder.pipelining = pipelining
        path = str(tmp_path / f"lmtp{len(servers)}.sock")

        def factory() -> LMTP:
            recorder.connections += 1
            return LMTP(recorder, hostname=MX, enable_SMTPUTF8=True)

        servers.append(await asyncio.get_running_loop().create_unix_server(factory, path))
        return recorder, path

    yield start
    for server in servers:
        server.close()


async def test_lmtp_lhlo_and_one_reply_per_accepted_recipient_in_rcpt_order(scripted):
    seen: list[bytes] = []

    async def script(reader, writer):
        writer.write(b"220 lmtp.example.test LMTP ready\r\n")
        seen.append(await reader.readline())
        writer.write(b"250-lmtp.example.test\r\n250-PIPELINING\r\n250-STARTTLS\r\n"
                     b"250-AUTH PLAIN\r\n250 ENHANCEDSTATUSCODES\r\n")
        for _ in range(6):  # MAIL, four RCPTs and DATA in one batch
            seen.append(await reader.readline())
        writer.write(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 <b@example.test> unknown\r\n"
                     b"250 2.1.5 ok\r\n250 2.1.5 ok\r\n354 go\r\n")
        seen.append(await reader.readuntil(b"\r\n.\r\n"))
        writer.write(b"250 2.0.0 <a@example.test> saved\r\n"
                     b"452 4.2.2 <c@example.test> mailbox full\r\n"
                     b"550 5.2.1 <d@example.test> mailbox disabled\r\n")
        await command(reader, b"QUIT")
        writer.write(b"221 bye\r\n")

    port = await scripted(script)
    async with await SMTPConnection.open_lmtp("127.0.0.1", port, lhlo=HELO,
                                               timeouts=FAST) as conn:
        assert conn.remote == f"lmtp:127.0.0.1:{port}" and conn.lmtp
        result = await conn.send(SENDER, [f"{x}@example.test" for x in "abcd"], MESSAGE)
    assert seen[0] == f"LHLO {HELO}\r\n".encode()
    assert seen[1].startswith(b"MAIL FROM:") and seen[6] == b"DATA\r\n"  # no STARTTLS, no AUTH
    assert seen[7] == MESSAGE + b".\r\n"
    assert [(r.code, r.enhanced, r.stage) for r in result.results] == [
        (250, "2.0.0", "end_of_data"), (550, "5.1.1", "rcpt"), (452, "4.2.2", "end_of_data"),
        (550, "5.2.1", "end_of_data")]
    assert result.results[2].text == "<c@example.test> mailbox full"
    assert result.remote == f"lmtp:127.0.0.1:{port}"


@pytest.mark.parametrize("pipelining", [True, False])
async def test_lmtp_over_a_unix_socket_carries_several_messages(lmtp_unix, pipelining):
    recorder, path = await lmtp_unix(pipelining=pipelining)
    recorder.lmtp_replies["full@example.test"] = "452 4.2.2 <full@example.test> over quota"
    content = b"Subject: x\r\n\r\n.dot\r\n\xc3\xa9\r\n"
    async with await SMTPConnection.open_lmtp(path=path, lhlo=HELO, timeouts=FAST) as conn:
        assert conn.remote == f"lmtp:unix:{path}" and conn.pipelining == pipelining
        first = await conn.send(SENDER, ["ok@example.test", "full@example.test"], content,
                                eight_bit=True)
        second = await conn.send(SENDER, ["ok@example.test"], MESSAGE)
        assert conn.transactions == 2 and conn.usable
    assert [r.code for r in first.results] == [250, 452]
    assert second.results[0].delivered
    assert recorder.connections == 1
    assert recorder.commands[:2] == ["LHLO", "MAIL"] and "RSET" not in recorder.commands
    assert recorder.messages[0].content == content
    assert recorder.messages[0].mail_options == ["SIZE=24", "BODY=8BITMIME"]


async def test_lmtp_a_connection_lost_between_replies_keeps_the_replies_already_read(scripted):
    async def script(reader, writer):
        writer.write(b"220 lmtp\r\n")
        await command(reader, b"LHLO ")
        writer.write(b"250-lmtp\r\n250 PIPELINING\r\n")
        for _ in range(5):
            await reader.readline()
        writer.write(b"250 ok\r\n250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        await reader.readuntil(b"\r\n.\r\n")
        writer.write(b"250 2.0.0 <a@example.test> saved\r\n")
        await writer.drain()

    port = await scripted(script)
    conn = await SMTPConnection.open_lmtp("127.0.0.1", port, lhlo=HELO, timeouts=FAST)
    result = await conn.send(SENDER, ["a@example.test", "b@example.test", "c@example.test"],
                             MESSAGE)
    assert result.results[0].delivered and not result.results[0].local
    assert [(r.code, r.enhanced, r.local) for r in result.results[1:]] == [
        (451, "4.4.2", True)] * 2
    assert "may be sent more than once" in result.results[1].text
    assert not conn.usable
    await conn.close()


async def test_lmtp_a_refused_lhlo_is_an_error_without_helo_fallback(scripted):
    after: list[bytes] = []

    async def script(reader, writer):
        writer.write(b"220 lmtp\r\n")
        await command(reader, b"LHLO ")
        writer.write(b"500 5.5.1 unrecognized command\r\n")
        after.append(await reader.readline())

    port = await scripted(script)
    with pytest.raises(SMTPError) as caught:
        await SMTPConnection.open_lmtp("127.0.0.1", port, lhlo=HELO, timeouts=FAST)
    assert (caught.value.code, caught.value.stage) == (500, "lhlo")
    await asyncio.sleep(0.05)
    assert after == [b""]  # no HELO: the connection was closed


async def test_lmtp_a_354_although_every_recipient_failed_drops_the_connection(scripted):
    rest: list[bytes] = []

    async def script(reader, writer):
        writer.write(b"220 lmtp\r\n")
        await command(reader, b"LHLO ")
        writer.write(b"250-lmtp\r\n250 PIPELINING\r\n")
        for _ in range(3):
            await reader.readline()
        writer.write(b"250 ok\r\n550 5.1.1 unknown\r\n354 go\r\n")
        rest.append(await reader.read())

    port = await scripted(script)
    conn = await SMTPConnection.open_lmtp("127.0.0.1", port, lhlo=HELO, timeouts=FAST)
    result = await conn.send(SENDER, ["gone@example.test"], MESSAGE)
    assert (result.results[0].code, result.results[0].stage) == (550, "rcpt")
    assert not conn.usable
    await conn.close()
    await asyncio.sleep(0.05)
    assert rest == [b""]  # neither content nor a dot whose replies could not be counted


async def test_lmtp_a_missing_socket_or_refused_port_is_a_temporary_connect_error(
        tmp_path, unused_tcp_port):
    missing = str(tmp_path / "no-such.sock")
    with pytest.raises(SMTPError) as caught:
        await SMTPConnection.open_lmtp(path=missing, lhlo=HELO, timeouts=FAST)
    assert (caught.value.code, caught.value.enhanced, caught.value.stage) == (451, "4.4.1",
                                                                            "connect")
    assert caught.value.text.startswith(f"connect to lmtp:unix:{missing}: ")
    with pytest.raises(SMTPError) as caught:
        await SMTPConnection.open_lmtp("127.0.0.1", unused_tcp_port, lhlo=HELO, timeouts=FAST)
    assert caught.value.temporary and caught.value.enhanced == "4.4.1"


async def test_lmtp_needs_either_a_host_or_a_socket_path():
    with pytest.raises(ValueError):
        await SMTPConnection.open_lmtp(lhlo=HELO)
    with pytest.raises(ValueError):
        await SMTPConnection.open_lmtp("127.0.0.1", 24, path="/run/lmtp", lhlo=HELO)


async def test_lmtp_delivery_to_postfix_smtp_sink(tmp_path):
    smtp_sink = require_tool_or_skip("smtp-sink")
    path = tmp_path / "sink.sock"
    user = ["-u", "root"] if os.geteuid() == 0 else []
    proc = await asyncio.create_subprocess_exec(
        smtp_sink, *user, "-L", f"unix:{path}", "100",
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                conn = await SMTPConnection.open_lmtp(path=str(path), lhlo=HELO, timeouts=FAST)
                break
            except SMTPError:
                if time.monotonic() > deadline or proc.returncode is not None:
                    raise
                await asyncio.sleep(0.05)
        for _ in range(3):
            result = await conn.send(SENDER, ["a@example.test", "b@example.test"], MESSAGE)
            assert [(r.code, r.stage) for r in result.results] == [(250, "end_of_data")] * 2
        await conn.close()
        assert conn.transactions == 3
    finally:
        proc.terminate()
        await proc.wait()
