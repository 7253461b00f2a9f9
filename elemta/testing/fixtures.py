"""pytest fixtures for Elemta and its plugins (loaded through the ``pytest11`` entry point).

``elemta_server`` starts a real server in the test's event loop, on free
loopback ports, with a private spool and state directory::

    async def test_greylist(elemta_server):
        server = await elemta_server(plugins=[("greylist", my_plugin)],
                                     config={"plugins": {"greylist": {"delay_seconds": 1}}})
        async with aiosmtplib.SMTP("127.0.0.1", server.port("mx")) as client:
            ...
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Iterable, Iterator

import pytest
import pytest_asyncio
import tomlkit

from ..app import App
from ..config import Settings, load_settings

if TYPE_CHECKING:
    from .dns import ZoneServer


def default_config(root: Path) -> dict[str, Any]:
    """A complete test configuration: three listeners on free loopback ports."""
    return {
        "server": {"hostname": "mx.example.test", "state_dir": str(root / "state"),
                   "shutdown_grace_seconds": 2.0},
        "listeners": [
            {"name": "mx", "address": "127.0.0.1:0", "mode": "smtp", "tls": "starttls"},
            {"name": "submission", "address": "127.0.0.1:0", "mode": "submission",
             "tls": "starttls"},
            {"name": "smtps", "address": "127.0.0.1:0", "mode": "submission",
             "tls": "implicit"},
        ],
        "spool": {"path": str(root / "queue")},
        "metrics": {"address": "127.0.0.1:0"},
        "log": {"level": "debug"},
        "domains": {"example.test": {}},
        # SMTP tests look at what was accepted; delivery tests turn the runner on
        "delivery": {"enabled": False},
        "plugins": {"enabled": []},
    }


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``override`` into a copy of ``base`` (lists are replaced)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def write_config(root: Path, config: dict[str, Any] | None = None) -> Path:
    """Write ``elemta.toml`` into ``root`` from the defaults plus ``config``."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "elemta.toml"
    path.write_text(tomlkit.dumps(merge(default_config(root), config or {})))
    return path


@dataclass
class RunningServer:
    app: App
    root: Path

    @property
    def settings(self) -> Settings:
        return self.app.settings

    def port(self, listener: str = "mx") -> int:
        return self.app.listener_port(listener)

    @property
    def metrics_port(self) -> int:
        assert self.app.metrics_server is not None
        return self.app.metrics_server.port

    @property
    def spool_path(self) -> Path:
        return self.app.spool.root


ServerFactory = Callable[..., Awaitable[RunningServer]]


@pytest_asyncio.fixture
async def elemta_server(tmp_path: Path) -> AsyncIterator[ServerFactory]:
    """Factory: ``await elemta_server(config=None, plugins=(), enabled=None)``.

    ``enabled`` lists installed plugins to load (entry-point names), in order;
    by default the config's ``[plugins] enabled`` (empty unless ``config`` sets
    it). ``plugins`` adds plugin objects after them, before the built-ins.
    """
    running: list[RunningServer] = []

    async def start(config: dict[str, Any] | None = None,
                    plugins: Iterable[tuple[str, object]] = (),
                    enabled: list[str] | None = None) -> RunningServer:
        root = tmp_path / f"server{len(running)}"
        settings = load_settings(write_config(root, config))
        # the config's [plugins] enabled, or the argument; never ELEMTA_LOAD_PLUGINS
        names = list(settings.plugins.enabled) if enabled is None else enabled
        app = App(settings, extra_plugins=plugins, enabled=names)
        await app.start()
        server = RunningServer(app, root)
        running.append(server)
        return server

    yield start
    for server in reversed(running):
        await server.app.stop(grace=1)


@pytest.fixture
def elemta_config(tmp_path: Path) -> Callable[[dict[str, Any] | None], Path]:
    """Factory writing a test ``elemta.toml`` and returning its path."""
    return lambda config=None: write_config(tmp_path / "config", config)


@pytest.fixture
def require_tool() -> Callable[[str], str]:
    """``require_tool("swaks")`` → the tool's path (skips, or fails under ``CI=true``)."""
    from .process import require_tool_or_skip

    return require_tool_or_skip


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Factory: ``start_server(config_path, env=None)`` → a ready ``elemta serve`` subprocess.

    See :class:`elemta.testing.process.ServerProcess`; every process is killed
    at the end of the test.
    """
    from .process import server_factory

    yield from server_factory(tmp_path)


@pytest.fixture(scope="session")
def postgresql_server() -> Iterator[Any]:
    """One PostgreSQL server for the test session; see :mod:`elemta.testing.postgres`."""
    from .postgres import PostgresServer

    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgresql(postgresql_server: Any) -> str:
    """The DSN of a fresh, empty PostgreSQL database on a loopback server."""
    return postgresql_server.new_database()


@pytest.fixture
def dns_server() -> Iterator["ZoneServer"]:
    """An authoritative DNS server on 127.0.0.1 (UDP and TCP) serving zones the test edits live.

    See :class:`elemta.testing.dns.ZoneServer`; needs dnslib (a test dependency).
    """
    from .dns import ZoneServer

    with ZoneServer() as server:
        yield server
