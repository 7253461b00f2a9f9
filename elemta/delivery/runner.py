"""The delivery runner: takes due messages from the spool and delivers them.

The schedule is an in-memory heap rebuilt from the spool at start-up and fed by
the spool: small messages as soon as their commit returns (*resident* ones,
delivered from memory; a retire record in the journal keeps a crash from
resurrecting one the runner delivered), the others once their journal segment
is checkpointed, so that a crash can never resurrect a message the runner
already delivered. Workers take due messages, ask the ``route`` hook
where each pending recipient goes, group the recipients by route and hand
each group to the ``deliver`` hook. The envelope is rewritten after every
attempt, so per-recipient state survives crashes: a recipient delivered once
is never delivered again.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import heapq
import itertools
import logging
import re
import time
from typing import TYPE_CHECKING, Any

from ..hookcall import HookCaller, HookFailure
from ..models import Outcome, Route, new_id
from ..spool.envelope import DELIVERED, FAILED, PENDING, Envelope, RecipientState, params_for
from ..verdicts import Discard
from . import dsn, notices

if TYPE_CHECKING:
    from ..config import DeliverySettings
    from ..metrics import Metrics
    from ..spool.store import Spool

log = logging.getLogger("elemta.delivery")

NO_TRANSPORT = "no transport accepted this route"


class Runner:
    """Delivers what the spool holds; one per server.

    It is given what it works with: the ``[delivery]`` settings, the name it
    reports in bounces, the spool, the hook dispatcher and the metrics.
    """

    def __init__(self, settings: DeliverySettings, *, hostname: str, spool: Spool,
                 hooks: HookCaller, metrics: Metrics) -> None:
        self.settings = settings
        self.spool = spool
        self.hooks = hooks
        self.metrics = metrics
        self.hostname = hostname
        self._heap: list[tuple[float, int, str]] = []
        self._due: dict[str, float] = {}
        self._seq = itertools.count()
        # idle workers, each waiting on a future of its own: a message that comes
        # due wakes one of them, not all (one timer stands for the schedule's head)
        self._idle: collections.deque[asyncio.Future[None]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._busy: set[str] = set()
        self._attempts = {result: metrics.delivery_attempts.labels(result=result)
                          for result in ("delivered", "failed", "deferred")}
        self._workers: list[asyncio.Task[None]] = []
        self._unsubscribe: Any = None
        self._unsubscribe_journaled: Any = None
        self._stopping = False

    # ------------------------------------------------------------- schedule

    def schedule(self, queue_id: str, at: float) -> None:
        """Deliver ``queue_id`` at ``at`` (epoch seconds); an earlier time wins."""
        current = self._due.get(queue_id)
        if current is not None and current <= at:
            return
        self._due[queue_id] = at
        heapq.heappush(self._heap, (at, next(self._seq), queue_id))
        if self._idle:  # busy workers look at the schedule when they are done
            self._poke()

    def _poke(self) -> None:
        """Wake one idle worker if the schedule's head is due, else time the head."""
        if not self._heap:
            return
        at = self._heap[0][0]
        if at <= time.time():
            while self._idle:
                waiter = self._idle.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    return
        elif self._timer is None or at < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = at
            self._timer = asyncio.get_running_loop().call_later(
                max(at - time.time(), 0.001), self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        self._poke()

    def _wake_all(self) -> None:
        for waiter in self._idle:
            if not waiter.done():
                waiter.set_result(None)
        self._idle.clear()

    def unschedule(self, queue_id: str) -> None:
        self._due.pop(queue_id, None)  # its heap entry is skipped when popped

    def _on_journaled(self, queue_ids: list[str]) -> None:
        now = time.time()
        for queue_id in queue_ids:
            self.schedule(queue_id, now)

    def _on_durable(self, entries: list[tuple[str, str]]) -> None:
        now = time.time()
        for queue_id, state in entries:
            if state in ("ready", "deferred"):
                self.schedule(queue_id, now)

    def rebuild(self) -> int:
        """Fill the schedule from the spool (start-up only). ``ready`` is due now, from a
        directory listing; ``deferred`` envelopes are read for their next attempt."""
        n = 0
        now = time.time()
        awaiting = self.spool.awaiting_checkpoint
        for queue_id in self.spool.ids_in("ready"):
            if not awaiting(queue_id):  # still in the journal: scheduled once written out
                self.schedule(queue_id, now)
                n += 1
        for state, env in self.spool.iter_envelopes("deferred"):
            if not awaiting(env.id):
                self.schedule(env.id, env.next_attempt_at or now)
                n += 1
        return n

    async def start(self) -> None:
        n = self.rebuild()
        self._unsubscribe = self.spool.on_durable(self._on_durable)
        self._unsubscribe_journaled = self.spool.on_journaled(self._on_journaled)
        self._workers = [asyncio.create_task(self._worker(i), name=f"delivery-{i}")
                         for i in range(self.settings.workers)]
        log.info("delivery runner started: %d workers, %d messages scheduled",
                 self.settings.workers, n)

    async def stop(self, grace: float = 10.0) -> None:
        self._stopping = True
        self._wake_all()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._unsubscribe_journaled is not None:
            self._unsubscribe_journaled()
        if self._workers:
            done, pending = await asyncio.wait(self._workers, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self._workers = []

    async def _next_due(self) -> str | None:
        while not self._stopping:
            now = time.time()
            while self._heap:
                at, _, queue_id = self._heap[0]
                if self._due.get(queue_id) != at:
                    heapq.heappop(self._heap)  # superseded or unscheduled
                    continue
                if queue_id in self._busy:
                    heapq.heappop(self._heap)
                    self._due.pop(queue_id, None)
                    continue
                if at > now:
                    break
                heapq.heappop(self._heap)
                del self._due[queue_id]
                if self._idle:
                    self._poke()  # the next one, for another worker
                return queue_id
            waiter = asyncio.get_running_loop().create_future()
            self._idle.append(waiter)
            self._poke()  # the head is not due: its timer
            await waiter
        return None

    async def _worker(self, n: int) -> None:
        while True:
            queue_id = await self._next_due()
            if queue_id is None:
                return
            self._busy.add(queue_id)
            try:
                await self.attempt(queue_id)
            except Exception:
                log.exception("%s: delivery attempt failed unexpectedly; retrying later", queue_id)
                self.schedule(queue_id, time.time() + self.settings.retry_intervals_seconds[0])
            finally:
                self._busy.discard(queue_id)

    # ------------------------------------------------------------- one attempt

    async def attempt(self, queue_id: str) -> None:
        try:
            state, env = self.spool.load(queue_id)
        except KeyError:
            return  # deleted meanwhile
        except ValueError as e:
            # unreadable (start-up reads no envelope in ready/: this is where it is checked)
            self.spool.set_aside(queue_id, e)
            self.metrics.queue_size.remove(queue_id)
            return
        if state not in ("ready", "deferred"):
            return  # held or failed: not ours
        pending = env.pending()
        if not pending:
            self.spool.remove(queue_id, state)
            self.metrics.queue_size.remove(queue_id)
            return
        env.attempts += 1
        groups: dict[Route, list[RecipientState]] = {}
        outcomes: dict[str, Outcome] = {}
        for rcpt in pending:
            try:
                route = (await self.hooks.call("route", envelope=env, recipient=rcpt)).value
            except HookFailure as f:
                outcomes[rcpt.address] = Outcome(rcpt.address, 451, "4.3.0",
                                                 f"routing failed in plugin {f.plugin}")
                continue
            if route is None:
                outcomes[rcpt.address] = Outcome(rcpt.address, 451, "4.3.0", "no route")
                continue
            groups.setdefault(route, []).append(rcpt)
        unfinished = len(groups)
        removed = False

        async def deliver_group(route: Route, rcpts: list[RecipientState]) -> None:
            nonlocal unfinished, removed
            group = await self._deliver(env, route, rcpts, content)
            unfinished -= 1
            for outcome in group:
                outcomes[outcome.recipient] = outcome
            done = {o.recipient for o in group if o.delivered}
            if not done:
                return
            # Record the deliveries before this task yields: until then no other
            # task can run, not even one reusing the connection that carried them,
            # so a crash can hardly fall between the remote 250 and this record.
            for rcpt in rcpts:
                if rcpt.address in done:
                    rcpt.state = DELIVERED
            if not unfinished and len(outcomes) == len(pending) and all(
                    o.delivered for o in outcomes.values()):
                self.spool.remove(env.id, state)
                removed = True
            else:
                self.spool.rewrite(env, state, state)

        with self.spool.content(queue_id) as content:
            # read now: a message delivered to everyone leaves the spool within the attempt
            notice_headers = notices.headers_if_wanted(env, pending, content)
            attempts = [deliver_group(route, rcpts) for route, rcpts in groups.items()]
            if len(attempts) == 1:  # most messages: no task and gathering future (9 µs)
                await attempts[0]
            else:
                await asyncio.gather(*attempts)
        await self._apply(state, env, pending, outcomes, removed)
        await notices.send_success(self, env, pending, outcomes, notice_headers)

    async def _deliver(self, env: Envelope, route: Route, rcpts: list[RecipientState],
                       content: str) -> list[Outcome]:
        start = time.perf_counter()
        try:
            answer = (await self.hooks.call("deliver", envelope=env, route=route,
                                            recipients=rcpts, content_path=content)).value
        except HookFailure as f:
            answer = None
            text = f"delivery failed in plugin {f.plugin}"
        else:
            text = NO_TRANSPORT
        metrics = self.metrics
        metrics.observe_delivery(route, rcpts, time.perf_counter() - start)
        if answer is not None:
            text = "the transport gave no outcome for this recipient"
        by_rcpt = {o.recipient: _checked(o) for o in answer or ()}
        return [by_rcpt.get(r.address) or Outcome(r.address, 451, "4.3.0", text) for r in rcpts]

    async def _apply(self, state: str, env: Envelope, pending: list[RecipientState],
                     outcomes: dict[str, Outcome], removed: bool = False) -> None:
        now = time.time()
        failed: list[tuple[RecipientState, Outcome]] = []
        retry: list[tuple[RecipientState, Outcome]] = []
        delays: list[float] = []
        metrics = self.metrics
        for rcpt in pending:
            outcome = outcomes[rcpt.address]
            rcpt.attempts += 1
            rcpt.updated_at = now
            rcpt.last_error = None if outcome.delivered else outcome.reply()
            if outcome.delivered:
                rcpt.state = DELIVERED
                self._attempts["delivered"].inc()
                metrics.messages_sent.labels(domain=_domain(rcpt.address)).inc()
                log.info("%s: delivered to <%s> via %s: %s", env.id, rcpt.address,
                         outcome.remote or "-", outcome.reply())
            elif outcome.permanent:
                rcpt.state = FAILED
                failed.append((rcpt, outcome))
                self._attempts["failed"].inc()
                log.info("%s: failed for <%s> via %s: %s", env.id, rcpt.address,
                         outcome.remote or "-", outcome.reply())
            else:
                retry.append((rcpt, outcome))
                self._attempts["deferred"].inc()
                log.info("%s: deferred for <%s> via %s: %s", env.id, rcpt.address,
                         outcome.remote or "-", outcome.reply())
        deadline = env.received_at + self.settings.bounce_after_seconds
        for rcpt, outcome in retry:
            if now >= deadline:
                rcpt.state = FAILED
                # RFC 3463 X.4.7: reported with the last temporary code, as Postfix does
                expired = Outcome(rcpt.address, outcome.code, "4.4.7",
                                  f"delivery time expired; last error: {outcome.reply()}",
                                  outcome.remote)
                failed.append((rcpt, expired))
                continue
            answers = await self._collect("deferred", envelope=env, recipient=rcpt,
                                          outcome=outcome)
            if any(isinstance(a, Discard) for a in answers):
                rcpt.state = FAILED
                rcpt.last_error = f"discarded by plugin after: {outcome.reply()}"
                continue
            delays.extend(float(a) for a in answers if isinstance(a, (int, float)))
        env.last_error = next((o.reply() for _, o in retry + failed), None)
        if failed:
            # The DSN must be queued before the failures are recorded: a crash in
            # between retries those recipients (a second DSN at worst), never
            # loses the notice. Deliveries are recorded first, so that they are
            # never repeated.
            bounced = [r for r, _ in failed]
            for rcpt in bounced:
                rcpt.state = PENDING
            self.spool.rewrite(env, state, state)
            await self.bounce(env, failed, now)
            for rcpt in bounced:
                rcpt.state = FAILED
        if env.pending():
            await self._delay_notice(env, retry, now, deadline)
            interval = self._interval(env.attempts)
            delay = min(delays) if delays else interval
            # the last attempt happens at the deadline, not an interval after it
            env.next_attempt_at = min(now + max(delay, 0.0), max(deadline, now))
            self.spool.rewrite(env, state, "deferred")
            self.schedule(env.id, env.next_attempt_at)
        elif not removed:
            self.spool.remove(env.id, state)
        self.metrics.queue_size.update(env)
        for rcpt, outcome in failed:
            await self.hooks.call("bounced", envelope=env, recipient=rcpt, outcome=outcome)
        for rcpt in pending:
            if rcpt.state == DELIVERED:
                await self.hooks.call("delivered", envelope=env, recipient=rcpt,
                                        outcome=outcomes[rcpt.address])

    async def _delay_notice(self, env: Envelope, retry: list[tuple[RecipientState, Outcome]],
                            now: float, deadline: float) -> None:
        """Tell the sender once that delivery is late (``delay_notice_after_seconds``)."""
        after = self.settings.delay_notice_after_seconds
        late = [(r, o) for r, o in retry if r.state == PENDING]
        if (not after or not late or now - env.received_at < after
                or any("delay_notice" in t for t in env.trace)):
            return
        env.trace.append({"delay_notice": now})  # stored by the rewrite that follows
        await self.bounce(env, late, now, action="delayed", will_retry_until=deadline)

    async def _collect(self, hook: str, **kwargs: Any) -> list[Any]:
        try:
            return (await self.hooks.call(hook, **kwargs)).values
        except HookFailure:
            return []

    def _interval(self, attempts: int) -> float:
        intervals = self.settings.retry_intervals_seconds
        return intervals[min(attempts, len(intervals)) - 1]

    async def bounce(self, env: Envelope, failed: list[tuple[RecipientState, Outcome]],
                      now: float, action: str = "failed",
                      will_retry_until: float | None = None) -> None:
        """Queue one DSN for this batch of recipients (never to the null sender).

        ``action`` is ``failed`` for a bounce, ``delayed`` for a delay notice.
        """
        if dsn.is_bounce(env):
            log.info("%s: not bouncing a bounce (null sender)", env.id)
            return
        outcomes = [dsn.RecipientOutcome(
            recipient=r.address, action=action, status=o.enhanced, diagnostic=o.reply(),
            remote_mta=o.remote, last_attempt=now, will_retry_until=will_retry_until)
            for r, o in failed]
        # a message in failed/ may have lost its content; returned, it is reported without
        built = dsn.build_dsn(envelope=env, outcomes=outcomes, reporting_mta=self.hostname,
                              original_headers=self.spool.original(env.id), now=now)
        if built is None:
            return
        sender, recipients, message = built
        try:
            answer = (await self.hooks.call("bounce", envelope=env,
                                            outcomes=[o for _, o in failed],
                                            message=message)).value
        except HookFailure:
            answer = None
        if isinstance(answer, Discard):
            log.info("%s: bounce suppressed by a plugin", env.id)
            return
        if answer is not None:
            message = answer
        bounce_id = new_id()
        bounce_env = Envelope(id=bounce_id, sender=sender,
                              recipients=[RecipientState(r) for r in recipients],
                              received_at=now, size=len(message),
                              mail_params=params_for(message, sender, recipients),
                              listener=None, trace=[{"bounce_of": env.id}])
        await self.spool.commit_bytes(bounce_env, message)
        log.info("%s: %s %s queued to <%s> for %d recipient(s)", env.id,
                 "bounce" if action == "failed" else "delay notice", bounce_id, env.sender,
                 len(failed))

    # ------------------------------------------------------------- claims
    #
    # ``elemta queue`` commands run on the event loop through the control
    # socket (elemta/delivery/admin.py), so they never interleave with a
    # worker's own changes: a message is claimed (which keeps every worker off
    # it) before it is changed, and a message in delivery is waited for first.

    async def claim(self, queue_ids: list[str], wait: float) -> tuple[list[str], list[str]]:
        """Take messages away from the workers: ``(claimed, busy)``.

        Those still in delivery after ``wait`` seconds are busy.
        """
        ids = list(dict.fromkeys(queue_ids))
        if any(self.spool.awaiting_checkpoint(i) for i in ids):
            # Changed before its checkpoint, a message could come back from the
            # journal after a crash: deleted mail delivered, released mail twice.
            await self.spool.checkpoint()
        deadline = time.monotonic() + wait
        while any(i in self._busy for i in ids) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        claimed, busy = [], []
        for queue_id in ids:
            # in delivery, or still only in the journal (no room to write it out yet)
            if queue_id in self._busy or self.spool.awaiting_checkpoint(queue_id):
                busy.append(queue_id)
            else:
                self._busy.add(queue_id)
                self.unschedule(queue_id)
                claimed.append(queue_id)
        return claimed, busy

    def unclaim(self, queue_ids: list[str]) -> None:
        """Give messages back to the workers, scheduled as their envelopes say."""
        now = time.time()
        for queue_id in queue_ids:
            self._busy.discard(queue_id)
            try:
                state, env = self.spool.load(queue_id)
            except (KeyError, ValueError):
                continue
            if state == "ready":
                self.schedule(queue_id, now)
            elif state == "deferred":
                self.schedule(queue_id, env.next_attempt_at or now)

    def in_delivery(self, queue_id: str) -> bool:
        return queue_id in self._busy

    def stats(self) -> dict[str, Any]:
        """What only the running server knows: messages in delivery, the schedule."""
        due = min(self._due.values(), default=None)
        return {"counts": self.spool.counts(), "delivering": len(self._busy),
                "scheduled": len(self._due), "next_due": due,
                "workers": len(self._workers)}


_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}\Z")


def _checked(outcome: Outcome) -> Outcome:
    """A transport's outcome with a usable reply code and enhanced status."""
    code = outcome.code if 200 <= outcome.code <= 599 else 451
    enhanced = outcome.enhanced
    if not isinstance(enhanced, str) or not _STATUS.match(enhanced) or enhanced[0] != str(code)[0]:
        enhanced = f"{str(code)[0]}.0.0"
    if code == outcome.code and enhanced == outcome.enhanced:
        return outcome
    return dataclasses.replace(outcome, code=code, enhanced=enhanced)


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower() or "-"
