"""The durable spool: messages and their envelopes on disk, committed through a journal.

:class:`Spool` is the one object the rest of Elemta uses; the work is done by
modules with one job each:

* ``layout.py`` — every folder and file name (no other module spells them out);
* ``incoming.py`` — DATA streamed into memory or ``tmp/`` while it arrives;
* ``writer.py`` — the journal thread: group commit, one ``pwritev`` and one
  ``fdatasync`` per batch, before any commit returns;
* ``writeout.py`` — the thread that writes each journaled message's files;
* ``checkpoint.py`` — the thread that makes those files durable and retires
  journal segments (``segments.py`` creates and reuses them);
* ``recovery.py`` and ``replay.py`` — start-up, and rewriting files from the
  journal;
* ``resident.py`` — small messages delivered from memory, retired without files;
* ``admin.py`` — what ``elemta queue`` does to one message.

The threads pass typed messages (``threads.py``). The rules they keep
together — an acknowledged message is durable in the journal; its files are
acted on only after its checkpoint (:meth:`Spool.on_durable`); recovery always
completes what the journal holds — are told in ``docs/architecture.md``.

A small message committed while a runner listens (:meth:`Spool.on_journaled`)
is *resident*: handed to the runner as soon as the journal holds it and
delivered from memory. Delivered before its journal segment is sealed, it never
gets files: a retire record in its segment's retire file tells replay to skip it. Still
undelivered when the segment is sealed, it is carried into the next segment
(``writer.py``) and stays in memory. Deferred, or older than the carry allows,
it is written out and goes on as any other message.

Longer than 500 lines because :class:`Spool` is the spool's whole public
surface: every method is a thin front for one of the modules above, but each
states the durability promise its callers rely on, and those promises are the
point of this file.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from . import journal
from .checkpoint import Checkpointer, Entries
from .envelope import STATES, Envelope, parse_envelope, read_envelope_file
from .incoming import IncomingMessage
from .layout import FreshIds, InvalidQueueId, Layout, check_id, is_queue_id
from .recovery import recover, replay_segments, set_aside
from .remover import Remover
from .replay import Syncer
from .segments import Segments, close_quietly
from .space import SpaceMonitor
from .resident import JournaledCallback, ResidentMessages
from .threads import (Backlog, Barrier, Checkpoint, CommitWaiter, Flags, Job, SpoolError,
                      SpoolStats, Stop)
from .writeout import WriteOutThread
from .writer import JournalWriter

__all__ = ["DurableCallback", "Spool", "SpoolError", "SpoolStats"]

log = logging.getLogger("elemta.spool")

DurableCallback = Callable[[Entries], None]

_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_FILE_MODE = 0o600


class Spool:
    """The message spool under ``root``.

    One process owns a spool for writing (the server): it calls :meth:`recover`
    once at start-up, then :meth:`incoming` and :meth:`commit` for every
    message, and :meth:`close` at the end. Readers such as ``elemta queue`` only
    use :meth:`load`, :meth:`iter_envelopes` and :meth:`message_path`, which
    never write. Whatever acts on a message's files (delivery, moving,
    deleting) must wait until the message is durable in them
    (:meth:`on_durable`), which is a moment after its commit returned.

    With ``visible_on_commit`` (the default) :meth:`commit` returns once the
    message's files are in place as well, so that whoever reads the spool
    directories right after a 250 finds them; without it, it returns as soon as
    the journal is synced and the files follow a moment later.

    ``commit_threads`` is the number of threads that make checkpointed files
    durable one by one where ``syncfs`` is not available; on Linux a
    checkpoint is one ``syncfs`` and the setting has no effect.
    """

    def __init__(self, root: Path, *, commit_threads: int = 8, memory_bytes: int = 262_144,
                 checkpoint_interval: float = 1.0, checkpoint_idle: float = 0.05,
                 segment_bytes: int = 64 << 20, visible_on_commit: bool = True,
                 min_free_bytes: int = 0, min_free_inodes: int = 0) -> None:
        self.root = Path(root)
        self.layout = Layout(self.root)
        self.tmp_dir = Path(self.layout.tmp)
        self.messages_dir = Path(self.layout.messages)
        self.journal_dir = Path(self.layout.journal)
        self.memory_bytes = memory_bytes
        self.checkpoint_interval = checkpoint_interval
        self.checkpoint_idle = checkpoint_idle
        self.segment_bytes = segment_bytes
        self.visible_on_commit = visible_on_commit
        self.stats = SpoolStats()
        self._flags = Flags()
        self._counts: dict[str, int] | None = None
        self._fresh = FreshIds()  # recover() sets what the spool holds
        self._closed = False
        # Queue ids in the journal and not yet checkpointed: the journal
        # thread adds, the checkpoint thread removes, one set operation at a time.
        self._undurable: set[str] = set()
        #: Free space and inodes of the spool's file system (``space.py``).
        self.space = SpaceMonitor(self.layout.root, min_free_bytes=min_free_bytes,
                                  min_free_inodes=min_free_inodes)
        # Journal segments recovery had no room to write out, and what of them is not counted
        self._pending: list[tuple[int, str]] = []
        self._uncounted: set[str] = set()
        self._syncer = Syncer(self.layout, commit_threads)
        self._segments = Segments(self.layout, self._flags, self.stats, segment_bytes)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake_due = False          # a wake-up of the journal thread is scheduled
        self._remover = Remover()
        self._durable_callbacks: list[DurableCallback] = []
        self._resident = ResidentMessages(self.layout, self.space, self.stats, self._count)
        # Started on first write, so that read-only users never start threads.
        self._writer: JournalWriter | None = None
        self._writeout: WriteOutThread | None = None
        self._checkpointer: Checkpointer | None = None

    def state_dir(self, state: str) -> Path:
        return Path(self.layout.state_dir(state))

    def message_path(self, queue_id: str) -> Path:
        return Path(self.message_file(queue_id))

    def message_file(self, queue_id: str) -> str:
        """:meth:`message_path` as a string, for per-message work."""
        try:
            return self.layout.content(check_id(queue_id))
        except InvalidQueueId as e:
            raise SpoolError(str(e)) from None

    # ------------------------------------------------------------------ start-up

    def recover(self) -> dict[str, int]:
        """Make the spool consistent after a crash and count the messages per state.

        Call once at start-up, before any listener opens. It replays the
        journal left by the previous run (every acknowledged message that was
        not checkpointed, and possibly some that were journaled but never
        acknowledged: duplicates, never losses), makes the result durable and
        empties the journal. Then it deletes whatever is in ``tmp/`` and content
        files without an envelope, and moves an envelope whose content is
        missing, or that cannot be parsed, to ``failed/`` with an error logged,
        so that nothing is dropped silently. Envelopes in ``ready/`` are only
        counted: whoever reads one and finds it unreadable (the runner, at once)
        moves it aside with :meth:`set_aside`. Interrupted, it can simply run again.
        """
        found = recover(self.layout, self._syncer, self.stats)
        self._segments.start_after(found.last_seq)
        self._pending, self._uncounted = found.pending, found.uncounted
        self._fresh = found.fresh
        # not deliverable before they are written out
        self._undurable.update(found.pending_ids)
        self._counts = found.counts
        return dict(found.counts)

    def refusal(self, size: int = 0) -> str | None:
        """Why new mail (of ``size`` bytes, when declared) cannot be taken now, or ``None``."""
        if self._pending:
            return (f"{len(self._pending)} journal segment(s) wait to be written out: the "
                    "spool's file system is full")
        return self.space.refusal(size)

    @property
    def pending_replay(self) -> int:
        """Journal segments recovery had no room to write out yet."""
        return len(self._pending)

    async def retry_pending(self) -> int:
        """Write out what recovery had no room for, as far as room allows now; messages done.

        Those written are counted and announced like a checkpoint's (``on_durable``).
        """
        if not self._pending:
            return 0
        entries, self._pending = await asyncio.to_thread(
            replay_segments, self.layout, self._syncer, self._pending)
        counts = self._counts
        assert counts is not None
        for queue_id, state in entries:
            self._undurable.discard(queue_id)
            if queue_id in self._uncounted:
                self._uncounted.discard(queue_id)
                counts[state] += 1
        if entries:
            log.info("spool: %d message(s) left in the journal at start-up written out; %d "
                     "segment(s) still wait", len(entries), len(self._pending))
            _call_durable(list(self._durable_callbacks), entries)
        return len(entries)

    # ------------------------------------------------------------------ writing

    def incoming(self, queue_id: str) -> IncomingMessage:
        """A message to stream DATA into; commit or discard it."""
        self._check_writable()
        if not is_queue_id(queue_id):
            raise SpoolError(f"invalid queue id {queue_id!r}")
        return IncomingMessage(self.tmp_dir, queue_id, self.memory_bytes)

    async def commit(self, incoming: IncomingMessage, envelope: Envelope, *, prepend: bytes = b"",
                     header_block: bytes | None = None,
                     body: tuple[bytes | None, str | None] | None = None,
                     state: str = "ready") -> None:
        """Make the message durable in ``state``; on return it survives a crash.

        The content is ``prepend`` (trace headers added here), then
        ``header_block`` (the header section as the pipeline left it; by default
        the received one unchanged), then the body: the received one, or
        ``body`` = ``(bytes, None)`` or ``(None, path)`` when a plugin replaced it.
        ``incoming`` is consumed: its tmp files are gone when this returns or
        raises. On failure (an ``OSError`` such as ENOSPC or EIO, or
        ``FileExistsError`` for a queue id already in the spool) nothing of the
        message is visible in the spool. On success the message is durable in
        the journal and, with ``visible_on_commit``, its files are in
        ``messages/`` and the state directory (otherwise they follow a moment
        later); it is durable in those files after the next checkpoint.
        """
        writer = self._check_writable()
        if state not in journal.STATE_INDEX:
            self.state_dir(state)  # raises the usual ValueError
        if envelope.id != incoming.queue_id:
            raise SpoolError(f"envelope {envelope.id} does not belong to message {incoming.queue_id}")
        try:
            parts = incoming.parts()
            loop = asyncio.get_running_loop()
            fut = CommitWaiter(loop)  # the session resumes in the turn that answers it
            content, body_path = ((parts.body, parts.body_path) if body is None else body)
            job = Job(incoming.queue_id, state,
                      prepend + (parts.header_block if header_block is None else header_block),
                      content, None if body_path is None else os.fspath(body_path),
                      envelope.to_json(), fut, loop)
            job.resident = (not self.visible_on_commit
                            and self._resident.eligible(state, body_path is None))
            if self._loop is not loop:
                self._wake_due = False  # a wake-up scheduled on another loop never runs
            self._loop = loop
            # the journal thread is woken once per turn of the event loop, with every
            # commit of that turn: sessions that reach the spool together share a batch
            # (one write, one fsync) instead of the first waking the thread alone
            writer.submit(job, wake=False)
            if not self._wake_due:
                self._wake_due = True
                loop.call_soon(self._wake_writer, writer)
            await fut
        finally:
            incoming.discard()

    async def commit_bytes(self, envelope: Envelope, content: bytes, *,
                           state: str = "ready") -> None:
        """Commit a message the server made itself (a bounce) like a received one."""
        incoming = self.incoming(envelope.id)
        try:
            incoming.write(content)
        except BaseException:
            incoming.discard()
            raise
        await self.commit(incoming, envelope, state=state)

    def _wake_writer(self, writer: JournalWriter) -> None:
        self._wake_due = False
        writer.wake_for_pending()

    def _check_writable(self) -> JournalWriter:
        if self._closed:
            raise SpoolError("the spool is closed")
        if self._counts is None:
            raise SpoolError("call Spool.recover() before writing to the spool")
        if self._writer is None:
            self._start_threads()
        assert self._writer is not None
        return self._writer

    def _start_threads(self) -> None:
        backlog = Backlog(self._flags)
        residents = self._resident.table
        checkpointer = Checkpointer(
            self.layout, self._segments, self._syncer, self._flags, self.stats,
            self._undurable, self._announce,
            retry=lambda: writeout.inbox.put(Checkpoint()), retry_after=self.checkpoint_interval,
            space=self.space, residents=residents,
            forget_segment=self._resident.forget_segment)
        writeout = WriteOutThread(self.layout, self._flags, self.stats, backlog, checkpointer,
                                  self._answer, self.space, residents)
        writer = JournalWriter(
            self.layout, self._segments, self._flags, self.stats, backlog, writeout.inbox,
            self._undurable, self._answer, self.space, residents,
            checkpoint_interval=self.checkpoint_interval,
            checkpoint_idle=self.checkpoint_idle, segment_bytes=self.segment_bytes,
            visible_on_commit=self.visible_on_commit, retire=self._resident.append_retire,
            fresh=self._fresh)
        self._checkpointer, self._writeout, self._writer = checkpointer, writeout, writer
        writeout.thread.start()
        writer.thread.start()

    def _answer(self, jobs: list[Job]) -> None:
        """On the event loop: count the batch and answer its commits."""
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(jobs))
        counts = self._counts
        assert counts is not None
        resident: list[str] = []
        for job in jobs:
            if job.error is None:
                counts[job.state] += 1
                self.stats.committed += 1
                if job.resident:
                    resident.append(job.queue_id)
            else:
                self.stats.failed += 1
        if resident:  # the runner has them before any session goes on to its 250
            self._resident.journaled(resident)
        for job in jobs:
            fut = job.future
            if fut.done():  # the caller was cancelled; the message still counts
                continue
            # a CommitWaiter resumes the waiting session right here
            if job.error is None:
                fut.set_result(None)
            else:
                fut.set_exception(job.error)

    async def checkpoint(self) -> None:
        """Write out every acknowledged message, make its files durable and empty the journal.

        This happens on its own every ``checkpoint_interval`` seconds under
        load; call it to wait for it (tests, shutdown). Raises the ``OSError``
        that made a segment stay in the journal (it is retried later).
        """
        if self._writer is None:
            return
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._writer.request_checkpoint(done)
        await asyncio.wrap_future(done)

    def wait_written(self, timeout: float = 10.0) -> None:
        """Block until every acknowledged message's files are in the spool directories.

        Without ``visible_on_commit`` a 250 means "in the journal" and the
        files follow a moment later; this waits for that moment (tests, tools
        that read the directories). It only needs the spool's own threads, so
        it may be called on the event loop. Raises ``TimeoutError``.
        """
        if self._writeout is None or self._flags.crashed:
            return
        done = threading.Event()
        self._writeout.inbox.put(Barrier(done))
        if not done.wait(timeout):
            raise TimeoutError(f"spool write-out did not catch up within {timeout} s")

    def on_durable(self, callback: DurableCallback) -> Callable[[], None]:
        """Call ``callback([(queue_id, state), …])`` on the event loop for every checkpoint.

        The messages passed are durable in their files and gone from the
        journal: from then on they may be delivered, moved or deleted. Messages
        found on disk after :meth:`recover` are all durable already. Returns a
        function that removes the callback.
        """
        self._durable_callbacks.append(callback)

        def remove() -> None:
            if callback in self._durable_callbacks:
                self._durable_callbacks.remove(callback)

        return remove

    def on_journaled(self, callback: JournaledCallback) -> Callable[[], None]:
        """Call ``callback([queue_id, …])`` on the event loop for resident messages, as
        soon as their commit returns (the delivery runner; see the module docstring).

        Those messages are *not* announced by :meth:`on_durable` later. While one
        listens, small messages committed in ``ready`` are kept in memory: read
        them with :meth:`load` and :meth:`content`, and change them only with
        :meth:`rewrite`, :meth:`move` and :meth:`remove`. Returns a function that
        removes the callback. Without ``memfd_create`` (not Linux) nothing is
        resident and the callback is never called.
        """
        return self._resident.subscribe(callback)

    def _announce(self, entries: Entries) -> None:
        """From the checkpoint thread: tell the ``on_durable`` callbacks, on the event loop."""
        callbacks, loop = list(self._durable_callbacks), self._loop
        if not callbacks or not entries or loop is None:
            return
        try:
            loop.call_soon_threadsafe(_call_durable, callbacks, entries)
        except RuntimeError:
            pass  # the event loop is gone, and with it whoever listened

    def awaiting_checkpoint(self, queue_id: str) -> bool:
        """Whether the message is committed but its journal segment not yet checkpointed."""
        return queue_id in self._undurable

    async def close(self) -> None:
        """Finish the commits in flight, checkpoint everything, then stop the threads."""
        self._closed = True
        writer, writeout = self._writer, self._writeout
        if writer is not None and writeout is not None:
            done: concurrent.futures.Future[None] = concurrent.futures.Future()
            writer.request_stop(done)
            try:
                await asyncio.wrap_future(done)
            except Exception as e:
                log.error("spool: cannot checkpoint the journal at shutdown (%s); it is replayed "
                          "at the next start-up", e)
            writer.thread.join()
            writeout.thread.join()
            self._writer = self._writeout = None
        if self._checkpointer is not None:
            self._checkpointer.shutdown()
            self._checkpointer = None
        self._resident.close()
        self._syncer.close()
        self._remover.close()

    # ------------------------------------------------------------------ tests

    @property
    def _materialize_gate(self) -> threading.Event:
        """Tests: clear it to hold writing out back (the journal keeps committing)."""
        self._check_writable()
        assert self._writeout is not None
        return self._writeout.gate

    def _crash_for_tests(self) -> None:
        """Stop the threads where they are, as a crash would: nothing more is written out."""
        self._flags.crashed = True
        writer, writeout, checkpointer = self._writer, self._writeout, self._checkpointer
        if writer is not None:
            writer.wake()
        if writeout is not None:
            writeout.gate.set()
            writeout.inbox.put(Stop())
        for thread in (writer and writer.thread, writeout and writeout.thread):
            if thread is not None:
                thread.join()
        if checkpointer is not None:
            checkpointer.shutdown()
        self._writer = self._writeout = self._checkpointer = None
        self._closed = True
        self._remover.abandon()
        self._resident.close()
        spare = self._segments.take_spare()
        segments = [writer and writer.active, spare, *(checkpointer.sealed if checkpointer else ())]
        for seg in {id(s): s for s in segments if s}.values():
            close_quietly(seg.fd)

    # ------------------------------------------------------------------ reading

    def counts(self) -> dict[str, int]:
        """Messages per state, kept in memory by the process that ran :meth:`recover`."""
        if self._counts is None:
            raise SpoolError("message counts are known after Spool.recover()")
        return dict(self._counts)

    def load(self, queue_id: str) -> tuple[str, Envelope]:
        """``(state, envelope)`` of a message; ``KeyError`` if the spool has no such message.

        Raises ``ValueError`` for an envelope that cannot be parsed.
        """
        if not is_queue_id(queue_id):
            raise KeyError(queue_id)
        found = self._resident.load(queue_id)
        if found is not None:
            return found
        # Two passes: a message moving between states while we look could be
        # missed by the first one.
        for _ in range(2):
            for state in STATES:
                try:
                    raw = read_envelope_file(self.layout.envelope(state, queue_id))
                except FileNotFoundError:
                    continue
                return state, parse_envelope(raw, queue_id)
        raise KeyError(queue_id)

    def set_aside(self, queue_id: str, error: Exception) -> str | None:
        """Move a message's envelope that :meth:`load` could not parse to
        ``failed/<ID>.json.corrupt``, durably, with an error logged; its new path,
        or ``None`` if the message has no envelope on disk (any more).

        The content stays, for the operator to rebuild the envelope from; the
        message no longer counts in its state, and no reader sees it again."""
        if not is_queue_id(queue_id):
            return None
        for state in STATES:
            try:
                target = set_aside(self.layout, state, queue_id, error)
            except FileNotFoundError:
                continue
            self._count(state, -1)
            return target
        return None

    def iter_envelopes(self, state: str | None = None) -> Iterator[tuple[str, Envelope]]:
        """Every envelope in ``state`` (all states if ``None``), in no particular order.

        A full directory scan: for the CLI and start-up, not for per-message work.
        Envelopes that disappear while scanning (delivered, moved) are skipped,
        and so are unreadable ones, with a warning.
        """
        for s in STATES if state is None else (state,):
            for queue_id in self.layout.ids_in(s):
                path = self.layout.envelope(s, queue_id)
                try:
                    raw = read_envelope_file(path)
                except FileNotFoundError:
                    continue
                try:
                    env = parse_envelope(raw, queue_id)
                except ValueError as e:
                    log.warning("spool: skipping unreadable envelope %s: %s", path, e)
                    continue
                yield s, env

    def ids_in(self, state: str) -> list[str]:
        """The queue ids in ``state``, from a directory listing (no envelope is read)."""
        return self.layout.ids_in(state)

    def writable(self) -> bool:
        """Whether a file can be created and deleted in ``tmp/`` (readiness probe)."""
        probe = self.layout.tmp_file(f".probe-{uuid.uuid4().hex}", "tmp")
        try:
            os.close(os.open(probe, _CREATE_FLAGS, _FILE_MODE))
            os.unlink(probe)
        except OSError:
            return False
        return True

    # ------------------------------------------------------------------ state changes
    #
    # What happens to a spooled message after the commit. These run on the
    # event loop and only rename, write and unlink: they survive a killed
    # process without fsync. After a power loss an older envelope may come
    # back, which can repeat a delivery but never lose a message, because an
    # envelope is only ever removed after everything it promised is done.

    def _count(self, state: str, delta: int) -> None:
        if self._counts is not None:
            self._counts[state] = self._counts.get(state, 0) + delta

    def rewrite(self, envelope: Envelope, from_state: str, to_state: str) -> None:
        """Store ``envelope`` (changed recipients, attempts…) in ``to_state``.

        The old envelope is first moved, then replaced atomically: at every
        moment exactly one envelope of the message exists. A resident message
        that stays ``ready`` stays in memory; moved to another state it is
        written out now.
        """
        if self._resident.rewrite(envelope, to_state):
            return
        src = self.layout.envelope(from_state, envelope.id)
        dst = self.layout.envelope(to_state, envelope.id)
        if src != dst:
            os.rename(src, dst)
            self._count(from_state, -1)
            self._count(to_state, +1)
        tmp = self.layout.tmp_file(envelope.id, f"{uuid.uuid4().hex[:8]}.envelope")
        fd = os.open(tmp, _CREATE_FLAGS, _FILE_MODE)
        try:
            os.write(fd, envelope.to_json())
        finally:
            os.close(fd)
        os.rename(tmp, dst)

    def move(self, queue_id: str, from_state: str, to_state: str) -> None:
        """Move a message between states without changing its envelope."""
        if self._resident.move(queue_id, to_state):
            return
        os.rename(self.layout.envelope(from_state, queue_id),
                  self.layout.envelope(to_state, queue_id))
        self._count(from_state, -1)
        self._count(to_state, +1)

    def remove(self, queue_id: str, state: str) -> None:
        """Delete a message: envelope first (it is the commit marker), then content;
        the envelope is moved out of its state directory at once, the files are
        unlinked by a helper process (``remover.py``).

        A resident message is retired: a retire record keeps replay from bringing
        it back, and if it never had files, none are touched.
        """
        if self._resident.remove(queue_id, state):
            return
        # gone for every reader once renamed; the unlinks, each costing a hundred
        # microseconds on a disk, are left to a helper process (remover.py)
        removed = self.layout.tmp_file(queue_id, "removed")
        os.rename(self.layout.envelope(state, queue_id), removed)
        self._count(state, -1)
        self._remover.unlink_later(removed)
        self._remover.unlink_later(self.layout.content(queue_id))

    def finish_removals(self) -> None:
        """Wait until the files of every message removed so far are unlinked (a command
        line that removed messages, before it exits; :meth:`close` does it too)."""
        self._remover.close()

    @contextlib.contextmanager
    def content(self, queue_id: str) -> Iterator[str]:
        """The path of a message's content, for as long as the ``with`` block lasts.

        That is :meth:`message_file`, or for a resident message a memory file
        (``/proc/self/fd/N``): read it by opening the path, as a file.
        """
        parts = self._resident.content_bytes(queue_id)
        if parts is None:
            yield self.message_file(queue_id)
        else:
            with self._resident.memory_file(parts) as path:
                yield path

    def original(self, queue_id: str) -> bytes | Path:
        """A message's content (or its path) to quote in a report; ``b""`` if it is gone."""
        parts = self._resident.content_bytes(queue_id)
        if parts is not None:
            return b"".join(parts)
        path = self.message_path(queue_id)
        return path if path.exists() else b""

    def __repr__(self) -> str:
        return f"<Spool {self.root}>"


def _call_durable(callbacks: list[DurableCallback], entries: Entries) -> None:
    for callback in callbacks:
        try:
            callback(entries)
        except Exception:
            log.exception("spool: on_durable callback %r failed", callback)
