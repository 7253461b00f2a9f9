"""Built-in: ``smtp_queue_size{domain,status}`` kept up to date from the message events.

A message enters the count when it is queued (``queued``; before any other
plugin's ``queued``, so that no delivery can come first) and is set again after
each delivery attempt (``delivered``, ``deferred``, ``bounced``) from what is
still pending. The server counts the spool once at start-up, after recovery,
and adds messages it queues itself (bounces, notices) when they become durable;
queue commands (hold, release, delete) set theirs directly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .hookspecs import hookimpl

if TYPE_CHECKING:
    from .app import App
    from .config import Settings
    from .metrics import QueueSize


class QueueEvents:
    """One server's queue gauge, fed by the hooks."""

    def __init__(self) -> None:
        self.queue: QueueSize | None = None

    @hookimpl
    def startup(self, app: App) -> None:
        self.queue = app.metrics.queue_size

    @hookimpl(tryfirst=True)
    def queued(self, envelope: Any) -> None:
        if self.queue is not None:
            self.queue.set(envelope.id, "hold" if envelope.hold_reason else "ready",
                           (r.address for r in envelope.pending()))

    @hookimpl
    def delivered(self, envelope: Any) -> None:
        if self.queue is not None:
            self.queue.update(envelope)

    @hookimpl
    def deferred(self, envelope: Any) -> None:
        if self.queue is not None:
            self.queue.update(envelope)

    @hookimpl
    def bounced(self, envelope: Any) -> None:
        if self.queue is not None:
            self.queue.update(envelope)


def make_plugin(settings: Settings) -> QueueEvents:
    return QueueEvents()
