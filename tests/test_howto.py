"""The how-to guides' shell examples, run as written against a real server.

Every fenced ```sh block of docs/how-to/*.md runs, in the order of its guide, as one
bash script (so that a variable set by one command is there for the next), with the
guide's server started first: ``elemta serve`` on a temporary configuration built from the
guide's own ``toml`` blocks, on free loopback ports. The script runs in the folder of that
``elemta.toml``, so the guide's ``elemta`` commands find it as they would in the
operator's ``/etc/elemta``; the addresses and paths that only exist on a real host are
replaced (``127.0.0.1:25`` by the test listener, ``/var/vmail`` by a temporary folder).

What a guide's command must do:

* exit with status 0, unless its trailing comment starts with an SMTP reply
  (``# 550 5.1.1``): then it must fail and print that reply;
* a ``swaks`` that is not refused must print ``250 2.0.0 Ok: queued as``;
* an ``ls`` must list something (retried for 10 s: delivery follows the ``250``).

A block not meant to run here is marked, on the line before its fence, with
``<!-- not run: REASON -->`` (port 25 on the internet, DNS, systemd...); the reason is
required. A guide with runnable blocks needs an entry in ``GUIDES`` below.
"""

from __future__ import annotations

import asyncio
import email
import os
import re
import shlex
import sqlite3
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tomlkit
import trustme

from elemta.testing import Sink, default_config, free_port, listener, merge

ROOT = Path(__file__).resolve().parent.parent
HOWTO = ROOT / "docs" / "how-to"
NOT_RUN = re.compile(r"<!--\s*not run:\s*(?P<reason>.*?)\s*-->")
REFUSAL = re.compile(r"#\s+(?P<reply>[45]\d\d(?:\s[45]\.\d{1,3}\.\d{1,3})?)\b")
SCRIPT_TIMEOUT = 120


@dataclass
class Block:
    guide: str
    line: int                      # of the opening fence
    text: str
    not_run: str | None            # the reason, for a block marked not to run


def fenced_blocks(path: Path, language: str) -> list[Block]:
    """The ```LANGUAGE blocks of a Markdown file, with their not-run markers."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        fence = re.fullmatch(rf"(\s*)```{language}\s*", lines[i])
        if fence:   # also indented, in a list item: its lines lose that indentation
            indent = len(fence.group(1))
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = NOT_RUN.search(before)
            start = i
            body: list[str] = []
            i += 1
            while i < len(lines) and not lines[i].lstrip().startswith("```"):
                body.append(lines[i][indent:] if lines[i][:indent].isspace() else lines[i])
                i += 1
            blocks.append(Block(path.name, start + 1, "\n".join(body),
                                marker.group("reason") if marker else None))
        i += 1
    return blocks


def commands(text: str) -> list[str]:
    """One command per line, a line ending in a backslash continued; comment lines dropped."""
    out: list[str] = []
    current = ""
    for line in text.splitlines():
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        if current.strip() and not current.lstrip().startswith("#"):
            out.append(current.strip())
        current = ""
    return out


def script(cmds: list[str]) -> str:
    """A bash script running ``cmds`` in one shell, checking each as the module says."""
    out = [
        "set -uo pipefail",
        "step() { printf '\\n>>> [%s] (at %s s) %s\\n' \"$1\" \"$SECONDS\" \"$2\"; }",
        "fail() { printf '\\n!!! [%s] %s\\n' \"$1\" \"$2\"; exit 1; }",
    ]
    for n, cmd in enumerate(cmds, 1):
        out.append(f"step {n} {shlex.quote(cmd)}")
        refusal = REFUSAL.search(cmd)
        first = cmd.split()[0]
        if refusal:
            reply = shlex.quote(refusal.group("reply"))
            out += [
                f"out=$( {{ {cmd}\n}} 2>&1 ); rc=$?; printf '%s\\n' \"$out\"",
                f"[ $rc != 0 ] || fail {n} \"succeeded, but the guide says it is refused with \"{reply}",
                f"grep -qF -- {reply} <<<\"$out\" || fail {n} \"did not print \"{reply}",
            ]
        elif first == "ls":
            out += [
                "deadline=$((SECONDS + 10))",
                f"until out=$( {{ {cmd}\n}} 2>&1 ) && [ -n \"$out\" ]; do",
                f"    [ $SECONDS -lt $deadline ] || fail {n} \"listed nothing within 10 s: $out\"",
                "    sleep 0.2",
                "done; printf '%s\\n' \"$out\"",
            ]
        elif first == "swaks":
            out += [
                f"out=$( {{ {cmd}\n}} 2>&1 ); rc=$?; printf '%s\\n' \"$out\"",
                f"[ $rc = 0 ] || fail {n} \"exited with status $rc\"",
                f"grep -q '250 2\\.0\\.0 Ok: queued as' <<<\"$out\" || fail {n} \"nothing was queued\"",
            ]
        else:
            # in this shell, not a subshell: an assignment is there for the next command
            out += [f"{{ {cmd}\n}}; rc=$?", f"[ $rc = 0 ] || fail {n} \"exited with status $rc\""]
    out.append("printf '\\n>>> all %s commands did what the guide says (%s s)\\n' "
               + f"{len(cmds)} \"$SECONDS\"")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------ the guides' set-ups


@dataclass
class Guide:
    """How to run one guide: its server and what stands in for the real host.

    ``replace`` maps the host's addresses and paths, in the guide's commands and ``toml``
    blocks, to the test's: ``{mx}``, ``{submission}``, ``{smtps}``, ``{metrics}`` are free
    loopback ports and ``{tmp}`` the test's folder.
    """

    toml_blocks: list[int]                     # which ```toml blocks make its configuration
    replace: dict[str, str]
    tools: list[str] = field(default_factory=list)
    prepare: Any = None                        # prepare(tmp) before the server starts
    after: Any = None                          # async check(sink, tmp) after the script


async def _local_delivery_after(sink: Sink, root: Path) -> None:
    # the forward rule's outside copy and nothing else left through SMTP
    [forwarded] = await sink.wait_for(1)
    assert forwarded.recipients == ["alice@home.example"]
    # Bob's mailbox: the redirect, the catch-all and the whole-domain rule
    new = root / "vmail" / "example.org" / "bob" / "Maildir" / "new"
    for _ in range(100):
        if len(list(new.iterdir())) >= 3:
            break
        await asyncio.sleep(0.1)
    original = sorted(email.message_from_bytes(p.read_bytes())["X-Original-To"]
                      for p in new.iterdir())
    assert original == ["anyone@example.net", "bob@old.example", "sales@example.org"]
    assert len(sink.messages) == 1, [m.recipients for m in sink.messages]


def _production_prepare(tmp: Path) -> None:
    # the certificate [tls] names, made by a CA of the test's
    tls = tmp / "tls"
    tls.mkdir()
    cert = trustme.CA().issue_cert("mx.example.com")
    cert.private_key_pem.write_to_path(str(tls / "privkey.pem"))
    (tls / "fullchain.pem").write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))


async def _production_after(sink: Sink, tmp: Path) -> None:
    backup = tmp / "backups" / "datasource.sqlite3"
    with sqlite3.connect(backup) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    assert "domains" in tables, tables


GUIDES: dict[str, Guide] = {
    # blocks 0: [plugins] datasource + maildir (1: LMTP instead, 2: Dovecot's settings)
    "local-delivery.md": Guide(
        toml_blocks=[0], tools=["swaks", "jq"], after=_local_delivery_after,
        replace={"127.0.0.1:25": "127.0.0.1:{mx}", "/var/vmail": "{tmp}/vmail"}),
    # block 0: the whole configuration
    "production.md": Guide(
        toml_blocks=[0], tools=["curl", "sqlite3"], prepare=_production_prepare,
        after=_production_after,
        replace={"0.0.0.0:25": "127.0.0.1:{mx}", "0.0.0.0:587": "127.0.0.1:{submission}",
                 "0.0.0.0:465": "127.0.0.1:{smtps}", "127.0.0.1:9025": "127.0.0.1:{metrics}",
                 "/var/lib/elemta": "{tmp}/data", "/var/backups/elemta": "{tmp}/backups",
                 "/etc/elemta/tls": "{tmp}/tls"}),
}


def runnable(path: Path) -> list[Block]:
    return [b for b in fenced_blocks(path, "sh") if b.not_run is None]


GUIDE_FILES = sorted(HOWTO.glob("*.md"))


def test_every_guide_with_runnable_blocks_has_a_setup() -> None:
    missing = [p.name for p in GUIDE_FILES if runnable(p) and p.name not in GUIDES]
    assert not missing, (f"{missing}: add a Guide to GUIDES in {Path(__file__).name}, or mark "
                         "the blocks <!-- not run: REASON -->")
    assert all(runnable(HOWTO / name) for name in GUIDES), "a GUIDES entry runs nothing"


@pytest.mark.parametrize("path", GUIDE_FILES, ids=lambda p: p.name)
def test_not_run_markers_give_a_reason(path: Path) -> None:
    for block in fenced_blocks(path, "sh"):
        if block.not_run is not None:
            assert len(block.not_run) >= 10, (
                f"{path.name}:{block.line}: say why the block does not run here")
    text = path.read_text(encoding="utf-8")
    markers = len(re.findall(r"<!--\s*not run", text))
    assert markers == sum(b.not_run is not None for b in fenced_blocks(path, "sh")), (
        f"{path.name}: a not-run marker that is not right before a ```sh block")


def test_commands_and_script_generation() -> None:
    cmds = commands("a \\\n  b\n# note\n\nswaks x   # 550 5.1.1\n")
    assert cmds == ["a    b", "swaks x   # 550 5.1.1"]
    done = subprocess.run(["bash", "-c", script(["x=1", "[ $x = 1 ]",
                                                 "false   # 550 5.1.1"])],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "did not print 550 5.1.1" in done.stdout, done.stdout
    done = subprocess.run(["bash", "-c", script(["echo '550 5.1.1 no'; false  # 550 5.1.1",
                                                 "id=$(echo 7)", "[ \"$id\" = 7 ]"])],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout


def _configuration(guide: Guide, path: Path, root: Path, replace: dict[str, str],
                   mx_port: int, sink_port: int) -> dict[str, Any]:
    blocks = fenced_blocks(HOWTO / path.name, "toml")
    config = default_config(root)
    config["listeners"] = [listener("mx", mx_port, "smtp", "starttls")]
    config["domains"] = {}      # the hosted domains live in the guide's datasource
    # delivery on; what leaves through SMTP goes to a sink instead of the internet
    config["delivery"] = {"enabled": True, "retry_intervals_seconds": [60],
                          "routes": {"*": {"host": f"127.0.0.1:{sink_port}", "tls": "none"}}}
    for index in guide.toml_blocks:
        text = blocks[index].text
        for old, new in replace.items():
            text = text.replace(old, new)
        config = merge(config, tomllib.loads(text))
    return config


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(GUIDES))
async def test_guide_runs_as_written(name: str, tmp_path: Path, start_server,
                                     require_tool) -> None:
    guide = GUIDES[name]
    path = HOWTO / name
    for tool in guide.tools:
        require_tool(tool)
    root = tmp_path / "etc"
    root.mkdir()
    config_path = root / "elemta.toml"
    ports = {name: free_port() for name in ("mx", "submission", "smtps", "metrics")}
    replace = {"/etc/elemta/elemta.toml": str(config_path)}
    replace.update({old: new.format(tmp=tmp_path, **ports) for old, new in guide.replace.items()})
    mx_port = ports["mx"]
    if guide.prepare is not None:
        guide.prepare(tmp_path)
    async with Sink() as sink:
        config = _configuration(guide, path, root, replace, mx_port, sink.port)
        config_path.write_text(tomlkit.dumps(config))
        server = await asyncio.to_thread(start_server, config_path)

        cmds = []
        for block in runnable(path):
            for cmd in commands(block.text):
                for old, new in replace.items():
                    cmd = cmd.replace(old, new)
                cmds.append(cmd)
        env = {**os.environ,
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.pop("ELEMTA_LOAD_PLUGINS", None)
        done = await asyncio.to_thread(
            subprocess.run, ["bash", "-c", script(cmds)], cwd=root, env=env,
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=SCRIPT_TIMEOUT)
        assert done.returncode == 0, (f"{name}: a command did not do what the guide says\n"
                                      f"{done.stdout}\n{done.stderr}\n--- server ---\n"
                                      f"{server.output()}")
        print(done.stdout)
        if guide.after is not None:
            await guide.after(sink, tmp_path)
