"""Mailbox writes in a helper process, whose interpreter lock is not the event loop's.

A Maildir delivery makes about fifteen system calls and waits for two
syncs. In threads of the server, each call gives the interpreter lock away
and takes it back, and the event loop, which feeds the deliveries, waits
for it: with twenty deliveries in flight the loop thread spent 28% of its
time waiting for the lock, and the delivery threads half of theirs idle,
waiting for the loop. Here the deliveries run in a helper process
(:class:`elemta.HelperProcess`; its side is :mod:`elemta_maildir.helper`)
that builds its own :class:`~elemta_maildir.delivery.Maildirs` from the same
settings, and writes every request that arrived meanwhile as one batch: two
syncs for the batch (:meth:`Maildirs.deliver_many`). The event loop only
sends one request per delivery, ``(envelope, recipients)`` with the
message's content as an open descriptor, and reads the outcomes back.

Requests made while the helper starts wait for it (its first batch takes
them all). A helper that cannot be started, or that exits, is replaced by
the plugin's threads until a new one runs (see :class:`elemta.HelperProcess`
for when). The deliveries it had in flight get ``451 4.3.0`` and are
retried; one that reached the mailbox is then found there (the maildir name
is the same for every attempt), not written twice. At the end of its input
(the server stops, or is killed) the helper finishes the batch it has and
exits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from elemta import Envelope, HelperProcess, Outcome, RecipientState

if TYPE_CHECKING:
    from .settings import MaildirSettings

log = logging.getLogger("elemta.maildir")


class DeliveryProcess(HelperProcess):
    """The server's side of the maildir helper."""

    def __init__(self, settings: MaildirSettings, hostname: str,
                 on_failure: Callable[[str], None] | None = None) -> None:
        # plain values: the helper does not import pydantic (50 ms of its start)
        super().__init__("elemta_maildir.helper:child_main", (settings.model_dump(), hostname),
                         name="maildir delivery process", logger=log, on_failure=on_failure,
                         meanwhile="deliveries run in threads of the server")

    async def deliver_all(self, envelope: Envelope, recipients: list[RecipientState],
                          content_path: str) -> list[Outcome] | None:
        """The outcomes of :meth:`Maildirs.deliver_all`, run in the helper; ``None`` when
        the request is too large for the helper's channel (deliver it elsewhere).

        :raises elemta.HelperGone: the helper exited before it answered.
        """
        # only what a mailbox delivery reads: the envelope's trace and TLS details stay here
        slim = Envelope(envelope.id, envelope.sender, [], envelope.received_at, envelope.size,
                        attempts=envelope.attempts)
        rcpts = [RecipientState(r.address, attempts=r.attempts, original=r.original)
                 for r in recipients]
        try:
            return await self.request((slim, rcpts), content_path)
        except OSError as e:
            log.warning("%s: cannot read the spooled message %s: %s", envelope.id,
                        content_path, e.strerror or e)
            return [Outcome(r.address, 451, "4.3.0", "the spooled message cannot be read")
                    for r in recipients]
