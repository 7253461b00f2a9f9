"""Durable writes into ``new/``: unnamed files linked in, syncs shared by a batch (blocking I/O).

:class:`Writer` writes a message to a file not yet in ``new/``
(:meth:`Writer.begin`) and names a batch of them with two syncs in all
(:meth:`Writer.complete`). :class:`FsSyncer` and :class:`DirSyncer` are the
group commits behind the syncs: a ``syncfs`` of the mailbox file system, or
an fsync of each ``new/``, shared by everything written before it began.
Nothing reads a message into memory: the kernel copies the content
(``sendfile``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from elemta import check_write_back, fsync_dir, have_syncfs, syncfs, write_all

from .store import Owner, own_file, unlinked_if_failed

CHUNK = 1 << 20

log = logging.getLogger("elemta.maildir")


class DirSyncer:
    """Group commit for directory fsyncs: one fsync covers every rename made before it began.

    Concurrent deliveries into one ``new/`` each need the directory synced after
    their rename. A caller whose rename happened before a sync that is still
    running waits for the *next* one; whoever finds no sync running starts one
    and thereby serves everybody who renamed before it started.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._dirs: dict[str, _DirState] = {}

    def _flush(self, path: str | Path) -> None:
        fsync_dir(path)

    def sync(self, path: str | Path) -> None:
        key = str(path)
        with self._lock:
            state = self._dirs.get(key)
            if state is None:
                if len(self._dirs) >= 10_000:
                    # Safe to forget: a caller still holding an old state is served
                    # by a sync on it, which begins after its request all the same.
                    self._dirs.clear()
                state = self._dirs[key] = _DirState()
        with state.cond:
            target = state.started + 1      # a sync that starts from now on covers us
            while state.done < target:
                if state.failed >= target:   # the sync meant to cover us failed
                    assert state.error is not None
                    raise state.error
                if not state.running:
                    state.running = True
                    state.started += 1
                    generation = state.started
                    state.cond.release()
                    error: OSError | None = None
                    try:
                        self._flush(path)
                    except OSError as e:
                        error = e
                    finally:
                        state.cond.acquire()
                        state.running = False
                        if error is None:
                            state.done = max(state.done, generation)
                        else:  # for everybody who waited for this one
                            state.failed, state.error = generation, error
                        state.cond.notify_all()
                    if error is not None:
                        raise error
                else:
                    state.cond.wait()


class FsSyncer(DirSyncer):
    """Group commit for a whole file system: one ``syncfs`` for every write made before it.

    ``sync(path)`` returns after a ``syncfs`` of ``path``'s file system that
    began after the call: every file written and every name made there before
    the call is then on disk. Concurrent deliveries share it: whoever finds
    none running runs the next one. It writes back everything dirty on the
    file system, the spool's files and other programs' too.

    A descriptor of each file system stays open: Linux reports to ``syncfs``
    the write-back errors that happened since that descriptor last saw one.
    """

    def __init__(self) -> None:
        super().__init__()
        self._fds: dict[str, int] = {}

    def keep_open(self, path: str | Path) -> None:
        """Open the directory ``path`` for good: ``sync(path)`` runs ``syncfs`` on it."""
        with self._lock:
            if str(path) not in self._fds:
                self._fds[str(path)] = os.open(path, os.O_RDONLY | os.O_DIRECTORY
                                               | os.O_CLOEXEC)

    def _flush(self, path: str | Path) -> None:
        key = str(path)
        fd = self._fds.get(key)
        if fd is None:
            self.keep_open(key)
            fd = self._fds[key]
        syncfs(fd, key)


class _DirState:
    __slots__ = ("cond", "running", "started", "done", "failed", "error")

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.running = False
        self.started = 0   # syncs begun
        self.done = 0      # the latest sync finished without an error
        self.failed = 0    # the latest sync that failed...
        self.error: OSError | None = None  # ...and why


#: ``open(O_TMPFILE)`` errors that mean "not here" (old kernel, file system
#: without it): such a folder is written through ``tmp/<name>`` instead.
_NO_TMPFILE = {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOSYS}
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


@dataclass(slots=True, eq=False)
class Pending:
    """One message on its way into ``new/``: written by :meth:`Writer.begin`, named by
    :meth:`Writer.complete`, which sets ``already`` or ``error``."""

    src: int
    folder: str
    name: str
    head: bytes
    size: int
    path: str                 # folder/new/name
    fd: int = -1              # the written file, unnamed or tmp/<name>, until it is named
    tmp: str | None = None    # tmp/<name>, when the file is renamed rather than linked
    already: bool = False     # a file of that name was already in new/ (it is kept)
    error: OSError | None = None


class Writer:
    """Puts messages into ``new/``, durably, under their final name.

    Where the kernel and the file system allow it, the file is created
    unnamed (``O_TMPFILE``) in the folder's ``tmp/``, written, fsynced, and
    linked into ``new/`` (``linkat`` of ``/proc/self/fd/N``): one directory
    entry made, none removed, and a crash at any point leaves nothing behind.
    Elsewhere (a file system without ``O_TMPFILE``, a process whose
    ``/proc/self/fd`` cannot be used) it is written to ``tmp/<name>`` and
    renamed into ``new/``. With ``fsync``, the file is on disk before it is
    named in ``new/`` and its name before :meth:`complete` returns: through a
    ``syncfs`` shared by every message of the batch and by the deliveries in
    flight in other threads on that file system (:class:`FsSyncer`), or,
    without ``syncfs``, an fsync of each file and of each ``new/`` (shared,
    :class:`DirSyncer`).

    :meth:`begin` writes one message; :meth:`complete` names a batch of them
    with two syncs in all, however many there are. A file of the same name
    already in ``new/`` (an earlier attempt that got as far as the link, or
    the rename) is kept and the new copy discarded (``Pending.already``).
    """

    def __init__(self, *, file_mode: int, fsync: bool, owner: Owner = None,
                 dir_syncer: DirSyncer | None = None, tmpfile: bool = True) -> None:
        self.file_mode = file_mode
        self.fsync = fsync
        self.owner = owner
        self.dir_syncer = dir_syncer
        self.tmpfile = tmpfile and hasattr(os, "O_TMPFILE")
        self._proc_fd: int | None = None
        self._plain: set[str] = set()  # tmp/ folders where O_TMPFILE is not supported
        self._lock = threading.Lock()
        # group commit: one syncfs for the deliveries in flight on a file system
        self.group = FsSyncer() if fsync and have_syncfs() else None
        self._fs: dict[str, str] = {}       # folder → the folder that names its file system
        self._devices: dict[int, str] = {}  # file system → that folder

    def begin(self, src: int, folder: str, name: str, head: bytes, size: int) -> Pending:
        """Write ``head`` + the content of ``src`` to a file not yet in ``new/``.

        :meth:`complete` names it. On an error (raised) nothing is left behind.
        """
        pending = Pending(src, folder, name, head, size, f"{folder}/new/{name}")
        tmp = folder + "/tmp"
        if self.tmpfile and tmp not in self._plain and self._proc() is not None:
            try:
                fd = os.open(tmp, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, self.file_mode)
            except OSError as e:
                if e.errno not in _NO_TMPFILE:
                    raise
                if len(self._plain) >= 10_000:
                    self._plain.clear()
                self._plain.add(tmp)
            else:
                try:
                    self._fill(fd, src, head, size)
                except BaseException:
                    os.close(fd)
                    raise
                pending.fd = fd
                return pending
        return self._begin_rename(pending)

    def _begin_rename(self, pending: Pending) -> Pending:
        if os.path.lexists(pending.path):  # a rename would replace it without a word
            pending.already = True
            return pending
        tmp = f"{pending.folder}/tmp/{pending.name}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(tmp, flags, self.file_mode)
        except FileExistsError:
            os.unlink(tmp)  # a crash left it half-written
            fd = os.open(tmp, flags, self.file_mode)
        with unlinked_if_failed(tmp):
            try:
                self._fill(fd, pending.src, pending.head, pending.size)
            except BaseException:
                os.close(fd)
                raise
        pending.fd, pending.tmp = fd, tmp
        return pending

    def complete(self, batch: list[Pending]) -> None:
        """Name every file of ``batch`` in ``new/``, durably; sets ``already`` or ``error``.

        With ``fsync``: the files are synced, then linked (or renamed), then
        their names synced: a crash leaves either no name or a complete file.
        Never raises for a file system error; a failed message leaves nothing
        behind.
        """
        try:
            live = [p for p in batch if p.error is None]
            if self.fsync:
                self._sync_files(live)
            for p in live:
                if p.error is None and not p.already:
                    try:
                        self._name(p)
                    except OSError as e:
                        p.error = e
            if self.fsync:
                self._sync_names([p for p in live if p.error is None])
        finally:
            self.discard(batch)

    def discard(self, batch: list[Pending]) -> None:
        """Close what :meth:`complete` left open; remove ``tmp/<name>`` files not renamed."""
        for p in batch:
            if p.fd >= 0:
                os.close(p.fd)
                p.fd = -1
            if p.tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(p.tmp)
                p.tmp = None

    def _sync_files(self, batch: list[Pending]) -> None:
        """Each written file on disk: one syncfs per file system, or an fsync each."""
        if self.group is None:
            check = os.fsync
        else:
            self._sync_groups([p for p in batch if p.fd >= 0])
            # after the syncfs: an error in writing this file back that the syncfs
            # told another caller (no fsync: it would flush the disk's cache per file)
            check = check_write_back
        for p in batch:
            if p.fd >= 0 and p.error is None:
                try:
                    check(p.fd)
                except OSError as e:
                    p.error = e

    def _sync_names(self, batch: list[Pending]) -> None:
        """Each ``new/`` entry on disk: one syncfs per file system, or an fsync of each ``new/``."""
        if self.group is not None:
            self._sync_groups(batch)
            return
        folders: dict[str, list[Pending]] = {}
        for p in batch:
            folders.setdefault(p.folder, []).append(p)
        for folder, ps in folders.items():
            try:
                if self.dir_syncer is None:
                    fsync_dir(folder + "/new")
                else:
                    self.dir_syncer.sync(folder + "/new")
            except OSError as e:
                for p in ps:
                    p.error = e

    def _sync_groups(self, batch: list[Pending]) -> None:
        assert self.group is not None
        systems: dict[str, list[Pending]] = {}
        for p in batch:
            try:
                systems.setdefault(self._file_system(p.folder), []).append(p)
            except OSError as e:
                p.error = e
        for key, ps in systems.items():
            try:
                self.group.sync(key)
            except OSError as e:
                for p in ps:
                    p.error = e

    def _name(self, p: Pending) -> None:
        """Link the unnamed file, or rename ``tmp/<name>``, into ``new/``."""
        if p.tmp is not None:
            os.rename(p.tmp, p.path)
            p.tmp = None
            return
        proc = self._proc()
        assert proc is not None  # begin made an unnamed file only with it
        try:
            os.link(str(p.fd), p.path, src_dir_fd=proc, follow_symlinks=True)
        except FileExistsError:
            p.already = True  # its name is synced with the others: a crash may have beaten it
        except OSError as e:
            if e.errno in _NO_SPACE:
                raise
            # tmp/ + rename works where the link did not: this message that way, now
            os.close(p.fd)
            p.fd = -1
            again = self._begin_rename(Pending(p.src, p.folder, p.name, p.head, p.size,
                                               p.path))
            self.complete([again])
            if again.error is not None:
                raise again.error from None
            p.already = again.already
            self._give_up_tmpfile(e)

    def _fill(self, fd: int, src: int, head: bytes, size: int) -> None:
        """Owner and mode, ``head``, then the content, copied by the kernel."""
        own_file(fd, self.file_mode, self.owner)
        write_all(fd, head)
        length = size - len(head)
        copied = _copy(src, fd, length)
        if copied != length:
            raise OSError(f"the spooled message is {copied} bytes, expected {length}: it "
                          "changed while it was copied")

    def _file_system(self, folder: str) -> str:
        """A folder on ``folder``'s file system: the same one for all folders there."""
        key = self._fs.get(folder)
        if key is None:
            device = os.stat(folder).st_dev
            with self._lock:
                key = self._devices.get(device)
                if key is None:
                    # opened now, so that a folder removed later still names its file system
                    assert self.group is not None
                    self.group.keep_open(folder)
                    key = self._devices[device] = folder
                if len(self._fs) >= 100_000:
                    self._fs.clear()
                self._fs[folder] = key
        return key

    def _proc(self) -> int | None:
        """A descriptor of ``/proc/self/fd``, to link unnamed files by; ``None`` without one."""
        if self._proc_fd is None:
            with self._lock:
                if self._proc_fd is None and self.tmpfile:
                    try:
                        self._proc_fd = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY
                                                | os.O_CLOEXEC)
                    except OSError as e:
                        self._give_up_tmpfile(e)
        return self._proc_fd

    def _give_up_tmpfile(self, error: OSError) -> None:
        if self.tmpfile:
            self.tmpfile = False
            log.info("maildir: messages are written to tmp/ and renamed into new/ from now on: "
                     "an unnamed file cannot be linked into new/ here (%s)",
                     error.strerror or error)


def _copy(src: int, dst: int, length: int) -> int:
    """Copy ``length`` bytes from the start of ``src`` to ``dst`` in the kernel (``sendfile``).

    Fewer bytes only when ``src`` is shorter; the bytes copied.
    """
    total = 0
    while total < length:
        n = os.sendfile(dst, src, total, min(CHUNK, length - total))
        if not n:
            break
        total += n
    return total
