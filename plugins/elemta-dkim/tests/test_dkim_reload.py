"""Reload (SIGHUP, ``App.reload()``): the keys of the datasource are asked for again and the
configured key files are read again, in a real server; OpenDKIM verifies what is signed after.

The office network relays through the ``mx`` listener without logging in (``sign_relay``),
so that each test sends with one plain SMTP session.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal

import pytest
from dkim_support import (MESSAGE, key_records, opendkim_verify, pem, publish, results, rsa_key,
                          verify)

from elemta import DkimKey
from elemta.testing import Sink, free_port, listener, send_mail, wait_until, write_config
from elemta_dkim.keys import write_private_key

pytest.importorskip("elemta_datasource")

from elemta_datasource.sql import SQLiteBackend  # noqa: E402


def selectors(content: bytes) -> list[str]:
    head = content.split(b"\r\n\r\n", 1)[0].decode()
    return re.findall(r"^DKIM-Signature:[^\r\n]*(?:\r\n[ \t][^\r\n]*)*?\bs=([a-z0-9.-]+);",
                      head, re.M | re.I)


async def store(path, *keys: DkimKey, remove: tuple[str, ...] = ()) -> None:
    """Add ``keys`` to the SQLite datasource at ``path`` and remove the ``remove`` selectors
    of example.com, as `elemta domains dkim add|remove` do."""
    backend = SQLiteBackend(path)
    await backend.open()
    try:
        if not await backend.get_domain("example.com"):
            from elemta_datasource.directory import Domain

            await backend.add_domain(Domain("example.com"))
        for key in keys:
            await backend.add_dkim_key(key)
        for selector in remove:
            assert await backend.remove_dkim_key("example.com", selector)
    finally:
        await backend.close()


def config(dns_server, datasource, **dkim):
    return {"dns": {"nameservers": [dns_server.nameserver], "timeout_seconds": 1,
                    "attempts": 1},
            "server": {"relay_networks": ["127.0.0.1/32"]},
            "plugins": {"datasource": {"sqlite_path": str(datasource), "cache_seconds": 0},
                        "dkim": {"sign_relay": True, **dkim}}}


async def relay(server, outbox=None) -> None:
    """Relay one message; with ``outbox``, wait until it is delivered, so that the
    deliveries are in the order of the sending."""
    delivered = len(outbox.messages) if outbox is not None else 0
    sent = await send_mail(server, "alice@example.com", ["bob@example.org"], MESSAGE)
    assert sent.accepted, sent.reply
    if outbox is not None:
        await outbox.wait(delivered + 1)


async def test_after_reload_a_changed_stored_key_signs_the_next_message(
        elemta_server, elemta_outbox, dns_server, namespace, tmp_path, caplog):
    old, new = rsa_key(2048), rsa_key(1024, seed=5)
    datasource = tmp_path / "ds.sqlite3"
    await store(datasource, DkimKey("example.com", "old2026", "rsa", pem(old).decode()))
    publish(dns_server, "example.com", "old2026", old)
    publish(dns_server, "example.com", "new2026", new)
    server = await elemta_server(config=config(dns_server, datasource),
                                 enabled=["datasource", "dkim"], outbox=elemta_outbox)
    await relay(server, elemta_outbox)

    # `elemta domains dkim add … new2026` and `remove … old2026`, while the server runs:
    # the old key stays cached (hook_keys_cache_seconds = 60) until the reload
    await store(datasource, DkimKey("example.com", "new2026", "rsa", pem(new).decode()),
                remove=("old2026",))
    await relay(server, elemta_outbox)
    with caplog.at_level(logging.INFO, logger="elemta.dkim"):
        await server.app.reload()
    await relay(server, elemta_outbox)

    first, cached, reloaded = elemta_outbox.messages
    assert [selectors(m.content) for m in (first, cached, reloaded)] == [
        ["old2026"], ["old2026"], ["new2026"]]
    [line] = [r.getMessage() for r in caplog.records if r.name == "elemta.dkim"]
    assert line == ("dkim: reloaded: no configured keys; keys of the key store are asked "
                    "for again")
    records = key_records("example.com", {"new2026": new})
    assert opendkim_verify(namespace, tmp_path, [reloaded.content], records) == [(0, "")]


async def signing_with_key_file(elemta_server, elemta_outbox, dns_server, tmp_path, key):
    """A server signing example.com with ``key`` from the key file keys/s.key (published)."""
    folder = tmp_path / "keys"
    folder.mkdir(mode=0o700)
    write_private_key(folder / "s.key", key)
    publish(dns_server, "example.com", "s", key)
    server = await elemta_server(
        config=config(dns_server, tmp_path / "ds.sqlite3", keys_dir=str(folder),
                      keys=[{"domain": "example.com", "selector": "s", "key_file": "s.key"}]),
        enabled=["datasource", "dkim"], outbox=elemta_outbox)
    return server, folder


async def test_reload_reads_a_replaced_configured_key_file(
        elemta_server, elemta_outbox, dns_server, tmp_path, caplog):
    """The selector stays, the key behind it changes (a key that leaked, replaced in place):
    after the reload the signature verifies against the new record."""
    first, second = rsa_key(2048), rsa_key(1024, seed=6)
    server, folder = await signing_with_key_file(elemta_server, elemta_outbox, dns_server,
                                                 tmp_path, first)
    (folder / "s.key").unlink()
    write_private_key(folder / "s.key", second)
    dns_server.remove("s._domainkey.example.com", "TXT")
    publish(dns_server, "example.com", "s", second)

    await relay(server, elemta_outbox)
    with caplog.at_level(logging.INFO, logger="elemta.dkim"):
        await server.app.reload()
    await relay(server, elemta_outbox)

    before, after = elemta_outbox.messages
    assert results(await verify(dns_server, before.content)) == ["fail"]
    assert results(await verify(dns_server, after.content)) == ["pass"]
    assert [r.getMessage() for r in caplog.records if r.name == "elemta.dkim"] == [
        "dkim: reloaded: signing for example.com with s (rsa-sha256); keys of the key store "
        "are asked for again"]


async def test_a_key_file_unusable_at_reload_keeps_the_key_in_service(
        elemta_server, elemta_outbox, dns_server, tmp_path, caplog):
    server, folder = await signing_with_key_file(elemta_server, elemta_outbox, dns_server,
                                                 tmp_path, rsa_key(2048))
    (folder / "s.key").chmod(0o644)

    with caplog.at_level(logging.INFO, logger="elemta.dkim"):
        await server.app.reload()
    await relay(server)

    [line] = [r for r in caplog.records if r.name == "elemta.dkim"]
    assert line.levelno == logging.ERROR
    assert line.getMessage() == (
        "dkim: reload: the signing keys in service are kept, cannot use the key files: key s "
        f"of example.com: {folder / 's.key'}: mode 0644 lets other users read the private "
        f"key; run `chmod 600 {folder / 's.key'}` (and publish a new key if it may have "
        "leaked)")
    [signed] = await elemta_outbox.wait(1)
    assert results(await verify(dns_server, signed.content)) == ["pass"]


async def test_sighup_to_elemta_serve_signs_with_the_new_stored_key(
        dns_server, start_server, tmp_path):
    """`systemctl reload elemta` after `elemta domains dkim add`: a real SIGHUP to a real
    `elemta serve`, and the next message, relayed over SMTP, carries the new selector."""
    old, new = rsa_key(2048), rsa_key(1024, seed=7)
    datasource = tmp_path / "ds.sqlite3"
    await store(datasource, DkimKey("example.com", "old2026", "rsa", pem(old).decode()))
    async with Sink() as sink:
        port = free_port()
        table = config(dns_server, datasource)
        table["plugins"]["enabled"] = ["datasource", "dkim"]
        table.update(listeners=[listener("mx", port)], metrics={"enabled": False},
                     delivery={"enabled": True,
                               "routes": {"*": {"host": sink.address, "tls": "none"}}})
        path = write_config(tmp_path / "srv", table)
        server = await asyncio.to_thread(start_server, path)
        await relay(port)
        await sink.wait_for(1)
        await store(datasource, DkimKey("example.com", "new2026", "rsa", pem(new).decode()),
                    remove=("old2026",))

        server.send_signal(signal.SIGHUP)
        await asyncio.to_thread(wait_until, lambda: "dkim: reloaded" in server.output(), 10,
                                "the reload's log line")
        await relay(port)
        first, second = await sink.wait_for(2)

    assert (selectors(first.content), selectors(second.content)) == (["old2026"], ["new2026"])
    assert server.proc.poll() is None, server.output()
