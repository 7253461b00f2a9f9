"""Writing out: one thread turns journaled messages into the spool's files.

Each message's content goes straight into ``messages/`` under its final name
(content without an envelope is invisible to every reader), then its envelope
to ``tmp/``, renamed into its state directory, so an envelope is never seen
half-written and never before its content. Nothing is fsynced here: the
journal still holds the message until the checkpoint has made these files
durable. Files that cannot be written mark their segment for replay; the
checkpoint writes them again from the journal.

Resident messages (``Job.resident``: the runner delivers them from memory)
are skipped here; when their segment is sealed, those still in memory are
written out then, before the checkpoint, and so are all of them at a
:class:`~.threads.Barrier`.

The thread also passes sealed segments and checkpoint requests to the
checkpointer, in the order they arrive, which is what guarantees that a
sealed segment's messages are all written out before it is checkpointed.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable

from ..durable import write_all
from . import journal, threads
from .checkpoint import Checkpointer
from .layout import Layout
from .space import SpaceMonitor
from .threads import (RESIDENT, WRITTEN, Backlog, Barrier, Checkpoint, Flags, Job, Residents,
                      Sealed, SpoolStats, Stop, WriteOut)

log = logging.getLogger("elemta.spool")

_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
_FILE_MODE = 0o600


class WriteOutThread:
    """The write-out thread and its queue (the journal writer's outbox)."""

    def __init__(self, layout: Layout, flags: Flags, stats: SpoolStats, backlog: Backlog,
                 checkpointer: Checkpointer, answer: Callable[[list[Job]], None],
                 space: SpaceMonitor, residents: Residents) -> None:
        self.layout = layout
        self.residents = residents
        self.flags = flags
        self.stats = stats
        self.backlog = backlog
        self.checkpointer = checkpointer
        self.answer = answer
        self.space = space
        self.inbox: queue.SimpleQueue[threads.Message] = queue.SimpleQueue()
        # tests hold writing out back with it, to look at a spool between commit and files
        self.gate = threading.Event()
        self.gate.set()
        self.thread = threading.Thread(target=self._main, name="spool-writeout", daemon=True)

    def _main(self) -> None:
        self.checkpointer.prepare_spare()
        get = self.inbox.get
        while True:
            message = get()
            if self.flags.crashed:
                return
            try:
                if isinstance(message, WriteOut):
                    try:
                        self.gate.wait()
                        if self.flags.crashed:
                            return
                        self.write(message.jobs)
                        if message.answer is not None:
                            threads.answer_later(message.answer, self.answer)
                    finally:
                        self.backlog.written(sum(job.held_bytes for job in message.jobs))
                elif isinstance(message, Barrier):  # every batch queued before it is written out
                    with self.residents.lock:
                        jobs = list(self.residents.jobs.values())
                    self.write_residents(jobs)
                    message.done.set()
                elif isinstance(message, Sealed):  # its messages are all written out by now
                    self.write_residents(message.segment.resident)
                    self.checkpointer.seal(message.segment)
                elif isinstance(message, Checkpoint):
                    self.checkpointer.request(message.done)
                elif isinstance(message, Stop):
                    self.checkpointer.stop()
                    return
            except BaseException:
                log.exception("spool: background writer failed")

    def write_residents(self, jobs: list[Job]) -> None:
        """Write the files of the resident jobs still only in memory."""
        lock = self.residents.lock
        for job in jobs:
            with lock:  # the event loop neither delivers nor changes it meanwhile
                if job.status == RESIDENT:
                    self.write([job], resident=True)
                    job.status = WRITTEN

    def write(self, jobs: list[Job], resident: bool = False) -> None:
        """Write the jobs' files; resident jobs only with ``resident`` (see
        :meth:`write_residents`)."""
        layout = self.layout
        failed: list[str] = []
        error: Exception | None = None
        placed_bytes = placed = 0
        for job in jobs:
            if job.resident and not resident:
                continue  # delivered from memory; written only if it is still there at sealing
            queue_id = job.queue_id
            try:
                # Straight under its final name: content without an envelope
                # is invisible to every reader, the envelope goes in last (by
                # rename, so it is never seen half-written), and until the
                # checkpoint a crash replays both from the journal.
                fd = os.open(layout.content(queue_id), _TMP_FLAGS, _FILE_MODE)
                try:
                    if job.body_path is None:
                        body = job.body
                        if os.writev(fd, (job.prefix, body)) != job.content_length:
                            _rewrite(fd, job.prefix + body)  # type: ignore[operator]
                    else:
                        journal.copy_range(job.segment.fd, fd,  # type: ignore[union-attr]
                                           job.content_offset, job.content_length)
                finally:
                    os.close(fd)
                path = layout.tmp_file(queue_id, "envelope")
                fd = os.open(path, _TMP_FLAGS, _FILE_MODE)
                try:
                    if os.write(fd, job.envelope) != len(job.envelope):
                        _rewrite(fd, job.envelope)
                finally:
                    os.close(fd)
                os.rename(path, layout.envelope(job.state, queue_id))
            except Exception as e:
                seg = job.segment
                assert seg is not None
                seg.replay = True
                seg.unwritten_bytes += job.placed_bytes
                seg.unwritten_messages += 1
                failed.append(queue_id)
                error = e
            else:
                placed_bytes += job.placed_bytes
                placed += 1
        self.space.placed(placed_bytes, placed)
        if failed:
            # one line per batch: a full disk would otherwise log every message
            self.stats.materialize_errors += len(failed)
            log.error("spool: cannot write out message %s%s: %s; kept in the journal and "
                      "written again at the next checkpoint", failed[0],
                      f" and {len(failed) - 1} more" if len(failed) > 1 else "", error)


def _rewrite(fd: int, data: bytes) -> None:
    # A short write to a regular file is rare enough to redo from the start.
    os.lseek(fd, 0, os.SEEK_SET)
    os.ftruncate(fd, 0)
    write_all(fd, data)
