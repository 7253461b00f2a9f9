"""The ``maildir`` plugin's hooks (exported as ``elemta_maildir.MaildirPlugin``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from elemta import (Envelope, HelperGone, Outcome, Recipient, RecipientState, Reject, Route,
                    hookimpl)

from .delivery import Maildirs
from .layout import UnsafeAddress
from .process import DeliveryProcess
from .settings import MaildirSettings
from .workers import Workers

if TYPE_CHECKING:
    from elemta import App

log = logging.getLogger("elemta.maildir")


class MaildirPlugin:
    """The ``maildir`` plugin: ``register_config``, ``register_metrics``, ``startup``,
    ``rcpt``, ``deliver`` and ``shutdown``."""

    def __init__(self) -> None:
        self.settings = MaildirSettings()
        self.maildirs: Maildirs | None = None
        self.local_domains: frozenset[str] = frozenset()
        self.workers: Workers | None = None
        self.process: DeliveryProcess | None = None
        self._helper_failures: Any = None

    @hookimpl
    def register_config(self) -> Mapping[str, type[MaildirSettings]]:
        return {"maildir": MaildirSettings}

    @hookimpl
    def register_metrics(self, registry: Any) -> None:
        from prometheus_client import Counter

        self._helper_failures = Counter(
            "smtp_maildir_helper_failures", "Times the maildir delivery process exited while "
            "the server ran, or could not be started (deliveries then run in threads), by "
            "what happened (exited, not_started).", ["what"], registry=registry)

    def _helper_failed(self, what: str) -> None:
        if self._helper_failures is not None:
            self._helper_failures.labels(what=what).inc()

    @hookimpl
    def startup(self, app: App) -> None:
        """Read ``[plugins.maildir]``; relative paths are relative to the config file."""
        self.settings = app.plugin_settings("maildir")
        self.maildirs = Maildirs(self.settings, app.settings.resolve,
                                 app.settings.server.hostname)
        self.local_domains = app.settings.local_domains
        # one thread per delivery the runner may have in flight
        self.workers = Workers(app.settings.delivery.workers)
        if self.settings.helper_process:
            # the helper has no config file to resolve the path against
            absolute = self.settings.model_copy(
                update={"path": str(app.settings.resolve(Path(self.settings.path)))})
            self.process = DeliveryProcess(absolute, app.settings.server.hostname,
                                           on_failure=self._helper_failed)
            self.process.running()  # started now, so that it is ready for the first delivery
        log.info("maildir: delivering transport %r to %s (mailboxes under %s)",
                 self.settings.transport, self.settings.path, self.maildirs.layout.base)

    @hookimpl(tryfirst=True)
    def rcpt(self, recipient: Recipient) -> Reject | None:
        """Refuse, at RCPT, a local recipient this plugin could never store.

        Accepted, it could only bounce later, to a sender who may be forged:
        backscatter. Two cases: a name no mailbox can have (``/``, ``..``,
        control characters: ``550 5.1.3``), and, with ``create_mailboxes =
        false``, a mailbox that does not exist (``550 5.1.1``): then the
        mailboxes on disk are the list of users. ``tryfirst``: before any
        plugin that accepts the recipient. Otherwise ``None``: who exists is
        for other plugins (elemta-datasource) to say.
        """
        maildirs = self.maildirs
        if maildirs is None:
            return None
        for address in recipient.deliver_to or (recipient.address,):
            if address.rpartition("@")[2].lower().rstrip(".") not in self.local_domains:
                continue
            try:
                box = maildirs.layout.mailbox(address)
            except UnsafeAddress:
                return Reject(550, "5.1.3", f"<{address}>: no mailbox can have this name")
            # a few stat calls on a local disk: cheaper than a hop to a thread
            if not self.settings.create_mailboxes and not maildirs.exists(box):
                log.info("maildir: <%s> refused at RCPT: no maildir at %s and "
                         "create_mailboxes is off", address, box.root)
                return Reject(550, "5.1.1", f"<{address}>: no such mailbox here")
        return None

    @hookimpl
    async def deliver(self, envelope: Envelope, route: Route, recipients: list[RecipientState],
                      content_path: str) -> list[Outcome] | None:
        """One outcome per recipient for this plugin's transport; ``None`` for other routes.

        The recipients are delivered in the helper process, in a batch with
        the other deliveries in flight; without a helper (or for a request too
        large for it), one after the other in one of the plugin's threads (as
        many as ``[delivery] workers``, the runner's concurrent attempts).
        """
        if route.transport != self.settings.transport:
            return None
        maildirs = self.maildirs
        workers = self.workers
        if maildirs is None or workers is None or workers.closed:
            return [Outcome(r.address, 451, "4.3.0", "the maildir plugin is not running")
                    for r in recipients]
        process = self.process
        if process is not None and process.running():
            try:
                outcomes = await process.deliver_all(envelope, recipients, content_path)
            except HelperGone as e:
                return [Outcome(r.address, 451, "4.3.0", f"local delivery was interrupted: {e}")
                        for r in recipients]
            if outcomes is not None:
                return outcomes
            # too many recipients for one request to the helper: delivered in a thread
        # One hop to a thread of the plugin's own for the whole group: each hop
        # costs a hand-over of the GIL, which on a busy server is most of a
        # small message's delivery time.
        return await workers.run(maildirs.deliver_all, envelope, recipients, content_path)

    @hookimpl
    async def shutdown(self, app: App) -> None:
        """Stop the delivery process and threads once they finish what they are writing."""
        if self.process is not None:
            await self.process.stop()
        if self.workers is not None:
            self.workers.close()
