"""The ``control_commands`` hook: a plugin answers commands on the running server's control
socket, and its command line asks them with ``elemta.control_request``."""

from __future__ import annotations

import asyncio
import json
import logging
import socket

import pytest

from elemta import (ControlError, ServerNotRunning, StartupError, control_request, hookimpl,
                    load_settings)
from elemta.testing import write_config


class Keeper:
    """Counts what it is asked; answers in every way a handler can."""

    def __init__(self) -> None:
        self.asked: list[dict] = []

    async def count(self, args):
        self.asked.append(args)
        await asyncio.sleep(0)
        return {"asked": len(self.asked), "echo": args}

    def plain(self, args):
        return {"plain": True}

    def picky(self, args):
        raise ValueError("give a domain as args.domain")

    def broken(self, args):
        raise KeyError("a bug")

    def unsendable(self, args):
        return {"when": object()}

    @hookimpl
    def control_commands(self):
        return {"keeper.count": self.count, "keeper.plain": self.plain,
                "keeper.picky": self.picky, "keeper.broken": self.broken,
                "keeper.unsendable": self.unsendable}


class Other:
    @hookimpl
    def control_commands(self):
        return {"other.hello": lambda args: {"hello": args.get("name", "world")}}


async def ask(server, name, args=None):
    """``control_request`` as a plugin's command line calls it (blocking), off the loop."""
    return await asyncio.to_thread(control_request, name, args, settings=server.settings,
                                   timeout=10)


async def test_hook_control_commands(elemta_server, caplog):
    keeper = Keeper()
    server = await elemta_server(plugins=[("keeper", keeper), ("other", Other())])

    assert await ask(server, "keeper.count", {"domain": "example.org"}) == {
        "asked": 1, "echo": {"domain": "example.org"}}
    assert await ask(server, "keeper.count") == {"asked": 2, "echo": {}}
    assert await ask(server, "keeper.plain") == {"plain": True}
    assert await ask(server, "other.hello", {"name": "ops"}) == {"hello": "ops"}

    with pytest.raises(ControlError, match="the server refused: keeper.picky: give a domain"):
        await ask(server, "keeper.picky")
    with caplog.at_level(logging.ERROR, logger="elemta.control"):
        with pytest.raises(ControlError, match=r"keeper.broken failed: KeyError\('a bug'\) "
                                               r"\(see the server log\)"):
            await ask(server, "keeper.broken")
        with pytest.raises(ControlError, match="answer cannot be sent"):
            await ask(server, "keeper.unsendable")
    assert "plugin keeper failed in keeper.broken" in caplog.text
    assert "plugin keeper answered keeper.unsendable with what JSON cannot hold" in caplog.text
    with pytest.raises(ControlError, match=r"no plugin command 'nobody.home' on this server "
                                           r"\(it has: keeper.broken, keeper.count, "):
        await ask(server, "nobody.home")
    # the server is still there for the next command
    assert await ask(server, "keeper.plain") == {"plain": True}


async def test_the_wire_format_is_one_json_line_each_way(elemta_server):
    server = await elemta_server(plugins=[("other", Other())])
    path = server.settings.resolve(server.settings.server.state_dir) / "control.sock"

    def exchange(payload: bytes) -> dict:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            sock.sendall(payload)
            with sock.makefile("rb") as f:
                return json.loads(f.readline())

    answer = await asyncio.to_thread(
        exchange, b'{"cmd": "plugin", "name": "other.hello", "args": {"name": "wire"}}\n')
    assert answer == {"ok": True, "result": {"hello": "wire"}}
    answer = await asyncio.to_thread(
        exchange, b'{"cmd": "plugin", "name": "other.hello", "args": ["not", "a", "dict"]}\n')
    assert answer == {"ok": False, "error": "other.hello: 'args' must be a JSON object"}


def test_no_server_running_is_its_own_error(tmp_path):
    settings = load_settings(write_config(tmp_path / "s"))
    with pytest.raises(ServerNotRunning, match=r"no Elemta server is running with .*elemta.toml"
                                               r" \(nothing answers on .*control.sock\); start "
                                               r"it with `elemta serve`"):
        control_request("dkim.keys", {"domain": "example.org"}, settings=settings)
    assert issubclass(ServerNotRunning, ControlError)


async def test_two_plugins_registering_one_name_stop_start_up(elemta_server):
    class Again:
        @hookimpl
        def control_commands(self):
            return {"other.hello": lambda args: {}}

    with pytest.raises(StartupError, match="plugins other and again both register control "
                                           "command other.hello; disable one of them"):
        await elemta_server(plugins=[("other", Other()), ("again", Again())])


async def test_a_handler_that_is_no_function_stops_start_up(elemta_server):
    class Wrong:
        @hookimpl
        def control_commands(self):
            return {"wrong.answer": {"not": "callable"}}

    with pytest.raises(StartupError, match="plugin wrong registers control command "
                                           "wrong.answer: its handler is a dict"):
        await elemta_server(plugins=[("wrong", Wrong())])
