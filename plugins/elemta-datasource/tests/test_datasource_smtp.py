"""The datasource answering the rcpt and data stages of a real server, and routing."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from elemta.testing import RawSMTP, Sink, free_port
from elemta_datasource.directory import Domain, Rule, check_rule
from elemta_datasource.sql import SQLiteBackend

MSG = b"Subject: t\r\n\r\nhello\r\n.\r\n"


async def directory(path: Path) -> None:
    b = SQLiteBackend(path)
    await b.open()
    await b.add_domain(Domain("example.test"))
    await b.add_domain(Domain("small.test", max_message_bytes=200))
    await b.add_domain(Domain("catch.test", catch_all="postmaster@catch.test"))
    for box in ("alice@example.test", "bob@example.test", "suspect@example.test",
                "u@small.test", "postmaster@catch.test"):
        await b.add_mailbox(box)
    await b.add_alias("team@example.test", ["alice@example.test", "bob@example.test",
                                            "carol@partner.example"])
    await b.set_rule(check_rule(Rule("suspect@example.test", "quarantine", text="manual review")))
    await b.set_rule(check_rule(Rule("spam@example.test", "reject", code=550, enhanced="5.7.1",
                                     text="Go away")))
    await b.close()


async def start(elemta_server, tmp_path: Path, extra: dict | None = None, **ds):
    db = tmp_path / "ds.sqlite3"
    await directory(db)
    config = {
        "domains": {},   # every hosted domain comes from the datasource
        "plugins": {"datasource": {"sqlite_path": str(db), "cache_seconds": 0.2, **ds}},
        **(extra or {}),
    }
    return await elemta_server(config, enabled=["datasource"])


def spooled(server, state: str = "ready") -> list[dict]:
    server.app.spool.wait_written()
    d = server.spool_path / state
    return [json.loads(p.read_bytes()) for p in sorted(d.glob("*.json"))]


async def test_rcpt_answers_from_the_directory(elemta_server, tmp_path) -> None:
    server = await start(elemta_server, tmp_path)
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        assert (await c.cmd("MAIL FROM:<s@origin.example>")).code == 250
        assert (await c.cmd("RCPT TO:<alice@example.test>")).code == 250
        assert (await c.cmd("RCPT TO:<Bob+News@Example.Test>")).code == 250
        r = await c.cmd("RCPT TO:<nobody@example.test>")
        assert (r.code, r.enhanced) == (550, "5.1.1") and "User unknown" in r.text
        r = await c.cmd("RCPT TO:<spam@example.test>")
        assert (r.code, r.enhanced) == (550, "5.7.1") and r.text.endswith("Go away")
        r = await c.cmd("RCPT TO:<x@elsewhere.example>")
        assert (r.code, r.enhanced) == (550, "5.7.1"), "not ours: the relay policy refuses"
        assert (await c.cmd("RCPT TO:<team@example.test>")).code == 250
        assert (await c.cmd("RCPT TO:<anyone@catch.test>")).code == 250
        assert (await c.cmd("DATA")).code == 354
        await c.send(MSG)
        assert (await c.read_reply()).code == 250
    [env] = spooled(server)
    got = [(r["address"], r["original"]) for r in env["recipients"]]
    assert got == [
        ("alice@example.test", None),
        ("Bob+News@Example.Test", None),
        # alice already is a recipient: spooled once
        ("bob@example.test", "team@example.test"),
        ("carol@partner.example", "team@example.test"),
        ("postmaster@catch.test", "anyone@catch.test"),
    ]
    shown = await cli(str(server.root / "elemta.toml"), "queue", "show", env["id"])
    assert "carol@partner.example (for team@example.test)" in shown


async def test_quarantine_rule_holds_the_message(elemta_server, tmp_path) -> None:
    server = await start(elemta_server, tmp_path)
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        assert (await c.send_message("s@origin.example", ["suspect@example.test"], MSG)).code \
            == 250
    assert spooled(server) == []
    [env] = spooled(server, "hold")
    assert env["hold_reason"] == "suspect@example.test: manual review"
    await server.app.spool.checkpoint()
    config = str(server.root / "elemta.toml")
    listing = await cli(config, "queue", "list", "--state", "hold")
    assert env["id"] in listing and "1 message in state hold" in listing
    assert "manual review" in await cli(config, "queue", "show", env["id"])
    await cli(config, "queue", "release", env["id"])
    [released] = spooled(server)
    assert released["id"] == env["id"] and released["hold_reason"] is None


async def cli(config: str, *args: str) -> str:
    """The real command line, against the running server's control socket."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "elemta", "--config", config, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200"})
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_per_domain_size_limit(elemta_server, tmp_path) -> None:
    server = await start(elemta_server, tmp_path)
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        await c.cmd("MAIL FROM:<s@origin.example> SIZE=5000")
        r = await c.cmd("RCPT TO:<u@small.test>")
        assert (r.code, r.enhanced) == (552, "5.3.4") and "200 bytes" in r.text
        assert (await c.cmd("RCPT TO:<alice@example.test>")).code == 250, "others unaffected"
        await c.cmd("RSET")
        await c.cmd("MAIL FROM:<s@origin.example>")
        assert (await c.cmd("RCPT TO:<u@small.test>")).code == 250
        assert (await c.cmd("DATA")).code == 354
        await c.send(b"Subject: big\r\n\r\n" + b"x" * 400 + b"\r\n.\r\n")
        r = await c.read_reply()
        assert (r.code, r.enhanced) == (552, "5.3.4")
        assert (await c.send_message("s@origin.example", ["u@small.test"], MSG)).code == 250


async def test_datasource_down_is_451_never_accept(elemta_server) -> None:
    dsn = f"postgresql://postgres@127.0.0.1:{free_port()}/elemta"
    server = await elemta_server({
        "domains": {},
        "plugins": {"datasource": {"backend": "postgresql", "postgresql_dsn": dsn,
                                   "lookup_timeout_seconds": 1}},
    }, enabled=["datasource"])
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        await c.cmd("MAIL FROM:<s@origin.example>")
        for rcpt in ("alice@example.test", "x@elsewhere.example"):
            r = await c.cmd(f"RCPT TO:<{rcpt}>")
            assert (r.code, r.enhanced) == (451, "4.3.0"), str(r)
        assert (await c.cmd("DATA")).code == 554


async def test_postgresql_backend_serves_the_mx(elemta_server, postgresql) -> None:
    from elemta_datasource.sql import PostgresBackend

    b = PostgresBackend(postgresql)
    await b.open()
    await b.add_domain(Domain("example.test"))
    await b.add_mailbox("alice@example.test")
    await b.close()
    server = await elemta_server({
        "domains": {},
        "plugins": {"datasource": {"backend": "postgresql", "postgresql_dsn": postgresql}},
    }, enabled=["datasource"])
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        await c.cmd("MAIL FROM:<s@origin.example>")
        assert (await c.cmd("RCPT TO:<alice@example.test>")).code == 250
        assert (await c.cmd("RCPT TO:<bob@example.test>")).code == 550


async def test_changes_show_after_the_cache_expires(elemta_server, tmp_path) -> None:
    server = await start(elemta_server, tmp_path)
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        await c.cmd("MAIL FROM:<s@origin.example>")
        assert (await c.cmd("RCPT TO:<new@example.test>")).code == 550
        b = SQLiteBackend(tmp_path / "ds.sqlite3")
        await b.open()
        await b.add_mailbox("new@example.test")
        await b.close()
        assert (await c.cmd("RCPT TO:<new@example.test>")).code == 550, "cached for 0.2 s"
        await asyncio.sleep(0.3)
        assert (await c.cmd("RCPT TO:<new@example.test>")).code == 250


async def test_local_recipients_never_reach_the_smtp_transport(elemta_server, tmp_path) -> None:
    async with Sink() as sink:
        server = await start(elemta_server, tmp_path, extra={
            "delivery": {"enabled": True, "workers": 2, "retry_intervals_seconds": [30],
                         "routes": {"*": {"host": f"127.0.0.1:{sink.port}", "tls": "none"}}},
        })
        async with RawSMTP(server.port("mx")) as c:
            await c.cmd("EHLO client.example")
            r = await c.send_message("s@origin.example", ["team@example.test"], MSG)
            assert r.code == 250
        await server.app.spool.checkpoint()
        [got] = await sink.wait_for(1)
        assert got.recipients == ["carol@partner.example"], "only the outside alias target"
        await asyncio.sleep(0.3)
        assert len(sink.messages) == 1
        # without a local transport the mailboxes' copies wait in the queue
        [env] = spooled(server, "deferred")
        states = {r["address"]: r["state"] for r in env["recipients"]}
        assert states == {"alice@example.test": "pending", "bob@example.test": "pending",
                          "carol@partner.example": "delivered"}


async def test_route_uses_the_last_answer_while_the_backend_is_down(elemta_server,
                                                                   tmp_path) -> None:
    import pytest

    from elemta import RecipientState
    from elemta_datasource.directory import BackendUnavailable

    server = await start(elemta_server, tmp_path, cache_seconds=0.1)
    plugin = server.app.pm.get_plugin("datasource")
    local = await plugin.route(recipient=RecipientState("alice@example.test"))
    assert (local.transport, local.destination) == ("local", "example.test")
    assert await plugin.route(recipient=RecipientState("x@elsewhere.example")) is None
    await plugin.backend.close()          # the database is gone from now on
    await asyncio.sleep(0.2)              # and the cached answers have expired
    assert await plugin.route(recipient=RecipientState("bob@example.test")) == local
    assert await plugin.route(recipient=RecipientState("y@elsewhere.example")) is None
    with pytest.raises(BackendUnavailable):  # never seen: neither local nor remote is safe
        await plugin.route(recipient=RecipientState("z@never-seen.example"))


class FreezableProxy:
    """A TCP proxy to PostgreSQL that can stop forwarding: a database that hangs."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.frozen = asyncio.Event()
        self.port = 0
        self._server = None
        self._tasks: set[asyncio.Task] = set()

    async def __aenter__(self) -> "FreezableProxy":
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self._server.close()
        for t in self._tasks:
            t.cancel()

    async def _client(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(src, dst) -> None:
            try:
                while data := await src.read(65536):
                    if self.frozen.is_set():
                        await asyncio.Event().wait()   # swallow it, forever
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        for coro in (pipe(reader, up_writer), pipe(up_reader, writer)):
            task = asyncio.create_task(coro)
            self._tasks.add(task)


async def test_a_hung_database_answers_451_fast_after_the_first_timeout(
        elemta_server, postgresql_server) -> None:
    import time

    from elemta_datasource.sql import PostgresBackend

    dsn = postgresql_server.new_database()
    b = PostgresBackend(dsn)
    await b.open()
    await b.add_domain(Domain("example.test"))
    await b.add_mailbox("alice@example.test")
    await b.close()
    async with FreezableProxy(postgresql_server.port) as proxy:
        proxied = dsn.replace(f":{postgresql_server.port}/", f":{proxy.port}/")
        server = await elemta_server({
            "domains": {},
            "plugins": {"datasource": {"backend": "postgresql", "postgresql_dsn": proxied,
                                       "lookup_timeout_seconds": 1, "cache_seconds": 0}},
        }, enabled=["datasource"])
        async with RawSMTP(server.port("mx")) as c:
            await c.cmd("EHLO client.example")
            await c.cmd("MAIL FROM:<s@origin.example>")
            assert (await c.cmd("RCPT TO:<alice@example.test>")).code == 250
            proxy.frozen.set()
            t0 = time.monotonic()
            r = await c.cmd("RCPT TO:<alice@example.test>")
            first = time.monotonic() - t0
            assert (r.code, r.enhanced) == (451, "4.3.0") and 0.9 < first < 3, first
            t0 = time.monotonic()
            for _ in range(5):
                r = await c.cmd("RCPT TO:<alice@example.test>")
                assert (r.code, r.enhanced) == (451, "4.3.0")
            assert time.monotonic() - t0 < 0.5, "later lookups fail fast, not after 1 s each"


async def test_postmaster_of_every_hosted_domain_is_accepted_without_a_mailbox(
        elemta_server, tmp_path, elemta_outbox) -> None:
    """RFC 5321 §4.5.1: postmaster@ every domain we take mail for; the hosted domains
    live in the datasource, not in [domains], so the core does not know them."""
    db = tmp_path / "ds.sqlite3"
    await directory(db)
    server = await elemta_server({
        "server": {"postmaster": "admin@example.test"},
        "domains": {},
        "plugins": {"datasource": {"sqlite_path": str(db), "cache_seconds": 0.2}},
    }, enabled=["datasource"], outbox=elemta_outbox)
    async with RawSMTP(server.port("mx")) as c:
        await c.cmd("EHLO client.example")
        assert (await c.cmd("MAIL FROM:<s@origin.example>")).code == 250
        for rcpt in ("postmaster@example.test", "PostMaster@Small.Test",
                     "postmaster@catch.test", "Postmaster", "postmaster@mx.example.test"):
            r = await c.cmd(f"RCPT TO:<{rcpt}>")
            assert r.code == 250, (rcpt, r)
        r = await c.cmd("RCPT TO:<admin@example.test>")
        assert r.code == 250, "[server] postmaster itself, though not a mailbox"
        r = await c.cmd("RCPT TO:<postmaster@elsewhere.example>")
        assert (r.code, r.enhanced) == (550, "5.7.1"), "not ours: never relayed"
        r = await c.cmd("RCPT TO:<admin2@example.test>")
        assert (r.code, r.enhanced) == (550, "5.1.1"), "other unknown users still refused"
        assert (await c.cmd("DATA")).code == 354
        await c.send(MSG)
        assert (await c.read_reply()).code == 250
    delivered = await elemta_outbox.wait(1)
    got = sorted(r for d in delivered for r in d.recipients)
    # postmaster@catch.test is a mailbox there; every other postmaster goes to admin
    assert got == ["admin@example.test", "postmaster@catch.test"]
    assert {d.route.transport for d in delivered} == {"local"}


async def test_a_forward_rule_keeps_one_local_copy_and_never_passes_it_on_again(
        elemta_server, tmp_path) -> None:
    """The recipients of a forward rule are expanded at RCPT; the mailbox's own copy is
    routed to its mailbox, not treated as an alias again (which re-queued it forever)."""
    async with Sink() as sink:
        db = tmp_path / "ds.sqlite3"
        await directory(db)
        b = SQLiteBackend(db)
        await b.open()
        await b.set_rule(check_rule(Rule("alice@example.test", "forward",
                                         targets=("alice@home.example",))))
        await b.close()
        server = await elemta_server({
            "domains": {},
            "plugins": {"datasource": {"sqlite_path": str(db), "cache_seconds": 0.2}},
            "delivery": {"enabled": True, "workers": 2, "retry_intervals_seconds": [30],
                         "routes": {"*": {"host": f"127.0.0.1:{sink.port}", "tls": "none"}}},
        }, enabled=["datasource"])
        async with RawSMTP(server.port("mx")) as c:
            await c.cmd("EHLO client.example")
            assert (await c.send_message("s@origin.example", ["alice@example.test"],
                                         MSG)).code == 250
        await server.app.spool.checkpoint()
        [got] = await sink.wait_for(1)
        assert got.recipients == ["alice@home.example"]
        await asyncio.sleep(0.5)
        # one message in the spool: the local copy, waiting for a local transport (none is
        # loaded here); nothing passed on
        envs = [e for state in ("ready", "deferred") for e in spooled(server, state)]
        assert len(envs) == 1, [e["recipients"] for e in envs]
        states = {r["address"]: r["state"] for r in envs[0]["recipients"]}
        assert states == {"alice@example.test": "pending", "alice@home.example": "delivered"}
