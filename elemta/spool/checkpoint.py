"""Checkpoints: making written-out files durable, then retiring their journal segments.

A sealed segment (all its messages written out) is checkpointed on a thread of
its own, so that a sync never holds up writing out: one ``syncfs`` makes its
messages' files and directory entries durable, then the segment is deleted,
or renamed to a new sequence number to be written over (its old records then
end its data instead of being replayed), and the journal directory is
fsynced. Only then are its messages announced as durable (``on_durable``):
from that moment they may be delivered, moved or deleted. Nothing of this is
on the path of a commit.

Resident messages (delivered from memory, see ``writer.py``) are not
announced: the runner has them already. Once their segment is checkpointed the
spool forgets that they were resident; those delivered meanwhile were never
written out, and replay skips them.

A segment whose files could not be written, or a sync that failed, keeps the
segment: the next attempt first writes its files again from the journal
(write-back errors are reported only once), and so does the next start-up.
A sync's error may also belong to a file of a segment written out while it
ran, so every segment with files written before a sync failed is written out
again before its own checkpoint trusts a sync (``Syncer.suspect``).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ..durable import fsync_dir
from .layout import Layout
from .replay import Syncer, replay_segment
from .segments import Segment, Segments, close_quietly, unlink_quietly
from .space import SpaceMonitor
from .threads import Flags, Residents, SpoolStats

log = logging.getLogger("elemta.spool")

Entries = list[tuple[str, str]]


class Checkpointer:
    """The checkpoint thread and the sealed segments waiting for it."""

    def __init__(self, layout: Layout, segments: Segments, syncer: Syncer, flags: Flags,
                 stats: SpoolStats, undurable: set[str], announce: Callable[[Entries], None],
                 retry: Callable[[], None], retry_after: float, space: SpaceMonitor,
                 residents: Residents, forget_segment: Callable[[int], None]) -> None:
        self.layout = layout
        self.segments = segments
        self.syncer = syncer
        self.flags = flags
        self.stats = stats
        self.undurable = undurable
        self.announce = announce
        self.retry = retry
        self.retry_after = retry_after
        self.space = space
        self.residents = residents
        self.forget_segment = forget_segment   # its retire file, once it is gone
        self.sealed: list[Segment] = []  # this thread only
        self._executor: ThreadPoolExecutor | None = ThreadPoolExecutor(
            1, thread_name_prefix="spool-checkpoint")

    # ------------------------------------------------------------------ from the write-out thread

    def prepare_spare(self) -> None:
        self._submit(self.segments.prepare_spare)

    def seal(self, seg: Segment) -> None:
        self._submit(self._task, seg, None)

    def request(self, done: concurrent.futures.Future[None] | None) -> None:
        self._submit(self._task, None, done)

    def stop(self) -> None:
        self._submit(self._stop)

    def shutdown(self) -> None:
        """Wait for the thread to finish what it was given (after :meth:`stop`)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _submit(self, fn: Callable[..., None], *args: object) -> None:
        if self._executor is not None:
            self._executor.submit(fn, *args)

    # ------------------------------------------------------------------ the thread

    def _task(self, seg: Segment | None, done: concurrent.futures.Future[None] | None) -> None:
        """Add a sealed segment, checkpoint, answer a request."""
        if self.flags.crashed:
            return
        if seg is not None:
            self.sealed.append(seg)
        try:
            self.run(raise_errors=done is not None)
        except BaseException as e:
            if done is None:
                log.exception("spool: checkpoint failed")
            else:
                done.set_exception(e)
        else:
            if done is not None:
                done.set_result(None)
        if self.sealed and not self.flags.stopping:
            # a segment is still waiting: try again later even if all is quiet
            timer = threading.Timer(self.retry_after, self.retry)
            timer.daemon = True
            timer.start()
        if seg is not None:
            self.segments.prepare_spare()

    def _stop(self) -> None:
        self.segments.drop_spare()
        for seg in self.sealed:  # kept for the next start-up
            close_quietly(seg.fd)
        self.sealed = []

    def run(self, raise_errors: bool = False) -> None:
        """Make the sealed segments' files durable and delete the segments."""
        if not self.sealed:
            return
        started = time.perf_counter()
        error: Exception | None = None
        ready: list[Segment] = []
        # a sync that fails from here on may have been told an error of these files
        checked = time.monotonic()
        for seg in self.sealed:
            if not seg.replay and self.syncer.suspect(seg.files_since):
                # a sync failed after some of its files were written: its error
                # may have been one of theirs, reported to that sync alone
                seg.replay = True
            if seg.replay:
                rewriting = time.monotonic()
                try:
                    replay_segment(self.layout, seg.fd, seg.seq, seg.path, self.residents)
                except OSError as e:
                    error = e
                    log.error("spool: cannot write out the messages of %s: %s; retrying later",
                              seg.path, e)
                    continue
                seg.replay = False
                seg.rewritten_at = rewriting
                self.space.placed(seg.unwritten_bytes, seg.unwritten_messages)
                seg.unwritten_bytes = seg.unwritten_messages = 0
            ready.append(seg)
        entries: Entries = []
        if ready:
            entries = [entry for seg in ready for entry in seg.entries]
            with self.residents.lock:
                retired = self.residents.retired
                files = [e for e in entries if e[0] not in retired] if retired else entries
            try:
                self.syncer.make_durable(files, checked)
            except OSError as e:
                error = e
                # Write-back errors are reported once: data lost now would not
                # show in the next sync. Rewrite the files from the journal first.
                for seg in ready:
                    seg.replay = True
                self.stats.checkpoint_errors += 1
                log.error("spool: checkpoint failed: %s; %d journal segment(s) kept, retrying "
                          "later", e, len(ready))
                ready = []
        if ready:
            reused: list[Segment] = []
            try:
                for seg in ready:
                    fresh = self.segments.reuse(seg) if not reused else None
                    if fresh is not None:
                        reused.append(fresh)
                    else:
                        unlink_quietly(seg.path, missing_ok=True, strict=True)
                # After this, no crash can bring the segments' records back:
                # deleted, or renamed to a sequence number they do not carry.
                fsync_dir(self.layout.journal)
            except OSError as e:
                # The files are durable; only the segments' removal is retried.
                error = e
                self.stats.checkpoint_errors += 1
                log.error("spool: cannot remove %d checkpointed journal segment(s): %s; "
                          "retrying later", len(ready), e)
            else:
                done = set(map(id, ready))
                self.sealed = [seg for seg in self.sealed if id(seg) not in done]
                kept = {fresh.fd for fresh in reused}
                for seg in ready:
                    if seg.fd not in kept:
                        close_quietly(seg.fd)
                for fresh in reused:
                    self.segments.offer_spare(fresh)
                for queue_id, _ in entries:
                    self.undurable.discard(queue_id)
                resident = self._forget_residents(ready)
                self.stats.checkpoints += 1
                self.stats.checkpointed += len(entries)
                self.stats.checkpoint_seconds = time.perf_counter() - started
                self.announce([e for e in entries if e[0] not in resident]
                              if resident else entries)
        if error is not None and raise_errors:
            raise error

    def _forget_residents(self, segments: list[Segment]) -> set[str]:
        """The resident messages of checkpointed segments are ordinary from now on
        (or gone, if retired); their ids."""
        ids: set[str] = set()
        residents = self.residents
        with residents.lock:
            for seg in segments:
                for job in seg.resident:
                    queue_id = job.queue_id
                    ids.add(queue_id)
                    residents.jobs.pop(queue_id, None)
                    residents.retired.discard(queue_id)
                seg.resident = []
        for seg in segments:
            self.forget_segment(seg.seq)
        return ids
