"""elemta-milter: filters behind the Sendmail/Postfix milter protocol, from Elemta.

Enabled as ``milter`` (``[plugins] enabled = ["milter"]``); Elemta makes one
:class:`MilterPlugin` per server. This module only holds the hooks: the protocol
codec is :mod:`elemta_milter.protocol`, one connection :mod:`elemta_milter.client`
(kept between sessions by :mod:`elemta_milter.pool`), the per-session state machine
over every milter :mod:`elemta_milter.session`, what answers mean
:mod:`elemta_milter.replies`, the end of a message and its modifications
:mod:`elemta_milter.edits`, the macros :mod:`elemta_milter.macros`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import ipaddress
import logging
from collections.abc import Mapping
from typing import Any

from elemta import (App, Message, Recipient, Session, StashKey, Transaction, Verdict,
                    hookimpl)

from .macros import AUTH_TYPE, Facts
from .metrics import Metrics
from .pool import Pool
from .session import Link, MilterSession
from .settings import MilterPluginSettings, MilterSettings

__all__ = ["MilterPlugin", "MilterPluginSettings", "MilterSettings"]
__version__ = "0.1.0"

log = logging.getLogger("elemta.milter")

SESSION = StashKey[MilterSession]()


class MilterPlugin:
    """The ``milter`` plugin: one client per configured milter, for every SMTP session."""

    def __init__(self) -> None:
        self.settings = MilterPluginSettings()
        self.metrics = Metrics()
        self.pools: list[Pool] = []
        self.app: App | None = None
        self.hostname = "localhost"
        self.local_domains: frozenset[str] = frozenset()
        self.version = "Elemta"

    @hookimpl
    def register_config(self) -> Mapping[str, type[MilterPluginSettings]]:
        return {"milter": MilterPluginSettings}

    @hookimpl
    def register_metrics(self, registry: Any) -> None:
        self.metrics.register(registry)

    @hookimpl
    def startup(self, app: App) -> None:
        self.app = app
        self.settings = app.plugin_settings("milter")
        self.pools = [Pool(m, self.metrics) for m in self.settings.milters]
        self.hostname = app.settings.server.hostname
        self.local_domains = frozenset(d.lower().rstrip(".") for d in app.settings.local_domains)
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            self.version = f"Elemta {importlib.metadata.version('elemta')}"
        if not self.settings.milters:
            log.warning("milter: enabled, but [plugins.milter] lists no milters: "
                        "add [[plugins.milter.milters]] entries with name and address")
        plugins = app.settings.plugins
        budget = plugins.timeouts.get("milter", plugins.timeout_seconds)
        for m in self.settings.milters:
            log.info("milter: %s at %s (on failure: %s)", m.name, m.address, m.on_failure)
            worst = m.end_timeout_seconds + m.command_timeout_seconds
            if worst > budget:
                log.warning(
                    "milter %s: end_timeout_seconds + command_timeout_seconds (%gs) is longer "
                    "than the plugin's timeout (%gs): a slow milter is then cut off with "
                    "451 4.3.0 whatever on_failure says; raise [plugins] timeouts = "
                    "{ milter = %g } or lower the milter's timeouts", m.name, worst, budget,
                    worst + 5)

    @hookimpl
    async def shutdown(self, app: App) -> None:
        for pool in self.pools:
            await pool.close()

    # ------------------------------------------------------------ AUTH, for {auth_type}

    @hookimpl
    def auth_mechanisms(self) -> list[str]:
        """None: the two hooks below only note the mechanism; they check no password."""
        return []

    @hookimpl(tryfirst=True)
    def auth(self, session: Session, mechanism: str) -> None:
        session.stash[AUTH_TYPE] = mechanism

    @hookimpl(tryfirst=True)
    def scram_keys(self, session: Session, mechanism: str) -> None:
        session.stash[AUTH_TYPE] = mechanism

    # ------------------------------------------------------------ SMTP stages

    @hookimpl
    async def connect(self, session: Session) -> Verdict | None:
        if not self.pools:
            return None
        facts = Facts(self.hostname, self.version, self.local_domains)
        if self.settings.client_name_lookup:
            facts.client_name, facts.client_ptr = await self._client_name(session.peer_ip)
        ms = MilterSession([Link(pool.settings, pool) for pool in self.pools], facts,
                           self.metrics)
        session.stash[SESSION] = ms
        return await ms.connect(session)

    @hookimpl
    async def helo(self, session: Session, hostname: str) -> Verdict | None:
        ms = session.stash.get(SESSION, None)
        return None if ms is None else await ms.helo(session, hostname)

    @hookimpl
    async def mail(self, session: Session, tx: Transaction, sender: str,
                   params: dict[str, str | None]) -> Verdict | None:
        ms = session.stash.get(SESSION, None)
        return None if ms is None else await ms.mail(session, tx, sender, params)

    @hookimpl
    async def rcpt_ok(self, session: Session, tx: Transaction,
                      recipient: Recipient) -> Verdict | None:
        ms = session.stash.get(SESSION, None)
        return None if ms is None else await ms.rcpt(session, tx, recipient)

    @hookimpl
    async def data(self, session: Session, tx: Transaction, message: Message) -> Verdict | None:
        ms = session.stash.get(SESSION, None)
        return None if ms is None else await ms.data(session, tx, message)

    @hookimpl
    async def disconnect(self, session: Session) -> None:
        ms = session.stash.get(SESSION, None)
        if ms is not None:
            del session.stash[SESSION]
            await ms.close()

    # ------------------------------------------------------------ helpers

    async def _client_name(self, ip: str) -> tuple[str, str | None]:
        """The client's verified host name (PTR confirmed by A/AAAA) and its PTR name."""
        if self.app is None or not ip:
            return "unknown", None
        try:
            ipaddress.ip_address(ip)
            async with asyncio.timeout(10):
                names = await self.app.resolver.ptr(ip)
                for name in names[:3]:
                    if ip in await self.app.resolver.addresses(name):
                        return name.rstrip("."), name.rstrip(".")
                return "unknown", names[0].rstrip(".") if names else None
        except Exception as e:  # DNS failures, timeouts: the name stays unknown
            log.debug("milter: no host name for %s: %s", ip, e)
            return "unknown", None
