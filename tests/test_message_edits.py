"""Everything a milter can do, from a hook: header and body edits, envelope edits."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from elemta import Message, hookimpl
from elemta.testing import RawSMTP

RAW_HEADERS = (b"Received: from a.example\r\n\tby b.example; Thu, 1 Jan 2026 00:00:00 +0000\r\n"
               b"Received: from c.example by d.example\r\n"
               b"From: Alice <alice@example.org>\r\n"
               b"Subject: hello\r\n"
               b"X-Tag: one\r\nX-Tag: two\r\n\r\n")


def message(body: bytes = b"the body\r\n") -> Message:
    return Message(RAW_HEADERS, body, None, len(RAW_HEADERS) + len(body))


def test_untouched_messages_keep_their_bytes():
    m = message()
    assert m.header_bytes() == RAW_HEADERS and not m.modified
    assert m.size == len(RAW_HEADERS) + len(b"the body\r\n")


def test_header_edits_in_place_and_in_order():
    m = message()
    m.append_header("X-Scanned", "yes")                       # SMFIR_ADDHEADER
    m.insert_header(0, "X-First", "top")                       # SMFIR_INSHEADER
    m.insert_header(3, "X-Middle", "folded\r\n\tvalue")
    assert m.change_header("X-Tag", "TWO", occurrence=2)       # SMFIR_CHGHEADER
    assert m.change_header("Subject", None)                    # CHGHEADER with no value
    assert not m.change_header("X-Missing", None)
    assert not m.change_header("X-New", "appended", occurrence=3)
    assert [n for n, _ in m.headers] == ["X-First", "Received", "Received", "X-Middle", "From",
                                         "X-Tag", "X-Tag", "X-Scanned", "X-New"]
    assert m.get_all("x-tag") == ["one", "TWO"] and m.header("subject") is None
    assert m.header("X-Middle") == "folded value", "read unfolded"
    raw = m.header_bytes()
    assert raw.startswith(b"X-First: top\r\nReceived: from a.example\r\n\tby b.example;")
    assert b"X-Middle: folded\r\n\tvalue\r\n" in raw, "written as given, folding kept"
    assert raw.endswith(b"X-Scanned: yes\r\nX-New: appended\r\n\r\n")
    assert m.size == len(raw) + len(b"the body\r\n")
    assert m.remove_headers(lambda n, v: n == "Received") == 2
    assert m.as_bytes().endswith(b"X-New: appended\r\n\r\nthe body\r\n")


@pytest.mark.parametrize("name, value", [("Bad Name", "x"), ("X-Ok", "injected\r\nTo: b@x"),
                                         ("X-Ok", "bare\nlf")])
def test_edits_that_would_break_the_header_are_refused(name, value):
    m = message()
    with pytest.raises(ValueError):
        m.append_header(name, value)
    with pytest.raises(ValueError):
        m.insert_header(0, name, value)
    if name == "X-Ok":
        with pytest.raises(ValueError):
            m.change_header("Subject", value)
    assert not m.modified


def test_body_replaced_in_memory_and_through_a_writer(tmp_path):
    m = Message(RAW_HEADERS, b"old\r\n", None, len(RAW_HEADERS) + 5,
                spill=(str(tmp_path), "Q1", 10))
    m.replace_body(b"new\r\n")                                  # SMFIR_REPLBODY
    assert m.body == b"new\r\n" and m.body_path is None and m.modified
    with m.body_writer() as w:                                   # past 10 bytes: spilled
        for i in range(5):
            w.write(f"chunk {i}\r\n".encode())
    assert m.body is None and m.body_path.startswith(str(tmp_path))
    assert m.as_bytes().endswith(b"chunk 0\r\nchunk 1\r\nchunk 2\r\nchunk 3\r\nchunk 4\r\n")
    assert m.size == len(RAW_HEADERS) + 45
    m.discard_temp_files()
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ through the server


class Editor:
    """A data plugin doing one of each edit; a second one sees them."""

    def __init__(self, seen: list) -> None:
        self.seen = seen

    @hookimpl
    def data(self, tx, message):
        message.change_header("Subject", "[scanned] " + (message.header("Subject") or ""))
        message.append_header("X-Spam-Score", "1.5")
        message.insert_header(0, "X-Top", "first")
        message.remove_headers(lambda n, v: n.lower() == "x-secret")
        message.replace_body(b"The body was replaced.\r\n")
        tx.set_sender("bounces@example.org")
        tx.add_recipient("archive@example.test", {"NOTIFY": "NEVER"})
        tx.remove_recipient("Drop@Example.test")
        return None


class Later:
    def __init__(self, seen: list) -> None:
        self.seen = seen

    @hookimpl
    def data(self, tx, message):
        self.seen.append((message.header("Subject"), message.as_bytes()[-24:],
                          [r.address for r in tx.recipients], tx.sender))


async def test_edits_reach_later_plugins_the_spool_and_the_envelope(elemta_server):
    seen: list = []
    server = await elemta_server(plugins=[("editor", Editor(seen)), ("later", Later(seen))])
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        reply = await c.send_message(
            "alice@example.org", ["bob@example.test", "drop@example.test"],
            b"Subject: hi\r\nX-Secret: 42\r\nFrom: alice@example.org\r\n\r\nold body\r\n.\r\n")
        assert reply.code == 250, reply
    assert seen == [("[scanned] hi", b"The body was replaced.\r\n",
                     ["bob@example.test", "archive@example.test"], "bounces@example.org")]
    server.app.spool.wait_written()
    [env_path] = (server.spool_path / "ready").glob("*.json")
    env = json.loads(env_path.read_bytes())
    assert env["sender"] == "bounces@example.org"
    assert [(r["address"], r["params"]) for r in env["recipients"]] == [
        ("bob@example.test", {}), ("archive@example.test", {"NOTIFY": "NEVER"})]
    content = (server.spool_path / "messages" / env["id"]).read_bytes()
    head, _, body = content.partition(b"\r\n\r\n")
    assert body == b"The body was replaced.\r\n"
    assert b"X-Secret" not in head and b"Subject: [scanned] hi\r\n" in head
    assert head.index(b"X-Top: first") < head.index(b"Subject:") < head.index(b"X-Spam-Score")
    assert env["size"] == len(content)


async def test_removing_every_recipient_drops_the_message(elemta_server):
    class DropAll:
        @hookimpl
        def data(self, tx):
            for r in list(tx.recipients):
                tx.remove_recipient(r.address)

    server = await elemta_server(plugins=[("dropall", DropAll())])
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        reply = await c.send_message("a@example.org", ["b@example.test"],
                                     b"Subject: x\r\n\r\nx\r\n.\r\n")
        assert reply.code == 250
    server.app.spool.wait_written()
    assert list((server.spool_path / "ready").glob("*.json")) == []


async def test_a_20_mib_body_replaced_stays_within_the_memory_bound(elemta_server):
    """The received body is read and a new one written, 64 KiB at a time: no copy in memory."""

    class Upper:
        @hookimpl
        def data(self, message):
            with message.open() as src, message.body_writer() as out:
                head = len(message.header_bytes())
                src.read(head)
                while chunk := src.read(65536):
                    out.write(chunk.upper())

    server = await elemta_server(plugins=[("upper", Upper())])
    line = b"a line of the message " * 3 + b"\r\n"
    lines = (20 << 20) // len(line)
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        await c.cmd("MAIL FROM:<a@example.org>")
        await c.cmd("RCPT TO:<b@example.test>")
        assert (await c.cmd("DATA")).code == 354
        tracemalloc.start()
        try:
            await c.send(b"Subject: big\r\n\r\n")
            for _ in range(lines // 1000):
                await c.send(line * 1000)
            await c.send(b".\r\n")
            reply = await c.read_reply()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert reply.code == 250, reply
    assert peak < 8 << 20, f"peak {peak >> 20} MiB of Python memory for a 20 MiB message"
    server.app.spool.wait_written()
    [path] = (server.spool_path / "messages").iterdir()
    with open(path, "rb") as f:
        f.seek(-len(line), 2)
        assert f.read() == line.upper()
    assert list((server.spool_path / "tmp").iterdir()) == [], "the replaced body's file is gone"
