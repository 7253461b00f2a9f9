"""``elemta domains|mailboxes|aliases|rules`` against each configured backend."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from elemta.testing import run_cli, write_config


def elemta_process(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "elemta", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=60, cwd=config.parent)


def elemta(config: Path, *args: str) -> Result:
    """The command line in this process (a subprocess per command costs a second)."""
    r = run_cli(*args, config=config)
    return Result(r.exit_code, r.stdout, r.stderr)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(params=["sqlite", "toml", "postgresql"])
def config(request, tmp_path: Path) -> Path:
    table: dict = {"backend": request.param}
    if request.param == "postgresql":
        table["postgresql_dsn"] = request.getfixturevalue("postgresql")
    return write_config(tmp_path / "srv", {"plugins": {"enabled": ["datasource"],
                                                       "datasource": table}})


def ok(config: Path, *args: str) -> str:
    r = elemta(config, *args)
    assert r.returncode == 0, f"elemta {' '.join(args)}: {r.stderr}"
    return r.stdout


def test_edit_and_list_everything(config: Path) -> None:
    assert ok(config, "domains", "add", "Example.TEST") == "domain example.test added\n"
    ok(config, "domains", "add", "catch.test", "--catch-all", "alice@example.test",
       "--max-message-bytes", "1000")
    ok(config, "mailboxes", "add", "alice@example.test")
    ok(config, "mailboxes", "add", "bob@example.test")
    ok(config, "aliases", "add", "team@example.test", "alice@example.test", "x@partner.example")
    ok(config, "rules", "set", "spam@example.test", "reject", "--code", "550",
       "--text", "No thanks")
    ok(config, "rules", "set", "old.test", "redirect", "--target", "@example.test")
    assert ok(config, "domains", "list").splitlines() == [
        "catch.test\tcatch-all=alice@example.test max-message-bytes=1000",
        "example.test",
    ]
    assert ok(config, "mailboxes", "list", "--domain", "example.test").split() == [
        "alice@example.test", "bob@example.test"]
    assert ok(config, "aliases", "list").splitlines() == [
        "team@example.test\talice@example.test", "team@example.test\tx@partner.example"]
    assert ok(config, "rules", "list").splitlines() == [
        "old.test\tredirect to @example.test",
        "spam@example.test\treject 550 5.7.1 No thanks"]
    ok(config, "aliases", "remove", "team@example.test", "x@partner.example")
    ok(config, "mailboxes", "remove", "bob@example.test")
    ok(config, "rules", "remove", "old.test")
    ok(config, "domains", "remove", "catch.test")
    assert ok(config, "mailboxes", "list").split() == ["alice@example.test"]
    assert ok(config, "aliases", "list").split() == ["team@example.test", "alice@example.test"]
    assert ok(config, "domains", "list").split() == ["example.test"]


def test_mistakes_say_what_and_how(config: Path) -> None:
    r = elemta(config, "mailboxes", "add", "alice@nowhere.test")
    assert r.returncode == 1
    assert "nowhere.test is not a hosted domain; add it first with " \
           "`elemta domains add nowhere.test`" in r.stderr
    ok(config, "domains", "add", "example.test")
    r = elemta(config, "domains", "add", "example.test")
    assert r.returncode == 1 and "exists already (use --update" in r.stderr
    r = elemta(config, "mailboxes", "add", "not-an-address")
    assert r.returncode == 2 and "is not a mail address" in r.stderr
    r = elemta(config, "rules", "set", "x@example.test", "redirect")
    assert r.returncode == 2 and "needs at least one target" in r.stderr
    r = elemta(config, "mailboxes", "remove", "ghost@example.test")
    assert r.returncode == 1 and "there is no mailbox ghost@example.test" in r.stderr


def test_commands_need_the_plugin_enabled(tmp_path: Path) -> None:
    config = write_config(tmp_path / "srv", {})
    r = elemta_process(config, "domains", "list")
    assert r.returncode == 2 and "No such command 'domains'" in r.stderr
