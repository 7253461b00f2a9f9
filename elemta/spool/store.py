"""The durable spool: messages and their envelopes on disk, committed in groups.

Layout under the spool root::

    tmp/                in-progress files; emptied at start-up
    messages/<ID>       message content (RFC 5322, CRLF); immutable once committed
    ready/<ID>.json     envelope of a message waiting for delivery
    deferred/<ID>.json, hold/<ID>.json, failed/<ID>.json

The envelope file is the commit marker: a message exists iff its envelope is in
one state directory, and its content is then always in ``messages/``.

Commit order for one message: content and envelope written to ``tmp/`` and
fsynced; content linked into ``messages/`` and ``messages/`` fsynced; envelope
renamed into its state directory and that directory fsynced. Only then does
:meth:`Spool.commit` return and the SMTP layer answer 250. A crash before that
leaves tmp leftovers and orphan content, which :meth:`Spool.recover` removes, or
a complete message that was never acknowledged (the client sends it again: a
duplicate, never a loss); never an envelope without its content.

An fsync costs from a few hundred microseconds to milliseconds, and concurrent
fsyncs of different files share journal commits, so commits are grouped: every commit
that arrives while a batch is on disk joins the next batch, whose files are
fsynced in parallel and whose directories are fsynced once for all of them.
At low load a batch is a single message and nothing waits for a timer.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from .envelope import STATES, Envelope
from .incoming import IncomingMessage

log = logging.getLogger(__name__)

_QUEUE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_DIR_MODE = 0o700
_FILE_MODE = 0o600
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_CONTENT_MISSING = "message content missing from the spool at start-up"


class SpoolError(Exception):
    """The spool cannot be used as asked (not recovered, closed, bad queue id…)."""


@dataclass(slots=True)
class SpoolStats:
    """Group-commit counters, for metrics and tests."""

    batches: int = 0
    committed: int = 0
    failed: int = 0
    largest_batch: int = 0


@dataclass(slots=True, eq=False)
class _Job:
    """One message to commit; filled in on the event loop, written by the commit threads."""

    queue_id: str
    state: str
    prefix: bytes          # prepended headers + received header section
    body: bytes | None     # body in memory…
    body_path: Path | None  # …or spilled to tmp/
    envelope: bytes
    tmp_content: Path
    tmp_envelope: Path
    created: list[Path] = field(default_factory=list)  # tmp files this job made (cleanup)
    linked: bool = False   # content is in messages/
    error: BaseException | None = None


class Spool:
    """The message spool under ``root``.

    One process owns a spool for writing (the server): it calls :meth:`recover`
    once at start-up, then :meth:`incoming` and :meth:`commit` for every
    message. Readers such as ``elemta queue`` only use :meth:`load`,
    :meth:`iter_envelopes` and :meth:`message_path`, which never write.
    """

    def __init__(self, root: Path, *, commit_threads: int = 8, memory_bytes: int = 262_144) -> None:
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
        self.messages_dir = self.root / "messages"
        self.commit_threads = commit_threads
        self.memory_bytes = memory_bytes
        self.stats = SpoolStats()
        self._counts: dict[str, int] | None = None
        self._pending: list[tuple[_Job, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False
        # The coordinator runs one batch at a time; the writers overlap the fsyncs
        # of a batch's files. Both are created on first use so that read-only
        # users of the spool never start threads.
        self._coordinator: ThreadPoolExecutor | None = None
        self._writers: ThreadPoolExecutor | None = None

    def state_dir(self, state: str) -> Path:
        if state not in STATES:
            raise ValueError(f"unknown spool state {state!r} (one of {', '.join(STATES)})")
        return self.root / state

    def message_path(self, queue_id: str) -> Path:
        return self.messages_dir / _checked_id(queue_id)

    # ------------------------------------------------------------------ start-up

    def recover(self) -> dict[str, int]:
        """Make the spool consistent after a crash and count the messages per state.

        Call once at start-up, before any listener opens: it deletes whatever is
        in ``tmp/`` (in-progress messages of the previous run, never acknowledged)
        and content files without an envelope (a crash in the middle of a commit);
        it moves an envelope whose content is missing, or that cannot be parsed,
        to ``failed/`` and logs an error, so that nothing is dropped silently.
        """
        for d in (self.root, self.tmp_dir, self.messages_dir, *(self.root / s for s in STATES)):
            d.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)

        removed_tmp = 0
        with os.scandir(self.tmp_dir) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
                removed_tmp += 1

        with os.scandir(self.messages_dir) as it:
            contents = {e.name for e in it}
        # List every state first: envelopes moved to failed/ below must not be
        # seen a second time.
        listing: dict[str, list[str]] = {}
        for state in STATES:
            with os.scandir(self.root / state) as it:
                listing[state] = [e.name for e in it]
        counts = dict.fromkeys(STATES, 0)
        referenced: set[str] = set()
        seen_in: dict[str, str] = {}
        for state, names in listing.items():
            for name in names:
                if name.endswith(".json.corrupt"):
                    # kept for the operator, and so is its content
                    referenced.add(name.removesuffix(".json.corrupt"))
                    continue
                if not name.endswith(".json"):
                    log.warning("spool: ignoring unexpected file %s", self.root / state / name)
                    continue
                queue_id = name.removesuffix(".json")
                referenced.add(queue_id)
                final_state = self._recover_envelope(state, queue_id, queue_id in contents)
                if final_state is None:
                    continue
                if queue_id in seen_in:
                    log.error("spool: message %s has envelopes in both %s/ and %s/; "
                              "resolve by hand", queue_id, seen_in[queue_id], final_state)
                seen_in[queue_id] = final_state
                counts[final_state] += 1

        orphans = contents - referenced
        for name in orphans:
            os.unlink(self.messages_dir / name)
        if orphans:
            _fsync_dir(self.messages_dir)
        if removed_tmp or orphans:
            log.info("spool: removed %d unfinished file(s) from tmp/ and %d orphan content "
                     "file(s) from messages/", removed_tmp, len(orphans))
        self._counts = counts
        return dict(counts)

    def _recover_envelope(self, state: str, queue_id: str, has_content: bool) -> str | None:
        """Check one envelope at start-up; the state it ends up in, ``None`` if quarantined."""
        path = self.root / state / f"{queue_id}.json"
        failed_dir = self.root / "failed"
        try:
            env = _parse_envelope(path.read_bytes(), queue_id)
        except ValueError as e:
            target = failed_dir / f"{queue_id}.json.corrupt"
            os.replace(path, target)
            _fsync_dir(failed_dir)
            _fsync_dir(path.parent)
            log.error("spool: unreadable envelope %s (%s); moved to %s", path, e, target)
            return None
        if has_content:
            return state
        if state == "failed" and env.last_error == _CONTENT_MISSING:
            return state  # found and reported at an earlier start-up
        env.last_error = _CONTENT_MISSING
        _write_durably(self.tmp_dir / f"{queue_id}.envelope", failed_dir / path.name, env.to_json())
        if state != "failed":
            os.unlink(path)
            _fsync_dir(path.parent)
        log.error("spool: message %s has an envelope in %s/ but no content; the envelope "
                  "is now in failed/", queue_id, state)
        return "failed"

    # ------------------------------------------------------------------ writing

    def incoming(self, queue_id: str) -> IncomingMessage:
        """A message to stream DATA into; commit or discard it."""
        self._check_writable()
        return IncomingMessage(self.tmp_dir, _checked_id(queue_id), self.memory_bytes)

    async def commit(self, incoming: IncomingMessage, envelope: Envelope, *, prepend: bytes = b"",
                     header_block: bytes | None = None, state: str = "ready") -> None:
        """Make the message durable in ``state``; on return it survives a crash.

        The content is ``prepend`` (trace headers added here), then
        ``header_block`` (the received header section minus fields the pipeline
        removed; by default the received one unchanged), then the body.
        ``incoming`` is consumed: its tmp files are gone when this returns or
        raises. On failure (an ``OSError`` such as ENOSPC or EIO) nothing of the
        message is visible in the spool.
        """
        self._check_writable()
        self.state_dir(state)
        if envelope.id != incoming.queue_id:
            raise SpoolError(f"envelope {envelope.id} does not belong to message {incoming.queue_id}")
        try:
            parts = incoming.parts()
            job = _Job(
                queue_id=incoming.queue_id,
                state=state,
                prefix=prepend + (parts.header_block if header_block is None else header_block),
                body=parts.body,
                body_path=parts.body_path,
                envelope=envelope.to_json(),
                tmp_content=self.tmp_dir / f"{incoming.queue_id}.content",
                tmp_envelope=self.tmp_dir / f"{incoming.queue_id}.envelope",
            )
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[None] = loop.create_future()
            self._pending.append((job, fut))
            if self._flusher is None:
                self._flusher = loop.create_task(self._flush())
            await fut
        finally:
            incoming.discard()

    async def _flush(self) -> None:
        """Commit pending jobs batch by batch until none is left."""
        loop = asyncio.get_running_loop()
        assert self._coordinator is not None
        batch: list[tuple[_Job, asyncio.Future[None]]] = []
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                await loop.run_in_executor(self._coordinator, self._commit_batch,
                                           [job for job, _ in batch])
                self.stats.batches += 1
                self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
                for job, fut in batch:
                    if job.error is None:
                        self._counts[job.state] += 1  # type: ignore[index]
                        self.stats.committed += 1
                    else:
                        self.stats.failed += 1
                    if fut.done():  # the caller was cancelled; the message still counts
                        continue
                    if job.error is None:
                        fut.set_result(None)
                    else:
                        fut.set_exception(job.error)
        except BaseException:
            # Cancelled (loop shutting down) or a bug: outcomes are unknown, so
            # nobody may answer 250. The client retries; duplicates beat losses.
            for _, fut in batch + self._pending:
                if not fut.done():
                    fut.set_exception(SpoolError("spool commit interrupted"))
            self._pending = []
            raise
        finally:
            self._flusher = None

    def _commit_batch(self, jobs: list[_Job]) -> None:
        """Runs in the coordinator thread; records each job's outcome in ``job.error``."""
        assert self._writers is not None
        # Spread the batch's files over the writer threads so that their fsyncs
        # overlap; one task per thread rather than per file keeps the hand-offs
        # (and their CPU cost) per batch, not per message.
        files = [(_write_content, job) for job in jobs] + [(_write_envelope, job) for job in jobs]
        n = min(self.commit_threads, len(files))
        slices = [files[i::n] for i in range(n)]
        waits = [self._writers.submit(_write_files, s) for s in slices[1:]]
        _write_files(slices[0])
        for w in waits:
            w.result()
        live = [job for job in jobs if job.error is None]

        linked: list[_Job] = []
        for job in live:
            try:
                # link, not rename: a queue id already in the spool fails with
                # EEXIST instead of silently replacing a committed message
                os.link(job.tmp_content, self.messages_dir / job.queue_id)
                job.linked = True
                linked.append(job)
            except OSError as e:
                job.error = e
        if linked:
            try:
                _fsync_dir(self.messages_dir)
            except OSError as e:
                _fail(linked, e)
        live = [job for job in linked if job.error is None]

        by_dir: dict[Path, list[_Job]] = {}
        for job in live:
            target_dir = self.root / job.state
            try:
                os.rename(job.tmp_envelope, target_dir / f"{job.queue_id}.json")
                job.created.remove(job.tmp_envelope)
                by_dir.setdefault(target_dir, []).append(job)
            except OSError as e:
                job.error = e
        for target_dir, done in by_dir.items():
            try:
                _fsync_dir(target_dir)
            except OSError as e:
                _fail(done, e)
                for job in done:
                    _unlink_quietly(target_dir / f"{job.queue_id}.json")

        for job in jobs:
            if job.error is not None and job.linked:
                _unlink_quietly(self.messages_dir / job.queue_id)
            for path in job.created:
                _unlink_quietly(path)
            if job.body_path is not None:
                _unlink_quietly(job.body_path)
            if job.error is not None:
                log.error("spool: cannot commit message %s: %s", job.queue_id, job.error)

    def _check_writable(self) -> None:
        if self._closed:
            raise SpoolError("the spool is closed")
        if self._counts is None:
            raise SpoolError("call Spool.recover() before writing to the spool")
        if self._coordinator is None:
            self._coordinator = ThreadPoolExecutor(1, thread_name_prefix="spool-commit")
            self._writers = ThreadPoolExecutor(self.commit_threads,
                                               thread_name_prefix="spool-write")

    async def close(self) -> None:
        """Finish the commits in flight, then stop the commit threads."""
        self._closed = True
        while self._flusher is not None:
            await asyncio.wait({self._flusher})
        for pool in (self._coordinator, self._writers):
            if pool is not None:
                pool.shutdown(wait=True)
        self._coordinator = self._writers = None

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
        if not _QUEUE_ID.fullmatch(queue_id):
            raise KeyError(queue_id)
        # Two passes: a message moving between states while we look could be
        # missed by the first one.
        for _ in range(2):
            for state in STATES:
                try:
                    raw = (self.root / state / f"{queue_id}.json").read_bytes()
                except FileNotFoundError:
                    continue
                return state, _parse_envelope(raw, queue_id)
        raise KeyError(queue_id)

    def iter_envelopes(self, state: str | None = None) -> Iterator[tuple[str, Envelope]]:
        """Every envelope in ``state`` (all states if ``None``), in no particular order.

        A full directory scan: for the CLI and start-up, not for per-message work.
        Envelopes that disappear while scanning (delivered, moved) are skipped,
        and so are unreadable ones, with a warning.
        """
        for s in STATES if state is None else (state,):
            d = self.state_dir(s)
            try:
                with os.scandir(d) as it:
                    names = [e.name for e in it if e.name.endswith(".json")]
            except FileNotFoundError:
                continue
            for name in names:
                try:
                    raw = (d / name).read_bytes()
                except FileNotFoundError:
                    continue
                try:
                    env = _parse_envelope(raw, name.removesuffix(".json"))
                except ValueError as e:
                    log.warning("spool: skipping unreadable envelope %s: %s", d / name, e)
                    continue
                yield s, env

    def writable(self) -> bool:
        """Whether a file can be created and deleted in ``tmp/`` (readiness probe)."""
        probe = self.tmp_dir / f".probe-{uuid.uuid4().hex}"
        try:
            os.close(os.open(probe, _CREATE_FLAGS, _FILE_MODE))
            os.unlink(probe)
        except OSError:
            return False
        return True

    def __repr__(self) -> str:
        return f"<Spool {self.root}>"


# ---------------------------------------------------------------------- file work


def _parse_envelope(raw: bytes, queue_id: str) -> Envelope:
    """An envelope file's contents; ``ValueError`` for anything malformed."""
    try:
        env = Envelope.from_json(raw)
    except (TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"malformed envelope: {e!r}") from None
    if env.id != queue_id:
        raise ValueError(f"envelope id {env.id!r} does not match its file name")
    return env


def _checked_id(queue_id: str) -> str:
    # Queue ids become file names: nothing that could walk out of the spool.
    if not _QUEUE_ID.fullmatch(queue_id):
        raise SpoolError(f"invalid queue id {queue_id!r}")
    return queue_id


def _write_files(work: list[tuple[Callable[[_Job], None], _Job]]) -> None:
    for write, job in work:
        if job.error is not None:
            continue  # its other file already failed
        try:
            write(job)
        except Exception as e:
            job.error = e


def _write_content(job: _Job) -> None:
    fd = os.open(job.tmp_content, _CREATE_FLAGS, _FILE_MODE)
    job.created.append(job.tmp_content)
    try:
        if job.body_path is None:
            _write_all(fd, job.prefix, job.body or b"")
        else:
            # The prepended headers cannot go in front of the spilled body in
            # place, so the content is a new file: the prefix, then the body
            # copied inside the kernel (no trip through Python's memory).
            _write_all(fd, job.prefix)
            with open(job.body_path, "rb") as src:
                _copy_file(src.fileno(), fd)
        _sync_data(fd)
    finally:
        os.close(fd)


def _write_envelope(job: _Job) -> None:
    fd = os.open(job.tmp_envelope, _CREATE_FLAGS, _FILE_MODE)
    job.created.append(job.tmp_envelope)
    try:
        _write_all(fd, job.envelope)
        _sync_data(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, *chunks: bytes) -> None:
    views = [memoryview(c) for c in chunks if c]
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def _copy_file(src: int, dst: int) -> None:
    try:
        while os.copy_file_range(src, dst, 1 << 30):
            pass
        return
    except OSError as e:
        # not supported between these files: copy through a buffer
        if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    while chunk := os.read(src, 1 << 20):
        _write_all(dst, chunk)


def _sync_data(fd: int) -> None:
    # fdatasync still flushes the size and block map of a new file; it only
    # skips timestamps. Not every platform has it.
    if hasattr(os, "fdatasync"):
        os.fdatasync(fd)
    else:
        os.fsync(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(tmp: Path, target: Path, data: bytes) -> None:
    """Replace ``target`` with ``data`` atomically and durably (recovery only)."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, _FILE_MODE)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)
    _fsync_dir(target.parent)


def _fail(jobs: list[_Job], error: OSError) -> None:
    # A directory fsync failure dooms every job of the batch in that directory;
    # each caller gets its own exception object.
    for job in jobs:
        job.error = OSError(error.errno, f"spool directory sync failed: {error.strerror}",
                            error.filename)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("spool: cannot remove %s: %s", path, e)
