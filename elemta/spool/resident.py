"""Resident messages: delivered from memory, written out only if they must be.

A small message (its body held in memory) committed in ``ready`` while a
runner listens (:meth:`~.store.Spool.on_journaled`) stays in memory after its
journal batch is synced, and the runner is told at once. From then on:

* delivered (or bounced) before its journal segment is sealed, it is
  *retired*: before :meth:`ResidentMessages.remove` returns, a retire record
  is appended to its segment's retire file (``journal/<seq>.retired``), and no
  file of the message is ever written; replay skips a message with a retire
  record. The record is not synced: a process crash keeps it (the page cache
  survives the process), a power loss may not, which only repeats a delivery.
  The retire file goes when its segment has been checkpointed;
* deferred, held or failed first, it gets its files then, in that state;
* still in memory when its segment is sealed (it takes longer than
  ``checkpoint_interval``), it is *carried*: the journal writer appends its
  record, envelope as it is now, to the next segment and syncs it before the
  sealed segment goes to its checkpoint (``writer.py``); it stays in memory,
  now belonging to the new segment. A retire record written to the old
  segment's retire file while it was being carried is written to the new
  one's too. Replay goes by sequence number, and the new segment's is higher,
  so of two copies left by a crash the carried one is written last;
* older than ``writer.CARRY_SECONDS`` at a seal, past the carry's byte limit,
  or when a checkpoint is asked for (a barrier, shutdown), the write-out
  thread writes it out before the segment's checkpoint, as if it had never
  been resident.

A job's status (``threads.RESIDENT``, ``WRITTEN``, ``RETIRED``) changes only
under :attr:`Residents.lock`, and whoever writes or skips its files holds it,
so the event loop and the spool's threads never both write one. Once its
segment is checkpointed the message is an ordinary one (or gone).

Content is passed to transports as a memory file, ``/proc/self/fd/N``: a
path they open like any other. Where that is not possible (not Linux, or a
process made non-dumpable by a privilege drop, whose ``/proc/self/fd`` it
cannot open) nothing is resident.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import uuid
from collections.abc import Callable, Iterator

from ..durable import write_all
from . import journal
from .envelope import Envelope, parse_envelope
from .layout import Layout
from .space import SpaceMonitor
from .threads import RESIDENT, RETIRED, WRITTEN, Job, Residents, SpoolStats

log = logging.getLogger("elemta.spool")

JournaledCallback = Callable[[list[str]], None]

_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_FILE_MODE = 0o600


class ResidentMessages:
    """The spool's resident messages, as the event loop sees them."""

    def __init__(self, layout: Layout, space: SpaceMonitor, stats: SpoolStats,
                 count: Callable[[str, int], None]) -> None:
        self.layout = layout
        self.stats = stats
        self.space = space
        self._count = count
        self.table = Residents()
        self.callbacks: list[JournaledCallback] = []
        # the open retire file of each segment that has one (under the table's lock)
        self._retire_fds: dict[int, int] = {}

    def eligible(self, state: str, body_in_memory: bool) -> bool:
        return bool(self.callbacks) and body_in_memory and state == "ready"

    def subscribe(self, callback: JournaledCallback) -> Callable[[], None]:
        if not memfd_usable():
            return lambda: None
        self.callbacks.append(callback)

        def remove() -> None:
            if callback in self.callbacks:
                self.callbacks.remove(callback)

        return remove

    def journaled(self, queue_ids: list[str]) -> None:
        """On the event loop: these resident messages' commits were answered."""
        for callback in list(self.callbacks):
            try:
                callback(queue_ids)
            except Exception:
                log.exception("spool: on_journaled callback %r failed", callback)

    def _resident(self, queue_id: str) -> Job | None:
        """The job if it is still only in memory (call with the lock held)."""
        job = self.table.jobs.get(queue_id)
        if job is not None and job.status == RETIRED:
            raise KeyError(queue_id)
        return job if job is not None and job.status == RESIDENT else None

    def load(self, queue_id: str) -> tuple[str, Envelope] | None:
        """``(state, envelope)`` of a message in memory; ``None`` if it has files (or is
        not resident); ``KeyError`` if it was retired."""
        if queue_id not in self.table.jobs:
            return None
        with self.table.lock:
            job = self._resident(queue_id)
            return None if job is None else (job.state, parse_envelope(job.envelope, queue_id))

    def rewrite(self, envelope: Envelope, to_state: str) -> bool:
        """Store a changed envelope of a message in memory; ``False`` if it has files."""
        if envelope.id not in self.table.jobs:
            return False
        with self.table.lock:
            job = self._resident(envelope.id)
            if job is None:
                return False
            if to_state == job.state:
                job.envelope = envelope.to_json()
            else:
                self._write_out(job, to_state, envelope.to_json())
            return True

    def move(self, queue_id: str, to_state: str) -> bool:
        if queue_id not in self.table.jobs:
            return False
        with self.table.lock:
            job = self._resident(queue_id)
            if job is None:
                return False
            if to_state != job.state:
                self._write_out(job, to_state, job.envelope)
            return True

    def _write_out(self, job: Job, state: str, envelope: bytes) -> None:
        """Give a message in memory its files, in ``state`` (lock held)."""
        queue_id, layout = job.queue_id, self.layout
        fd = os.open(layout.content(queue_id), os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                     | os.O_CLOEXEC, _FILE_MODE)
        try:
            write_all(fd, job.prefix, job.body or b"")
        finally:
            os.close(fd)
        tmp = layout.tmp_file(queue_id, f"{uuid.uuid4().hex[:8]}.envelope")
        fd = os.open(tmp, _CREATE_FLAGS, _FILE_MODE)
        try:
            write_all(fd, envelope)
        finally:
            os.close(fd)
        os.rename(tmp, layout.envelope(state, queue_id))
        job.status = WRITTEN
        self.space.placed(job.placed_bytes, 1)
        self._count(job.state, -1)
        self._count(state, +1)

    def remove(self, queue_id: str, state: str) -> bool:
        """Retire a resident message; ``True`` once it is removed, ``False`` if it is
        not resident or has files for the caller to delete."""
        table = self.table
        job = table.jobs.get(queue_id)
        if job is None:
            return False
        with table.lock:
            status = job.status
            if status == RETIRED:
                raise FileNotFoundError(errno.ENOENT, "message already removed", queue_id)
            job.status = RETIRED
            table.retired.add(queue_id)
            if job.segment is not None:
                self.append_retire(job.segment.seq, queue_id)
        if status == RESIDENT:
            self._count(job.state, -1)
            self.space.placed(job.placed_bytes, 1)
            self.stats.retired += 1
            return True
        if os.path.lexists(self.layout.envelope(state, queue_id)):
            return False
        # its write-out failed: the retire record keeps replay from writing it later
        self._count(state, -1)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.layout.content(queue_id))
        return True

    def append_retire(self, seq: int, queue_id: str) -> None:
        """The retire record of ``queue_id``, appended to segment ``seq``'s retire file
        (lock held). Unsynced, it outlives a crash of the process."""
        try:
            fd = self._retire_fds.get(seq)
            if fd is None:
                fd = self._retire_fds[seq] = os.open(
                    self.layout.retire_file(seq),
                    os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, _FILE_MODE)
            write_all(fd, journal.retire_record(seq, queue_id.encode("ascii")))
        except OSError as e:
            # delivered all the same: at worst a crash delivers it again
            log.warning("spool: cannot write the retire record of %s: %s", queue_id, e)

    def forget_segment(self, seq: int) -> None:
        """Segment ``seq`` is checkpointed and gone: its retire file is not needed."""
        with self.table.lock:
            fd = self._retire_fds.pop(seq, None)
        if fd is not None:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.layout.retire_file(seq))

    def close(self) -> None:
        """Close the retire files (they stay, for the journal they belong to)."""
        with self.table.lock:
            fds, self._retire_fds = list(self._retire_fds.values()), {}
        for fd in fds:
            os.close(fd)

    def content_bytes(self, queue_id: str) -> tuple[bytes, bytes] | None:
        if queue_id not in self.table.jobs:
            return None
        with self.table.lock:
            try:
                job = self._resident(queue_id)
            except KeyError:
                return None
            return None if job is None else (job.prefix, job.body or b"")

    @contextlib.contextmanager
    def memory_file(self, parts: tuple[bytes, bytes]) -> Iterator[str]:
        fd = os.memfd_create("elemta-message", os.MFD_CLOEXEC)
        try:
            write_all(fd, *parts)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)


def memfd_usable() -> bool:
    """Whether memory files can be created and opened by path, now (asked once per
    runner start: a privilege drop can change the answer)."""
    try:
        fd = os.memfd_create("elemta-probe", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        return False
    try:
        os.write(fd, b"x")
        with open(f"/proc/self/fd/{fd}", "rb") as f:
            return f.read() == b"x"
    except OSError:
        return False
    finally:
        os.close(fd)
