"""What the reference pages promise about the command line, checked on the real command.

* docs/configuration.md's first example is a whole file: it passes ``elemta check-config``
  with the plugins it enables installed (with the certificate files it names made up);
* docs/cli.md (and the datasource README): ``--config PATH`` works after the command's own
  name as well as before it, for the core's commands and a plugin's.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import trustme

ROOT = Path(__file__).resolve().parent.parent


def elemta(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "elemta", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


def first_toml_block(path: Path) -> str:
    match = re.search(r"^```toml\n(.*?)^```", path.read_text(encoding="utf-8"), re.S | re.M)
    assert match, f"{path} has no ```toml block"
    return match.group(1)


def test_the_first_example_of_configuration_md_passes_check_config(tmp_path: Path) -> None:
    text = first_toml_block(ROOT / "docs" / "configuration.md")
    # the Let's Encrypt paths it names, made up in a folder of the test
    names = re.findall(r'"(/etc/letsencrypt/[^"]+)"', text)
    assert len(names) == 2, names
    cert = trustme.CA().issue_cert("mx.example.com")
    for name in names:
        local = tmp_path / Path(name).name
        if "key" in Path(name).name:
            cert.private_key_pem.write_to_path(str(local))
        else:
            local.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        text = text.replace(name, str(local))
    (tmp_path / "elemta.toml").write_text(text)

    result = elemta("check-config", "elemta.toml", cwd=tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    enabled = re.search(r"^enabled = \[(.*)\]$", text, re.M)
    assert enabled, "the example enables plugins"
    count = len(re.findall(r'"[^"]+"', enabled.group(1)))
    assert f"{count} plugins enabled" in result.stdout, result.stdout


@pytest.fixture
def elsewhere(tmp_path: Path) -> tuple[Path, Path]:
    """A configuration in conf/, and an empty folder to run the commands from."""
    conf = tmp_path / "conf"
    conf.mkdir()
    config = conf / "site.toml"
    config.write_text(
        '[server]\nhostname = "mx.example.test"\nstate_dir = "state"\n'
        '[[listeners]]\nname = "mx"\naddress = "127.0.0.1:0"\n'
        '[spool]\npath = "queue"\n'
        '[plugins]\nenabled = ["datasource"]\n')
    cwd = tmp_path / "work"
    cwd.mkdir()
    return config, cwd


@pytest.mark.parametrize("where", ["before", "after"])
def test_config_option_before_or_after_the_command(elsewhere, where: str) -> None:
    config, cwd = elsewhere

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        if where == "before":
            return elemta("--config", str(config), *args, cwd=cwd)
        return _after(args, config, cwd)

    # a plugin's command group, with its subcommand
    added = run("domains", "add", "example.test")
    assert added.returncode == 0, added.stderr
    assert (config.parent / "state" / "datasource.sqlite3").exists(), "relative to the file"
    assert "example.test" in run("domains", "list").stdout
    assert run("mailboxes", "add", "u@example.test").returncode == 0
    # the core's queue commands read the spool next to the file, not next to cwd
    (config.parent / "queue").mkdir()
    for cmd in (("queue", "list"), ("queue", "stats"), ("plugins",)):
        result = run(*cmd)
        assert result.returncode == 0, (cmd, result.stderr)
    listed = run("queue", "list")
    assert "0 messages" in listed.stdout, listed.stdout
    unknown = run("queue", "show", "01AAAAAAAAAAAAAAAAAA")
    assert unknown.returncode == 1 and "no spool" not in unknown.stderr, unknown.stderr
    assert not (cwd / "state").exists() and not (cwd / "queue").exists()


def _after(args: tuple[str, ...], config: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``elemta GROUP SUB --config PATH ARGS…`` or ``elemta COMMAND --config PATH``."""
    groups = {"domains", "mailboxes", "queue", "aliases", "rules", "users"}
    if args[0] in groups and len(args) > 1:
        return elemta(args[0], args[1], "--config", str(config), *args[2:], cwd=cwd)
    return elemta(args[0], "--config", str(config), *args[1:], cwd=cwd)


def test_a_config_option_after_the_command_that_names_no_file_says_so(elsewhere) -> None:
    _, cwd = elsewhere
    result = elemta("queue", "list", "--config", "missing.toml", cwd=cwd)
    assert result.returncode == 2
    assert "missing.toml" in result.stderr and "no such file" in result.stderr, result.stderr
