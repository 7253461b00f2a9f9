"""The directory on each real backend: SQLite on disk, the TOML file, PostgreSQL.

The same directory is built through each backend's editing API and resolved
with the same expectations, so the three cannot drift apart.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from elemta_datasource.directory import (BackendUnavailable, DirectoryError, Domain, Rule,
                                         check_rule, resolve)
from elemta_datasource.sql import SCHEMA_VERSION, PostgresBackend, SQLiteBackend
from elemta_datasource.static import StaticBackend


async def populate(b) -> None:
    await b.add_domain(Domain("example.test"))
    await b.add_domain(Domain("catch.test", catch_all="postmaster@catch.test",
                              max_message_bytes=1000))
    await b.add_domain(Domain("open.test", reject_unknown=False))
    await b.add_domain(Domain("old.test"))
    for box in ("alice@example.test", "bob@example.test", "postmaster@catch.test",
                "carol@catch.test"):
        await b.add_mailbox(box)
    await b.add_alias("team@example.test", ["alice@example.test", "bob@example.test",
                                            "dave@partner.example"])
    await b.add_alias("all@example.test", ["team@example.test", "carol@catch.test"])
    await b.add_alias("loop1@example.test", ["loop2@example.test"])
    await b.add_alias("loop2@example.test", ["loop1@example.test", "alice@example.test"])
    await b.set_rule(check_rule(Rule("sales@example.test", "redirect", ("bob@example.test",))))
    await b.set_rule(check_rule(Rule("alice@example.test", "forward",
                                     ("alice@home.example",))))
    await b.set_rule(check_rule(Rule("spam@example.test", "reject", code=550,
                                     enhanced="5.7.1", text="No spam here")))
    await b.set_rule(check_rule(Rule("busy@example.test", "reject", code=450,
                                     enhanced="4.2.1", text="Try later")))
    await b.set_rule(check_rule(Rule("suspect@example.test", "quarantine", text="review")))
    await b.add_mailbox("suspect@example.test")
    await b.set_rule(check_rule(Rule("old.test", "redirect", ("@example.test",))))


async def run(b, address: str):
    return await resolve(b.lookup, address, "+", 8)


async def test_resolution(backend) -> None:
    await populate(backend)
    r = await run(backend, "Bob@Example.Test")
    assert (r.kind, r.deliver_to) == ("accept", None), "a mailbox keeps the address as given"
    r = await run(backend, "bob+lists@example.test")
    assert (r.kind, r.deliver_to) == ("accept", None), "+detail finds the mailbox"
    r = await run(backend, "team@example.test")
    assert r.deliver_to == ("alice@example.test", "alice@home.example", "bob@example.test",
                            "dave@partner.example")
    r = await run(backend, "all@example.test")
    assert set(r.deliver_to) == {"alice@example.test", "alice@home.example", "bob@example.test",
                                 "dave@partner.example", "carol@catch.test"}
    r = await run(backend, "loop1@example.test")
    assert r.kind == "accept" and set(r.deliver_to) == {"alice@example.test",
                                                        "alice@home.example"}
    assert any("loop" in t for t in r.trace)
    r = await run(backend, "nobody@example.test")
    assert (r.kind, r.code, r.enhanced) == ("reject", 550, "5.1.1")
    r = await run(backend, "nobody@catch.test")
    assert r.deliver_to == ("postmaster@catch.test",) and r.max_message_bytes == 1000
    r = await run(backend, "anyone@open.test")
    assert (r.kind, r.deliver_to) == ("accept", None), "reject_unknown = false"
    r = await run(backend, "x@elsewhere.example")
    assert r.kind == "foreign"
    r = await run(backend, "sales@example.test")
    assert r.deliver_to == ("bob@example.test",), "redirect"
    r = await run(backend, "alice@example.test")
    assert r.deliver_to == ("alice@example.test", "alice@home.example"), "forward keeps a copy"
    r = await run(backend, "spam@example.test")
    assert (r.kind, r.code, r.enhanced, r.text) == ("reject", 550, "5.7.1", "No spam here")
    r = await run(backend, "busy@example.test")
    assert (r.kind, r.code, r.enhanced) == ("reject", 450, "4.2.1")
    r = await run(backend, "suspect@example.test")
    assert (r.kind, r.deliver_to, r.quarantine) == ("accept", None, "review")
    r = await run(backend, "carol@old.test")
    assert (r.kind, r.code) == ("reject", 550), "redirected to an unknown user: refused at RCPT"
    r = await run(backend, "bob@old.test")
    assert r.deliver_to == ("bob@example.test",), "a domain redirect keeps the local part"


async def test_editing_and_listing(backend) -> None:
    await populate(backend)
    assert [d.name for d in await backend.list_domains()] == ["catch.test", "example.test",
                                                              "old.test", "open.test"]
    assert "alice@example.test" in await backend.list_mailboxes("example.test")
    assert await backend.list_mailboxes("catch.test") == ["carol@catch.test",
                                                          "postmaster@catch.test"]
    with pytest.raises(DirectoryError, match="exists already"):
        await backend.add_mailbox("alice@example.test")
    with pytest.raises(DirectoryError, match="not a hosted domain.*elemta domains add"):
        await backend.add_mailbox("x@unknown.test")
    with pytest.raises(DirectoryError, match="exists already.*--update"):
        await backend.add_domain(Domain("example.test"))
    await backend.add_domain(Domain("example.test", max_message_bytes=5), replace=True)
    assert (await backend.get_domain("example.test")).max_message_bytes == 5
    assert await backend.remove_alias("team@example.test", "bob@example.test") == 1
    assert ("team@example.test", "bob@example.test") not in await backend.list_aliases()
    assert await backend.remove_alias("team@example.test") == 2
    assert await backend.remove_mailbox("bob@example.test")
    assert not await backend.remove_mailbox("bob@example.test")
    assert (await run(backend, "bob@example.test")).kind == "reject"
    assert [r.pattern for r in await backend.list_rules()][:2] == ["alice@example.test",
                                                                   "busy@example.test"]
    assert await backend.remove_rule("spam@example.test")
    assert (await run(backend, "spam@example.test")).code == 550  # now simply unknown
    assert await backend.remove_domain("catch.test")
    assert await backend.list_mailboxes("catch.test") == []
    assert (await run(backend, "carol@catch.test")).kind == "foreign"


# ------------------------------------------------------------------ SQLite specifics


async def test_sqlite_schema_is_created_once_and_versioned(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "ds.sqlite3"
    b = SQLiteBackend(path)
    await b.open()
    await b.add_domain(Domain("example.test"))
    await b.close()
    b = SQLiteBackend(path)
    await b.open()   # no second migration: the data is still there
    assert [d.name for d in await b.list_domains()] == ["example.test"]
    await b.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version FROM elemta_schema ORDER BY version").fetchall() \
            == [(v,) for v in range(1, SCHEMA_VERSION + 1)], "each migration ran once"
        conn.execute("INSERT INTO elemta_schema VALUES (?)", (SCHEMA_VERSION + 1,))
    b = SQLiteBackend(path)
    with pytest.raises(BackendUnavailable, match="newer than this elemta-datasource"):
        await b.open()


async def test_sqlite_database_is_the_owners_alone(tmp_path: Path) -> None:
    """It holds password hashes and SCRAM keys: mode 0600 whatever the umask, and so are
    SQLite's -wal and -shm files next to it."""
    path = tmp_path / "ds.sqlite3"
    old = os.umask(0o022)
    try:
        b = SQLiteBackend(path)
        await b.open()
        await b.add_domain(Domain("example.test"))
        modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
        await b.close()
    finally:
        os.umask(old)
    assert modes["ds.sqlite3"] == 0o600
    assert all(mode == 0o600 for mode in modes.values()), modes


async def test_postgresql_down_is_unavailable_not_empty() -> None:
    from elemta.testing import free_port

    b = PostgresBackend(f"postgresql://postgres@127.0.0.1:{free_port()}/x", timeout=1.0)
    with pytest.raises(BackendUnavailable, match="PostgreSQL"):
        await b.open()


async def test_postgresql_schema_versioned(postgresql) -> None:
    import psycopg

    for _ in range(2):
        b = PostgresBackend(postgresql)
        await b.open()
        await b.close()
    with psycopg.connect(postgresql) as conn:
        assert conn.execute("SELECT version FROM elemta_schema ORDER BY version").fetchall() \
            == [(v,) for v in range(1, SCHEMA_VERSION + 1)], "each migration ran once"


async def test_a_version_1_database_is_migrated_and_keeps_its_data(tmp_path) -> None:
    """A directory made before users existed gains the users tables, and loses nothing."""
    from elemta_datasource.directory import User
    from elemta_datasource.sql import MIGRATIONS

    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE elemta_schema (version INTEGER NOT NULL)")
        for stmt in MIGRATIONS[0][1]:
            conn.execute(stmt)
        conn.execute("INSERT INTO elemta_schema VALUES (1)")
        conn.execute("INSERT INTO domains (name) VALUES ('example.test')")
        conn.execute("INSERT INTO mailboxes VALUES ('alice@example.test', 'example.test')")
    b = SQLiteBackend(path)
    await b.open()
    try:
        assert await b.list_mailboxes() == ["alice@example.test"]
        await b.add_user(User("alice@example.test", "$argon2id$x", send_as=("@example.test",)))
        assert (await b.get_user("alice@example.test")).send_as == ("@example.test",)
    finally:
        await b.close()


# ------------------------------------------------------------------ TOML specifics


async def test_toml_file_mistakes_name_the_key(tmp_path: Path) -> None:
    path = tmp_path / "directory.toml"
    path.write_text('[domains."example.test"]\nmailboxs = ["a"]\n')
    with pytest.raises(DirectoryError, match=r'domains\."example.test"\.mailboxs: unknown key'):
        await StaticBackend(path).open()
    path.write_text('[rules."x@example.test"]\naction = "explode"\n')
    with pytest.raises(DirectoryError, match="unknown rule action 'explode'"):
        await StaticBackend(path).open()


async def test_toml_reloads_on_change_and_keeps_comments(tmp_path: Path) -> None:
    path = tmp_path / "directory.toml"
    path.write_text('# our domains\n[domains."example.test"]\nmailboxes = ["alice"]  # boss\n')
    b = StaticBackend(path)
    b.RECHECK_SECONDS = 0
    await b.open()
    assert (await run(b, "alice@example.test")).kind == "accept"
    assert (await run(b, "bob@example.test")).kind == "reject"
    await b.add_mailbox("bob@example.test")
    text = path.read_text()
    assert "# our domains" in text and "# boss" in text
    assert (await run(b, "bob@example.test")).kind == "accept"
    # an edit by hand that breaks the file keeps the last good contents
    path.write_text(text + "\n[domains.broken\n")
    assert (await run(b, "bob@example.test")).kind == "accept"


async def test_users_on_every_backend(backend) -> None:
    """Users, grants, the aliases that reach a user and the daily counts, the same on all three."""
    from elemta_datasource.directory import User

    await populate(backend)
    await backend.add_user(User("alice@example.test", "$argon2id$hash", "SCRAM-SHA-256$x",
                                daily_quota=5, send_as=("@brand.example",)))
    await backend.add_user(User("bob@example.test", max_message_bytes=1000))
    with pytest.raises(DirectoryError, match="exists already"):
        await backend.add_user(User("alice@example.test"))
    alice = await backend.get_user("alice@example.test")
    assert alice == User("alice@example.test", "$argon2id$hash", "SCRAM-SHA-256$x", False,
                         None, 5, ("@brand.example",))
    assert "$argon2id$hash" not in repr(alice), "hashes stay out of logs"
    assert await backend.update_user("alice@example.test", disabled=True, daily_quota=None)
    assert not await backend.update_user("nobody@example.test", disabled=True)
    alice = await backend.get_user("alice@example.test")
    assert alice.disabled and alice.daily_quota is None
    await backend.grant("alice@example.test", "sales@example.test")
    await backend.grant("alice@example.test", "sales@example.test")       # once only
    assert (await backend.get_user("alice@example.test")).send_as == (
        "@brand.example", "sales@example.test")
    assert await backend.revoke("alice@example.test", "@brand.example")
    assert not await backend.revoke("alice@example.test", "@brand.example")
    with pytest.raises(DirectoryError, match="no user carol@example.test"):
        await backend.grant("carol@example.test", "x@example.test")
    assert [u.address for u in await backend.list_users()] == ["alice@example.test",
                                                               "bob@example.test"]
    assert await backend.list_users("catch.test") == []
    assert await backend.aliases_to("alice@example.test") == ["loop2@example.test",
                                                              "team@example.test"]
    assert await backend.count_sent("bob@example.test", "2026-12-06") == 0
    assert [await backend.add_sent("bob@example.test", "2026-12-06") for _ in range(3)] \
        == [1, 2, 3]
    assert await backend.add_sent("bob@example.test", "2026-12-07") == 1
    assert await backend.count_sent("bob@example.test", "2026-12-06") == 3
    assert await backend.add_sent("bob@example.test", "2026-12-20") == 1   # prunes a week back
    assert await backend.count_sent("bob@example.test", "2026-12-06") == 0
    assert await backend.remove_user("alice@example.test")
    assert await backend.get_user("alice@example.test") is None
    assert not await backend.remove_user("alice@example.test")
