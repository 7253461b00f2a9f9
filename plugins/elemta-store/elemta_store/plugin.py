"""The ``store`` plugin's hooks: route recipients to the store, deliver them into it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from elemta import Envelope, Outcome, RecipientState, Route, hookimpl

from .api import Store, StoreError, _set_current
from .message import Incoming
from .settings import StoreSettings

if TYPE_CHECKING:
    from elemta import App

log = logging.getLogger("elemta.store")


class _Metrics:
    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Histogram

        self.stored = Counter(
            "elemta_store_messages", "Messages written into the store (a repeated delivery "
            "that only adds recipients counts too).", registry=registry)
        self.bytes = Counter(
            "elemta_store_bytes", "Bytes of messages written into the store.",
            registry=registry)
        self.recipients = Counter(
            "elemta_store_recipients", "Recipients delivered into the store.",
            registry=registry)
        self.pruned = Counter(
            "elemta_store_pruned_messages", "Messages deleted to keep the store within "
            "max_messages and max_bytes.", registry=registry)
        self.failures = Counter(
            "elemta_store_failures", "Deliveries into the store that failed and were "
            "deferred, by reason (error, timeout, closed).", ["reason"], registry=registry)
        self.latency = Histogram(
            "elemta_store_write_seconds", "Time from a delivery's request to its durable "
            "commit.", registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))


class StorePlugin:
    """The ``store`` plugin: ``register_config``, ``register_metrics``, ``startup``,
    ``shutdown``, ``route`` and ``deliver``."""

    def __init__(self) -> None:
        self.settings = StoreSettings()
        self.store: Store | None = None
        self.metrics: _Metrics | None = None
        self.local_domains: frozenset[str] = frozenset()
        self.domains: frozenset[str] = frozenset()
        self._pruned_seen = 0
        # each write holds its message in memory: at most writes_in_flight at once,
        # whatever [delivery] workers lets the runner have in flight
        self._slots = asyncio.Semaphore(self.settings.writes_in_flight)

    @hookimpl
    def register_config(self) -> Mapping[str, type[StoreSettings]]:
        return {"store": StoreSettings}

    @hookimpl
    def register_metrics(self, registry: Any) -> None:
        self.metrics = _Metrics(registry)

    @hookimpl
    async def startup(self, app: App) -> None:
        """Open the store (created the first time); it becomes :func:`current_store`."""
        self.settings = app.plugin_settings("store")
        self._slots = asyncio.Semaphore(self.settings.writes_in_flight)
        self.local_domains = app.settings.local_domains
        self.domains = frozenset(self.settings.domains)
        base = app.settings.resolve(Path("."))
        self.store = await Store.open(self.settings, base=base)
        self._pruned_seen = 0
        _set_current(app, self.store)
        where = ("PostgreSQL" if self.settings.backend == "postgresql"
                 else str(app.settings.resolve(Path(self.settings.path))))
        log.info("store: delivering transport %r into %s", self.settings.transport, where)

    @hookimpl
    async def shutdown(self, app: App) -> None:
        store, self.store = self.store, None
        if store is not None:
            _set_current(app, None)
            await store.close()

    @hookimpl
    def route(self, envelope: Envelope, recipient: RecipientState) -> Route | None:
        """The store's transport for the recipients ``[plugins.store]`` names; else ``None``.

        Every recipient gets the same route, so one message is one delivery.
        """
        s = self.settings
        if not s.catch_all:
            domain = recipient.address.rpartition("@")[2].lower().rstrip(".")
            if not ((s.local_domains and domain in self.local_domains) or domain in self.domains):
                return None
        return Route(transport=s.transport, destination="store")

    @hookimpl
    async def deliver(self, envelope: Envelope, route: Route, recipients: list[RecipientState],
                      content_path: str) -> list[Outcome] | None:
        """``250`` for every recipient once the store has committed the message; else ``451``."""
        if route.transport != self.settings.transport:
            return None
        store, m = self.store, self.metrics
        if store is None:
            if m is not None:
                m.failures.labels("closed").inc()
            return [Outcome(r.address, 451, "4.3.0", "the message store is not open")
                    for r in recipients]
        peer = envelope.peer.get("ip") if isinstance(envelope.peer, dict) else None
        item = Incoming(
            queue_id=envelope.id, sender=envelope.sender,
            recipients=[(r.address, dict(r.params), r.original) for r in recipients],
            raw=b"", received=datetime.fromtimestamp(envelope.received_at, timezone.utc),
            mail_params=dict(envelope.mail_params), helo=envelope.helo, peer=peer,
            auth=envelope.auth, content_path=content_path)
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.settings.timeout_seconds):  # the wait for a slot too
                async with self._slots:
                    id = await store.put(item)
        except (TimeoutError, asyncio.TimeoutError):
            if m is not None:
                m.failures.labels("timeout").inc()
            log.warning("store: %s not stored within %.0f s; deferred", envelope.id,
                        self.settings.timeout_seconds)
            return [Outcome(r.address, 451, "4.3.0", "the message store did not answer in time")
                    for r in recipients]
        except (StoreError, OSError) as e:
            if m is not None:
                m.failures.labels("error").inc()
            log.warning("store: %s not stored, deferred: %s", envelope.id, e)
            return [Outcome(r.address, 451, "4.3.0", "the message store cannot take it now")
                    for r in recipients]
        if m is not None:
            m.latency.observe(time.monotonic() - started)
            m.stored.inc()
            m.bytes.inc(len(item.raw))
            m.recipients.inc(len(recipients))
            if store.pruned_total > self._pruned_seen:
                m.pruned.inc(store.pruned_total - self._pruned_seen)
                self._pruned_seen = store.pruned_total
        log.info("store: %s stored as #%d for %d recipient(s)", envelope.id, id, len(recipients))
        return [Outcome(r.address, 250, "2.0.0", f"stored as message {id}") for r in recipients]
