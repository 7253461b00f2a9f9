"""Turning journal records into files, and making files durable.

Recovery replays every segment left by the previous run; a checkpoint that
failed replays its segments before it tries again (write-back errors are
reported only once, so what is on disk cannot be trusted). Both write a
record's content and envelope through ``tmp/`` and rename them into place,
overwriting whatever partial files exist: replaying twice gives the same spool.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

from .. import durable
from ..durable import fsync_dir, write_all
from . import journal
from .envelope import STATES, parse_envelope, read_envelope_file
from .layout import Layout, is_queue_id
from .threads import WRITTEN, Residents

log = logging.getLogger("elemta.spool")

_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
_FILE_MODE = 0o600

# Measured on journaled ext4, making a checkpoint's files durable costs 40-50 us
# per message with one syncfs, 300-400 us with an fdatasync of each file (even
# on 8 threads): the file system commits its own journal once instead of once
# per file. The per-file way remains for systems without syncfs, and for
# measuring.
USE_SYNCFS = True


def replay_segment(layout: Layout, fd: int, seq: int, path: str,
                   residents: Residents | None = None) -> list[tuple[str, str]]:
    """Write out every valid record of one segment; ``(queue id, state)`` of each.

    Messages ``residents`` knows were delivered are skipped.
    """
    reader = journal.SegmentReader(fd, seq, is_queue_id)
    entries = []
    for rec in reader:
        if residents is None:
            entries.append((rec.queue_id, materialize_record(layout, fd, rec)))
            continue
        with residents.lock:
            if rec.queue_id in residents.retired:
                continue
            entries.append((rec.queue_id, materialize_record(layout, fd, rec)))
            job = residents.jobs.get(rec.queue_id)
            if job is not None:
                job.status = WRITTEN
    if reader.damaged:
        log.error("spool: journal %s is damaged (%s); the %d byte(s) from offset %d on are "
                  "not replayed although valid records follow: acknowledged messages may "
                  "be lost", path, reader.problem, reader.size - reader.end, reader.end)
    elif reader.torn:
        log.warning("spool: journal %s ends with a record cut short (%s): a batch that was "
                    "never acknowledged, ignored", path, reader.problem)
    elif reader.problem is not None:
        log.debug("spool: journal %s: %d record(s), then %s", path, len(entries),
                  reader.problem)
    return entries


def materialize_record(layout: Layout, fd: int, rec: journal.Record) -> str:
    """Write one journal record's files, replacing what is there; the state its envelope is in."""
    queue_id = rec.queue_id
    tmp = layout.tmp_file(queue_id, "content")
    out = os.open(tmp, _TMP_FLAGS, _FILE_MODE)
    try:
        journal.copy_range(fd, out, rec.content_offset, rec.content_length)
    finally:
        os.close(out)
    os.rename(tmp, layout.content(queue_id))
    moved = moved_elsewhere(layout, queue_id, rec.state)
    if moved is not None:
        return moved
    tmp = layout.tmp_file(queue_id, "envelope")
    out = os.open(tmp, _TMP_FLAGS, _FILE_MODE)
    try:
        write_all(out, rec.envelope)
    finally:
        os.close(out)
    os.rename(tmp, layout.envelope(rec.state, queue_id))
    return rec.state


def moved_elsewhere(layout: Layout, queue_id: str, state: str) -> str | None:
    """The state a sound envelope of the message is in, other than ``state``.

    Such an envelope means the message moved on after its commit (a queue
    command); replay must not put a second copy back where it was committed.
    """
    for other in STATES:
        if other == state:
            continue
        try:
            parse_envelope(read_envelope_file(layout.envelope(other, queue_id)), queue_id)
        except (FileNotFoundError, ValueError):
            continue
        return other
    return None


class Syncer:
    """Makes the files of checkpointed (or replayed) messages durable.

    On Linux one ``syncfs`` of the spool's file system, through a descriptor
    kept open for the life of the spool so that it reports every write-back
    error from then on (Linux 5.8 and later). Elsewhere, an fdatasync of each
    file on ``threads`` threads and an fsync of each directory.

    A ``syncfs`` reports a write-back error once, to one caller, whichever
    file it came from; and the next segment's files are written out while one
    checkpoint syncs. So a failed sync records when it failed
    (:attr:`failed_at`): every file written before then is suspect, whatever
    segment it belongs to, and the checkpointer writes those segments out
    again from the journal (:meth:`suspect`) before it trusts a sync; a sync
    that overlapped another's failure fails too (:meth:`make_durable`'s
    ``checked``). Nothing is read back per file.
    """

    def __init__(self, layout: Layout, threads: int) -> None:
        self.layout = layout
        self.threads = threads
        self.fd: int | None = None
        self._pool: ThreadPoolExecutor | None = None
        #: monotonic time at which a sync last failed; -inf: never
        self.failed_at = float("-inf")

    def open(self) -> None:
        # opened before anything is written, so that syncfs reports every
        # write-back error from here on
        if self.fd is None:
            self.fd = os.open(self.layout.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def make_durable(self, entries: list[tuple[str, str]], checked: float) -> None:
        """Make the files of these messages, and their directory entries, durable.

        ``checked``: when the caller last looked at :attr:`failed_at` to decide
        which files to write again; a sync of another caller that has failed
        since then may have been told this one's error, so this one fails too.
        """
        try:
            self._sync(entries)
        except OSError:
            self.failed_at = time.monotonic()
            raise
        if self.failed_at >= checked:
            raise OSError(errno.EIO, "a sync of the spool's file system failed meanwhile: "
                                     "its write-back error may belong to these files")

    def suspect(self, written_since: float) -> bool:
        """Whether files written since ``written_since`` (monotonic) may have lost a
        write-back error to a sync that failed."""
        return self.failed_at >= written_since

    def _sync(self, entries: list[tuple[str, str]]) -> None:
        if USE_SYNCFS and self.fd is not None and durable.have_syncfs():
            durable.syncfs(self.fd)
            return
        layout = self.layout
        paths = self._paths(entries)
        dirs = {layout.messages} | {layout.state_dir(state) for _, state in entries}
        n = max(1, min(self.threads, len(paths) // 16))
        if n == 1:
            journal.sync_files(paths)
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="spool-sync")
            for f in [self._pool.submit(journal.sync_files, paths[i::n])
                      for i in range(n)]:
                f.result()
        for d in dirs:
            fsync_dir(d)

    def _paths(self, entries: list[tuple[str, str]]) -> list[str]:
        """The content and envelope file of each message."""
        layout = self.layout
        return [path for queue_id, state in entries
                for path in (layout.content(queue_id), layout.envelope(state, queue_id))]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
