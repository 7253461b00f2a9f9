"""Limits of mail sent from a hosted domain or by a user, for a rate limiter: stored on
each backend, migrated into existing databases, set with the command line, answered
through the ``rate_limits`` hook of a running server."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from elemta.testing import run_cli
from elemta_datasource.directory import DirectoryError, Domain, User
from elemta_datasource.sql import MIGRATIONS, SCHEMA_VERSION, PostgresBackend, SQLiteBackend
from elemta_datasource.static import StaticBackend


async def test_limits_on_every_backend(backend) -> None:
    await backend.add_domain(Domain("example.test", max_message_bytes=1000))
    assert (await backend.get_domain("example.test")).messages_per_hour is None
    assert await backend.set_domain_limits("example.test", messages_per_hour=50,
                                           messages_per_day=0)
    assert not await backend.set_domain_limits("nowhere.test", messages_per_hour=1)
    d = await backend.get_domain("example.test")
    assert (d.messages_per_hour, d.messages_per_day, d.max_message_bytes) == (50, 0, 1000)
    assert (await backend.lookup("a@example.test", "a@example.test", "example.test")
            ).domain == d
    await backend.add_domain(Domain("example.test", catch_all="a@example.test"), replace=True)
    d = (await backend.list_domains())[0]
    assert (d.catch_all, d.messages_per_hour, d.messages_per_day) == ("a@example.test", 50, 0), \
        "domains add --update keeps the limits"
    assert await backend.set_domain_limits("example.test", messages_per_day=None)
    assert (await backend.get_domain("example.test")).messages_per_day is None
    with pytest.raises(TypeError):
        await backend.set_domain_limits("example.test", catch_all="x@example.test")

    await backend.add_user(User("alice@example.test", daily_quota=0, messages_per_hour=20))
    alice = await backend.get_user("alice@example.test")
    assert (alice.daily_quota, alice.messages_per_hour) == (0, 20), "0 (no limit) is kept"
    assert await backend.update_user("alice@example.test", messages_per_hour=None,
                                     daily_quota=7)
    alice = (await backend.list_users())[0]
    assert (alice.daily_quota, alice.messages_per_hour) == (7, None)


def version_2(conn) -> None:
    conn.execute("CREATE TABLE elemta_schema (version INTEGER NOT NULL)")
    for version, statements in MIGRATIONS[:2]:
        for stmt in statements:
            conn.execute(stmt)
        conn.execute(f"INSERT INTO elemta_schema VALUES ({version})")
    conn.execute("INSERT INTO domains (name, max_message_bytes) VALUES ('example.test', 99)")
    conn.execute("INSERT INTO users (address, password, daily_quota) "
                 "VALUES ('alice@example.test', '$argon2id$x', 5)")


async def check_migrated(b) -> None:
    d = await b.get_domain("example.test")
    assert (d.max_message_bytes, d.messages_per_hour, d.messages_per_day) == (99, None, None)
    alice = await b.get_user("alice@example.test")
    assert (alice.password, alice.daily_quota, alice.messages_per_hour) == \
        ("$argon2id$x", 5, None)
    assert await b.set_domain_limits("example.test", messages_per_hour=10)
    assert (await b.get_domain("example.test")).messages_per_hour == 10


async def test_a_version_2_sqlite_database_gains_the_limits(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as conn:
        version_2(conn)
    b = SQLiteBackend(path)
    await b.open()
    try:
        await check_migrated(b)
    finally:
        await b.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version FROM elemta_schema ORDER BY version").fetchall() \
            == [(v,) for v in range(1, SCHEMA_VERSION + 1)]


async def test_a_version_2_postgresql_database_gains_the_limits(postgresql) -> None:
    import psycopg

    with psycopg.connect(postgresql) as conn:
        version_2(conn)
    servers = [PostgresBackend(postgresql) for _ in range(2)]
    await asyncio.gather(*(b.open() for b in servers))   # two servers starting together
    try:
        await check_migrated(servers[0])
        assert (await servers[1].get_domain("example.test")).messages_per_hour == 10
    finally:
        for b in servers:
            await b.close()
    with psycopg.connect(postgresql) as conn:
        assert conn.execute("SELECT version FROM elemta_schema ORDER BY version").fetchall() \
            == [(v,) for v in range(1, SCHEMA_VERSION + 1)], "each migration ran once"


async def test_toml_limits_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "directory.toml"
    path.write_text('[domains."example.test"]\nmessages_per_hour = -1\n')
    with pytest.raises(DirectoryError, match=r'domains\."example.test": messages_per_hour '
                                             r"must be a number of messages \(0: no limit\)"):
        await StaticBackend(path).open()
    path.write_text('[users."a@example.test"]\nmessages_per_hour = "many"\n')
    with pytest.raises(DirectoryError, match=r'users\."a@example.test": messages_per_hour'):
        await StaticBackend(path).open()
    path.write_text('[domains."example.test"]\nmessages_per_day = 0\n'
                    '[users."a@example.test"]\ndaily_quota = 0\nmessages_per_hour = 3\n')
    b = StaticBackend(path)
    await b.open()
    assert (await b.get_domain("example.test")).messages_per_day == 0
    assert (await b.get_user("a@example.test")).messages_per_hour == 3
    await b.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def directory(request) -> dict:
    table: dict = {"backend": request.param, "cache_seconds": 0.1}
    if request.param == "postgresql":
        table["postgresql_dsn"] = request.getfixturevalue("postgresql")
    return table


async def test_rate_limits_answered_by_a_running_server(elemta_server, directory) -> None:
    server = await elemta_server({"plugins": {"enabled": ["datasource"],
                                              "datasource": directory}})

    def cli(*args: str):
        return run_cli(*args, config=server.config_path)

    async def ok(*args: str) -> str:
        r = await asyncio.to_thread(cli, *args)
        assert r.exit_code == 0, r.stderr
        return r.stdout

    await ok("domains", "add", "small.example")
    await ok("domains", "add", "plain.example")
    assert await ok("domains", "set", "Small.Example", "--messages-per-hour", "2",
                    "--messages-per-day", "0") == \
        "domain small.example: messages-per-hour=2, messages-per-day=0\n"
    await ok("users", "add", "alice@small.example", "--no-password", "--no-mailbox")
    await ok("users", "add", "bob@small.example", "--no-password", "--no-mailbox")
    assert await ok("users", "set", "alice@small.example", "--messages-per-day", "40",
                    "--messages-per-hour", "0") == \
        "user alice@small.example: daily-quota=40, messages-per-hour=0\n"
    assert "small.example\tmessages-per-hour=2 messages-per-day=0" in await ok("domains", "list")

    app = server.app
    assert await app.rate_limits("domain", "SMALL.example") == {"per_hour": 2, "per_day": 0}
    assert await app.rate_limits("domain", "plain.example") is None, "no limits of its own"
    assert await app.rate_limits("domain", "elsewhere.example") is None, "not hosted"
    assert await app.rate_limits("user", "alice@small.example") == {"per_hour": 0,
                                                                    "per_day": 40}
    assert await app.rate_limits("user", "bob@small.example") is None
    assert await app.rate_limits("user", "nobody@small.example") is None

    # a change reaches the running server once its cache entry expires
    await ok("domains", "set", "small.example", "--messages-per-hour", "none")
    await asyncio.sleep(0.2)
    assert await app.rate_limits("domain", "small.example") == {"per_hour": None,
                                                                "per_day": 0}

    r = await asyncio.to_thread(cli, "domains", "set", "nowhere.example",
                                "--messages-per-hour", "1")
    assert r.exit_code == 1 and "domain nowhere.example is not hosted" in r.stderr
    r = await asyncio.to_thread(cli, "domains", "set", "small.example",
                                "--messages-per-day", "lots")
    assert r.exit_code == 2 and "a number of messages, 0 for no limit, or none" in r.stderr
    r = await asyncio.to_thread(cli, "domains", "set", "small.example")
    assert r.exit_code == 2 and "nothing to change" in r.stderr
