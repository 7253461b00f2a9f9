"""The store transport end to end: SMTP in (swaks, smtplib), the real runner, the store out.

Each test starts an in-process server with the installed ``store`` plugin on
SQLite and on a real PostgreSQL, sends mail to its MX listener with a real
client and reads what was stored through the query API and the spool.
"""

from __future__ import annotations

import asyncio
import json
import smtplib
import subprocess

import pytest
from elemta_store import current_store

from store_support import store_config

DOMAIN = "example.test"


async def start(elemta_server, backend, request, retry: float = 60.0, **store):
    config = {"delivery": {"enabled": True, "workers": 4,
                           "retry_intervals_seconds": [retry, retry]},
              "plugins": {"store": store_config(backend, request, **store)}}
    return await elemta_server(config, enabled=["store"])


def envelope_of(server, queue_id: str) -> tuple[str | None, dict | None]:
    for state in ("ready", "deferred", "hold", "failed"):
        path = server.spool_path / state / f"{queue_id}.json"
        if path.exists():
            return state, json.loads(path.read_bytes())
    return None, None


async def wait_for(predicate, timeout: float = 15.0, what: str = "condition"):
    async with asyncio.timeout(timeout):
        while not (value := await predicate()):
            await asyncio.sleep(0.02)
    assert value, what
    return value


async def spool_state(server, queue_id: str, state: str | None):
    async def check():
        got, env = envelope_of(server, queue_id)
        if state is None:
            return got is None
        return env if got == state and env["attempts"] >= 1 else None
    return await wait_for(check, what=f"message {state or 'gone from the spool'}")


def metric(server, name: str, **labels: str) -> float:
    """The value of one sample of the server's metrics (0 when it was never counted)."""
    shown = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    wanted = f"{name}{{{shown}}} " if labels else f"{name} "
    for line in server.app.metrics.render().decode().splitlines():
        if line.startswith(wanted):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def smtplib_send(port: int, sender: str, rcpts: list[str], data: bytes,
                 mail_options=(), rcpt_options=()) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        c.ehlo("client.example.org")
        c.mail(sender, list(mail_options))
        for r in rcpts:
            code, text = c.rcpt(r, list(rcpt_options))
            assert code == 250, text
        code, text = c.data(data)
        assert code == 250, text
    return text.decode().rsplit(" ", 1)[1]


MESSAGE = (b"From: Alice <alice@example.org>\r\nTo: bob@example.test, carol@example.test\r\n"
           b"Subject: quarterly figures\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\n"
           b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
           b"The pangolin budget is appro=\r\nved, caf=C3=A9 included.\r\n")


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_smtp_into_the_store_one_message_with_a_row_per_recipient(
        elemta_server, backend, request):
    server = await start(elemta_server, backend, request)
    store = current_store()
    assert store is not None and store is server.app.pm.get_plugin("store").store
    async with store.subscribe() as events:
        queue_id = await asyncio.to_thread(
            smtplib_send, server.port("mx"), "alice@example.org",
            ["bob@example.test", "carol@example.test"], MESSAGE,
            mail_options=["BODY=8BITMIME"], rcpt_options=["NOTIFY=SUCCESS,FAILURE"])
        await server.app.spool.checkpoint()
        async with asyncio.timeout(15):
            event = await events.__anext__()
    assert event["type"] == "stored"
    await spool_state(server, queue_id, None)       # delivered: the spool forgot it

    message = await store.get(event["id"])
    assert message.recipients == ["bob@example.test", "carol@example.test"]
    assert message.envelope.queue_id == queue_id
    assert message.envelope.mail_params.get("BODY") == "8BITMIME"
    assert message.envelope.rcpt_params["carol@example.test"] == {"NOTIFY": "SUCCESS,FAILURE"}
    assert message.envelope.helo == "client.example.org"
    assert message.envelope.peer == "127.0.0.1"
    assert message.subject == "quarterly figures"
    assert message.headers[0][0] == "Received"         # as the spool holds it
    raw = await store.raw(message.id)
    assert raw.endswith(MESSAGE) and message.size == len(raw)
    # the quoted-printable soft line break is decoded before indexing
    assert [s.id for s in (await store.search(text="approved")).items] == [message.id]
    assert (await store.search(text="pangolin", to="carol")).total == 1
    assert await store.count() == 1
    assert metric(server, "elemta_store_messages_total") == 1
    assert metric(server, "elemta_store_recipients_total") == 2
    assert metric(server, "elemta_store_bytes_total") == len(raw)
    assert metric(server, "elemta_store_write_seconds_count") == 1


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_swaks_message_with_a_base64_part_is_found_by_its_words(
        elemta_server, backend, request, require_tool, tmp_path):
    swaks = require_tool("swaks")
    server = await start(elemta_server, backend, request)
    store = current_store()
    attachment = tmp_path / "notes.txt"
    attachment.write_text("the wombat inventory\n")
    done = await asyncio.to_thread(subprocess.run, [
        swaks, "--server", "127.0.0.1", "--port", str(server.port("mx")),
        "--from", "dave@example.org", "--to", "erin@example.test",
        "--header", "Subject: with a part", "--body", "see the attached list",
        "--attach-type", "text/plain", "--attach-name", "notes.txt",
        "--attach", f"@{attachment}"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    await server.app.spool.checkpoint()

    async def stored():
        return (await store.search(sender="dave@")).items
    [summary] = await wait_for(stored, what="message stored")
    assert summary.recipients == ["erin@example.test"] and summary.has_attachments
    raw = await store.raw(summary.id)
    assert b"wombat" not in raw                          # swaks sent it base64
    # attachments are not indexed; the text body is
    assert (await store.search(text="attached list")).total == 1


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_a_store_that_fails_defers_and_the_spool_keeps_the_message(
        elemta_server, backend, request):
    server = await start(elemta_server, backend, request)
    store = current_store()
    plugin = server.app.pm.get_plugin("store")
    if backend == "sqlite":
        import sqlite3
        path = server.app.settings.resolve(__import__("pathlib").Path(plugin.settings.path))
        db = sqlite3.connect(path)
        db.execute("CREATE TRIGGER refuse BEFORE INSERT ON messages BEGIN "
                   "SELECT RAISE(ABORT, 'the disk says no'); END")
        db.commit()
        undo = "DROP TRIGGER refuse"
    else:
        import psycopg
        db = psycopg.connect(plugin.settings.postgresql_dsn.get_secret_value(), autocommit=True)
        db.execute("CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
                   "$$ BEGIN RAISE EXCEPTION 'the disk says no'; END $$")
        db.execute("CREATE TRIGGER refuse BEFORE INSERT ON elemta_store_messages "
                   "FOR EACH ROW EXECUTE FUNCTION refuse()")
        undo = "DROP TRIGGER refuse ON elemta_store_messages"
    try:
        queue_id = await asyncio.to_thread(smtplib_send, server.port("mx"), "alice@example.org",
                                           ["bob@example.test"], MESSAGE)
        await server.app.spool.checkpoint()
        env = await spool_state(server, queue_id, "deferred")
        assert env["recipients"][0]["last_error"].startswith("451 4.3.0")
        assert (server.spool_path / "messages" / queue_id).exists()
        assert await store.count() == 0
        assert metric(server, "elemta_store_failures_total", reason="error") >= 1
        assert metric(server, "elemta_store_messages_total") == 0
        db.execute(undo)
        if backend == "sqlite":
            db.commit()
    finally:
        db.close()
    await server.retry(queue_id)
    await spool_state(server, queue_id, None)
    page = await store.search()
    assert page.total == 1 and page.items[0].recipients == ["bob@example.test"]
    assert metric(server, "elemta_store_messages_total") == 1


async def test_the_bound_prunes_the_oldest_and_counts_it(elemta_server, request):
    server = await start(elemta_server, "sqlite", request, max_messages=2)
    store = current_store()
    for n in range(4):
        await asyncio.to_thread(smtplib_send, server.port("mx"), "alice@example.org",
                                ["bob@example.test"], MESSAGE.replace(b"quarterly",
                                                                      b"q%d" % n))
        await server.app.spool.checkpoint()

        async def stored(n=n):
            return (await store.search(text=f"q{n}")).total == 1
        await wait_for(stored, what=f"message {n} stored")
    page = await store.search()
    assert [s.subject for s in page.items] == ["q3 figures", "q2 figures"]
    assert metric(server, "elemta_store_pruned_messages_total") == 2


async def test_only_the_configured_recipients_are_routed_to_the_store(
        elemta_server, request):
    server = await start(elemta_server, "sqlite", request, local_domains=False,
                         domains=["other.test"])
    store = current_store()
    # example.test is local but not named: the built-in "local" route, which nothing serves
    queue_id = await asyncio.to_thread(smtplib_send, server.port("mx"), "alice@example.org",
                                       ["bob@example.test"], MESSAGE)
    await server.app.spool.checkpoint()
    env = await spool_state(server, queue_id, "deferred")
    assert "no transport" in env["recipients"][0]["last_error"]
    assert await store.count() == 0


async def test_two_servers_in_one_process_each_find_their_own_store(elemta_server, request):
    first = await start(elemta_server, "sqlite", request)
    second = await start(elemta_server, "sqlite", request)
    mine = current_store(first.app)
    theirs = current_store(second.app)
    assert mine is first.app.pm.get_plugin("store").store
    assert theirs is second.app.pm.get_plugin("store").store
    assert mine is not theirs and current_store() is theirs     # without an app: the last one
    await asyncio.to_thread(smtplib_send, first.port("mx"), "alice@example.org",
                            ["bob@example.test"], MESSAGE)
    await wait_for(lambda: _count(mine, 1), what="the message in the first server's store")
    assert await theirs.count() == 0


async def _count(store, n: int) -> bool:
    return await store.count() == n


async def test_writes_in_flight_bounds_the_messages_held_in_memory(elemta_server, request):
    server = await start(elemta_server, "sqlite", request, writes_in_flight=2)
    store = current_store()
    real_put, inside, most = store.put, 0, 0
    release = asyncio.Event()

    async def counted_put(item):
        nonlocal inside, most
        inside += 1
        most = max(most, inside)
        try:
            await release.wait()  # every write waits here until all six are delivered
            return await real_put(item)
        finally:
            inside -= 1

    store.put = counted_put
    await asyncio.gather(*(asyncio.to_thread(
        smtplib_send, server.port("mx"), "alice@example.org", [f"user{n}@example.test"],
        MESSAGE) for n in range(6)))
    await server.app.spool.checkpoint()

    async def two_writing():
        return inside == 2
    await wait_for(two_writing, what="two writes under way")
    await asyncio.sleep(0.3)  # the runner's four workers have all reached the store by now
    assert (inside, most) == (2, 2)
    release.set()

    await wait_for(lambda: _count(store, 6), what="six messages stored")
    assert most == 2
