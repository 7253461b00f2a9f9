"""The server: wires configuration, plugins, spool, listeners and metrics.

Start order: plugins (config schemas, metrics, ``startup``), spool recovery,
TLS contexts, listeners, metrics HTTP. Stop order (SIGTERM): stop accepting,
let sessions finish within ``shutdown_grace_seconds`` (idle ones are told
``421`` at once), close what is left, finish in-flight spool commits, then run
``shutdown`` hooks in reverse order.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any, Iterable

from .config import ConfigError, ListenerSettings, Settings, parse_hostport
from .control import ControlError, ControlServer, plugin_commands, socket_path
from .delivery.admin import RunningAdmin
from .delivery.runner import Runner
from .dns import Resolver
from .hookcall import HookCaller, HookFailure
from .metrics import Metrics, MetricsServer
from .models import new_id
from .plugins import enabled_names, make_plugin_manager, validated_plugin_settings
from .smtp.auth import available as auth_mechanisms_available
from .smtp.context import SMTPContext
from .smtp.protocol import ElemtaSMTP
from .smtp.tls import TLSConfigError
from .sockets import Listening, bind_sockets, listen_problem
from .spool.lock import SpoolFormatError, SpoolLocked, lock_spool, unlock_spool
from .spool.envelope import Envelope, RecipientState, params_for
from .spool.store import Spool
from .state import StateUnavailable, state_store

log = logging.getLogger("elemta")


class StartupError(Exception):
    """The server cannot start; ``str()`` says why and how to fix it."""


class App:
    """One Elemta server. ``await app.start()`` … ``await app.stop()``."""

    def __init__(self, settings: Settings, *, extra_plugins: Iterable[tuple[str, object]] = (),
                 enabled: list[str] | None = None) -> None:
        self.settings = settings
        names = enabled if enabled is not None else enabled_names(settings.plugins.enabled)
        self.pm, self.plugin_order = make_plugin_manager(
            names, source=str(settings.source), extra=extra_plugins, settings=settings)
        # the domain label's values besides "other" and "none" (docs/metrics.md)
        self.metrics = Metrics(domains=(*settings.domains, *settings.metrics.domains))
        #: The one DNS resolver of this server: plugins and the SMTP transport share it.
        self.resolver = Resolver(settings.dns)
        #: Where policy plugins keep shared state (``[state]``): embedded or Redis.
        self.state = state_store(settings)
        self.hooks = HookCaller(
            self.pm, self.plugin_order, settings.plugins.timeout_for,
            self.metrics.hook_duration if settings.metrics.enabled else None,
            hook_minimum_seconds={"deliver": settings.delivery.attempt_timeout_seconds})
        self._plugin_settings = validated_plugin_settings(self.hooks, settings)
        spool = settings.spool
        self.spool = Spool(settings.resolve(spool.path), commit_threads=spool.commit_threads,
                           memory_bytes=spool.memory_bytes, visible_on_commit=False,
                           min_free_bytes=spool.min_free_bytes,
                           min_free_inodes=spool.min_free_inodes)
        self.smtp = SMTPContext(settings, self.hooks, self.spool, self.metrics)
        self.servers: dict[str, Listening] = {}
        self._bound: dict[str, list[socket.socket]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.queue_counted: asyncio.Task[None] | None = None   # the start-up count of the queue
        self.metrics_server: MetricsServer | None = None
        self.runner: Runner | None = None
        self.control: ControlServer | None = None
        self.queue_admin: RunningAdmin | None = None
        self._spool_lock: int | None = None
        self._started = False

    def plugin_settings(self, name: str) -> Any:
        """The validated ``[plugins.<name>]`` settings a plugin registered."""
        return self._plugin_settings[name]

    async def queue_message(self, sender: str, recipients: list[str], content: bytes, *,
                            note: str | None = None) -> str:
        """Queue a message a plugin made (a notice, a copy, mail passed on to an alias's
        members) for delivery; its queue id. Durable when this returns.

        ``content`` is the whole message, CRLF line ends. It goes to the delivery
        runner as it is: no SMTP stage hook sees it. ``note`` is kept in the
        envelope's trace (``elemta queue show``).
        """
        if not recipients:
            raise ValueError("queue_message needs at least one recipient")
        envelope = Envelope(id=new_id(), sender=sender,
                            recipients=[RecipientState(r) for r in recipients],
                            received_at=time.time(), size=len(content),
                            mail_params=params_for(content, sender, recipients),
                            listener=None, trace=[{"queued_by": note}] if note else [])
        await self.spool.commit_bytes(envelope, content)
        return envelope.id

    async def rate_limits(self, kind: str, key: str) -> Any:
        """The ``rate_limits`` hook's answer for a sending domain (``kind`` ``"domain"``)
        or a login (``"user"``): a mapping of ``per_hour``/``per_day``, or ``None``.

        A plugin that fails or times out raises :class:`~elemta.HookFailure`; the
        caller decides what that means (a rate limiter answers ``451 4.3.0``).
        """
        return (await self.hooks.call("rate_limits", kind=kind, key=key.lower())).value

    async def dkim_keys(self, domain: str) -> list[Any] | None:
        """The ``dkim_keys`` hook's answer for ``domain``: the :class:`~elemta.DkimKey`
        list a key store (a datasource) holds for it, or ``None``.

        A plugin that fails or times out raises an exception naming it; the
        caller decides what that means (a signer answers ``451 4.3.0``).
        """
        return (await self.hooks.call("dkim_keys", domain=domain.lower())).value

    def bind(self) -> None:
        """Bind every listener's sockets now, and read the configured TLS key: what needs
        root, done before the server drops it (``[server] user``); :meth:`start` serves
        these sockets. Raises :class:`StartupError` saying which address and why."""
        try:
            for listener in self.settings.listeners:
                if listener.name not in self._bound:
                    self._bound[listener.name] = self._bind(listener)
            tls = self.pm.get_plugin("elemta.default_tls")
            if tls is not None and self._tls_listeners():
                tls.read_configured()
        except TLSConfigError as e:
            self._close_bound()
            raise StartupError(str(e)) from None
        except BaseException:
            self._close_bound()
            raise

    def _bind(self, listener: ListenerSettings) -> list[socket.socket]:
        try:
            return bind_sockets(listener.host, listener.port)
        except OSError as e:
            raise StartupError(f"listener {listener.name}: cannot listen on {listener.address}"
                               f": {listen_problem(listener.host, listener.port, e)}") from None

    def _close_bound(self) -> None:
        for sockets in self._bound.values():
            for sock in sockets:
                sock.close()
        self._bound.clear()

    def listener_port(self, name: str) -> int:
        """The bound port of a listener (useful when it was configured as port 0)."""
        sock = self.servers[name].sockets[0]
        return sock.getsockname()[1]

    async def start(self) -> None:
        try:
            self._spool_lock = lock_spool(self.spool.root)
        except SpoolLocked as e:
            raise StartupError(f"[spool] path: {self.spool.root} is in use: {e} (is another "
                               "elemta server running on this spool?)") from None
        except SpoolFormatError as e:
            raise StartupError(f"[spool] path: {e}") from None
        except OSError as e:
            if os.path.exists(self.spool.root) and not os.path.isdir(self.spool.root):
                raise StartupError(f"[spool] path: {self.spool.root} is not a directory; "
                                   "name a directory (it is created if missing)") from None
            raise StartupError(f"[spool] path: cannot lock {self.spool.root}: "
                               f"{_reason(e)}") from None
        try:
            await self._open_state()
            try:
                self.hooks.call_at_startup("register_metrics", registry=self.metrics.registry)
                await self.hooks.call("startup", app=self)
            except HookFailure as f:
                raise StartupError(f"plugin {f.plugin} failed to start: {f.reason}") from None
            await self._recover()
            self.metrics.bind_spool(self.spool.counts)
            await self._count_queue()
            await self._load_tls()
            if self.settings.metrics.enabled:
                host, port = parse_hostport(self.settings.metrics.address)
                self.metrics_server = MetricsServer(self.metrics, host, port, self.readiness)
                try:
                    await self.metrics_server.start()
                except OSError as e:
                    raise StartupError(f"[metrics] address: cannot listen on "
                                       f"{self.settings.metrics.address}: "
                                       f"{listen_problem(host, port, e)}") from None
            self._warn_about_auth()
            for listener in self.settings.listeners:
                await self._listen(listener)
            self._spawn(self._watch_spool())
            runner = Runner(self.settings.delivery, hostname=self.settings.server.hostname,
                            spool=self.spool, hooks=self.hooks, metrics=self.metrics)
            if self.settings.delivery.enabled:
                self.runner = runner
                await runner.start()
            # without delivery, queue commands act through a runner that never starts
            self.queue_admin = RunningAdmin(runner)
            self.control = ControlServer(self.queue_admin, socket_path(self.settings),
                                         delivering=self.runner is not None,
                                         commands=self._control_commands())
            try:
                await self.control.start()
            except ControlError as e:
                raise StartupError(f"[server] state_dir: {e}") from None
        except BaseException:
            await self._abort_start()
            raise
        self._started = True
        log.info("elemta started: %s", ", ".join(
            f"{lst.name}={lst.address}({lst.mode},{lst.tls})" for lst in self.settings.listeners))

    async def _recover(self) -> None:
        """Spool recovery, in a thread; a stop asked for meanwhile waits for it to finish."""
        recovery = asyncio.ensure_future(asyncio.to_thread(self.spool.recover))
        try:
            counts = await asyncio.shield(recovery)
        except asyncio.CancelledError:
            await asyncio.wait({recovery})  # never close the spool under a running recovery
            raise
        except OSError as e:
            where = f" ({e.filename})" if e.filename else ""
            raise StartupError(f"[spool] path: cannot recover the spool at {self.spool.root}: "
                               f"{_reason(e)}{where}; nothing was removed: fix the cause "
                               "(permissions, a failing disk) and start again") from None
        log.info("spool %s recovered: %s", self.spool.root,
                 ", ".join(f"{k}={n}" for k, n in counts.items()))

    async def _count_queue(self) -> None:
        """``smtp_queue_size``: the spool read once, after recovery, in the background
        (:meth:`_scan_queue`: a full queue is not read before the server starts); events
        keep it since (``default_metrics``), and what the server queues itself
        (bounces, notices, :meth:`queue_message`) is added when it becomes durable.

        With ``[metrics] enabled = false`` nothing can read the gauge, and the spool
        is not read a second time: the scan competes with the first deliveries of a
        full queue for the interpreter lock (a held queue of 5,000 emptied about 6%
        sooner without it)."""
        if not self.settings.metrics.enabled:
            return
        queue = self.metrics.queue_size

        def durable(entries: list[tuple[str, str]]) -> None:
            for queue_id, state in entries:
                if queue_id in queue or state not in queue.STATUSES:
                    continue
                try:
                    state, env = self.spool.load(queue_id)
                except (KeyError, ValueError):
                    continue  # delivered or moved meanwhile, or unreadable (logged elsewhere)
                queue.set(queue_id, state, (r.address for r in env.pending()))

        self.spool.on_durable(durable)
        if self.settings.delivery.enabled:  # small messages reach the runner at once
            self.spool.on_journaled(lambda ids: durable([(i, "ready") for i in ids]))
        queue.begin_count()
        self.queue_counted = self._spawn(self._scan_queue())

    async def _scan_queue(self) -> None:
        """Count what the spool held at start-up into ``smtp_queue_size``; a message an
        event changed meanwhile is left as the event set it."""
        queue = self.metrics.queue_size

        def scan() -> list[tuple[str, str, list[str]]]:
            return [(env.id, state, [r.address for r in env.pending()])
                    for state, env in self.spool.iter_envelopes()
                    if state in queue.STATUSES]

        try:
            for queue_id, state, pending in await asyncio.to_thread(scan):
                queue.counted(queue_id, state, pending)
        except Exception:  # a gauge must not stop the server
            log.exception("cannot count the queue for smtp_queue_size")
        finally:
            queue.end_count()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _watch_spool(self, interval: float = 1.0) -> None:
        """The spool's room, every second: gauges, a log line when taking mail stops or
        resumes, and what recovery had no room to write out, written once there is."""
        metrics, spool = self.metrics, self.spool
        refusing: str | None = None
        while True:
            try:
                if spool.pending_replay:
                    await spool.retry_pending()
                space = spool.space.read()
                metrics.spool_free_bytes.set(space.free_bytes)
                metrics.spool_free_inodes.set(space.free_inodes)
                why = spool.refusal()
                if (why is None) != (refusing is None):
                    if why is not None:
                        log.warning("spool: new mail is refused with 452 4.3.1: %s", why)
                    else:
                        log.warning("spool: there is room again; new mail is accepted")
                refusing = why
                metrics.spool_refusing.set(0 if why is None else 1)
            except Exception:
                log.exception("spool: watching the spool's room failed")
            await asyncio.sleep(interval)

    async def _abort_start(self) -> None:
        """Undo a half-finished start: close what opened, then run ``shutdown`` hooks."""
        await self._cancel_tasks()
        if self.control is not None:
            await self.control.stop()
            self.control = None
        if self.runner is not None:
            await self.runner.stop()
            self.runner = None
        for server in self.servers.values():
            server.close()
        self.servers.clear()
        self._close_bound()
        if self.metrics_server is not None:
            await self.metrics_server.stop()
            self.metrics_server = None
        await self.spool.close()
        self._unlock_spool()
        await self.hooks.call("shutdown", app=self)
        await self.state.close()

    def _unlock_spool(self) -> None:
        if self._spool_lock is not None:
            unlock_spool(self._spool_lock)
            self._spool_lock = None

    def _tls_listeners(self) -> list[ListenerSettings]:
        return [lst for lst in self.settings.listeners if lst.tls != "none"]

    async def _load_tls(self) -> None:
        for listener in self._tls_listeners():
            try:
                ctx = (await self.hooks.call("tls_context", listener=listener)).value
            except HookFailure as f:
                raise StartupError(f"listener {listener.name}: TLS set-up failed in plugin "
                                   f"{f.plugin}: {f.reason}") from None
            if ctx is None:
                raise StartupError(f"listener {listener.name} has tls = {listener.tls!r} but "
                                   "no plugin provided a TLS context")
            self.smtp.tls_contexts[listener.name] = ctx

    async def _open_state(self) -> None:
        """The state store: an embedded one that cannot open is a configuration error; Redis
        that does not answer yet is not (its users decide what a failure means)."""
        try:
            await self.state.open()
        except StateUnavailable as e:
            if self.settings.state.backend == "embedded":
                raise StartupError(f"[state] path: {e}") from None
            log.error("state: %s; policy plugins apply their failure mode until it answers", e)

    def _control_commands(self) -> dict[str, Any]:
        """The plugins' control commands (``control_commands``)."""
        try:
            answers = self.hooks.call_at_startup("control_commands")
            return plugin_commands(answers.items, self.settings.plugins.timeout_for)
        except HookFailure as f:
            raise StartupError(f"plugin {f.plugin} failed in control_commands: {f.reason}"
                               ) from None
        except ControlError as e:
            raise StartupError(str(e)) from None

    def _warn_about_auth(self) -> None:
        """Settle the SASL mechanisms; say what would otherwise only show as every
        login failing."""
        try:
            self.smtp.auth_mechanisms = auth_mechanisms_available(self.hooks)
        except HookFailure as f:
            raise StartupError(f"plugin {f.plugin} failed in auth_mechanisms: {f.reason}"
                               ) from None
        can_check = bool(self.smtp.auth_mechanisms)
        for listener in self.settings.listeners:
            if listener.require_auth and not can_check:
                log.warning("listener %s requires AUTH, but no enabled plugin checks logins, "
                            "so every client gets 530 at MAIL: enable one in [plugins] "
                            "enabled (elemta-datasource: \"datasource\", with users added by "
                            "`elemta users add`), or set require_auth = false", listener.name)
            if listener.allow_plaintext_auth and listener.tls != "implicit":
                log.warning("listener %s offers AUTH before TLS (allow_plaintext_auth = true): "
                            "passwords cross the network in clear; turn it off outside tests",
                            listener.name)

    async def _listen(self, listener: ListenerSettings) -> None:
        ctx = self.smtp

        def factory() -> ElemtaSMTP:
            return ElemtaSMTP(ctx, listener)

        sockets = self._bound.pop(listener.name, None) or self._bind(listener)
        try:
            # TLS, implicit or by STARTTLS, is the session's own handshake
            # (elemta/smtp/starttls.py), with the listener's current context
            self.servers[listener.name] = await Listening.serve(factory, sockets)
        except OSError as e:
            for sock in sockets:
                sock.close()
            raise StartupError(f"listener {listener.name}: cannot listen on {listener.address}"
                               f": {listen_problem(listener.host, listener.port, e)}") from None

    def readiness(self) -> tuple[bool, str]:
        if not self._started:
            return False, "starting"
        for name, server in self.servers.items():
            if not server.is_serving():
                return False, f"listener {name} is not serving"
        if not self.spool.writable():
            return False, "spool is not writable"
        why = self.spool.refusal()
        if why is not None:
            return False, f"new mail is refused: {why}"
        return True, "ready"

    async def reload_tls(self) -> bool:
        """Ask ``tls_context`` again for every TLS listener (SIGHUP).

        New connections get the contexts answered now; sessions already open
        keep theirs. A listener whose plugin fails or answers nothing keeps the
        context it had. Returns whether every listener got a context.
        """
        ok = True
        builtin = self.pm.get_plugin("elemta.default_tls")
        if builtin is not None:
            builtin.reloading()
        for listener in self._tls_listeners():
            try:
                ctx = (await self.hooks.call("tls_context", listener=listener)).value
            except HookFailure as f:
                log.error("TLS: listener %s keeps its certificate: plugin %s failed: %s",
                          listener.name, f.plugin, f.reason)
                ok = False
                continue
            if ctx is None:
                log.error("TLS: listener %s keeps its certificate: no plugin provided a "
                          "TLS context", listener.name)
                ok = False
                continue
            self.smtp.tls_contexts[listener.name] = ctx
        log.info("TLS contexts %s", "reloaded" if ok else "NOT all reloaded (see errors above)")
        return ok

    async def reload(self) -> bool:
        """Reload (SIGHUP): the TLS contexts (:meth:`reload_tls`), then the ``reload``
        hook of every plugin. Returns whether every TLS listener got a context; a
        plugin that fails in ``reload`` is logged and the others still reload."""
        ok = await self.reload_tls()
        await self.hooks.call("reload", app=self)
        log.info("reload done")
        return ok

    async def _cancel_tasks(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def stop(self, grace: float | None = None) -> None:
        if grace is None:
            grace = self.settings.server.shutdown_grace_seconds
        for server in self.servers.values():
            server.close()
        self.smtp.stopping = True
        for proto in list(self.smtp.sessions):
            proto.shutdown_idle()
        if not await self.smtp.wait_idle(grace):
            log.warning("%d sessions still open after %.0fs; closing them",
                        len(self.smtp.sessions), grace)
            for proto in list(self.smtp.sessions):
                proto.close()
            await self.smtp.wait_idle(5)
        for server in self.servers.values():
            await server.wait_closed()
        self._close_bound()
        if self.control is not None:
            await self.control.stop()
            self.control = None
        if self.runner is not None:
            await self.runner.stop(grace)
            self.runner = None
        await self._cancel_tasks()
        await self.spool.close()
        self._unlock_spool()
        if self.metrics_server is not None:
            await self.metrics_server.stop()
        await self.hooks.call("shutdown", app=self)
        await self.state.close()
        self._started = False
        log.info("elemta stopped")


def _reason(e: OSError) -> str:
    return os.strerror(e.errno) if e.errno else str(e)


__all__ = ["App", "ConfigError", "StartupError"]
