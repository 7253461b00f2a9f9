"""What the spool's threads share and pass to each other.

The event loop hands :class:`Job` objects to the journal writer; the writer
posts typed messages to the write-out thread's queue (:class:`WriteOut`,
:class:`Barrier`, :class:`Sealed`, :class:`Checkpoint`, :class:`Stop`);
the write-out thread passes checkpoints on to the checkpoint thread. Commits
are answered on the event loop that made them (:func:`answer_later`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from .segments import Segment

# Journaled messages not yet written out, in bytes held in memory: past this
# the journal waits for the files to catch up, so that a background thread
# starved of the GIL by a busy event loop cannot let memory grow without bound.
MAX_BACKLOG_BYTES = 32 << 20


class SpoolError(Exception):
    """The spool cannot be used as asked (not recovered, closed, bad queue id…)."""


@dataclass(slots=True)
class SpoolStats:
    """Commit, journal and checkpoint counters, for metrics and tests."""

    batches: int = 0
    committed: int = 0
    failed: int = 0
    largest_batch: int = 0
    journal_bytes: int = 0
    checkpoints: int = 0
    checkpointed: int = 0            # messages whose segment was checkpointed
    checkpoint_seconds: float = 0.0  # duration of the last checkpoint
    checkpoint_errors: int = 0
    materialize_errors: int = 0
    segments_reused: int = 0
    replayed: int = 0                # records replayed by the last recover()
    retired: int = 0                 # resident messages delivered without ever having files
    carried: int = 0                 # resident messages carried into a newer segment at a seal


@dataclass(slots=True)
class Flags:
    """Set on the event loop, read by every thread."""

    stopping: bool = False
    crashed: bool = False  # tests: the threads stop dead, as a crash would stop them


# What became of a resident job (``Job.resident``): kept in memory, delivered from there.
RESIDENT, WRITTEN, RETIRED = 0, 1, 2


@dataclass(slots=True, eq=False)
class Job:
    """One message to commit: filled in on the event loop, journaled and written out in threads."""

    queue_id: str
    state: str
    prefix: bytes           # prepended headers + received header section
    body: bytes | None      # body in memory…
    body_path: str | None   # …or spilled to tmp/
    envelope: bytes
    future: CommitWaiter
    loop: asyncio.AbstractEventLoop
    body_fd: int = -1
    segment: Segment | None = None
    content_offset: int = 0
    content_length: int = 0
    error: BaseException | None = None
    # A resident job stays in memory after its commit, for the runner to deliver from
    # there; it gets files only if its segment is sealed before it is delivered (or when
    # the runner defers it). ``status``: RESIDENT, WRITTEN or RETIRED; ``envelope`` is
    # replaced by the runner's changes while it is RESIDENT.
    resident: bool = False
    status: int = RESIDENT
    journaled_at: float = 0.0  # monotonic time its first batch was synced

    @property
    def placed_bytes(self) -> int:
        """What its files take on disk: the content and the envelope (once journaled)."""
        return self.content_length + len(self.envelope)

    @property
    def held_bytes(self) -> int:
        """What this job keeps in memory until its files are written."""
        return len(self.envelope) + len(self.prefix) + len(self.body or b"")


class Residents:
    """Resident jobs by queue id, until their segment is checkpointed, and the ids
    retired before that (replay skips those). The event loop and the spool's threads
    change a job's status, and write or skip its files, only under :attr:`lock`."""

    __slots__ = ("lock", "jobs", "retired")

    def __init__(self, retired: set[str] | None = None) -> None:
        self.lock = threading.Lock()
        self.jobs: dict[str, Job] = {}
        self.retired: set[str] = retired if retired is not None else set()


# ---------------------------------------------------------------------- write-out queue


@dataclass(slots=True)
class WriteOut:
    """Journaled jobs whose files are to be written; ``answer``: commits to answer after."""

    jobs: list[Job]
    answer: list[Job] | None


@dataclass(slots=True)
class Barrier:
    """Set once every batch queued before it is written out."""

    done: threading.Event


@dataclass(slots=True)
class Sealed:
    """A segment that takes no more records: its messages are written out when this arrives."""

    segment: Segment


@dataclass(slots=True)
class Checkpoint:
    """Checkpoint now; ``done`` (if any) gets the outcome."""

    done: concurrent.futures.Future[None] | None = None


@dataclass(slots=True)
class Stop:
    """The last message: stop the write-out and checkpoint threads."""


Message = Union[WriteOut, Barrier, Sealed, Checkpoint, Stop]


# ---------------------------------------------------------------------- backlog


@dataclass(slots=True)
class Backlog:
    """Bytes of journaled messages still to write out (:data:`MAX_BACKLOG_BYTES`)."""

    flags: Flags
    bytes: int = 0
    _cond: threading.Condition = field(default_factory=lambda: threading.Condition(
        threading.Lock()))

    def wait_room(self, limit: int) -> None:
        with self._cond:
            while self.bytes > limit and not self.flags.crashed:
                self._cond.wait(0.1)

    def add(self, n: int) -> None:
        with self._cond:
            self.bytes += n

    def written(self, n: int) -> None:
        with self._cond:
            self.bytes -= n
            self._cond.notify()


# ---------------------------------------------------------------------- answering commits


def answer_later(batch: list[Job], answer: Callable[[list[Job]], None]) -> None:
    """Call ``answer(jobs)`` on the event loop of each group of jobs (from any thread)."""
    loop = batch[0].loop
    if all(job.loop is loop for job in batch):
        groups = [batch]
    else:
        by_loop: dict[int, list[Job]] = {}
        for job in batch:
            by_loop.setdefault(id(job.loop), []).append(job)
        groups = list(by_loop.values())
    for jobs in groups:
        try:
            jobs[0].loop.call_soon_threadsafe(answer, jobs)
        except RuntimeError:
            pass  # that event loop is closed: nobody waits for these commits


_PENDING, _CANCELLED, _FINISHED = 0, 1, 2


class CommitWaiter:
    """What a commit awaits: an asyncio future whose task resumes at once when answered.

    ``asyncio.Future`` schedules the task that awaits it for the next turn of
    the event loop. A commit is answered in a loop callback already (handed
    over from the journal thread), so that was a second turn before the
    session could send its ``250``: 0.25-0.45 ms at ten sessions, a tenth of a
    commit. Answered from a callback, this one runs the waiting task's step
    right there; answered from inside a task (no two tasks may run at once),
    or cancelled, it schedules it as a future does. It speaks the protocol
    asyncio's tasks accept from any future (``_asyncio_future_blocking``,
    ``add_done_callback``, ``cancel``…), on asyncio's loop and on uvloop.
    """

    __slots__ = ("_loop", "_state", "_error", "_callbacks", "_asyncio_future_blocking")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._state = _PENDING
        self._error: BaseException | None = None
        self._callbacks: list[tuple[Callable[[CommitWaiter], object], object]] = []
        self._asyncio_future_blocking = False

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def done(self) -> bool:
        return self._state != _PENDING

    def cancelled(self) -> bool:
        return self._state == _CANCELLED

    def result(self) -> None:
        error = self.exception()
        if error is not None:
            raise error

    def exception(self) -> BaseException | None:
        if self._state == _CANCELLED:
            raise asyncio.CancelledError
        if self._state == _PENDING:
            raise asyncio.InvalidStateError("the commit has not been answered")
        return self._error

    def add_done_callback(self, fn: Callable[[CommitWaiter], object], *,
                          context: object = None) -> None:
        if self._state == _PENDING:
            self._callbacks.append((fn, context))
        else:
            self._loop.call_soon(fn, self, context=context)  # type: ignore[arg-type]

    def remove_done_callback(self, fn: Callable[[CommitWaiter], object]) -> int:
        kept = [(f, c) for f, c in self._callbacks if f != fn]
        removed, self._callbacks = len(self._callbacks) - len(kept), kept
        return removed

    def cancel(self, msg: object = None) -> bool:
        if self._state != _PENDING:
            return False
        self._state = _CANCELLED
        self._schedule()
        return True

    def set_result(self, result: None = None) -> None:
        self._finish(None)

    def set_exception(self, error: BaseException) -> None:
        self._finish(error)

    def _finish(self, error: BaseException | None) -> None:
        if self._state != _PENDING:
            raise asyncio.InvalidStateError("the commit was answered already")
        self._state, self._error = _FINISHED, error
        if asyncio.current_task(self._loop) is not None:
            self._schedule()
            return
        callbacks, self._callbacks = self._callbacks, []
        for fn, context in callbacks:
            try:
                if context is None:
                    fn(self)
                else:
                    context.run(fn, self)  # type: ignore[attr-defined]
            except Exception as e:  # as the loop treats a failing callback; the next still run
                self._loop.call_exception_handler({
                    "message": f"exception in the callback of a spool commit: {fn!r}",
                    "exception": e, "future": self})

    def _schedule(self) -> None:
        callbacks, self._callbacks = self._callbacks, []
        for fn, context in callbacks:
            self._loop.call_soon(fn, self, context=context)  # type: ignore[arg-type]

    def __await__(self):  # type: ignore[no-untyped-def]
        if self._state == _PENDING:
            self._asyncio_future_blocking = True
            yield self
        if self._state == _PENDING:
            raise RuntimeError("await wasn't used with future")
        return self.result()

    __iter__ = __await__
