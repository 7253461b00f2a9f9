"""elemta-lmtp: deliver local mail to an LMTP server (RFC 2033) such as Dovecot.

Only the hook implementations live here; :mod:`elemta_lmtp.transport` does the
delivering and :mod:`elemta_lmtp.settings` holds the ``[plugins.lmtp]`` schema.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from elemta import Envelope, Outcome, RecipientState, Route, hookimpl

from .settings import LMTPAddress, LMTPSettings, parse_address
from .transport import LMTPTransport

if TYPE_CHECKING:
    import pydantic

    from elemta import App

__all__ = ["LMTPAddress", "LMTPPlugin", "LMTPSettings", "LMTPTransport", "parse_address"]


class LMTPPlugin:
    """The ``lmtp`` plugin: one instance per server (a class entry point)."""

    def __init__(self) -> None:
        self.transport: LMTPTransport | None = None

    @hookimpl
    def register_config(self) -> dict[str, type[pydantic.BaseModel]]:
        return {"lmtp": LMTPSettings}

    @hookimpl
    def startup(self, app: App) -> None:
        """Read ``[plugins.lmtp]``; a relative socket path is relative to the config file."""
        settings: LMTPSettings = app.plugin_settings("lmtp")
        target = settings.target
        if target.path is not None:
            target = LMTPAddress(path=str(app.settings.resolve(Path(target.path))))
        hostname = app.settings.server.hostname
        self.transport = LMTPTransport(settings, target, settings.lhlo_name or hostname,
                                       hostname)

    @hookimpl
    async def deliver(self, envelope: Envelope, route: Route, recipients: list[RecipientState],
                      content_path: str) -> list[Outcome] | None:
        """Deliver the routes of ``[plugins.lmtp] transport``; ``None`` for every other route."""
        transport = self.transport
        if transport is None or route.transport != transport.settings.transport:
            return None
        return await transport.deliver(envelope, [r.address for r in recipients], content_path)

    @hookimpl
    async def shutdown(self) -> None:
        """Close the idle LMTP sessions."""
        if self.transport is not None:
            await self.transport.close()
