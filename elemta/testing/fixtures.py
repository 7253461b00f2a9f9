"""pytest fixtures for Elemta and its plugins (loaded through the ``pytest11`` entry point).

``elemta_server`` starts a real server in the test's event loop, on free
loopback ports, with a private spool and state directory::

    async def test_greylist(elemta_server, elemta_outbox):
        server = await elemta_server(enabled=["greylist"], outbox=elemta_outbox,
                                     config={"plugins": {"greylist": {"delay_seconds": 1}}})
        sent = await send_mail(server, "a@example.org", ["b@example.test"], "Subject: x\\n\\nx\\n")

The fixtures load in an environment without Elemta's test extras: one that
needs a missing library (pytest-asyncio, dnslib) fails the test that asks for
it with the ``pip install`` to run, and every other test is unaffected.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Iterable, Iterator

import pytest
import tomlkit

from ..app import App
from ..config import Settings, load_settings
from .outbox import Outbox

if TYPE_CHECKING:
    from .dns import ZoneServer

INSTALL_TEST_EXTRAS = "pip install 'elemta[test]'"

try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - exercised by test_testing_kit in a subprocess
    pytest_asyncio = None  # type: ignore[assignment]


def _async_fixture(function: Callable[..., Any]) -> Any:
    """``pytest_asyncio.fixture``, or a fixture saying how to get it."""
    if pytest_asyncio is not None:
        return pytest_asyncio.fixture(function)

    @pytest.fixture(name=function.__name__)
    def missing() -> None:
        pytest.fail(f"the {function.__name__} fixture needs pytest-asyncio, which is not "
                    f"installed: {INSTALL_TEST_EXTRAS}", pytrace=False)

    missing.__doc__ = function.__doc__
    return missing


def _needs(module: str, fixture: str) -> None:
    try:
        __import__(module)
    except ImportError:
        pytest.fail(f"the {fixture} fixture needs {module}, which is not installed: "
                    f"{INSTALL_TEST_EXTRAS}", pytrace=False)


# ------------------------------------------------------------------ configuration

DOMAIN = "example.test"
HOSTNAME = "mx.example.test"
LISTENERS = ("mx", "submission", "smtps")


def default_config(root: Path) -> dict[str, Any]:
    """A complete test configuration: three listeners on free loopback ports.

    ``mx`` (port 25 style, STARTTLS offered), ``submission`` (STARTTLS then
    AUTH required) and ``smtps`` (implicit TLS, AUTH required); local domain
    ``example.test``; host name ``mx.example.test``; delivery off (SMTP tests
    look at what was accepted; pass an outbox, or ``[delivery] enabled``, to
    have it delivered).
    """
    return {
        "server": {"hostname": HOSTNAME, "state_dir": str(root / "state"),
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
        "domains": {DOMAIN: {}},
        "delivery": {"enabled": False},
        "plugins": {"enabled": []},
    }


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``override`` into a copy of ``base`` (tables merge; lists are replaced)."""
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


# ------------------------------------------------------------------ the running server


@dataclass
class RunningServer:
    """A server started by ``elemta_server``; stopped when the test ends."""

    app: App
    root: Path

    @property
    def settings(self) -> Settings:
        return self.app.settings

    @property
    def config_path(self) -> Path:
        return self.root / "elemta.toml"

    def port(self, listener: str = "mx") -> int:
        return self.app.listener_port(listener)

    @property
    def metrics_port(self) -> int:
        assert self.app.metrics_server is not None
        return self.app.metrics_server.port

    @property
    def spool_path(self) -> Path:
        return self.app.spool.root

    async def flush(self) -> None:
        """Hand everything accepted so far to the delivery runner now, not at the next tick."""
        await self.app.spool.checkpoint()

    async def retry(self, *queue_ids: str) -> None:
        """Deliver these deferred messages now (``elemta queue retry``)."""
        assert self.app.queue_admin is not None
        await self.app.queue_admin.retry(list(queue_ids) or None)


ServerFactory = Callable[..., Awaitable[RunningServer]]


@_async_fixture
async def elemta_server(tmp_path: Path) -> AsyncIterator[ServerFactory]:
    """Factory: ``await elemta_server(config=None, plugins=(), enabled=None, outbox=None)``.

    ``config`` is deep-merged into :func:`default_config`. ``enabled`` lists
    installed plugins to load (entry-point names), in order; by default the
    config's ``[plugins] enabled``. ``plugins`` adds plugin objects after them,
    before the built-ins. ``outbox`` (the ``elemta_outbox`` fixture) turns
    delivery on and captures every delivery instead of making it.
    """
    running: list[RunningServer] = []

    async def start(config: dict[str, Any] | None = None,
                    plugins: Iterable[tuple[str, object]] = (),
                    enabled: list[str] | None = None,
                    outbox: Outbox | None = None) -> RunningServer:
        root = tmp_path / f"server{len(running)}"
        if outbox is not None:
            config = merge(config or {}, {"delivery": {"enabled": True}})
            plugins = [*plugins, ("outbox", outbox)]
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
def elemta_outbox() -> Outbox:
    """Captures what a server would deliver: pass it as ``elemta_server(outbox=...)``."""
    return Outbox()


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


@pytest.fixture(scope="session")
def redis_session_server() -> Iterator[Any]:
    """One ``redis-server`` for the test session; see :mod:`elemta.testing.redis`."""
    from .redis import RedisServer

    server = RedisServer().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_server(redis_session_server: Any) -> Any:
    """A real ``redis-server`` on loopback, emptied for this test (``.url``, ``.stop()``,
    ``.start()``); tests that stop it get it started again afterwards."""
    server = redis_session_server
    if server.proc is None:
        server.start()
    server.flush()
    yield server
    if server.proc is None:
        server.start()


@pytest.fixture(params=["embedded", "redis"])
def state_config(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """A ``[state]`` table, once for each store a stateful plugin must work on: the
    embedded SQLite file, and a real ``redis-server`` (:func:`redis_server`)."""
    if request.param == "embedded":
        return {"backend": "embedded", "path": str(tmp_path / "state.sqlite3")}
    return {"backend": "redis", "redis_url": request.getfixturevalue("redis_server").url,
            "timeout_seconds": 0.5}


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Factory: ``small_filesystem("4m")`` → the folder of a new tmpfs of that size.

    A real file system that fills up (``ENOSPC``), for disk-full tests. Mounting
    needs root (CI runs as root): without it the test is skipped, or fails under
    ``CI=true``. Everything mounted is unmounted at the end of the test.
    """
    import os
    import subprocess

    mounted: list[Path] = []

    def mount(size: str) -> Path:
        reason = None
        if os.geteuid() != 0:
            reason = "mounting a small tmpfs needs root"
        else:
            folder = tmp_path / f"small{len(mounted)}"
            folder.mkdir()
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700",
                                   "tmpfs", str(folder)], capture_output=True, text=True)
            if done.returncode == 0:
                mounted.append(folder)
                return folder
            reason = f"cannot mount a tmpfs: {done.stderr.strip()}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and a disk-full test cannot run: {reason}", pytrace=False)
        pytest.skip(reason)

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture
def dns_server() -> Iterator[ZoneServer]:
    """An authoritative DNS server on 127.0.0.1 (UDP and TCP) serving zones the test edits live.

    See :class:`elemta.testing.dns.ZoneServer`; needs dnslib (a test dependency).
    """
    _needs("dnslib", "dns_server")
    from .dns import ZoneServer

    with ZoneServer() as server:
        yield server
