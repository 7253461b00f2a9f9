"""What ``elemta queue`` does to one message: hold, release, make due, delete.

The caller makes sure nobody else acts on the message meanwhile: the running
server claims it from its delivery runner first, the command line holds the
spool lock. Every change is one of the spool's own state changes (an atomic
rename or rewrite of the envelope).
"""

from __future__ import annotations

from .store import Spool


class StateConflict(Exception):
    """The message is in a state the operation does not apply to; ``str()`` says why."""


class QueueAdmin:
    """Administration of the messages of one spool."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool

    def hold(self, queue_id: str, reason: str) -> bool:
        """Keep a queued message from delivery; ``False`` if it was held already.

        Raises ``KeyError`` for an unknown message, :class:`StateConflict` for
        one in ``failed/``.
        """
        state, env = self.spool.load(queue_id)
        if state == "hold":
            return False
        if state not in ("ready", "deferred"):
            raise StateConflict(f"in {state}/, not queued for delivery")
        env.hold_reason = reason
        self.spool.rewrite(env, state, "hold")
        return True

    def release(self, queue_id: str) -> None:
        """Put a held message back in ``ready/``, to be delivered now."""
        state, env = self.spool.load(queue_id)
        if state != "hold":
            raise StateConflict(f"not held (in {state}/)")
        env.hold_reason = None
        env.next_attempt_at = None
        self.spool.rewrite(env, "hold", "ready")

    def make_due(self, queue_id: str, now: float) -> str:
        """Make a queued message due at ``now``; its state.

        For a spool no server runs on: the runner rebuilds its schedule from
        ``next_attempt_at`` when it starts.
        """
        state, env = self.spool.load(queue_id)
        self.check_deliverable(state)
        if state == "deferred" and (env.next_attempt_at is None or env.next_attempt_at > now):
            env.next_attempt_at = now
            self.spool.rewrite(env, state, state)
        return state

    @staticmethod
    def check_deliverable(state: str) -> None:
        """Raise :class:`StateConflict` for a message that ``retry`` cannot deliver."""
        if state == "hold":
            raise StateConflict("held: release it instead")
        if state == "failed":
            raise StateConflict("in failed/, cannot be delivered")

    def delete(self, queue_id: str) -> str:
        """Remove a message, whatever its state, without telling anyone; its state."""
        state, _ = self.spool.load(queue_id)
        self.spool.remove(queue_id, state)
        return state
