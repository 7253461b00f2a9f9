"""Signing keys kept in elemta-datasource (the ``dkim_keys`` hook), end to end.

A user of a hosted domain logs in to the submission listener of a real
server whose only DKIM keys are in the datasource (SQLite and PostgreSQL);
the message it accepted is signed, and the signature verifies with
OpenDKIM's ``opendkim-testmsg`` through a local DNS zone. Rotation by
validity dates, and a key file that cannot be read, on the same path.
"""

from __future__ import annotations

import logging
import time

import pytest
from dkim_support import ed_key, key_records, opendkim_verify, pem, publish, rsa_key

from elemta import DkimKey
from elemta.testing import send_mail

pytest.importorskip("elemta_datasource")

from elemta_datasource.directory import Domain, User  # noqa: E402
from elemta_datasource.sql import PostgresBackend, SQLiteBackend  # noqa: E402

ALICE = ("alice@example.com", "correct horse")
SUBMITTED = (b"From: Alice <alice@example.com>\r\nTo: Bob <bob@example.org>\r\n"
             b"Subject: Keys in the directory\r\n\r\nSigned with a key from the datasource.\r\n")
DAY = 86400.0


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    """(the backend, not opened, and the [plugins.datasource] table naming it)."""
    if request.param == "sqlite":
        path = tmp_path / "ds.sqlite3"
        return SQLiteBackend(path), {"sqlite_path": str(path)}
    dsn = request.getfixturevalue("postgresql")
    return PostgresBackend(dsn), {"backend": "postgresql", "postgresql_dsn": dsn}


async def directory(backend, *keys: DkimKey) -> None:
    await backend.open()
    try:
        await backend.add_domain(Domain("example.com"))
        await backend.add_mailbox("alice@example.com")
        await backend.add_user(User("alice@example.com", "{PLAIN}correct horse"))
        for key in keys:
            await backend.add_dkim_key(key)
    finally:
        await backend.close()


async def start(elemta_server, elemta_outbox, dns_server, table, **dkim):
    config = {
        "dns": {"nameservers": [dns_server.nameserver], "timeout_seconds": 1, "attempts": 1},
        "domains": {},
        "plugins": {"datasource": {**table, "cache_seconds": 0.2}, "dkim": dkim},
    }
    return await elemta_server(config=config, enabled=["datasource", "dkim"],
                               outbox=elemta_outbox)


async def submit(server):
    return await send_mail(server, "alice@example.com", ["bob@example.org"], SUBMITTED,
                           listener="submission", starttls=True, auth=ALICE)


def selectors(content: bytes) -> list[str]:
    import re

    head = content.split(b"\r\n\r\n", 1)[0].decode()
    return [m.group(1) for m in re.finditer(r"^DKIM-Signature:[^\r\n]*(?:\r\n[ \t][^\r\n]*)*?"
                                            r"\bs=([a-z0-9.-]+);", head, re.M | re.I)]


async def test_a_user_of_a_hosted_domain_is_signed_with_its_stored_key_and_opendkim_agrees(
        elemta_server, elemta_outbox, dns_server, store, namespace, tmp_path):
    backend, table = store
    rsa, ed = rsa_key(2048), ed_key()
    await directory(backend,
                    DkimKey("example.com", "ds2026", "rsa", pem(rsa, pkcs8=True).decode()),
                    DkimKey("example.com", "ds2026e", "ed25519", pem(ed).decode()))
    for selector, key in (("ds2026", rsa), ("ds2026e", ed)):
        publish(dns_server, "example.com", selector, key)
    server = await start(elemta_server, elemta_outbox, dns_server, table)

    sent = await submit(server)
    assert sent.accepted, sent.reply
    [delivered] = await elemta_outbox.wait(1)

    assert sorted(selectors(delivered.content)) == ["ds2026", "ds2026e"]
    from dkim_support import only_signature

    records = key_records("example.com", {"ds2026": rsa, "ds2026e": ed})
    checked = opendkim_verify(namespace, tmp_path, [
        only_signature(delivered.content, 0), only_signature(delivered.content, 1),
        only_signature(delivered.content.replace(b"datasource", b"database"), 0)], records)
    assert checked[:2] == [(0, ""), (0, "")]
    assert checked[2][0] != 0 and "Bad signature" in checked[2][1]


async def test_rotation_follows_the_validity_dates(elemta_server, elemta_outbox, dns_server,
                                                   tmp_path):
    """Of the stored RSA keys, the one valid now that became valid last signs: not the
    expired one, not the one whose time has not come."""
    now = time.time()
    key = pem(rsa_key(2048)).decode()
    path = tmp_path / "ds.sqlite3"
    await directory(
        SQLiteBackend(path),
        DkimKey("example.com", "old", "rsa", key, not_after=now - DAY),
        DkimKey("example.com", "current", "rsa", key, not_before=now - 2 * DAY),
        DkimKey("example.com", "previous", "rsa", key,
                not_before=now - 30 * DAY, not_after=now + 30 * DAY),
        DkimKey("example.com", "next", "rsa", key, not_before=now + DAY))
    server = await start(elemta_server, elemta_outbox, dns_server, {"sqlite_path": str(path)})

    assert (await submit(server)).accepted
    [delivered] = await elemta_outbox.wait(1)

    assert selectors(delivered.content) == ["current"]


async def test_a_stored_key_file_that_cannot_be_read_refuses_for_now_and_says_why(
        elemta_server, elemta_outbox, dns_server, tmp_path, caplog):
    """Like a configured key that cannot be used (which stops start-up), a stored one is
    never skipped silently: the message is refused with 451 (the client retries) and the
    log names the key, the file and the problem. Once the file is right, it signs."""
    key_file = tmp_path / "keys" / "example.com.filed.key"
    path = tmp_path / "ds.sqlite3"
    await directory(SQLiteBackend(path),
                    DkimKey("example.com", "filed", "ed25519", key_file=str(key_file)))
    server = await start(elemta_server, elemta_outbox, dns_server, {"sqlite_path": str(path)},
                         hook_keys_cache_seconds=0)

    with caplog.at_level(logging.ERROR, logger="elemta.dkim"):
        missing = await submit(server)
    assert not missing.accepted and missing.reply.code == 451, missing.reply
    [line] = [r.getMessage() for r in caplog.records if r.name == "elemta.dkim"]
    assert "key filed of example.com from the key store" in line
    assert f"{key_file}: no such key file" in line

    key_file.parent.mkdir()
    key_file.write_bytes(pem(ed_key()))
    key_file.chmod(0o644)
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="elemta.dkim"):
        readable = await submit(server)
    assert readable.reply.code == 451
    assert any("lets other users read the private key" in r.getMessage()
               for r in caplog.records)

    key_file.chmod(0o600)
    assert (await submit(server)).accepted
    [delivered] = await elemta_outbox.wait(1)
    assert selectors(delivered.content) == ["filed"]


async def test_configured_keys_come_first(elemta_server, elemta_outbox, dns_server,
                                          signing_keys, tmp_path):
    """A domain of [plugins.dkim] keys is signed with those, the datasource not asked."""
    path = tmp_path / "ds.sqlite3"
    await directory(SQLiteBackend(path),
                    DkimKey("example.com", "stored", "rsa", pem(rsa_key(2048)).decode()))
    server = await start(elemta_server, elemta_outbox, dns_server, {"sqlite_path": str(path)},
                         keys_dir=str(signing_keys.folder), keys=signing_keys.entries())

    assert (await submit(server)).accepted
    [delivered] = await elemta_outbox.wait(1)
    assert sorted(selectors(delivered.content)) == ["ed2026", "rsa2026"]
