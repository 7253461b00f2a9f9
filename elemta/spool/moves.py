"""What happens to a spooled message after the commit: rewrite, move, remove.

These run on the event loop and only rename, write and unlink: they survive a
killed process without fsync. After a power loss an older envelope may come
back, which can repeat a delivery but never lose a message, because an
envelope is only ever removed after everything it promised is done.
"""

from __future__ import annotations

import os
import uuid
from typing import TYPE_CHECKING

from .envelope import STATES, Envelope

if TYPE_CHECKING:
    from .incoming import IncomingMessage


class StateConflict(Exception):
    """The message is in a state the operation does not apply to; ``str()`` says why."""


class SpoolMoves:
    """Mixed into :class:`~elemta.spool.store.Spool`."""

    root: os.PathLike[str]
    _root_s: str   # the root as a string: paths here are built per message
    _counts: dict[str, int] | None

    def _envelope_path(self, state: str, queue_id: str) -> str:
        if state not in STATES:
            raise ValueError(f"unknown spool state {state!r} (one of {', '.join(STATES)})")
        return f"{self._root_s}/{state}/{queue_id}.json"

    def _count(self, state: str, delta: int) -> None:
        if self._counts is not None:
            self._counts[state] = self._counts.get(state, 0) + delta

    def rewrite(self, envelope: Envelope, from_state: str, to_state: str) -> None:
        """Store ``envelope`` (changed recipients, attempts…) in ``to_state``.

        The old envelope is first moved, then replaced atomically: at every
        moment exactly one envelope of the message exists.
        """
        src = self._envelope_path(from_state, envelope.id)
        dst = self._envelope_path(to_state, envelope.id)
        if src != dst:
            os.rename(src, dst)
            self._count(from_state, -1)
            self._count(to_state, +1)
        tmp = f"{self._root_s}/tmp/{envelope.id}.{uuid.uuid4().hex[:8]}.envelope"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, envelope.to_json())
        finally:
            os.close(fd)
        os.rename(tmp, dst)

    def move(self, queue_id: str, from_state: str, to_state: str) -> None:
        """Move a message between states without changing its envelope."""
        os.rename(self._envelope_path(from_state, queue_id),
                  self._envelope_path(to_state, queue_id))
        self._count(from_state, -1)
        self._count(to_state, +1)

    def remove(self, queue_id: str, state: str) -> None:
        """Delete a message: envelope first (it is the commit marker), then content."""
        os.unlink(self._envelope_path(state, queue_id))
        self._count(state, -1)
        try:
            os.unlink(f"{self._root_s}/messages/{queue_id}")
        except FileNotFoundError:
            pass

    async def commit_bytes(self, envelope: Envelope, content: bytes, *,
                           state: str = "ready") -> None:
        """Commit a message the server made itself (a bounce) like a received one."""
        incoming: IncomingMessage = self.incoming(envelope.id)  # type: ignore[attr-defined]
        try:
            incoming.write(content)
        except BaseException:
            incoming.discard()
            raise
        await self.commit(incoming, envelope, state=state)  # type: ignore[attr-defined]

    # ------------------------------------------------------------- administration
    #
    # What ``elemta queue`` does to one message. The caller makes sure nobody
    # else acts on the message meanwhile: the running server claims it from its
    # delivery runner, the command line holds the spool lock.

    def _load(self, queue_id: str) -> tuple[str, Envelope]:
        return self.load(queue_id)  # type: ignore[attr-defined]

    def hold(self, queue_id: str, reason: str) -> bool:
        """Keep a queued message from delivery; ``False`` if it was held already.

        Raises ``KeyError`` for an unknown message, :class:`StateConflict` for
        one in ``failed/``.
        """
        state, env = self._load(queue_id)
        if state == "hold":
            return False
        if state not in ("ready", "deferred"):
            raise StateConflict(f"in {state}/, not queued for delivery")
        env.hold_reason = reason
        self.rewrite(env, state, "hold")
        return True

    def release(self, queue_id: str) -> None:
        """Put a held message back in ``ready/``, to be delivered now."""
        state, env = self._load(queue_id)
        if state != "hold":
            raise StateConflict(f"not held (in {state}/)")
        env.hold_reason = None
        env.next_attempt_at = None
        self.rewrite(env, "hold", "ready")

    def make_due(self, queue_id: str, now: float) -> str:
        """Make a queued message due at ``now``; its state.

        For a spool no server runs on: the runner rebuilds its schedule from
        ``next_attempt_at`` when it starts.
        """
        state, env = self._load(queue_id)
        if state == "hold":
            raise StateConflict("held: release it instead")
        if state == "failed":
            raise StateConflict("in failed/, cannot be delivered")
        if state == "deferred" and (env.next_attempt_at is None or env.next_attempt_at > now):
            env.next_attempt_at = now
            self.rewrite(env, state, state)
        return state

    def delete(self, queue_id: str) -> str:
        """Remove a message, whatever its state, without telling anyone; its state."""
        state, _ = self._load(queue_id)
        self.remove(queue_id, state)
        return state
