"""``elemta dkim check`` for keys kept in the datasource: the command asks the running server
(``dkim.keys`` on its control socket) which keys it would sign with, and compares them with
the records of a real DNS zone."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from dkim_support import ed_key, pem, publish, rsa_key

from elemta import DkimKey, control_request
from elemta.testing import run_cli
from elemta_dkim.keys import dns_record, public_p, write_private_key

pytest.importorskip("elemta_datasource")

from elemta_datasource.directory import Domain  # noqa: E402
from elemta_datasource.sql import SQLiteBackend  # noqa: E402


async def directory(path, *keys: DkimKey) -> None:
    backend = SQLiteBackend(path)
    await backend.open()
    try:
        await backend.add_domain(Domain("example.com"))
        for key in keys:
            await backend.add_dkim_key(key)
    finally:
        await backend.close()


@pytest.fixture
def keys():
    return {"good": rsa_key(2048), "bad": ed_key(), "other": rsa_key(1024, seed=8)}


@pytest.fixture
def zone(dns_server, keys):
    """good's record matches its key, bad's is another key's; example.org's configured
    key matches."""
    publish(dns_server, "example.com", "good", keys["good"])
    dns_server.add("bad._domainkey.example.com", "TXT", dns_record(ed_key()))
    publish(dns_server, "example.org", "conf", keys["other"])
    return dns_server


@pytest.fixture
def server_config(zone, keys, tmp_path):
    """The configuration (a dict for elemta_server): example.org's key in [plugins.dkim]
    keys, example.com's three in the datasource (one of them in a file not there yet)."""
    folder = tmp_path / "keys"
    folder.mkdir(mode=0o700)
    write_private_key(folder / "conf.key", keys["other"])
    return {
        "dns": {"nameservers": [zone.nameserver], "timeout_seconds": 1, "attempts": 1},
        "plugins": {
            "enabled": ["datasource", "dkim"],
            "datasource": {"sqlite_path": str(tmp_path / "ds.sqlite3")},
            "dkim": {"keys_dir": str(folder), "keys": [
                {"domain": "example.org", "selector": "conf", "key_file": "conf.key"}]}}}


async def stored(tmp_path, keys):
    await directory(tmp_path / "ds.sqlite3",
                    DkimKey("example.com", "good", "rsa", pem(keys["good"]).decode()),
                    DkimKey("example.com", "bad", "ed25519", pem(keys["bad"]).decode()),
                    # the next key, its file not in place yet
                    DkimKey("example.com", "gone", "rsa",
                            key_file=str(tmp_path / "keys" / "gone.key"),
                            not_before=time.time() + 7 * 86400))


def report(stdout: str) -> dict[str, str]:
    """Record name → its line of the report."""
    return {line[11:].split()[0]: line for line in stdout.splitlines()
            if line and not line.startswith(" ")}


async def check(server, *args):
    """``elemta dkim check ARGS`` with the server's configuration, through the test kit's
    runner; in a thread, since the command waits for the server on this event loop."""
    return await asyncio.to_thread(run_cli, "dkim", "check", *args, config=server.config_path)


async def test_check_compares_the_stored_keys_the_server_signs_with(
        elemta_server, server_config, keys, tmp_path):
    await stored(tmp_path, keys)
    server = await elemta_server(config=server_config)

    out = await check(server, "--domain", "example.com")

    assert out.exit_code == 1
    lines = report(out.stdout)
    assert lines["good._domainkey.example.com"].startswith("match")
    assert "rsa, signing now, in the datasource" in lines["good._domainkey.example.com"]
    assert lines["bad._domainkey.example.com"].startswith("mismatch")
    assert ("another public key than the key stored in the datasource (its PEM text)"
            in lines["bad._domainkey.example.com"])
    assert lines["gone._domainkey.example.com"].startswith("key error")
    assert "gone.key: no such key file" in lines["gone._domainkey.example.com"]
    # what to publish for the mismatching record: the stored key's, in 255-byte strings
    assert out.stdout.count("publish: ") == 1
    assert f"k=ed25519; p={public_p(keys['bad'])}" in out.stdout
    assert "2 of 3 key(s) do not match" in out.stderr


async def test_a_configured_domain_is_checked_from_its_key_files(
        elemta_server, server_config, keys, tmp_path):
    await stored(tmp_path, keys)
    server = await elemta_server(config=server_config)

    out = await check(server, "--domain", "example.org")

    assert out.exit_code == 0, out.stdout + out.stderr
    assert out.stdout.startswith("match      conf._domainkey.example.org  rsa, signing now")


async def test_the_server_answers_public_keys_only(elemta_server, server_config, keys,
                                                   tmp_path):
    await stored(tmp_path, keys)
    server = await elemta_server(config=server_config)

    answer = await asyncio.to_thread(control_request, "dkim.keys", {"domain": "Example.COM"},
                                     settings=server.settings)

    assert answer["domain"] == "example.com" and answer["store_error"] is None
    by_selector = {k["selector"]: k for k in answer["keys"]}
    assert sorted(by_selector) == ["bad", "gone", "good"]
    assert by_selector["good"] == {
        "domain": "example.com", "selector": "good", "algorithm": "rsa",
        "source": "datasource", "not_before": None, "not_after": None, "signing_now": True,
        "key_file": None, "p": public_p(keys["good"])}
    assert "no such key file" in by_selector["gone"]["error"]
    assert "PRIVATE" not in json.dumps(answer)
    configured = await asyncio.to_thread(control_request, "dkim.keys",
                                         {"domain": "example.org"}, settings=server.settings)
    [conf] = configured["keys"]
    assert (conf["source"], conf["p"]) == ("config", public_p(keys["other"]))


async def test_without_a_server_the_configured_keys_are_checked_and_it_says_why_not_the_rest(
        server_config, keys, tmp_path, elemta_config):
    await stored(tmp_path, keys)
    path = elemta_config(server_config)

    both = await asyncio.to_thread(run_cli, "dkim", "check", "--domain", "example.org",
                                   "--domain", "example.com", config=path)
    stored_only = await asyncio.to_thread(run_cli, "dkim", "check", "--domain", "example.com",
                                          config=path)

    assert both.exit_code == 1
    assert both.stdout.startswith("match      conf._domainkey.example.org")
    assert "example.com: no key is configured in [plugins.dkim] keys" in both.stderr
    assert ("keys kept in the datasource are checked through the running server: no Elemta "
            "server is running with") in both.stderr
    assert stored_only.exit_code == 1 and stored_only.stdout == ""
    assert "start it with `elemta serve`" in stored_only.stderr


async def test_a_domain_with_no_key_anywhere_fails_and_says_how_to_add_one(
        elemta_server, server_config, keys, tmp_path):
    await stored(tmp_path, keys)
    server = await elemta_server(config=server_config)

    out = await check(server, "--domain", "example.net")

    assert out.exit_code == 1 and out.stdout == ""
    assert ("example.net: no key signs its mail: none in [plugins.dkim] keys, none in the key "
            "store (add one with `elemta domains dkim add`") in out.stderr
