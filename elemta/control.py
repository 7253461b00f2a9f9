"""The control socket of a running server, and queue commands on a spool no server runs.

A running server owns its spool (it holds the spool lock, ``spool/lock.py``)
and listens on ``<state_dir>/control.sock`` (mode 0600) for the changing
``elemta queue`` commands: hold, release, retry, delete, bounce. The protocol
is one JSON object per line each way::

    → {"cmd": "hold", "ids": ["01HX…"]}
    ← {"ok": true, "done": ["01HX…"], "missing": [], "skipped": {}, "busy": [],
       "message": ""}

Commands run one at a time on the server's event loop, through the delivery
runner (:class:`~elemta.delivery.admin.RunningAdmin`), so they never race a
delivery attempt.

Plugins add their own commands (the ``control_commands`` hook), asked as
``{"cmd": "plugin", "name": "dkim.keys", "args": {...}}`` and answered as
``{"ok": true, "result": {...}}``; a plugin's command line sends them with
:func:`elemta.control_request` (``cli/plugin_control.py``).

With no server running, the command line takes the spool lock itself and
changes the files directly with the same operations
(:class:`~elemta.spool.admin.QueueAdmin`, :func:`apply_offline`); the
read-only commands (``list``, ``show``, ``stats``) always read the files.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from .delivery.admin import HELD_BY_ADMIN, AdminResult, RunningAdmin
from .spool.admin import QueueAdmin

if TYPE_CHECKING:
    from .config import Settings
    from .spool.store import Spool

log = logging.getLogger("elemta.control")

SOCKET_NAME = "control.sock"
COMMANDS = ("hold", "release", "retry", "delete", "bounce", "stats", "ping", "plugin")
# A request names its messages: `retry` with every id of a big queue fits.
MAX_LINE_BYTES = 16 << 20
# sun_path holds 108 bytes on Linux, 104 elsewhere; longer paths go through
# /proc/self/fd (Linux), which keeps the socket where the configuration says.
_SUN_PATH_MAX = 100


class ControlError(Exception):
    """The control socket cannot be served or reached; ``str()`` says why."""


class Unreachable(ControlError):
    """Nothing answers on the control socket (no server, or a stale socket file)."""


class ServerNotRunning(Unreachable):
    """No server runs with this configuration: :func:`control_request` found nothing
    answering on its control socket."""


@dataclass(frozen=True, slots=True)
class PluginCommand:
    """A control command a plugin answers (``control_commands``)."""

    plugin: str
    handler: Callable[[dict[str, Any]], Any]
    timeout_seconds: float


def plugin_commands(answers: list[tuple[str, Any]], timeout_for: Callable[[str], float]
                    ) -> dict[str, PluginCommand]:
    """The commands of the ``control_commands`` answers ((plugin, mapping) pairs).

    :raises ControlError: a name that is not a non-empty string, a handler that
        cannot be called, or a name two plugins register.
    """
    commands: dict[str, PluginCommand] = {}
    for plugin, mapping in answers:
        for name, handler in mapping.items():
            if not isinstance(name, str) or not name.strip():
                raise ControlError(f"plugin {plugin} registers control command {name!r}: a "
                                   "name is a non-empty string, such as \"dkim.keys\"")
            if not callable(handler):
                raise ControlError(f"plugin {plugin} registers control command {name}: its "
                                   f"handler is a {type(handler).__name__}, not a function")
            if name in commands:
                raise ControlError(f"plugins {commands[name].plugin} and {plugin} both register "
                                   f"control command {name}; disable one of them")
            commands[name] = PluginCommand(plugin, handler, timeout_for(plugin))
    return commands


# ---------------------------------------------------------------------- paths


def socket_path(settings: Settings) -> Path:
    return settings.resolve(settings.server.state_dir) / SOCKET_NAME


# ---------------------------------------------------------------------- server


class ControlServer:
    """The unix socket a running server answers queue commands on."""

    def __init__(self, admin: RunningAdmin, path: Path, *, delivering: bool,
                 commands: Mapping[str, PluginCommand] | None = None) -> None:
        self.admin = admin
        self.path = Path(path)
        self.delivering = delivering
        self.commands = dict(commands or {})
        self._server: asyncio.base_events.Server | None = None
        self._lock = asyncio.Lock()
        self._clients: set[asyncio.Task[Any]] = set()
        self._working: set[asyncio.Task[Any]] = set()  # clients with a command in progress

    async def start(self) -> None:
        directory = self.path.parent
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise ControlError(f"cannot create {directory}: {e.strerror or e}") from None
        if self.path.exists() or self.path.is_symlink():
            try:
                request(self.path, {"cmd": "ping"}, timeout=2)
            except ControlError:
                self.path.unlink(missing_ok=True)  # left by a server that died
            else:
                raise ControlError(f"another server answers on {self.path} (is a second server "
                                   "using the same [server] state_dir?)")
        try:
            with _sun_path(self.path) as address:
                self._server = await asyncio.start_unix_server(
                    self._serve_client, path=address, limit=MAX_LINE_BYTES)
            os.chmod(self.path, 0o600)
        except OSError as e:
            await self.stop()
            raise ControlError(f"cannot listen on {self.path}: {e.strerror or e}") from None

    async def stop(self, grace: float = 40.0) -> None:
        """Stop listening; a command in progress may finish within ``grace`` seconds."""
        if self._server is None:
            return
        self._server.close()
        with contextlib.suppress(OSError):
            self.path.unlink()
        for task in self._clients - self._working:
            task.cancel()  # waiting for a request
        if self._clients:
            # A command cut short could, say, queue a bounce and keep the message.
            _, pending = await asyncio.wait(self._clients, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def _serve_client(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # longer than MAX_LINE_BYTES
                    writer.write(_encode({"ok": False, "error": "request too long"}))
                    break
                if not line:
                    break
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict):
                        raise ValueError("not a JSON object")
                except ValueError as e:
                    response: dict[str, Any] = {"ok": False, "error": f"bad request: {e}"}
                else:
                    self._working.add(task)
                    try:
                        response = await self.handle(req)
                    finally:
                        self._working.discard(task)
                writer.write(_encode(response))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._clients.discard(task)
            writer.close()

    async def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd not in COMMANDS:
            return {"ok": False, "error": f"unknown command {cmd!r} (one of {', '.join(COMMANDS)})"}
        if cmd == "ping":
            return {"ok": True, "pid": os.getpid()}
        if cmd == "stats":
            return {"ok": True, "pid": os.getpid(), "delivery_enabled": self.delivering,
                    **self.admin.stats()}
        if cmd == "plugin":
            return await self._plugin(req.get("name"), req.get("args", {}))
        ids = req.get("ids")
        every = bool(req.get("all"))
        if ids is None and cmd == "retry" and every:
            pass
        elif not isinstance(ids, list) or not all(isinstance(i, str) for i in ids) or not ids:
            return {"ok": False, "error": f"{cmd} needs a non-empty list of queue ids in 'ids'"}
        async with self._lock:
            try:
                if cmd == "retry":
                    result = await self.admin.retry(None if every else ids)
                    if not self.delivering:
                        result.message = ("delivery is disabled on this server ([delivery] "
                                          "enabled = false): nothing delivers these messages")
                else:
                    result = await getattr(self.admin, cmd)(ids)
            except Exception as e:
                log.exception("control: %s failed", cmd)
                return {"ok": False, "error": f"{cmd} failed: {e!r} (see the server log)"}
        log.info("control: %s: %d done, %d unknown, %d skipped, %d busy", cmd,
                 len(result.done), len(result.missing), len(result.skipped), len(result.busy))
        return result.to_dict()

    async def _plugin(self, name: Any, args: Any) -> dict[str, Any]:
        """A plugin's command: its handler's answer as ``result``, or an ``error``."""
        command = self.commands.get(name) if isinstance(name, str) else None
        if command is None:
            known = ", ".join(sorted(self.commands)) or "none"
            return {"ok": False, "error": f"no plugin command {name!r} on this server (it "
                    f"has: {known}); is the plugin enabled in the server's configuration?"}
        if not isinstance(args, dict):
            return {"ok": False, "error": f"{name}: 'args' must be a JSON object"}
        try:
            async with asyncio.timeout(command.timeout_seconds):
                result = command.handler(args)
                if inspect.isawaitable(result):
                    result = await result
        except ValueError as e:  # the request is wrong: say so, nothing to log
            return {"ok": False, "error": f"{name}: {e}"}
        except TimeoutError:
            log.error("control: plugin %s did not answer %s within %gs", command.plugin, name,
                      command.timeout_seconds)
            return {"ok": False, "error": f"{name}: no answer within "
                    f"{command.timeout_seconds:g}s (see the server log)"}
        except Exception as e:
            log.exception("control: plugin %s failed in %s", command.plugin, name)
            return {"ok": False, "error": f"{name} failed: {e!r} (see the server log)"}
        try:
            if not isinstance(result, dict):
                raise TypeError(f"a {type(result).__name__}, not a dict")
            json.dumps(result)
        except (TypeError, ValueError) as e:
            log.error("control: plugin %s answered %s with what JSON cannot hold: %s",
                      command.plugin, name, e)
            return {"ok": False, "error": f"{name}: the plugin's answer cannot be sent "
                    "(see the server log)"}
        return {"ok": True, "result": result}


def _encode(obj: dict[str, Any]) -> bytes:
    # ASCII: a lone surrogate in a request's ids must not break the answer
    return json.dumps(obj, separators=(",", ":")).encode("ascii") + b"\n"


@contextlib.contextmanager
def _sun_path(path: Path) -> Iterator[str]:
    """An address for ``bind``/``connect`` that fits ``sun_path``."""
    full = os.fspath(path)
    if len(os.fsencode(full)) < _SUN_PATH_MAX or not os.path.isdir("/proc/self/fd"):
        yield full
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- client


def request(path: Path, payload: dict[str, Any], *, timeout: float) -> dict[str, Any]:
    """Send one request to the server's control socket and return its answer.

    Raises :class:`Unreachable` when nothing listens there, :class:`ControlError`
    for any other failure.
    """
    path = Path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            with _sun_path(path) as address:
                sock.connect(address)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            raise Unreachable(f"no server answers on {path}") from None
        except OSError as e:
            raise ControlError(f"cannot connect to {path}: {e.strerror or e}") from None
        try:
            sock.sendall(_encode(payload))
            with sock.makefile("rb") as f:
                line = f.readline()
        except TimeoutError:
            raise ControlError(f"the server did not answer on {path} within {timeout:.0f}s"
                               ) from None
        except OSError as e:
            raise ControlError(f"lost the connection to {path}: {e.strerror or e}") from None
    finally:
        sock.close()
    if not line:
        raise ControlError(f"the server closed {path} without answering")
    try:
        answer = json.loads(line)
    except ValueError:
        raise ControlError(f"unreadable answer on {path}: {line[:200]!r}") from None
    if not isinstance(answer, dict):
        raise ControlError(f"unreadable answer on {path}: {line[:200]!r}")
    return answer


# ---------------------------------------------------------------------- offline


def apply_offline(spool: Spool, cmd: str, ids: list[str] | None,
                  reason: str = HELD_BY_ADMIN) -> AdminResult:
    """Run a queue command on the files of a spool no server runs on.

    The caller holds the spool lock (:func:`~elemta.spool.lock.lock_spool`). A
    journal left by a server that did not stop cleanly is replayed first, as
    the server would at start-up, so that no change is undone by a later replay.
    """
    if spool.layout.has_journal():
        spool.recover()
        asyncio.run(spool.close())
    queue = QueueAdmin(spool)
    result = AdminResult()
    now = time.time()
    if cmd == "retry" and ids is None:
        ids = sorted(spool.ids_in("deferred"))
    assert ids is not None
    try:
        for queue_id in dict.fromkeys(ids):
            with result.recording(queue_id):
                if cmd == "hold":
                    queue.hold(queue_id, reason)
                elif cmd == "release":
                    queue.release(queue_id)
                elif cmd == "retry":
                    queue.make_due(queue_id, now)
                elif cmd == "delete":
                    queue.delete(queue_id)
                else:
                    raise ValueError(f"{cmd} needs the running server")
    finally:
        spool.finish_removals()  # the files of deleted messages, before the command exits
    return result
