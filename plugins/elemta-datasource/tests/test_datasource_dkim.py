"""DKIM signing keys in the directory: every backend, the migration, the commands, the hook."""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import stat
from pathlib import Path

import pytest
from elemta import DkimKey
from elemta.testing import run_cli, write_config

from elemta_datasource.directory import DirectoryError, Domain
from elemta_datasource.dkim import dns_record, load
from elemta_datasource.sql import MIGRATIONS, SCHEMA_VERSION, SQLiteBackend
from elemta_datasource.static import StaticBackend

PEM = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIJ0wQzJ0ZQ5y5Y9Xc4l9nQ3N0k2d1lq8M2mQ3c0p0Q1x\n" \
      "-----END PRIVATE KEY-----\n"
T0 = dt.datetime(2027, 1, 1, tzinfo=dt.timezone.utc).timestamp()


async def test_keys_are_stored_listed_and_removed_on_every_backend(backend, tmp_path) -> None:
    await backend.add_domain(Domain("example.org"))
    await backend.add_domain(Domain("other.example"))
    stored = DkimKey("example.org", "2026a", "rsa", private_key=PEM, not_after=T0)
    filed = DkimKey("example.org", "2027e", "ed25519", key_file=str(tmp_path / "k.key"),
                    not_before=T0)
    await backend.add_dkim_key(filed)
    await backend.add_dkim_key(stored)
    await backend.add_dkim_key(DkimKey("other.example", "s1", "rsa", private_key=PEM))

    assert await backend.dkim_keys("example.org") == [stored, filed]
    assert [k.selector for k in await backend.list_dkim_keys()] == ["2026a", "2027e", "s1"]
    assert await backend.dkim_keys("nokeys.example") == []
    with pytest.raises(DirectoryError, match="exists already; a new key needs a new selector"):
        await backend.add_dkim_key(DkimKey("example.org", "2026a", "rsa", private_key=PEM))
    with pytest.raises(DirectoryError, match="not a hosted domain"):
        await backend.add_dkim_key(DkimKey("elsewhere.example", "s", "rsa", private_key=PEM))

    assert await backend.remove_dkim_key("example.org", "2026a") is True
    assert await backend.remove_dkim_key("example.org", "2026a") is False
    assert await backend.dkim_keys("example.org") == [filed]
    await backend.remove_domain("other.example")
    assert await backend.list_dkim_keys() == [filed], "a removed domain's keys go with it"


@pytest.mark.parametrize("old_version", [1, 2, 3])
async def test_an_older_database_gains_the_keys_table_and_keeps_its_data(tmp_path,
                                                                          old_version) -> None:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE elemta_schema (version INTEGER NOT NULL)")
        for version, statements in MIGRATIONS:
            if version <= old_version:
                for stmt in statements:
                    conn.execute(stmt)
                conn.execute("INSERT INTO elemta_schema VALUES (?)", (version,))
        conn.execute("INSERT INTO domains (name) VALUES ('example.org')")
        conn.execute("INSERT INTO mailboxes VALUES ('alice@example.org', 'example.org')")
    b = SQLiteBackend(path)
    await b.open()
    try:
        assert await b.list_mailboxes() == ["alice@example.org"]
        await b.add_dkim_key(DkimKey("example.org", "s", "rsa", private_key=PEM))
        assert [k.selector for k in await b.dkim_keys("example.org")] == ["s"]
    finally:
        await b.close()
    with sqlite3.connect(path) as conn:
        versions = [v for (v,) in conn.execute("SELECT version FROM elemta_schema")]
    assert versions == list(range(1, SCHEMA_VERSION + 1))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, "private keys: the owner's alone"


async def test_the_toml_file_says_which_key_is_wrong(tmp_path) -> None:
    path = tmp_path / "directory.toml"
    path.write_text('[domains."example.org".dkim."s1"]\nalgorithm = "dsa"\nkey_file = "/k"\n')
    with pytest.raises(DirectoryError, match=r'domains."example.org": dkim.s1.algorithm must be'):
        await StaticBackend(path).open()
    path.write_text('[domains."example.org".dkim."s1"]\nkey_file = "/k"\nprivate_key = "x"\n')
    with pytest.raises(DirectoryError, match="give exactly one of key_file"):
        await StaticBackend(path).open()
    path.write_text('[domains."example.org".dkim."s1"]\nkey_file = "/k"\n'
                    'not_before = 2027-01-01\nnot_after = 2026-01-01T00:00:00Z\n')
    with pytest.raises(DirectoryError, match="not_after is not later than not_before"):
        await StaticBackend(path).open()


@pytest.fixture(params=["sqlite", "toml"])
def config(request, tmp_path: Path) -> Path:
    return write_config(tmp_path / "srv", {"plugins": {"enabled": ["datasource"],
                                                       "datasource": {"backend": request.param}}})


def ok(config: Path, *args: str) -> str:
    r = run_cli(*args, config=config)
    assert r.exit_code == 0, f"elemta {' '.join(args)}: {r.stderr}"
    return r.stdout


def test_domains_dkim_commands(config: Path, tmp_path: Path) -> None:
    ok(config, "domains", "add", "example.org")
    out = ok(config, "domains", "dkim", "add", "Example.ORG", "2026A", "--algo", "ed25519",
             "--not-before", "2027-01-01")
    assert "DKIM key 2026a of example.org added (ed25519" in out
    assert "2026a._domainkey.example.org. 3600 IN TXT" in out and "k=ed25519; p=" in out
    filed = tmp_path / "keys" / "example.org.2026r.key"
    out = ok(config, "domains", "dkim", "add", "example.org", "2026r", "--key-file", str(filed))
    assert f"private key in the file {filed}" in out
    assert stat.S_IMODE(os.stat(filed).st_mode) == 0o600

    listed = ok(config, "domains", "dkim", "list", "--records").splitlines()
    assert listed[0].split("\t")[:5] == ["example.org", "2026a", "ed25519",
                                         "2027-01-01T00:00:00Z", "-"]
    assert listed[2].split("\t")[:3] == ["example.org", "2026r", "rsa"]
    assert listed[2].endswith(f"file {filed}")
    key = DkimKey("example.org", "2026r", "rsa", key_file=str(filed))
    assert dns_record(load(key)) in listed[3].replace('" "', "")

    again = run_cli("domains", "dkim", "add", "example.org", "2026a", config=config)
    assert again.exit_code == 1 and "exists already" in again.stderr
    ok(config, "domains", "dkim", "remove", "example.org", "2026a")
    gone = run_cli("domains", "dkim", "remove", "example.org", "2026a", config=config)
    assert gone.exit_code == 1 and "has no DKIM key 2026a" in gone.stderr
    assert "2026a" not in ok(config, "domains", "dkim", "list")


async def test_the_hook_answers_a_hosted_domains_keys(elemta_server, tmp_path) -> None:
    path = tmp_path / "ds.sqlite3"
    b = SQLiteBackend(path)
    await b.open()
    await b.add_domain(Domain("example.org"))
    key = DkimKey("example.org", "s1", "ed25519", private_key=PEM, not_before=T0)
    await b.add_dkim_key(key)
    await b.close()
    server = await elemta_server({"plugins": {"datasource": {"sqlite_path": str(path)}}},
                                 enabled=["datasource"])

    assert await server.app.dkim_keys("Example.org") == [key]
    assert await server.app.dkim_keys("unknown.example") is None
