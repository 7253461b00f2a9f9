"""elemta-sink: Elemta as a developer's mail sink, with a JSON API and a web UI.

Enabled as ``sink``, next to ``store`` (elemta-store keeps the messages). With
``capture_all = true`` every recipient is accepted and every message is routed
into the store: nothing leaves the machine, except a message a person releases.
The web UI and the JSON API (:mod:`elemta_sink.web`) are served by uvicorn on
Elemta's own event loop, started by ``startup`` and stopped by ``shutdown``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import click

from elemta import (Accept, App, Envelope, RecipientState, Route, StartupError, hookimpl)

from .settings import SinkSettings
from .web import RELEASE_NOTE, Api, build_app

__all__ = ["SinkPlugin", "SinkSettings", "RELEASE_NOTE"]
__version__ = "0.1.0"

log = logging.getLogger("elemta.sink")

# how long shutdown waits for open HTTP connections (event streams) before closing them
STOP_SECONDS = 3.0


class _Metrics:
    """``elemta_sink_*``; nothing is counted before ``register_metrics``."""

    def __init__(self) -> None:
        self.requests: Any = None
        self.releases: Any = None
        self.streams: Any = None

    def register(self, registry: Any) -> None:
        from prometheus_client import Counter, Gauge

        self.requests = Counter("elemta_sink_http_requests", "Requests to the sink's web UI "
                                "and API, by endpoint and HTTP status.", ["endpoint", "status"],
                                registry=registry)
        self.releases = Counter("elemta_sink_releases", "Stored messages released to real "
                                "recipients, by result (queued, failed).", ["result"],
                                registry=registry)
        self.streams = Gauge("elemta_sink_event_streams", "Browsers and clients listening to "
                             "the live event stream now.", registry=registry)

    def request(self, endpoint: str, status: int) -> None:
        if self.requests is not None:
            self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def released(self, result: str) -> None:
        if self.releases is not None:
            self.releases.labels(result=result).inc()

    def stream(self, delta: int) -> None:
        if self.streams is not None:
            self.streams.inc(delta)


def _uvicorn_server(config: Any) -> Any:
    import uvicorn

    class EmbeddedServer(uvicorn.Server):
        """uvicorn's server without its signal handlers: SIGTERM, SIGINT and SIGHUP stay
        Elemta's, which stops this server through the ``shutdown`` hook."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return EmbeddedServer(config)


def _released(envelope: Envelope) -> bool:
    """A message the sink's release queued: it goes where Elemta routes it normally."""
    return envelope.listener is None and any(
        isinstance(t, dict) and str(t.get("queued_by", "")).startswith(RELEASE_NOTE)
        for t in envelope.trace)


class SinkPlugin:
    """The ``sink`` plugin; one instance per server."""

    def __init__(self) -> None:
        self.settings = SinkSettings()
        self.api: Api | None = None
        self.port: int | None = None
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None
        self._metrics = _Metrics()
        self._store_transport = "store"

    # ------------------------------------------------------------ lifecycle

    @hookimpl
    def register_config(self) -> Mapping[str, type[SinkSettings]]:
        return {"sink": SinkSettings}

    @hookimpl
    def register_metrics(self, registry: Any) -> None:
        self._metrics.register(registry)

    @hookimpl
    def register_commands(self, cli: click.Group) -> None:
        if "sink" not in cli.commands:
            cli.add_command(sink_group)

    @hookimpl
    async def startup(self, app: App) -> None:
        """Check that ``store`` is enabled, bind the web UI's address, serve it."""
        import uvicorn

        self.settings = settings = app.plugin_settings("sink")
        try:
            self._store_transport = app.plugin_settings("store").transport
        except KeyError:
            raise StartupError("sink: the store plugin is not enabled; add \"store\" to "
                               "[plugins] enabled (pip install elemta-store)") from None
        host, port = settings.host_port
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                             socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            raise StartupError(f"sink: cannot listen on {settings.address} ([plugins.sink] "
                               f"address): {e.strerror or e}; choose another port") from None
        self.port = sock.getsockname()[1]

        async def queue(sender: str, recipients: list[str], content: bytes) -> str:
            return await app.queue_message(sender, recipients, content,
                                           note=f"{RELEASE_NOTE} to {', '.join(recipients)}")

        from elemta_store import current_store

        asgi, self.api = build_app(settings, lambda: current_store(app), queue, self._metrics,
                                   __version__)
        config = uvicorn.Config(asgi, log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=STOP_SECONDS, server_header=False,
                                http="auto")
        # uvicorn's "Started server process" and "Waiting for application startup" would
        # say the wrong thing here; its warnings and errors still reach Elemta's log
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        self._server = _uvicorn_server(config)
        self._task = asyncio.create_task(self._serve(sock), name="elemta-sink-http")
        for _ in range(200):    # uvicorn's startup is quick: wait for it, bounded
            if self._server.started or self._task.done():
                break
            await asyncio.sleep(0.01)
        if self._task.done():
            raise StartupError(f"sink: the web UI on {settings.address} did not start; see "
                               "the log above")
        scheme_host = f"[{host}]" if ":" in host else host
        log.info("sink: web UI and API on http://%s:%d/%s%s", scheme_host, self.port,
                 " (capture_all: every recipient goes to the store)" if settings.capture_all
                 else "", " read-only" if settings.read_only else "")
        if settings.username is None and host not in ("127.0.0.1", "::1", "localhost"):
            log.warning("sink: the web UI on %s is open to anyone who can reach it; set "
                        "username and password_hash in [plugins.sink]", settings.address)

    async def _serve(self, sock: socket.socket) -> None:
        try:
            await self._server.serve(sockets=[sock])
        except Exception:
            log.exception("sink: the web server stopped")
        finally:
            sock.close()

    @hookimpl
    async def shutdown(self, app: App) -> None:
        if self.api is not None:
            self.api.stopping.set()
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            try:
                await asyncio.wait_for(asyncio.shield(self._task), STOP_SECONDS + 2)
            except asyncio.TimeoutError:
                self._task.cancel()
                log.warning("sink: the web server did not stop in time; closed")
        self._server = self._task = None

    # ------------------------------------------------------------ sink mode

    @hookimpl(tryfirst=True)
    def rcpt(self, recipient: Any) -> Accept | None:
        """``capture_all``: every recipient is accepted (it goes to the store)."""
        if self.settings.capture_all:
            return Accept()
        return None

    @hookimpl(tryfirst=True)
    def route(self, envelope: Envelope, recipient: RecipientState) -> Route | None:
        """``capture_all``: every recipient to the store, but a released message's."""
        if not self.settings.capture_all or _released(envelope):
            return None
        return Route(transport=self._store_transport, destination="store")


# ------------------------------------------------------------------ commands

@click.group("sink", help="The sink's web UI.")
def sink_group() -> None:
    pass


@sink_group.command("hash-password")
@click.option("--password-stdin", is_flag=True,
              help="Read the password from standard input instead of asking for it.")
def hash_password(password_stdin: bool) -> None:
    """Print the argon2id hash of a password, for [plugins.sink] password_hash."""
    from argon2 import PasswordHasher

    if password_stdin:
        line = sys.stdin.readline()
        password = (line[:-1] if line.endswith("\n") else line).removesuffix("\r")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt="Again",
                                err=True)
    if not password:
        raise click.UsageError("the password is empty")
    if len(password) > 1024:
        raise click.UsageError("the password is longer than 1024 characters")
    click.echo(PasswordHasher().hash(password))
