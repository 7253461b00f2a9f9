"""Queue administration on a running server: ``elemta queue hold|release|retry|delete|bounce``.

The commands arrive through the control socket (``elemta/control.py``) and run
on the event loop, through the delivery runner: each message is claimed from
the workers first (a message in delivery is waited for), changed with the
spool's own operations (:class:`~elemta.spool.admin.QueueAdmin`), then given
back, scheduled as its envelope now says. So a command never races a delivery.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..models import Outcome
from ..spool.admin import QueueAdmin, StateConflict
from ..spool.envelope import FAILED
from .runner import Runner

log = logging.getLogger("elemta.delivery")

# How long a command waits for a delivery attempt in progress to end.
ADMIN_WAIT_SECONDS = 30.0
HELD_BY_ADMIN = "held by administrator"
RETURNED_BY_ADMIN = "returned by the administrator"


@dataclass
class AdminResult:
    """What a queue command did, message by message."""

    done: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # queue id → why not
    busy: list[str] = field(default_factory=list)  # still in delivery after the wait
    message: str = ""

    @property
    def ok(self) -> bool:
        return not (self.missing or self.skipped or self.busy)

    @contextlib.contextmanager
    def recording(self, queue_id: str) -> Iterator[None]:
        """Count one message as done, missing or skipped, by how the block ends."""
        try:
            yield
        except KeyError:
            self.missing.append(queue_id)
        except StateConflict as e:
            self.skipped[queue_id] = str(e)
        except ValueError as e:  # an envelope that cannot be parsed
            self.skipped[queue_id] = f"unreadable envelope: {e}"
        except OSError as e:
            self.skipped[queue_id] = f"{e.strerror or e}"
        else:
            self.done.append(queue_id)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "done": self.done, "missing": self.missing,
                "skipped": self.skipped, "busy": self.busy, "message": self.message}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdminResult:
        return cls(done=list(d.get("done", ())), missing=list(d.get("missing", ())),
                   skipped=dict(d.get("skipped", {})), busy=list(d.get("busy", ())),
                   message=str(d.get("message", "")))


class RunningAdmin:
    """The queue commands of a running server, carried out through its runner."""

    def __init__(self, runner: Runner, *, wait: float = ADMIN_WAIT_SECONDS) -> None:
        self.runner = runner
        self.spool = runner.spool
        self.queue = QueueAdmin(runner.spool)
        self.wait = wait

    async def _each_claimed(self, queue_ids: list[str],
                            change: Callable[[str], Awaitable[None] | None]) -> AdminResult:
        """Claim the messages from the workers, ``change`` each, give them back."""
        result = AdminResult()
        claimed, result.busy = await self.runner.claim(queue_ids, self.wait)
        try:
            for queue_id in claimed:
                with result.recording(queue_id):
                    done = change(queue_id)
                    if done is not None:
                        await done
        finally:
            self.runner.unclaim(claimed)  # schedules what is now ready or deferred
        return result

    async def hold(self, queue_ids: list[str], reason: str = HELD_BY_ADMIN) -> AdminResult:
        """Keep messages from delivery until they are released."""
        def hold(queue_id: str) -> None:
            if self.queue.hold(queue_id, reason):
                self.runner.metrics.queue_size.moved(queue_id, "hold")
                log.info("%s: held by the administrator", queue_id)
        return await self._each_claimed(queue_ids, hold)

    async def release(self, queue_ids: list[str]) -> AdminResult:
        """Put held messages back in the queue, due now."""
        def release(queue_id: str) -> None:
            self.queue.release(queue_id)
            self.runner.metrics.queue_size.moved(queue_id, "ready")
            log.info("%s: released by the administrator", queue_id)
        return await self._each_claimed(queue_ids, release)

    async def retry(self, queue_ids: list[str] | None = None) -> AdminResult:
        """Deliver now: the given messages, or every deferred one."""
        result = AdminResult()
        now = time.time()
        runner = self.runner
        if queue_ids is None:
            # The names are enough: whatever is in deferred/ and not in
            # delivery right now is in the schedule.
            for queue_id in self.spool.ids_in("deferred"):
                if not runner.in_delivery(queue_id):
                    runner.schedule(queue_id, now)
                result.done.append(queue_id)
            return result
        for queue_id in dict.fromkeys(queue_ids):
            with result.recording(queue_id):
                state, _ = self.spool.load(queue_id)
                self.queue.check_deliverable(state)
                # In delivery right now, or not yet handed to the runner (its
                # checkpoint schedules it): due already either way.
                if not runner.in_delivery(queue_id) and not self.spool.awaiting_checkpoint(
                        queue_id):
                    runner.schedule(queue_id, now)
        return result

    async def delete(self, queue_ids: list[str]) -> AdminResult:
        """Remove messages without delivering them or telling anyone."""
        def delete(queue_id: str) -> None:
            state = self.queue.delete(queue_id)
            self.runner.metrics.queue_size.remove(queue_id)
            log.info("%s: deleted by the administrator (was in %s/)", queue_id, state)
        return await self._each_claimed(queue_ids, delete)

    async def bounce(self, queue_ids: list[str]) -> AdminResult:
        """Fail every pending recipient, tell the sender with a DSN, remove the message."""
        return await self._each_claimed(queue_ids, self._return)

    async def _return(self, queue_id: str) -> None:
        state, env = self.spool.load(queue_id)
        now = time.time()
        failed = [(rcpt, Outcome(rcpt.address, 550, "5.0.0", RETURNED_BY_ADMIN))
                  for rcpt in env.pending()]
        if failed:
            env.last_error = failed[0][1].reply()
            try:
                await self.runner.bounce(env, failed, now)
            except OSError as e:
                raise StateConflict(f"cannot queue the delivery status notification: {e}"
                                    ) from None
            for rcpt, outcome in failed:
                rcpt.state = FAILED
                rcpt.last_error = outcome.reply()
                rcpt.updated_at = now
        self.spool.remove(queue_id, state)
        log.info("%s: returned to <%s> by the administrator for %d recipient(s)", queue_id,
                 env.sender, len(failed))
        for rcpt, outcome in failed:
            await self.runner.hooks.call("bounced", envelope=env, recipient=rcpt, outcome=outcome)

    def stats(self) -> dict[str, Any]:
        return self.runner.stats()
