"""The journal writer: one thread that makes commits durable, in batches (group commit).

Everything that is pending when the thread becomes free is one batch: its
records (``journal.py``) are written to the current segment with one
``pwritev`` (a spilled body is copied in through a 1 MiB buffer) and the
segment is fdatasynced once. Only then is a commit answered, so a ``250``
means the message is in the journal, durably. A batch that cannot be written
fails as a whole (every commit in it gets the ``OSError``); the segment is cut
back to where the batch started and never written again, so a torn batch can
only ever be the last thing in a segment.

The writer also decides when a segment is full or old enough to be sealed
(``checkpoint_interval``, ``checkpoint_idle``, ``segment_bytes``) and hands
the journaled jobs and sealed segments to the write-out thread.

At a seal, resident messages (``resident.py``) still in memory and younger
than :data:`CARRY_SECONDS` are *carried*: their records, with the envelope as
it is now, are appended to the next segment and synced there before the
sealed one goes to its checkpoint, so the sealed segment can be deleted while
they stay in memory, still to be delivered from there. A carry is one
sequential write where writing them out would create, sync and later unlink
two files per message: under a backlog (more mail accepted than delivered
for a while), most messages are then delivered without ever having files.
Older messages, and those past :data:`CARRY_MAX_BYTES` at one seal, are
written out as before.
"""

from __future__ import annotations

import concurrent.futures
import errno
import logging
import os
import queue
import threading
import time
import zlib
from collections.abc import Callable

from ..durable import sync_data
from . import journal, threads
from .layout import FreshIds, Layout
from .segments import Segment, Segments, discard
from .space import SpaceMonitor
from .threads import (Backlog, Checkpoint, Flags, Job, Residents, Sealed, SpoolError, SpoolStats,
                      Stop, WriteOut)

log = logging.getLogger("elemta.spool")

#: a resident message older than this (since its commit) gets files at the next seal
CARRY_SECONDS = 30.0
#: at most this many bytes of records carried into a new segment at one seal
CARRY_MAX_BYTES = 32 << 20


class JournalWriter:
    """The journal thread and the commits waiting for it."""

    def __init__(self, layout: Layout, segments: Segments, flags: Flags, stats: SpoolStats,
                 backlog: Backlog, outbox: queue.SimpleQueue[threads.Message],
                 undurable: set[str], answer: Callable[[list[Job]], None],
                 space: SpaceMonitor, residents: Residents, *,
                 checkpoint_interval: float, checkpoint_idle: float, segment_bytes: int,
                 visible_on_commit: bool,
                 retire: Callable[[int, str], None] | None = None,
                 fresh: FreshIds | None = None) -> None:
        self.layout = layout
        self.segments = segments
        self.flags = flags
        self.stats = stats
        self.backlog = backlog
        self.outbox = outbox
        self.undurable = undurable
        self.answer = answer
        self.space = space
        self.residents = residents
        self.checkpoint_interval = checkpoint_interval
        self.checkpoint_idle = checkpoint_idle
        self.segment_bytes = segment_bytes
        self.visible_on_commit = visible_on_commit
        # appends a retire record to a segment's retire file (residents' lock held);
        # without it nothing is carried
        self.retire = retire
        # ids known to be new to the spool without a look at messages/
        self.fresh = fresh if fresh is not None else FreshIds()
        # Shared with the event loop, under the condition.
        self._cond = threading.Condition(threading.Lock())
        self._pending: list[Job] = []
        self._requests: list[concurrent.futures.Future[None]] = []
        self._stop_requested = False
        self._idle = False
        # This thread only.
        self.active: Segment | None = None
        self._copy_buf: bytearray | None = None
        self.thread = threading.Thread(target=self._main, name="spool-journal", daemon=True)

    # ------------------------------------------------------------------ from the event loop

    def submit(self, job: Job, wake: bool = True) -> None:
        """Queue ``job`` for the next batch; ``wake=False`` leaves waking the thread to
        :meth:`wake_for_pending`."""
        with self._cond:
            self._pending.append(job)
            if wake and self._idle:
                self._cond.notify()

    def wake_for_pending(self) -> None:
        with self._cond:
            if self._idle and self._pending:
                self._cond.notify()

    def request_checkpoint(self, done: concurrent.futures.Future[None]) -> None:
        """Seal the active segment and have everything so far checkpointed; ``done`` tells."""
        with self._cond:
            self._requests.append(done)
            self._cond.notify()

    def request_stop(self, done: concurrent.futures.Future[None]) -> None:
        """Finish what is pending, checkpoint it all, then stop the threads."""
        with self._cond:
            self._requests.append(done)
            self._stop_requested = True
            self.flags.stopping = True
            self._cond.notify()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ------------------------------------------------------------------ the thread

    def _main(self) -> None:
        while True:
            try:
                if not self._step():
                    return
            except BaseException:  # a bug: keep serving the commits that follow
                log.exception("spool: journal writer failed")

    def _step(self) -> bool:
        """Journal one batch and seal the segment when due; ``False`` to stop."""
        cond = self._cond
        with cond:
            while not (self._pending or self._requests or self._stop_requested
                       or self.flags.crashed):
                timeout = self._rotation_wait()
                if timeout is not None and timeout <= 0:
                    break
                self._idle = True
                cond.wait(timeout)
                self._idle = False
            batch, self._pending = self._pending, []
            requests, self._requests = self._requests, []
            stopping = self._stop_requested and not self._pending
        if self.flags.crashed:
            return False
        if batch:
            try:
                self._write_batch(batch)
            except BaseException as e:  # a bug; the callers must not wait forever
                log.exception("spool: journal writer failed")
                for job in batch:
                    if job.error is None:
                        job.error = SpoolError(f"spool commit failed: {e!r}")
                threads.answer_later(batch, self.answer)
        seg = self.active
        if seg is not None and seg.first_write is not None and (
                requests or stopping or seg.size >= self.segment_bytes
                or (self._rotation_wait() or 0.0) <= 0):
            # a checkpoint asked for, or the end: every message gets its files
            self._seal_active(carry=not (requests or stopping))
        for done in requests:
            self.outbox.put(Checkpoint(done))
        if stopping:
            if self.active is not None:  # empty: nothing in it was ever acknowledged
                discard(self.active)
                self.active = None
            self.outbox.put(Stop())
            return False
        return True

    def _rotation_wait(self) -> float | None:
        """Seconds until the active segment is due for a checkpoint; ``None``: it is empty.

        Due after ``checkpoint_interval`` under steady load, or as soon as
        commits pause for ``checkpoint_idle``: at low load a message becomes
        deliverable (on_durable) within tens of milliseconds, not a second.
        """
        seg = self.active
        if seg is None or seg.first_write is None:
            return None
        if seg.carried_only:  # nothing new for a runner to wait for
            return seg.first_write + self.checkpoint_interval - time.monotonic()
        return min(seg.first_write + self.checkpoint_interval,
                   seg.last_write + self.checkpoint_idle) - time.monotonic()

    def _write_batch(self, batch: list[Job]) -> None:
        self.backlog.wait_room(threads.MAX_BACKLOG_BYTES)
        seg = self.active
        if seg is None:
            try:
                seg = self.active = self.segments.take_spare() or self.segments.new()
            except OSError as e:
                for job in batch:
                    job.error = _batch_error(e)
                log.error("spool: cannot start a journal segment: %s", e)
                threads.answer_later(batch, self.answer)
                return
        live: list[Job] = []
        layout, undurable, fresh = self.layout, self.undurable, self.fresh
        for job in batch:
            queue_id = job.queue_id
            # a committed message is never replaced by another with its queue id
            if queue_id in undurable or (not fresh.surely_new(queue_id)
                                         and os.path.lexists(layout.content(queue_id))):
                job.error = FileExistsError(errno.EEXIST, "queue id already in the spool",
                                            queue_id)
                continue
            if job.body_path is None:
                job.content_length = len(job.prefix) + len(job.body)  # type: ignore[arg-type]
            else:
                try:
                    job.body_fd = os.open(job.body_path, os.O_RDONLY | os.O_CLOEXEC)
                    job.content_length = len(job.prefix) + os.fstat(job.body_fd).st_size
                except OSError as e:
                    job.error = e
                    continue
            undurable.add(queue_id)
            live.append(job)
        if live and not self.space.fits(sum(job.placed_bytes for job in live), len(live)):
            # Acknowledged, a message must be placeable in files later, a crash
            # or not: refuse the batch while that room is not there.
            for job in live:
                undurable.discard(job.queue_id)
                job.error = OSError(errno.ENOSPC, "no room in the spool for this message's "
                                    "files")
            log.warning("spool: %d message(s) refused: the spool's file system cannot hold "
                        "their files as well as the journal", len(live))
            live = []
        start = seg.size
        try:
            if live:
                end = self._append(seg, live, start)
                sync_data(seg.fd)
        except Exception as e:
            for job in live:
                undurable.discard(job.queue_id)
                job.error = _batch_error(e)
            log.error("spool: cannot write %d message(s) to the journal %s: %s", len(live),
                      seg.path, e)
            live = []
            self._abandon(seg, start)
        else:
            if live:
                for job in live:
                    fresh.journaled(job.queue_id)
                seg.size = end
                seg.last_write = now = time.monotonic()
                seg.carried_only = False
                if seg.first_write is None:
                    seg.first_write = now
                seg.entries += [(job.queue_id, job.state) for job in live]
                residents = self.residents
                for job in live:
                    job.segment = seg
                    job.journaled_at = now
                    if job.resident:
                        seg.resident.append(job)
                        with residents.lock:
                            residents.jobs[job.queue_id] = job
                self.stats.journal_bytes += end - start
        finally:
            for job in batch:
                if job.body_fd >= 0:
                    try:
                        os.close(job.body_fd)
                    except OSError:
                        pass
                    job.body_fd = -1
        if not live:
            threads.answer_later(batch, self.answer)
            return
        self.backlog.add(sum(job.held_bytes for job in live))
        if self.visible_on_commit:
            # The write-out thread answers once the files are there, while
            # this thread goes on with the next batch.
            self.outbox.put(WriteOut(live, batch))
        else:
            # queued first: the files appear as early as possible after the 250
            self.outbox.put(WriteOut(live, None))
            threads.answer_later(batch, self.answer)

    def _append(self, seg: Segment, jobs: list[Job], offset: int) -> int:
        """Write the jobs' records at ``offset``; the new end of the segment."""
        fd, seq = seg.fd, seg.seq
        crc32, head_of, trailer = zlib.crc32, journal.record_head, journal.TRAILER.pack
        bufs: list = []
        write_at = offset  # where ``bufs`` goes
        for job in jobs:
            env, prefix = job.envelope, job.prefix
            head = head_of(seq, job.state, job.queue_id.encode("ascii"), env, job.content_length)
            crc = crc32(prefix, crc32(env, crc32(head)))
            job.content_offset = offset + len(head) + len(env)
            offset = job.content_offset + job.content_length + 4
            if job.body_fd < 0:
                crc = crc32(job.body, crc)  # type: ignore[arg-type]
                bufs += (head, env, prefix, job.body, trailer(crc))
                continue
            # A spilled body goes through one reused buffer: a 20 MiB message
            # costs 1 MiB of memory, not 20.
            bufs += (head, env, prefix)
            pos = journal.pwrite_all(fd, bufs, write_at)
            bufs = []
            crc, pos = self._copy_body(job.body_fd, fd, pos,
                                       job.content_length - len(prefix), crc)
            bufs.append(trailer(crc))
            write_at = pos
        if bufs:
            journal.pwrite_all(fd, bufs, write_at)
        return offset

    def _copy_body(self, src: int, dst: int, pos: int, length: int, crc: int) -> tuple[int, int]:
        if self._copy_buf is None:
            self._copy_buf = bytearray(journal.CHUNK)
        view = memoryview(self._copy_buf)
        src_pos = 0
        while length:
            n = os.preadv(src, [view[:min(length, len(view))]], src_pos)
            if n <= 0:
                raise OSError(errno.EIO, "spilled message body shrank before its commit")
            crc = zlib.crc32(view[:n], crc)
            pos = journal.pwrite_all(dst, [view[:n]], pos)
            src_pos += n
            length -= n
        return crc, pos

    def _abandon(self, seg: Segment, start: int) -> None:
        """After a failed batch: cut it off and never append to this segment again.

        Reading a segment stops at its first bad record, so a later batch
        behind a torn one would be lost; a fresh segment cannot have that.
        """
        try:
            os.ftruncate(seg.fd, start)
        except OSError as e:
            log.error("spool: cannot cut the failed batch off %s: %s", seg.path, e)
        self.active = None
        if seg.first_write is None:  # nothing acknowledged in it
            discard(seg)
        else:
            self.outbox.put(Sealed(seg))

    def _seal_active(self, carry: bool = False) -> None:
        seg = self.active
        assert seg is not None
        self.active = self.segments.take_spare()  # or a new one at the next batch
        if carry and seg.resident and self.retire is not None:
            self._carry_residents(seg)
        self.outbox.put(Sealed(seg))

    def _carry_residents(self, old: Segment) -> None:
        """Journal ``old``'s young resident messages again in the active segment.

        Synced before ``old`` is handed on, so that ``old`` can be checkpointed
        and deleted: from then on the new records are the messages' only
        durable copy. If the carry cannot be written, nothing moves and the
        write-out thread gives them files, as for any resident at a seal.
        """
        now = time.monotonic()
        # half a segment at most: the new segment must not be full of carried
        # records at once, to be sealed and carried again at the next step
        budget = min(CARRY_MAX_BYTES, self.segment_bytes // 2)
        jobs: list[Job] = []
        with self.residents.lock:
            for job in old.resident:
                if job.status != threads.RESIDENT or now - job.journaled_at > CARRY_SECONDS:
                    continue
                size = job.content_length + len(job.envelope)
                if size > budget:
                    break
                budget -= size
                jobs.append(job)
        if not jobs:
            return
        seg = self.active
        if seg is not None and seg.seq < old.seq and seg.first_write is None:
            # a spare numbered before ``old`` (made while ``old`` was new): replay
            # goes by sequence number, and a carried record must come after the
            # one it replaces, whose envelope may be older
            discard(seg)
            seg = self.active = None
        if seg is None:
            try:
                seg = self.active = self.segments.new()
            except OSError as e:
                log.warning("spool: cannot start a journal segment to carry %d message(s) "
                            "in memory: %s; they are written out", len(jobs), e)
                return
        start = seg.size
        try:
            # _append reads each job's envelope once: the version of that moment,
            # with whatever the runner has changed so far
            end = self._append(seg, jobs, start)
            sync_data(seg.fd)
        except Exception as e:
            log.warning("spool: cannot carry %d message(s) in memory into %s: %s; they are "
                        "written out", len(jobs), seg.path, e)
            self._abandon(seg, start)
            return
        seg.size = end
        if seg.first_write is None:
            seg.first_write = seg.last_write = time.monotonic()
            seg.carried_only = True
        moved = {id(job) for job in jobs}
        ids = {job.queue_id for job in jobs}
        with self.residents.lock:
            old.resident = [job for job in old.resident if id(job) not in moved]
            for job in jobs:
                job.segment = seg
                if job.status == threads.RETIRED:
                    # delivered while it was being carried: its retire record went
                    # to the old segment, which is about to go
                    self.retire(seg.seq, job.queue_id)  # type: ignore[misc]
            seg.resident += jobs
        # the old segment's checkpoint must neither wait for their files nor
        # declare them durable; the new one's does, for those written out by then
        old.entries = [entry for entry in old.entries if entry[0] not in ids]
        seg.entries += [(job.queue_id, job.state) for job in jobs]
        self.stats.carried += len(jobs)
        self.stats.journal_bytes += end - start
        log.debug("spool: %d message(s) still in memory carried from %s into %s", len(jobs),
                  old.path, seg.path)


def _batch_error(error: BaseException) -> BaseException:
    # Every caller of a failed batch gets its own exception object.
    if isinstance(error, OSError):
        return OSError(error.errno, f"spool journal write failed: {error.strerror or error}",
                       error.filename)
    return SpoolError(f"spool commit failed: {error!r}")
