"""elemta-maildir: deliver local mail into Dovecot-compatible Maildir++ mailboxes.

Enabled as ``maildir``; the core makes one :class:`MaildirPlugin` per server.
It answers ``deliver`` for routes whose transport is ``[plugins.maildir]
transport`` (``"local"``, the built-in route for local domains) and leaves
every other route to other transports. The rules live in
:mod:`elemta_maildir.delivery`; this module only holds the hooks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from elemta import Outcome, Route, hookimpl
from elemta.spool.envelope import Envelope, RecipientState

from .delivery import Maildirs, stat_size
from .settings import MaildirSettings

if TYPE_CHECKING:
    from elemta.app import App

__all__ = ["MaildirPlugin", "MaildirSettings"]
__version__ = "0.1.0"

log = logging.getLogger("elemta.maildir")


class MaildirPlugin:
    """The ``maildir`` plugin: ``register_config``, ``startup`` and ``deliver``."""

    def __init__(self) -> None:
        self.settings = MaildirSettings()
        self.maildirs: Maildirs | None = None

    @hookimpl
    def register_config(self) -> Mapping[str, type[MaildirSettings]]:
        return {"maildir": MaildirSettings}

    @hookimpl
    def startup(self, app: App) -> None:
        """Read ``[plugins.maildir]``; relative paths are relative to the config file."""
        self.settings = app.plugin_settings("maildir")
        self.maildirs = Maildirs(self.settings, app.settings.resolve,
                                 app.settings.server.hostname)
        log.info("maildir: delivering transport %r to %s (mailboxes under %s)",
                 self.settings.transport, self.settings.path, self.maildirs.layout.base)

    @hookimpl
    async def deliver(self, envelope: Envelope, route: Route, recipients: list[RecipientState],
                      content_path: str) -> list[Outcome] | None:
        """One outcome per recipient for this plugin's transport; ``None`` for other routes.

        Recipients are delivered concurrently, each in a worker thread.
        """
        if route.transport != self.settings.transport:
            return None
        maildirs = self.maildirs
        if maildirs is None:
            return [Outcome(r.address, 451, "4.3.0", "the maildir plugin has not started")
                    for r in recipients]
        try:
            size = await asyncio.to_thread(stat_size, content_path)
        except OSError as e:
            log.warning("%s: cannot read the spooled message %s: %s", envelope.id,
                        content_path, e.strerror or e)
            return [Outcome(r.address, 451, "4.3.0", "the spooled message cannot be read")
                    for r in recipients]
        return list(await asyncio.gather(*(
            self._one(maildirs, envelope, r, content_path, size) for r in recipients)))

    async def _one(self, maildirs: Maildirs, envelope: Envelope, recipient: RecipientState,
                   content_path: str, size: int) -> Outcome:
        try:
            return await asyncio.to_thread(maildirs.deliver, envelope, recipient, content_path,
                                           size)
        except Exception:
            # a bug, not a mailbox problem: keep the message and say where it broke
            log.exception("%s: maildir delivery to <%s> failed unexpectedly", envelope.id,
                          recipient.address)
            return Outcome(recipient.address, 451, "4.3.0", "local delivery failed; see the "
                           "server log")
