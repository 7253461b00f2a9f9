"""``elemta dkim keygen`` and ``elemta dkim check``, in-process, against the test DNS server."""

from __future__ import annotations

import re
import tomllib

import pytest
from dkim_support import rsa_key, server_config

from elemta.testing import run_cli
from elemta_dkim.keys import dns_record, load_private_key, public_p, write_private_key


def config_with(elemta_config, dns_server, **dkim):
    table = server_config(dns_server, **dkim)
    table["plugins"]["enabled"] = ["dkim"]
    return elemta_config(table)


def printed_record(stdout: str) -> tuple[str, list[str]]:
    name = re.search(r"name:  (\S+)", stdout).group(1)
    value = re.search(r"value: (.*)", stdout).group(1)
    return name, re.findall(r'"([^"]*)"', value)


@pytest.mark.parametrize("algo", ["rsa", "ed25519"])
def test_keygen_writes_a_0600_key_and_prints_its_record_and_config(
        elemta_config, dns_server, algo):
    path = config_with(elemta_config, dns_server)

    out = run_cli("dkim", "keygen", "--domain", "Example.COM", "--selector", "2026a",
                  "--algo", algo, config=path)

    assert out.exit_code == 0, out.stderr
    key_file = path.parent / "dkim" / "example.com.2026a.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert (path.parent / "dkim").stat().st_mode & 0o777 == 0o700
    private = load_private_key(key_file, algo)
    name, strings = printed_record(out.stdout)
    assert name == "2026a._domainkey.example.com"
    assert all(len(s) <= 255 for s in strings)
    assert "".join(strings) == dns_record(private)
    assert len(strings) == (2 if algo == "rsa" else 1)
    assert f'IN TXT ( "{strings[0]}"' in out.stdout
    # the snippet is valid TOML naming the key relative to keys_dir
    snippet = out.stdout.split("elemta.toml", 1)[1].split("3. ", 1)[0]
    snippet = "\n".join(line.strip() for line in snippet.splitlines()[1:])
    entry = tomllib.loads(snippet)["plugins"]["dkim"]["keys"][0]
    assert entry["domain"] == "example.com" and entry["selector"] == "2026a"
    assert entry["algorithm"] == algo and entry["key_file"] == "example.com.2026a.key"
    assert "not_before" in entry


def test_keygen_never_overwrites_and_says_what_to_do(elemta_config, dns_server, tmp_path):
    path = config_with(elemta_config, dns_server)
    out_file = tmp_path / "mine.key"
    first = run_cli("dkim", "keygen", "--domain", "example.com", "--selector", "s",
                    "--out", str(out_file), "--algo", "ed25519", config=path)
    again = run_cli("dkim", "keygen", "--domain", "example.com", "--selector", "s",
                    "--out", str(out_file), config=path)

    assert first.exit_code == 0 and f'key_file = "{out_file}"' in first.stdout
    assert again.exit_code == 1
    assert "exists" in again.stderr and "another --selector" in again.stderr


@pytest.mark.parametrize("args, words", [
    (["--domain", "not a domain", "--selector", "s"], "not a domain name"),
    (["--domain", "example.com", "--selector", "s_1"], "not a DNS label"),
    (["--domain", "example.com", "--selector", "s", "--bits", "512"], "1024 to 8192"),
])
def test_keygen_refuses_bad_arguments(elemta_config, dns_server, args, words):
    out = run_cli("dkim", "keygen", *args, config=config_with(elemta_config, dns_server))
    assert out.exit_code == 2 and words in out.stderr


def test_check_reports_match_mismatch_missing_and_dns_errors(elemta_config, dns_server,
                                                             tmp_path):
    keys = {name: rsa_key(2048) for name in ("good", "wrong", "absent", "broken", "other")}
    folder = tmp_path / "keys"
    folder.mkdir(mode=0o700)
    for name, key in keys.items():
        write_private_key(folder / f"{name}.key", key)
    dns_server.zone("example.com")
    dns_server.add("good._domainkey.example.com", "TXT", dns_record(keys["good"]))
    dns_server.add("wrong._domainkey.example.com", "TXT", dns_record(rsa_key(1024, seed=9)))
    dns_server.add("broken._domainkey.example.com", "TXT", dns_record(keys["broken"]))
    dns_server.fail("broken._domainkey.example.com", "SERVFAIL")
    dns_server.zone("example.org")
    dns_server.add("other._domainkey.example.org", "TXT", dns_record(keys["other"]))
    path = config_with(elemta_config, dns_server, keys_dir=str(folder), keys=[
        {"domain": "example.com", "selector": s, "key_file": f"{s}.key"}
        for s in ("good", "wrong", "absent", "broken")] + [
        {"domain": "example.org", "selector": "other", "key_file": "other.key"}])

    out = run_cli("dkim", "check", "--domain", "example.com", config=path)

    assert out.exit_code == 1
    lines = {line[11:].split()[0]: line for line in out.stdout.splitlines()
             if line and not line.startswith(" ")}
    assert lines["good._domainkey.example.com"].startswith("match")
    assert lines["wrong._domainkey.example.com"].startswith("mismatch")
    assert "another public key" in lines["wrong._domainkey.example.com"]
    assert lines["absent._domainkey.example.com"].startswith("missing")
    assert lines["broken._domainkey.example.com"].startswith("DNS error")
    assert "other._domainkey.example.org" not in out.stdout
    # what to publish is printed for the wrong and the missing record
    assert out.stdout.count("publish: ") == 2
    assert public_p(keys["absent"])[:200] in out.stdout.replace('" "', "")
    assert "3 of 4 key(s) do not match" in out.stderr

    only_good = run_cli("dkim", "check", "--domain", "example.org", config=path)
    assert only_good.exit_code == 0, only_good.stdout + only_good.stderr
    assert only_good.stdout.startswith("match")


def test_check_of_a_domain_without_keys_says_how_to_add_one(elemta_config, dns_server):
    out = run_cli("dkim", "check", "--domain", "example.net",
                  config=config_with(elemta_config, dns_server))
    assert out.exit_code == 1 and "elemta dkim keygen" in out.stderr


def test_check_reports_a_key_file_problem(elemta_config, dns_server, tmp_path):
    path = config_with(elemta_config, dns_server, keys_dir=str(tmp_path), keys=[
        {"domain": "example.com", "selector": "s", "key_file": "nope.key"}])
    out = run_cli("dkim", "check", config=path)
    assert out.exit_code == 1
    assert out.stdout.startswith("key error") and "no such key file" in out.stdout


def test_an_ed25519_record_published_for_an_rsa_key_is_a_mismatch(elemta_config, dns_server,
                                                                   tmp_path):
    from dkim_support import ed_key

    write_private_key(tmp_path / "k.key", rsa_key(2048))
    dns_server.zone("example.com")
    dns_server.add("s._domainkey.example.com", "TXT", dns_record(ed_key()))
    path = config_with(elemta_config, dns_server, keys_dir=str(tmp_path), keys=[
        {"domain": "example.com", "selector": "s", "key_file": "k.key"}])
    out = run_cli("dkim", "check", config=path)
    assert out.exit_code == 1 and "k=ed25519" in out.stdout
