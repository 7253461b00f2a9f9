"""The query API on both backends: search, bounds, repeated delivery, events, 10,000 messages.

Each test runs on SQLite and on a real PostgreSQL (the test kit's ``postgresql``
fixture starts one from the distribution's binaries).
"""

from __future__ import annotations

import asyncio
import base64
import os
import stat
import time
from datetime import datetime, timedelta, timezone

import pytest
from store_support import incoming, mime, plain
from elemta_store import Store, StoreError, StoreSettings


async def events(sub, n: int) -> list[dict]:
    out = []
    async with asyncio.timeout(10):
        while len(out) < n:
            out.append(await sub.__anext__())
    return out


async def test_search_finds_words_of_decoded_text_parts(open_store):
    store = await open_store()
    raw = mime("The zebrafish report is attached", "Kumquat caf\u00e9 na\u00efve",
               attachment=b"platypus " * 20)
    id = await store.put(incoming("Q1", raw))
    await store.put(incoming("Q2", plain("other", "nothing to see")))

    for words in ("zebrafish", "kumquat", "cafe", "caf\u00e9", "naive", "zebra*",
                  '"zebrafish report"', "r\u00e9union", "zoe@example.org"[:3]):
        page = await store.search(text=words)
        if words == "zoe":     # the From header is not indexed, the envelope sender is
            assert page.total == 0
            continue
        assert [s.id for s in page.items] == [id], words
    # what is on the wire is not what is indexed: neither base64 nor an attachment
    encoded = base64.b64encode(b"The zebrafish report")[:12].decode()
    assert (await store.search(text=encoded)).total == 0
    assert (await store.search(text="platypus")).total == 0
    assert (await store.search(text='"report zebrafish"')).total == 0

    message = await store.get(id)
    assert message is not None
    assert message.subject == "R\u00e9union"
    assert message.from_header == "Zo\u00e9 <zoe@example.org>"
    assert message.has_attachments
    assert message.snippet == "The zebrafish report is attached"
    assert ("MIME-Version", "1.0") in message.headers
    assert message.size == len(raw)
    assert await store.raw(id) == raw


async def test_search_by_recipient_sender_time_and_pages(open_store):
    store = await open_store()
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    ids = []
    for n in range(12):
        rcpts = ["bob@example.test"] if n % 2 else ["carol@example.test", "dave@example.test"]
        ids.append(await store.put(incoming(
            f"Q{n}", plain(f"number {n}", f"hello {n}"), rcpts,
            sender=f"s{n % 3}@example.org", received=t0 + timedelta(minutes=n))))

    page = await store.search(limit=5)
    assert page.total == 12
    assert [s.id for s in page.items] == ids[::-1][:5]          # newest first
    page = await store.search(offset=10, limit=5)
    assert [s.id for s in page.items] == ids[1::-1]

    page = await store.search(to="DAVE@")
    assert page.total == 6 and all("dave@example.test" in s.recipients for s in page.items)
    page = await store.search(sender="s1@", to="bob")
    assert sorted(s.id for s in page.items) == [ids[n] for n in (1, 7)]
    page = await store.search(since=t0 + timedelta(minutes=3), before=t0 + timedelta(minutes=6))
    assert [s.id for s in page.items] == [ids[5], ids[4], ids[3]]
    assert page.items[0].received == t0 + timedelta(minutes=5)
    naive = (t0 + timedelta(minutes=10)).replace(tzinfo=None)
    assert (await store.search(since=naive)).total == 2
    # "%" and "_" are letters here, not wildcards
    assert (await store.search(to="%")).total == 0
    assert (await store.search(sender="s_@")).total == 0


@pytest.mark.parametrize("text", ['"unbalanced', "OR", "NEAR(a b", "a AND", "*", "-x", "^", "()",
                                  "bob@example.test", "sub:ject"])
async def test_any_typed_text_is_a_search_never_an_error(open_store, text):
    store = await open_store()
    await store.put(incoming("Q1", plain("a subject", "body text for bob@example.test")))
    page = await store.search(text=text)
    assert page.total in (0, 1)
    if text == "bob@example.test":
        assert page.total == 1


async def test_max_messages_keeps_the_newest(open_store):
    store = await open_store(max_messages=3)
    sub = store.subscribe()
    ids = [await store.put(incoming(f"Q{n}", plain(f"m{n}", "x"))) for n in range(5)]
    assert await store.count() == 3
    page = await store.search()
    assert [s.id for s in page.items] == ids[:1:-1]
    assert await store.get(ids[0]) is None and await store.raw(ids[1]) is None
    assert (await store.search(text="m0")).total == 0
    got = await events(sub, 7)
    assert {"type": "deleted", "id": ids[0]} in got and {"type": "deleted", "id": ids[1]} in got
    assert store.pruned_total == 2


async def test_max_bytes_keeps_the_newest_within_the_bound(open_store):
    raw = [plain(f"m{n}", "y" * 1000) for n in range(6)]
    size = len(raw[0])
    store = await open_store(max_bytes=size * 3 + 10)
    ids = [await store.put(incoming(f"Q{n}", r)) for n, r in enumerate(raw)]
    page = await store.search()
    assert [s.id for s in page.items] == ids[:2:-1]
    assert sum(s.size for s in page.items) <= size * 3 + 10
    # one message larger than the bound is kept alone: the newest always stays
    big = await store.put(incoming("QBIG", plain("big", "z" * 10 * size)))
    assert [s.id for s in (await store.search()).items] == [big]


async def test_a_repeated_delivery_keeps_one_copy_and_adds_recipients(open_store):
    store = await open_store()
    sub = store.subscribe()
    raw = plain("once", "hello")
    first = await store.put(incoming("Q1", raw, ["bob@example.test"], params={"NOTIFY": "NEVER"}))
    again = await store.put(incoming("Q1", raw, ["bob@example.test"]))
    more = await store.put(incoming("Q1", raw, ["carol@example.test"]))
    assert first == again == more
    assert await store.count() == 1
    message = await store.get(first)
    assert message.recipients == ["bob@example.test", "carol@example.test"]
    assert message.envelope.rcpt_params == {"bob@example.test": {"NOTIFY": "NEVER"},
                                            "carol@example.test": {}}
    assert message.envelope.mail_params == {"BODY": "8BITMIME"}
    assert message.envelope.queue_id == "Q1" and message.envelope.helo == "client.example.org"
    assert (await store.search(text="carol")).total == 1
    assert (await store.search(to="carol")).total == 1
    got = await events(sub, 3)
    assert [e["new"] for e in got] == [True, False, False]


async def test_delete_clear_count_and_their_events(open_store):
    store = await open_store()
    ids = [await store.put(incoming(f"Q{n}", plain(f"m{n}", "x"))) for n in range(4)]
    sub = store.subscribe()
    assert await store.delete(ids[1]) is True
    assert await store.delete(ids[1]) is False
    assert await store.count() == 3
    assert (await store.search(text="m1")).total == 0
    assert await store.clear() == 3
    assert await store.count() == 0 and (await store.search()).total == 0
    assert await events(sub, 2) == [{"type": "deleted", "id": ids[1]},
                                    {"type": "cleared", "id": None}]
    await store.close()
    with pytest.raises(StopAsyncIteration):
        await sub.__anext__()


async def test_a_slow_subscriber_is_told_it_missed_events(open_store):
    store = await open_store()
    sub = store.subscribe(queue_size=3)
    ids = [await store.put(incoming(f"Q{n}", plain(f"m{n}", "x"))) for n in range(5)]
    got = await events(sub, 3)
    assert got[0] == {"type": "overflow", "id": None}
    assert [(e["type"], e["id"]) for e in got[1:]] == [("stored", ids[3]), ("stored", ids[4])]
    sub.close()


@pytest.mark.slow
async def test_ten_thousand_messages_are_stored_and_searched(open_store, backend):
    store = await open_store()
    started = time.monotonic()
    batch = 200
    for start in range(0, 10_000, batch):
        await asyncio.gather(*(
            store.put(incoming(f"Q{n}", plain(f"report {n}", f"word{n % 100} common text",
                                              to=f"user{n % 10}@example.test"),
                               [f"user{n % 10}@example.test"]))
            for n in range(start, start + batch)))
    stored = time.monotonic() - started
    assert await store.count() == 10_000
    started = time.monotonic()
    page = await store.search(text="word42")
    assert page.total == 100 and len(page.items) == 50
    assert all("word42" in s.snippet for s in page.items)
    assert (await store.search(text="common", to="user3@")).total == 1000
    assert (await store.search(text="report 9999")).items[0].subject == "report 9999"
    searched = time.monotonic() - started
    print(f"{backend}: 10,000 stored in {stored:.1f} s, three searches in {searched:.2f} s")
    assert searched < 10


async def test_the_sqlite_file_is_private(tmp_path):
    store = await Store.open(StoreSettings(path="db/m.db"), base=tmp_path)
    try:
        await store.put(incoming("Q1", plain("x", "y")))
        assert stat.S_IMODE(os.stat(tmp_path / "db").st_mode) == 0o700
        for name in ("m.db", "m.db-wal"):
            assert stat.S_IMODE(os.stat(tmp_path / "db" / name).st_mode) == 0o600, name
    finally:
        await store.close()


async def test_the_wal_is_copied_into_the_database_in_the_background(tmp_path):
    store = await Store.open(StoreSettings(path=str(tmp_path / "m.db")))
    try:
        before = os.path.getsize(tmp_path / "m.db")
        for n in range(0, 300, 50):
            await asyncio.gather(*(store.put(incoming(f"Q{k}", plain(f"m{k}", "x" * 3000)))
                                   for k in range(n, n + 50)))
        async with asyncio.timeout(10):
            while os.path.getsize(tmp_path / "m.db") < before + 300 * 3000:
                await asyncio.sleep(0.05)
        assert (await store.search(text="m299")).total == 1
    finally:
        await store.close()
    import sqlite3
    conn = sqlite3.connect(tmp_path / "m.db")
    assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 300
    conn.close()


async def test_a_lock_held_too_long_fails_the_write_and_the_store_goes_on(tmp_path):
    import sqlite3
    store = await Store.open(StoreSettings(path=str(tmp_path / "m.db"), timeout_seconds=0.5))
    try:
        other = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")        # another process writing, for too long
        started = time.monotonic()
        with pytest.raises(StoreError, match="locked"):
            await store.put(incoming("Q1", plain("locked out", "x")))
        assert time.monotonic() - started < 5
        other.execute("ROLLBACK")
        other.close()
        id = await store.put(incoming("Q1", plain("let in", "x")))
        assert (await store.get(id)).subject == "let in"
    finally:
        await store.close()


async def test_an_unusable_path_says_what_to_fix(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match=r"cannot open the message store .*file/m\.db.*path"):
        await Store.open(StoreSettings(path=str(tmp_path / "file" / "m.db")))


async def test_an_unreachable_postgresql_says_what_to_fix():
    from elemta.testing import free_port
    dsn = f"postgresql://elemta:hunter2@127.0.0.1:{free_port()}/db"
    with pytest.raises(StoreError) as e:
        await Store.open(StoreSettings(backend="postgresql", postgresql_dsn=dsn,
                                       timeout_seconds=1))
    assert "postgresql_dsn" in str(e.value) and "hunter2" not in str(e.value)


async def test_postgresql_stores_on_one_database_hear_each_other(postgresql):
    a = await Store.open(StoreSettings(backend="postgresql", postgresql_dsn=postgresql))
    b = await Store.open(StoreSettings(backend="postgresql", postgresql_dsn=postgresql))
    try:
        heard_by_b, heard_by_a = b.subscribe(), a.subscribe()
        id = await a.put(incoming("Q1", plain("across", "nodes")))
        assert await b.delete(id) is True
        assert await events(heard_by_b, 2) == [{"type": "stored", "id": id, "new": True},
                                               {"type": "deleted", "id": id}]
        # each store hears its own changes once, not again through NOTIFY
        assert await events(heard_by_a, 2) == [{"type": "stored", "id": id, "new": True},
                                               {"type": "deleted", "id": id}]
        await asyncio.sleep(0.3)
        assert heard_by_a._queue.empty() and heard_by_b._queue.empty()
    finally:
        await a.close()
        await b.close()
