"""elemta-acme: certificates from an ACME CA (RFC 8555), renewed and reloaded by themselves.

Enabled as ``acme`` (``[plugins] enabled = ["acme"]``); Elemta makes one
:class:`AcmePlugin` per server, so two servers in one process never share
state. This module holds the hook implementations; the work is done by
:mod:`.renewer` (when to order), :mod:`.issuer` (the ACME protocol),
:mod:`.responders` (the challenges), :mod:`.store` (the state directory) and
:mod:`.cli` (``elemta acme``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path
from typing import Any

from elemta import App, ListenerSettings, StartupError, hookimpl

from .certs import server_context
from .renewer import Renewer, when_text
from .settings import AcmeSettings
from .store import Current, Store, StoreError

__all__ = ["AcmePlugin", "AcmeSettings", "state_dir_of"]

log = logging.getLogger("elemta.acme")

RESULTS = ("success", "failure", "rate_limited")


def state_dir_of(settings: AcmeSettings, server_settings: Any) -> Path:
    """The plugin's state directory: ``state_dir``, or ``<[server] state_dir>/acme``."""
    if settings.state_dir is not None:
        return settings.state_dir
    return server_settings.resolve(server_settings.server.state_dir) / "acme"


class AcmePlugin:
    """The ``acme`` plugin: answers ``tls_context`` with the ACME certificate once there is
    one, and keeps it renewed in a background task."""

    def __init__(self) -> None:
        self.app: App | None = None
        self.settings: AcmeSettings | None = None
        self.store: Store | None = None
        self.renewer: Renewer | None = None
        self.task: asyncio.Task[None] | None = None
        self.context: ssl.SSLContext | None = None
        self.current: Current | None = None
        self._expiry: Any = None
        self._renewals: Any = None
        self._failures: Any = None

    @hookimpl
    def register_config(self) -> dict[str, type[AcmeSettings]]:
        return {"acme": AcmeSettings}

    @hookimpl
    def register_commands(self, cli: Any) -> None:
        from .cli import add_commands

        add_commands(cli)

    @hookimpl
    def register_metrics(self, registry: Any) -> None:
        from prometheus_client import Counter, Gauge

        self._expiry = Gauge(
            "elemta_acme_certificate_expiry_timestamp_seconds",
            "When the ACME certificate in service expires (Unix time), per name it holds",
            ["name"], registry=registry)
        self._renewals = Counter(
            "elemta_acme_renewals",
            "Certificate orders by result: success, failure, rate_limited",
            ["result"], registry=registry)
        for result in RESULTS:
            self._renewals.labels(result=result)
        self._failures = Gauge(
            "elemta_acme_renewal_failures",
            "Orders that failed in a row since the last certificate was issued (0: none)",
            registry=registry)

    @hookimpl
    async def startup(self, app: App) -> None:
        self.app = app
        settings = self.settings = app.plugin_settings("acme")
        store = self.store = Store(state_dir_of(settings, app.settings))
        try:
            await asyncio.to_thread(store.ensure)
            await asyncio.to_thread(store.hold_server_lock)
        except (StoreError, OSError) as e:
            raise StartupError(f"[plugins.acme] state_dir: {e}") from None
        renewer = self.renewer = Renewer(settings, store, on_new_certificate=self._use,
                                         count=self._count)
        await renewer.refresh()
        try:
            status = await asyncio.to_thread(store.read_status)
        except StoreError as e:
            log.warning("ACME: %s", e)
            status = {}
        if self._failures is not None:
            self._failures.set(int(status.get("failures") or 0))
        if renewer.current is None:
            log.warning("ACME: no certificate for %s yet; new connections get the [tls] or "
                        "self-signed certificate until %s issues one (`elemta acme status` "
                        "shows the progress)", ", ".join(settings.names),
                        settings.directory_url)
        if status.get("last_error"):
            log.warning("ACME: the last order failed (%s); next attempt at %s",
                        status["last_error"], when_text(status.get("next_attempt_at")))
        if settings.responders == "always":
            try:
                await renewer.responders.start(settings.challenges)
            except Exception as e:
                raise StartupError(f"[plugins.acme] responders = \"always\": {e}") from None
        self.task = asyncio.create_task(renewer.run(), name="elemta-acme renewal")

    @hookimpl
    async def shutdown(self) -> None:
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self.renewer is not None:
            await self.renewer.responders.stop()
        if self.store is not None:
            self.store.release_server_lock()

    @hookimpl
    def tls_context(self, listener: ListenerSettings) -> ssl.SSLContext | None:
        """The ACME certificate's context for every TLS listener; ``None`` (the built-in
        ``[tls]`` or self-signed certificate) until one is issued."""
        if listener.tls == "none":
            return None
        return self.context

    # ------------------------------------------------------------ helpers

    async def _use(self, current: Current) -> None:
        """A certificate became current: build its context, then reload the listeners."""
        assert self.app is not None
        tls = self.app.settings.tls
        try:
            context = await asyncio.to_thread(server_context, current.fullchain,
                                              current.privkey, min_version=tls.min_version,
                                              ciphers=tls.ciphers)
        except (ssl.SSLError, OSError, ValueError) as e:
            log.error("ACME: cannot use the certificate in %s: %s; new connections keep the "
                      "certificate in service", current.folder, e)
            return
        info = current.info
        self.context, self.current = context, current
        if self._expiry is not None:
            self._expiry.clear()
            for name in info.names:
                self._expiry.labels(name=name).set(info.not_after.timestamp())
        log.info("ACME: the certificate for %s (serial %s, issued by %s, valid until %s) is "
                 "in service", ", ".join(info.names), info.serial_hex, info.issuer,
                 when_text(info.not_after.timestamp()))
        if self.task is not None:
            await self.app.reload_tls()

    def _count(self, result: str, status: dict[str, Any]) -> None:
        if self._renewals is not None:
            self._renewals.labels(result=result).inc()
        if self._failures is not None:
            self._failures.set(int(status.get("failures") or 0))
