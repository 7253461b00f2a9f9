"""BDAT (RFC 3030 CHUNKING, BINARYMIME) as a client on a raw socket sees it."""

from __future__ import annotations

import asyncio
import json

import pytest

from elemta import hookimpl
from elemta.testing.client import RawSMTP
from elemta.testing.fixtures import write_config
from elemta.testing.process import free_port, listener, wait_until

from tests.test_memory import MIB, rss_peak_kib

HEAD = b"Subject: chunks\r\nMessage-ID: <c1@client.example>\r\n\r\n"


def spooled(server) -> list[dict]:
    server.app.spool.wait_written()
    d = server.spool_path / "ready"
    return [json.loads(p.read_bytes()) for p in sorted(d.glob("*.json"))]


def stored(server, queue_id: str) -> bytes:
    """The spooled message after the trace headers the server prepended."""
    server.app.spool.wait_written()
    raw = (server.spool_path / "messages" / queue_id).read_bytes()
    return raw[raw.index(b"Subject:"):]


async def transaction(c: RawSMTP, *params: str) -> None:
    assert (await c.cmd("MAIL FROM:<a@client.example>" + "".join(" " + p for p in params))
            ).code == 250
    assert (await c.cmd("RCPT TO:<u@example.test>")).code == 250


async def bdat(c: RawSMTP, chunk: bytes, last: bool = False):
    await c.send(f"BDAT {len(chunk)}{' LAST' if last else ''}\r\n".encode() + chunk)
    return await c.read_reply()


async def test_ehlo_offers_chunking_binarymime_and_dsn(elemta_server):
    server = await elemta_server()
    async with RawSMTP(server.port("mx")) as c:
        lines = (await c.cmd("EHLO client.example")).lines
    assert {"CHUNKING", "BINARYMIME", "DSN"} <= set(lines)


async def test_a_message_in_chunks_is_stored_as_their_concatenation(elemta_server):
    server = await elemta_server()
    body = [HEAD + b"first line\r\nsecond", b" half of a line\r", b"\nlast line\r\n"]
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        await transaction(c)
        r1 = await bdat(c, body[0])
        r2 = await bdat(c, body[1])
        assert (r1.code, r2.code) == (250, 250), (r1, r2)
        assert r2.enhanced == "2.0.0"
        final = await bdat(c, body[2], last=True)
        assert final.code == 250 and "queued as" in final.text, final
    queue_id = final.text.rsplit(" ", 1)[1]
    assert stored(server, queue_id) == b"".join(body)
    [env] = spooled(server)
    assert env["recipients"][0]["address"] == "u@example.test"


async def test_pipelined_transaction_gets_its_replies_in_order(elemta_server):
    server = await elemta_server()
    first, last = HEAD + b"one\r\n", b"two\r\n"
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        await c.send(b"MAIL FROM:<a@client.example>\r\nRCPT TO:<u@example.test>\r\n"
                     b"RCPT TO:<v@example.test>\r\n"
                     + f"BDAT {len(first)}\r\n".encode() + first
                     + f"BDAT {len(last)} LAST\r\n".encode() + last
                     + b"MAIL FROM:<b@client.example>\r\nRCPT TO:<u@example.test>\r\n"
                     b"BDAT 0 LAST\r\nNOOP\r\n")
        codes = [(await c.read_reply()).code for _ in range(9)]
    assert codes == [250] * 9
    queue_ids = {e["id"] for e in spooled(server)}
    assert len(queue_ids) == 2


async def test_bdat_0_last_ends_the_message_with_what_came_before(elemta_server):
    server = await elemta_server()
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        await transaction(c)
        assert (await bdat(c, HEAD + b"all of it\r\n")).code == 250
        final = await bdat(c, b"", last=True)
    assert final.code == 250, final
    assert stored(server, final.text.rsplit(" ", 1)[1]) == HEAD + b"all of it\r\n"


async def test_data_after_bdat_is_refused_and_ends_the_transaction(elemta_server):
    server = await elemta_server()
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        await transaction(c)
        assert (await bdat(c, HEAD)).code == 250
        reply = await c.cmd("DATA")
        assert (reply.code, reply.enhanced) == (503, "5.5.1"), reply
        # the transaction is over: a further chunk is read and answered 503
        assert (await bdat(c, b"QUIT\r\n", last=True)).code == 503
        assert (await c.cmd("RSET")).code == 250
        # and the session goes on: the same client sends with DATA now
        reply = await c.send_message("a@client.example", ["u@example.test"],
                                     HEAD + b"by DATA\r\n.\r\n")
        assert reply.code == 250, reply
    assert len(spooled(server)) == 1
    assert not list((server.spool_path / "tmp").glob("*")), "chunks of the aborted message left"


async def test_binarymime_content_cannot_be_sent_with_data(elemta_server):
    server = await elemta_server()
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        await transaction(c, "BODY=BINARYMIME")
        reply = await c.cmd("DATA")
    assert (reply.code, reply.enhanced) == (503, "5.5.1"), reply


async def test_binarymime_content_is_stored_octet_for_octet(elemta_server):
    server = await elemta_server()
    binary = bytes(range(256)) * 4 + b"\n\r\0"
    content = HEAD + binary
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        await transaction(c, "BODY=BINARYMIME")
        assert (await bdat(c, content[:700])).code == 250
        final = await bdat(c, content[700:], last=True)
    assert final.code == 250, final
    assert stored(server, final.text.rsplit(" ", 1)[1]) == content
    [env] = spooled(server)
    assert env["mail_params"]["BODY"] == "BINARYMIME"


async def test_text_chunks_are_checked_like_data(elemta_server):
    server = await elemta_server()
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        await transaction(c)
        # answered at the chunk that has it; the rest of the transaction is refused
        reply = await bdat(c, HEAD + b"a bare\nline feed")
        assert (reply.code, reply.enhanced) == (550, "5.5.2"), reply
        assert (await bdat(c, b"\r\n", last=True)).code == 503
        await transaction(c)
        reply = await bdat(c, HEAD + b"a NUL \0\r\n", last=True)
        assert (reply.code, reply.enhanced) == (554, "5.6.0"), reply
        await transaction(c)
        reply = await bdat(c, HEAD + b"ends in a lone CR\r", last=True)
        assert reply.code == 550, reply
        assert (await c.cmd("NOOP")).code == 250
    assert spooled(server) == []


async def test_size_limit_counts_every_chunk_and_the_session_goes_on(elemta_server):
    server = await elemta_server({"server": {"max_message_bytes": 1000}})
    chunk = b"x" * 78 + b"\r\n"
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        await transaction(c)
        # pipelined: the chunk that crosses the limit is read to its end and answered 552;
        # the chunk after it belongs to a failed transaction: 503
        await c.send(f"BDAT {len(HEAD) + 560}\r\n".encode() + HEAD + chunk * 7
                     + b"BDAT 560\r\n" + chunk * 7
                     + b"BDAT 6 LAST\r\nQUIT\r\n")
        replies = [await c.read_reply() for _ in range(3)]
        assert [r.code for r in replies] == [250, 552, 503], replies
        assert replies[1].enhanced == "5.3.4"
        assert (await c.cmd("RSET")).code == 250
        await transaction(c)
        final = await bdat(c, HEAD + b"small\r\n", last=True)
        assert final.code == 250, final
    assert len(spooled(server)) == 1


async def test_refused_chunks_are_read_and_skipped(elemta_server):
    server = await elemta_server()
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        # without MAIL: the chunk (which looks like commands) is skipped
        reply = await bdat(c, b"MAIL FROM:<evil@client.example>\r\n", last=True)
        assert (reply.code, reply.enhanced) == (503, "5.5.1"), reply
        # after every RCPT failed
        assert (await c.cmd("MAIL FROM:<a@client.example>")).code == 250
        assert (await c.cmd("RCPT TO:<u@elsewhere.example>")).code == 550
        reply = await bdat(c, b"RCPT TO:<u@example.test>\r\n", last=True)
        assert (reply.code, reply.enhanced) == (554, "5.5.1"), reply
        # a bad keyword after the size: the size is known, so the chunk is skipped
        assert (await c.cmd("RSET")).code == 250
        await transaction(c)
        await c.send(b"BDAT 6 FINAL\r\nNOOP\r\n")
        reply = await c.read_reply()
        assert (reply.code, reply.enhanced) == (501, "5.5.4"), reply
        assert (await c.cmd("NOOP")).code == 250
    assert spooled(server) == []


@pytest.mark.parametrize("argument", ["", " abc", " -1", " 10x", " 123456789012345678901",
                                      " +5"])
async def test_a_size_that_is_no_number_closes_the_session(elemta_server, argument):
    server = await elemta_server()
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        await transaction(c)
        reply = await c.cmd(f"BDAT{argument}")
        assert (reply.code, reply.enhanced) == (501, "5.5.4"), reply
        assert await c.closed()
    assert not list((server.spool_path / "tmp").glob("*"))


class Edits:
    """A data hook that records what it saw and edits the message."""

    def __init__(self) -> None:
        self.seen: list[tuple[bytes, int]] = []

    @hookimpl
    def data(self, message):
        self.seen.append((message.header("Subject"), message.size))
        message.add_header("X-Seen", "yes")


async def test_hooks_see_and_edit_a_chunked_message_as_a_data_one(elemta_server):
    edits = Edits()
    server = await elemta_server(plugins=[("edits", edits)])
    content = HEAD + b"body\r\n"
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        await transaction(c)
        await bdat(c, content[:10])
        by_bdat = await bdat(c, content[10:], last=True)
        by_data = await c.send_message("a@client.example", ["u@example.test"],
                                       content + b".\r\n")
    assert by_bdat.code == by_data.code == 250
    assert edits.seen[0] == edits.seen[1]
    server.app.spool.wait_written()
    a, b = ((server.spool_path / "messages" / r.text.rsplit(" ", 1)[1]).read_bytes()
            for r in (by_bdat, by_data))
    assert b"\r\nX-Seen: yes\r\n" in a and b"\r\nX-Seen: yes\r\n" in b
    assert a.split(b"X-Seen: yes", 1)[1] == b.split(b"X-Seen: yes", 1)[1]


@pytest.mark.slow
async def test_20_mib_in_1_mib_chunks_grows_peak_rss_by_less_than_5_mib(tmp_path, start_server):
    port = free_port()
    config = write_config(tmp_path / "srv", {
        "server": {"max_message_bytes": 64 * MIB},
        "listeners": [listener("mx", port)],
        "metrics": {"enabled": False},
        "log": {"level": "warning"},
    })
    server = start_server(config)
    line = b"x" * 76 + b"\r\n"
    chunk = line * (MIB // len(line))
    async with RawSMTP(port) as c:
        await c.cmd("EHLO client.example")
        await transaction(c)
        assert (await bdat(c, HEAD + b"warm-up\r\n", last=True)).code == 250
        await asyncio.sleep(0.2)
        before = rss_peak_kib(server.pid)
        await transaction(c, "SIZE=21000000")
        assert (await bdat(c, HEAD)).code == 250
        sent = 0
        while sent < 20 * MIB:
            assert (await bdat(c, chunk)).code == 250
            sent += len(chunk)
        reply = await bdat(c, b"", last=True)
        assert reply.code == 250, str(reply)
    growth_mib = (rss_peak_kib(server.pid) - before) / 1024
    print(f"peak RSS growth for 20 MiB in 1 MiB BDAT chunks: {growth_mib:.2f} MiB")
    assert growth_mib < 5, f"peak RSS grew by {growth_mib:.1f} MiB for a 20 MiB message"
    queue_id = reply.text.rsplit(" ", 1)[1]
    spool = tmp_path / "srv" / "queue"
    wait_until(lambda: (spool / "ready" / f"{queue_id}.json").exists(), what="envelope written")
    assert (spool / "messages" / queue_id).stat().st_size > sent


async def test_the_outbound_client_sends_bdat_that_this_server_stores_as_sent(elemta_server,
                                                                            tmp_path):
    from elemta.delivery.smtp import SMTPConnection, Timeouts, TLSPolicy
    server = await elemta_server()
    text = HEAD + b".leading dot\r\n" + b"y" * 300_000 + b"\r\nend\r\n"
    binary = HEAD + bytes(range(256)) * 1200 + b"\0\r"
    path = tmp_path / "binary.eml"
    path.write_bytes(binary)
    conn = await SMTPConnection.open("127.0.0.1", server.port("mx"), mx_host="mx.example.test",
                                     helo="client.example", tls=TLSPolicy("none"),
                                     timeouts=Timeouts.uniform(10))
    async with conn:
        assert {"CHUNKING", "BINARYMIME"} <= conn.extensions.keys()
        sent_text = await conn.send("a@client.example", ["u@example.test"], text, chunking=True)
        sent_binary = await conn.send("a@client.example", ["u@example.test"], str(path),
                                      binary=True)
    queue_ids = [r.results[0].text.rsplit(" ", 1)[1] for r in (sent_text, sent_binary)]
    assert all(r.results[0].delivered for r in (sent_text, sent_binary))
    # text as DATA would carry it: no dot-stuffing in BDAT, the long line wrapped
    stored_text = stored(server, queue_ids[0])
    assert stored_text.startswith(HEAD + b".leading dot\r\n")
    assert max(map(len, stored_text.split(b"\r\n"))) <= 998
    assert stored_text.replace(b"\r\n ", b"").replace(b"\r\n", b"") == text.replace(b"\r\n", b"")
    assert stored(server, queue_ids[1]) == binary
    env = {e["id"]: e for e in spooled(server)}
    assert env[queue_ids[1]]["mail_params"]["BODY"] == "BINARYMIME"


async def test_a_chunk_refused_before_starttls_is_skipped(elemta_server):
    server = await elemta_server()
    async with RawSMTP(server.port("submission")) as c:
        await c.cmd("EHLO client.example")
        await c.send(b"BDAT 6 LAST\r\nQUIT\r\nNOOP\r\n")
        reply = await c.read_reply()
        assert (reply.code, reply.enhanced) == (530, "5.7.0"), reply
        assert (await c.read_reply()).code == 250, "QUIT was chunk data, NOOP the next command"


async def test_a_full_disk_mid_chunk_is_452_after_the_chunk_and_the_session_goes_on(
        elemta_server, small_filesystem):
    disk = small_filesystem("8m")
    server = await elemta_server({
        "server": {"max_message_bytes": 64 * MIB},
        "spool": {"path": str(disk / "queue"), "memory_bytes": 65536,
                  "min_free_bytes": 1 << 20}})
    chunk = (b"z" * 78 + b"\r\n") * (MIB // 80)
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        await transaction(c)
        replies = [await bdat(c, HEAD)]
        while replies[-1].code == 250 and len(replies) < 20:
            replies.append(await bdat(c, chunk))
        reply = replies[-1]
        assert (reply.code, reply.enhanced) == (452, "4.3.1"), replies
        assert (await c.cmd("NOOP")).code == 250, "the chunk was read to its end"
        assert (await bdat(c, b"", last=True)).code == 503
        assert (await c.cmd("RSET")).code == 250
    assert not list((disk / "queue" / "tmp").glob("*")), "the spilled body was removed"
