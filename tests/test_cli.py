"""The ``elemta`` console script, run as operators run it: a real subprocess."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from elemta.testing.fixtures import write_config

REPO = Path(__file__).resolve().parent.parent
_SCRIPT = Path(sys.executable).with_name("elemta")
ELEMTA = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "elemta"]


def elemta(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ELEMTA_LOAD_PLUGINS"}
    env["COLUMNS"] = "200"
    return subprocess.run([*ELEMTA, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def assert_config_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Exit 2, every needle on stderr, and no Python traceback anywhere."""
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert "Traceback" not in out, out
    for needle in needles:
        assert needle in result.stderr, f"{needle!r} not in:\n{result.stderr}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ help


def test_help(tmp_path: Path) -> None:
    result = elemta("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for command in ("serve", "check-config", "plugins", "queue"):
        assert command in result.stdout


def test_serve_help(tmp_path: Path) -> None:
    result = elemta("serve", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout
    assert "SIGHUP" in result.stdout


def test_module_entry_point_matches_script(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "elemta", "--version"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert re.search(r"\d+\.\d+", result.stdout)


# ------------------------------------------------------------------ check-config


def config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "elemta.toml"
    path.write_text(text)
    return path


def test_check_config_good(tmp_path: Path) -> None:
    path = write_config(tmp_path / "cfg")
    result = elemta("check-config", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
    assert "3 listeners" in result.stdout
    # the top-level option names the file too
    result = elemta("--config", str(path), "check-config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_check_config_shipped_file(tmp_path: Path) -> None:
    shutil.copy(REPO / "elemta.toml", tmp_path / "elemta.toml")
    result = elemta("check-config", cwd=tmp_path)  # default: ./elemta.toml
    assert result.returncode == 0, result.stderr
    assert "elemta.toml: OK" in result.stdout
    assert not (tmp_path / "queue").exists(), "check-config must not create the spool"


def test_check_config_unknown_key(tmp_path: Path) -> None:
    path = config_file(tmp_path, '[server]\nhostnme = "mx.example.test"\n')
    assert_config_error(elemta("check-config", str(path), cwd=tmp_path),
                        str(path), "server.hostnme", 'did you mean "hostname"')


def test_check_config_wrong_type(tmp_path: Path) -> None:
    path = config_file(tmp_path, '[server]\nmax_recipients = "lots"\n')
    result = elemta("check-config", str(path), cwd=tmp_path)
    assert_config_error(result, str(path), "server.max_recipients")
    assert 'got "lots"; write a whole number' in result.stderr


def test_check_config_bad_listener_mode(tmp_path: Path) -> None:
    path = config_file(tmp_path, '[[listeners]]\nname = "mx"\naddress = "127.0.0.1:2525"\n'
                                 'mode = "lmtp"\n')
    assert_config_error(elemta("check-config", str(path), cwd=tmp_path),
                        str(path), "listeners[0].mode", "lmtp", "'smtp'", "'submission'")


def test_check_config_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    assert_config_error(elemta("check-config", str(missing), cwd=tmp_path),
                        str(missing), "no such file")
    # and the default when nothing is given
    assert_config_error(elemta("check-config", cwd=tmp_path), "elemta.toml", "no such file")


def test_check_config_toml_syntax_error(tmp_path: Path) -> None:
    path = config_file(tmp_path, '[server]\nhostname = "mx.example.test"\nmax_recipients = = 3\n')
    result = elemta("check-config", str(path), cwd=tmp_path)
    assert_config_error(result, "TOML syntax error")
    assert re.search(rf"{re.escape(str(path))}:3:\d+: TOML syntax error", result.stderr), \
        result.stderr


def test_check_config_plugin_not_installed(tmp_path: Path) -> None:
    path = config_file(tmp_path, '[plugins]\nenabled = ["nosuchplugin"]\n')
    assert_config_error(elemta("check-config", str(path), cwd=tmp_path),
                        str(path), "'nosuchplugin'", "pip install elemta-nosuchplugin")


def test_serve_reports_config_errors_too(tmp_path: Path) -> None:
    path = config_file(tmp_path, '[server]\nhostnme = "mx.example.test"\n')
    assert_config_error(elemta("serve", "--config", str(path), cwd=tmp_path, timeout=30),
                        "server.hostnme", 'did you mean "hostname"')


# ------------------------------------------------------------------ plugins


def test_plugins_lists_builtins_and_call_order(tmp_path: Path) -> None:
    path = write_config(tmp_path / "cfg")
    result = elemta("plugins", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for builtin in ("elemta.default_relay", "elemta.default_received",
                    "elemta.default_authres", "elemta.default_tls"):
        assert builtin in result.stdout
    assert "Call order per hook" in result.stdout
    order = result.stdout.split("Call order per hook", 1)[1]
    assert re.search(r"\brcpt\b.*elemta\.default_relay", order), order
    assert re.search(r"\btls_context\b.*elemta\.default_tls", order), order


def test_plugins_reports_missing_plugin(tmp_path: Path) -> None:
    path = config_file(tmp_path, '[plugins]\nenabled = ["nosuchplugin"]\n')
    assert_config_error(elemta("--config", str(path), "plugins", cwd=tmp_path),
                        "pip install elemta-nosuchplugin")


# ------------------------------------------------------------------ queue


async def _queue_one(port: int) -> str:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=10,
                             local_hostname="client.example")
    await client.connect()
    try:
        errors, reply = await client.sendmail(
            "sender@client.example", ["user@example.test"],
            b"Subject: queue cli test\r\nMessage-ID: <cli@client.example>\r\n\r\nhello\r\n")
        await client.quit()
    finally:
        client.close()
    assert errors == {}
    match = re.search(r"queued as ([A-Za-z0-9_-]+)", reply)
    assert match is not None, reply
    return match.group(1)


async def test_queue_list_and_show(elemta_server: Any, tmp_path: Path) -> None:
    server = await elemta_server()
    queue_id = await _queue_one(server.port("mx"))
    config = str(server.root / "elemta.toml")

    listing = await asyncio.to_thread(elemta, "--config", config, "queue", "list", cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert queue_id in listing.stdout
    assert "sender@client.example" in listing.stdout
    assert "1 message" in listing.stdout

    shown = await asyncio.to_thread(elemta, "--config", config, "queue", "show", queue_id,
                                    cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    for needle in (queue_id, "ready", "sender@client.example", "user@example.test",
                   "Subject: queue cli test", "Message-ID: <cli@client.example>"):
        assert needle in shown.stdout, needle
    assert "hello" not in shown.stdout, "show prints headers, not the body"


async def test_queue_show_unknown_id(elemta_server: Any, tmp_path: Path) -> None:
    server = await elemta_server()
    config = str(server.root / "elemta.toml")
    result = await asyncio.to_thread(elemta, "--config", config, "queue", "show",
                                     "NOSUCHMESSAGE", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "no message NOSUCHMESSAGE" in result.stderr
    assert "Traceback" not in result.stderr


def test_queue_accepts_config_after_the_command(tmp_path: Path) -> None:
    path = write_config(tmp_path / "cfg")
    (tmp_path / "cfg" / "queue").mkdir()
    result = elemta("queue", "list", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "0 messages" in result.stdout


# ------------------------------------------------------------------ serve


def test_serve_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        path = write_config(tmp_path / "cfg", {
            "listeners": [{"name": "inbound", "address": f"127.0.0.1:{port}", "mode": "smtp",
                           "tls": "none"}],
            "metrics": {"enabled": False},
        })
        result = elemta("serve", "--config", str(path), cwd=tmp_path, timeout=30)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "listener inbound" in result.stderr
    assert f"127.0.0.1:{port}" in result.stderr
    assert "in use" in result.stderr


def test_serve_metrics_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        path = write_config(tmp_path / "cfg", {
            "listeners": [{"name": "mx", "address": f"127.0.0.1:{free_port()}",
                           "mode": "smtp", "tls": "none"}],
            "metrics": {"address": f"127.0.0.1:{port}"},
        })
        result = elemta("serve", "--config", str(path), cwd=tmp_path, timeout=30)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "metrics" in result.stderr
    assert f"127.0.0.1:{port}" in result.stderr


# ------------------------------------------------------------------ the event loop


def test_the_server_hands_the_interpreter_lock_round_every_millisecond(tmp_path: Path) -> None:
    """In process: ``serve`` runs its loop with the spool threads' switch interval."""
    from elemta.cli.main import SWITCH_INTERVAL, run_event_loop
    from elemta.config import load_settings

    async def interval() -> float:
        return sys.getswitchinterval()

    before = sys.getswitchinterval()
    try:
        for loop in ("asyncio", "uvloop"):
            if loop == "uvloop":
                pytest.importorskip("uvloop")
            path = write_config(tmp_path / loop, {"server": {"event_loop": loop}})
            assert run_event_loop(load_settings(path), interval()) == SWITCH_INTERVAL
    finally:
        sys.setswitchinterval(before)


# ------------------------------------------------------------------ the garbage collector

_SERVE_AND_REPORT_GC = """
import gc, os, signal, sys, threading, time
import elemta.cli

config, ready, report = sys.argv[1:]
os.environ["ELEMTA_READY_FILE"] = ready

def watch():
    for _ in range(30000):  # bounded: 30 s; elemta.cli.run turns it off before this import
        if "elemta.cli.main" in sys.modules:
            break
        time.sleep(0.001)
    during = gc.isenabled()
    for _ in range(3000):  # bounded: 30 s
        if os.path.exists(ready):
            break
        time.sleep(0.01)
    with open(report, "w") as f:
        f.write(f"{during} {gc.isenabled()} {gc.get_freeze_count()}")
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=watch, daemon=True).start()
elemta.cli.run(["serve", "--config", config])
"""


def test_serve_collects_garbage_once_started_with_start_up_frozen(tmp_path: Path) -> None:
    """Off through the imports and the start; on, with what start-up made frozen, once ready."""
    path = write_config(tmp_path, {"listeners": [
        {"name": "mx", "address": f"127.0.0.1:{free_port()}", "mode": "smtp", "tls": "none"}]})
    report = tmp_path / "gc"
    env = {k: v for k, v in os.environ.items() if k != "ELEMTA_LOAD_PLUGINS"}
    result = subprocess.run([sys.executable, "-c", _SERVE_AND_REPORT_GC, str(path),
                             str(tmp_path / "ready"), str(report)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    during, after, frozen = report.read_text().split()
    assert (during, after) == ("False", "True")
    assert int(frozen) > 10_000  # modules, classes, settings: what lives as long as the server


def test_other_commands_collect_garbage(tmp_path: Path) -> None:
    path = write_config(tmp_path, {})
    code = ("import gc, sys, elemta.cli\n"
            "try:\n    elemta.cli.run(['check-config', sys.argv[1]])\n"
            "except SystemExit:\n    pass\n"
            "print('collecting', gc.isenabled(), gc.get_freeze_count())")
    result = subprocess.run([sys.executable, "-c", code, str(path)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert "collecting True 0" in result.stdout, result.stdout + result.stderr
