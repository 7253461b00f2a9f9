"""elemta-webhook: a delivery transport that POSTs each message to a web service.

Enabled as ``webhook``; the core makes one :class:`WebhookPlugin` per server.
``route`` sends the recipients a ``[[plugins.webhook.targets]]`` entry takes to
the transport ``webhook`` (the route's destination is the target's name), and
``deliver`` answers for that transport: one signed POST per message and
target. The request is built in :mod:`elemta_webhook.payload`, sent by
:mod:`elemta_webhook.client`, and its answer becomes the recipients' outcomes
in :mod:`elemta_webhook.delivery`; this module only holds the hooks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from elemta import (Envelope, Outcome, RecipientState, Route, StartupError, existing_ca_file,
                    hookimpl, plain_http_host)

from .client import TargetClient
from .delivery import PARSERS, Metrics, post_message
from .settings import TargetSettings, WebhookSettings

if TYPE_CHECKING:
    from elemta import App

__all__ = ["WebhookPlugin", "WebhookSettings", "TargetSettings"]
__version__ = "0.1.0"

log = logging.getLogger("elemta.webhook")


class WebhookPlugin:
    """The ``webhook`` plugin: ``register_config``, ``register_metrics``, ``startup``,
    ``shutdown``, ``route`` and ``deliver``."""

    def __init__(self) -> None:
        self.settings = WebhookSettings()
        self.local_domains: frozenset[str] = frozenset()
        self._clients: dict[str, TargetClient] = {}
        self._metrics = Metrics()
        self._parsers = asyncio.Semaphore(PARSERS)

    @hookimpl
    def register_config(self) -> Mapping[str, type[WebhookSettings]]:
        return {"webhook": WebhookSettings}

    @hookimpl
    def register_metrics(self, registry: Any) -> None:
        self._metrics.register(registry)

    @hookimpl
    async def startup(self, app: App) -> None:
        self.settings = app.plugin_settings("webhook")
        self.local_domains = app.settings.local_domains
        agent = f"elemta-webhook/{__version__}"
        clients: dict[str, TargetClient] = {}
        try:
            for target in self.settings.targets:
                try:
                    ca_file = existing_ca_file(
                        target.ca_file and app.settings.resolve(target.ca_file), "the receiver")
                    clients[target.name] = TargetClient(target, ca_file, agent)
                except ValueError as e:
                    raise StartupError(f"[plugins.webhook] target {target.name}: {e}") from None
                self._warn(target)
        except BaseException:
            for client in clients.values():
                await client.close()
            raise
        self._clients = clients
        if clients:
            log.info("webhook: %s", "; ".join(
                f"{t.name} ({', '.join(t.domains + t.recipients) or 'every local domain'}) "
                f"-> {clients[t.name].origin} as {t.format}" for t in self.settings.targets))

    def _warn(self, target: TargetSettings) -> None:
        foreign = [d for d in target.domains if d not in self.local_domains]
        if foreign:
            log.warning("webhook: target %s takes %s, which %s no local domain: mail for it "
                        "from the internet is refused at RCPT (relay denied); add "
                        "[domains.\"%s\"] to receive it", target.name, ", ".join(foreign),
                        "is" if len(foreign) == 1 else "are", foreign[0])
        host = plain_http_host(target.url)
        if host is not None:
            log.warning("webhook: target %s sends messages over plain HTTP to %s; use "
                        "https:// beyond this machine", target.name, host)

    @hookimpl
    async def shutdown(self, app: App) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.close()

    @hookimpl
    def route(self, recipient: RecipientState) -> Route | None:
        """The webhook route of a recipient a target takes (the first that does, in
        order); ``None`` for the others."""
        target = self.settings.target_for(recipient.address, self.local_domains)
        if target is None:
            return None
        return Route(self.settings.transport, destination=target.name)

    @hookimpl
    async def deliver(self, envelope: Envelope, route: Route, recipients: list[RecipientState],
                      content_path: str) -> list[Outcome] | None:
        """One POST for the group and one outcome per recipient for this plugin's
        transport; ``None`` for other routes."""
        if route.transport != self.settings.transport:
            return None
        client = self._clients.get(route.destination)
        if client is None:
            log.warning("%s: no webhook target is named %r (targets: %s); the recipients "
                        "stay queued: add the target, or fix the route", envelope.id,
                        route.destination, ", ".join(self._clients) or "none")
            return [Outcome(r.address, 451, "4.3.0", f"no webhook target named "
                            f"{route.destination!r}") for r in recipients]
        return await post_message(client, self._metrics, self._parsers, envelope, recipients,
                                  content_path)
