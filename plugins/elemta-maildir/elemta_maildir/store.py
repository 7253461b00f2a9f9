"""Maildir files: names, creation, the write into new/, Maildir++ quota (blocking I/O).

Everything here blocks; the plugin calls it from its delivery threads. Nothing
reads a message into memory: the kernel copies the content (``sendfile``).
Every file and directory created here gets ``owner`` (a uid and gid), when
one is given.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from elemta import fsync_dir, have_syncfs, syncfs, write_all

from .layout import folder_of

SUBDIRS = ("cur", "new", "tmp")
MAILDIRSIZE = "maildirsize"
CHUNK = 1 << 20
#: Maildir++: a ``maildirsize`` this large is recalculated...
MAILDIRSIZE_MAX_BYTES = 5120
#: ...and so is one over quota, when it is this old or has more than one total line.
MAILDIRSIZE_STALE_SECONDS = 15 * 60

#: A uid and a gid, or ``None`` to leave ownership to the process.
Owner = tuple[int, int] | None

log = logging.getLogger("elemta.maildir")

_SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
_LIMIT = re.compile(r"(\d+)([SC])\Z")
_TOTALS = re.compile(r"\s*([+-]?\d+)\s+([+-]?\d+)")
_DIGITS = re.compile(r"\d*")


class MailboxMissing(Exception):
    """The Maildir does not exist and may not be created."""


# ------------------------------------------------------------------ names


def escape_host(host: str) -> str:
    """The host part of a maildir name: ``/`` → ``\\057`` and ``:`` → ``\\072``."""
    return host.replace("/", "\\057").replace(":", "\\072")


def base_name(queue_id: str, received_at: float, address: str, host: str, size: int) -> str:
    """``<secs>.M<usecs>Q<queue id>R<hash>.<host>,S=<size>``: the same for every attempt.

    Everything comes from the spooled envelope and the recipient, never from
    the clock, so a delivery repeated after a crash produces the same name.
    """
    micros = round(received_at * 1_000_000)
    secs, usecs = divmod(micros, 1_000_000)
    qid = queue_id if _SAFE_ID.match(queue_id) else hashlib.sha256(
        queue_id.encode("utf-8", "surrogateescape")).hexdigest()[:20]
    digest = hashlib.sha256(address.lower().encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return f"{secs}.M{usecs}Q{qid}R{digest}.{escape_host(host)},S={size}"


def trace_headers(sender: str, recipient: str, original: str | None) -> bytes:
    """``Return-Path``, ``Delivered-To`` and, for a rewritten recipient, ``X-Original-To``."""
    lines = [f"Return-Path: <{_clean(sender)}>", f"Delivered-To: {_clean(recipient)}"]
    if original and original.lower() != recipient.lower():
        lines.append(f"X-Original-To: {_clean(original)}")
    return "".join(line + "\r\n" for line in lines).encode("utf-8", "surrogateescape")


def _clean(value: str) -> str:
    return value.replace("\r", "").replace("\n", "")


# ------------------------------------------------------------------ folders


def is_maildir(path: Path) -> bool:
    return all(os.path.isdir(path / d) for d in SUBDIRS)


def make_maildir(path: Path, dir_mode: int, fsync: bool, folder: bool = False,
                 owner: Owner = None, file_mode: int = 0o600) -> None:
    """Create ``path`` (and missing parents) with ``cur/``, ``new/`` and ``tmp/``.

    ``folder`` marks a Maildir++ sub-folder with the ``maildirfolder`` file, as
    Dovecot and Courier do. Directories get exactly ``dir_mode`` (no umask),
    the marker ``file_mode``; both get ``owner``.
    """
    created: list[Path] = []
    missing: list[Path] = []
    p = path
    while not os.path.isdir(p):
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        if _mkdir(d, dir_mode, owner):
            created.append(d)
    for sub in SUBDIRS:
        if _mkdir(path / sub, dir_mode, owner):
            created.append(path / sub)
    if folder:
        marker = path / "maildirfolder"
        if not marker.exists():
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                         file_mode)
            try:
                _own(fd, file_mode, owner)
            finally:
                os.close(fd)
    if fsync:
        for parent in dict.fromkeys(d.parent for d in created):
            fsync_dir(parent)


def _mkdir(path: Path, mode: int, owner: Owner) -> bool:
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        if not os.path.isdir(path):
            raise NotADirectoryError(errno.ENOTDIR, "exists but is not a directory; move it "
                                     "away", str(path)) from None
        return False
    if owner is not None:
        os.chown(path, *owner, follow_symlinks=False)
    os.chmod(path, mode)
    return True


def _own(fd: int, mode: int, owner: Owner) -> None:
    """Give a file this plugin created its owner, then exactly ``mode``."""
    if owner is not None:
        os.fchown(fd, *owner)
    os.fchmod(fd, mode)


def find_folder(root: Path, directory: str) -> Path | None:
    """The existing folder of ``root`` named as ``directory``'s folder but for case.

    Names are compared as IMAP names, with Unicode case folding; of several
    such folders, the first by name. ``None`` when there is none.
    """
    wanted = folder_of(directory)
    if wanted is None:
        return None
    wanted = wanted.casefold()
    with os.scandir(root) as it:
        names = sorted(e.name for e in it
                       if (name := folder_of(e.name)) is not None
                       and name.casefold() == wanted)
    return next((root / n for n in names if is_maildir(root / n)), None)


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


# ------------------------------------------------------------------ idempotency


def find_delivered(folders: list[Path], name: str, scan_cur: bool) -> Path | None:
    """The copy of ``name`` already in ``new/`` (one stat each) or, if asked, ``cur/``.

    In ``cur/`` an IMAP server has added flags (``name:2,S``), so the folder is
    listed: that costs a directory read, done only for a repeated attempt.
    """
    for folder in folders:
        path = folder / "new" / name
        try:
            os.stat(path)
            return path
        except FileNotFoundError:
            pass
    if not scan_cur:
        return None
    for folder in folders:
        try:
            with os.scandir(folder / "cur") as it:
                for entry in it:
                    n = entry.name
                    if n.startswith(name) and (len(n) == len(name) or n[len(name)] in ":;!,"):
                        return folder / "cur" / n
        except FileNotFoundError:
            pass
    return None


# ------------------------------------------------------------------ writing


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
    with two syncs in all, however many there are. :meth:`write` is both for
    one message.
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

    def write(self, src: int, folder: str, name: str, head: bytes, size: int) -> tuple[str, bool]:
        """Deliver ``head`` + the content of ``src`` as ``folder/new/name``.

        Returns the path, and whether a file of that name was already there
        (an earlier attempt that got as far as the link, or the rename: it is
        kept, and the new copy discarded). On an error nothing is left behind.
        """
        pending = self.begin(src, folder, name, head, size)
        self.complete([pending])
        if pending.error is not None:
            raise pending.error
        return pending.path, pending.already

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
        with _unlinked_if_failed(tmp):
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
        if self.group is not None:
            self._sync_groups([p for p in batch if p.fd >= 0])
        for p in batch:
            if p.fd >= 0 and p.error is None:
                try:
                    # after a syncfs nothing is left to write: this only reports an
                    # error in writing this file back that the syncfs told another caller
                    os.fsync(p.fd)
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
        _own(fd, self.file_mode, self.owner)
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


# ------------------------------------------------------------------ quota


@dataclass(frozen=True, slots=True)
class Quota:
    """A mailbox's limits (0: none) and what it holds now."""

    limit_bytes: int
    limit_count: int
    used_bytes: int
    used_count: int

    @property
    def over(self) -> bool:
        return (0 < self.limit_bytes < self.used_bytes) or (0 < self.limit_count < self.used_count)


@dataclass(frozen=True, slots=True)
class SizeFile:
    """What a ``maildirsize`` file says, and whether its totals are to be trusted.

    ``current`` is false when the Maildir++ rules (and Dovecot) recalculate
    the totals: the file is 5120 bytes or more, a totals line is malformed,
    a total is negative, or the mailbox is over quota and the file is older
    than 15 minutes or has more than one totals line.
    """

    quota: Quota
    current: bool


@dataclass(frozen=True, slots=True)
class Usage:
    """A scan's bytes and messages, and when each ``new/`` and ``cur/`` it read last changed."""

    used_bytes: int
    used_count: int
    stamps: tuple[tuple[str, int | None], ...]


def read_maildirsize(root: Path) -> SizeFile | None:
    """``root/maildirsize``: a ``<bytes>S,<count>C`` line, then ``<bytes> <count>`` lines.

    ``None`` when there is no such file, or not even one complete line. A
    last line without its newline is being written and does not count.
    """
    try:
        with open(root / MAILDIRSIZE, "rb") as f:
            raw = f.read(MAILDIRSIZE_MAX_BYTES)
            mtime = os.fstat(f.fileno()).st_mtime
    except FileNotFoundError:
        return None
    complete = raw.rpartition(b"\n")[0]
    if not complete:
        return None
    lines = complete.decode("ascii", "replace").split("\n")
    limit_bytes, limit_count = _limits(lines[0])
    totals = [_TOTALS.match(line) for line in lines[1:]]
    used_bytes = sum(int(m.group(1)) for m in totals if m is not None)
    used_count = sum(int(m.group(2)) for m in totals if m is not None)
    quota = Quota(limit_bytes, limit_count, max(used_bytes, 0), max(used_count, 0))
    stale = quota.over and (len(totals) > 1 or mtime < time.time() - MAILDIRSIZE_STALE_SECONDS)
    current = (len(raw) < MAILDIRSIZE_MAX_BYTES and None not in totals and used_bytes >= 0
               and used_count >= 0 and not stale)
    return SizeFile(quota, current)


def _limits(line: str) -> tuple[int, int]:
    """``(bytes, count)`` of a ``<bytes>S,<count>C`` line; a part that is neither is ignored."""
    limits = {"S": 0, "C": 0}
    for part in line.split(","):
        m = _LIMIT.match(part)
        if m is not None:
            limits[m.group(2)] = int(m.group(1))
    return limits["S"], limits["C"]


def append_maildirsize(root: Path, size: int) -> bool:
    """Add ``<size> 1`` to an existing ``maildirsize``; False when there is none."""
    try:
        fd = os.open(root / MAILDIRSIZE, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        write_all(fd, f"{size} 1\n".encode())
    finally:
        os.close(fd)
    return True


def scan_usage(root: Path) -> Usage:
    """Bytes and messages in ``new/`` and ``cur/`` of the INBOX and its folders, as Dovecot counts.

    The folders are the directories Dovecot can open (:func:`folder_of`); a
    directory whose name is not modified UTF-7 is not counted. In ``new/`` and
    ``cur/`` every entry counts but those whose name starts with ``..``. Its
    size is the number after the first ``,S=`` when a ``:``, a ``,`` or the
    end of the name follows it, else the size ``stat`` gives.
    """
    stamps: list[tuple[str, int | None]] = []
    folders = [root]
    with os.scandir(root) as it:
        folders += sorted(Path(e.path) for e in it
                          if folder_of(e.name) is not None and e.is_dir())
    total = count = 0
    for folder in folders:
        for sub in ("new", "cur"):
            path = folder / sub
            stamps.append((str(path), _mtime_ns(path)))
            try:
                it = os.scandir(path)
            except (FileNotFoundError, NotADirectoryError):
                continue
            with it:
                for entry in it:
                    if entry.name.startswith(".."):
                        continue
                    size = _named_size(entry.name)
                    if size is None:
                        try:
                            size = entry.stat().st_size
                        except FileNotFoundError:
                            continue  # expunged meanwhile
                    total += size
                    count += 1
    return Usage(total, count, tuple(stamps))


def _named_size(name: str) -> int | None:
    """The size in a maildir name (``…,S=<size>`` then ``:``, ``,`` or the end), if any."""
    at = name.find(",S=")
    if at < 0:
        return None
    digits = _DIGITS.match(name, at + 3).group()
    end = at + 3 + len(digits)
    if end < len(name) and name[end] not in ":,":
        return None
    return int(digits or 0)


def replace_maildirsize(root: Path, quota: Quota, usage: Usage, *, file_mode: int,
                        owner: Owner, fsync: bool) -> bool:
    """Write ``maildirsize`` anew with ``quota``'s limits and ``usage``'s totals.

    As Dovecot does: a temporary file renamed over the old one, given up
    (False) when a ``new/`` or ``cur/`` the scan read changed meanwhile, since
    the totals may then miss a message.
    """
    head = f"{quota.limit_bytes}S" if quota.limit_bytes or not quota.limit_count else ""
    if quota.limit_count:
        head += ("," if head else "") + f"{quota.limit_count}C"
    fd, tmp = tempfile.mkstemp(prefix=MAILDIRSIZE + ".", dir=root)
    with _unlinked_if_failed(tmp):
        try:
            _own(fd, file_mode, owner)
            write_all(fd, f"{head}\n{usage.used_bytes} {usage.used_count}\n".encode())
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        if any(_mtime_ns(path) != stamp for path, stamp in usage.stamps):
            os.unlink(tmp)
            return False
        os.rename(tmp, root / MAILDIRSIZE)
    return True


@contextlib.contextmanager
def _unlinked_if_failed(path: str) -> Iterator[None]:
    """Remove the temporary file ``path`` if the block raises, then re-raise."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


def _mtime_ns(path: str | Path) -> int | None:
    """When ``path`` last changed; ``None`` while it does not exist."""
    try:
        return os.stat(path).st_mtime_ns
    except (FileNotFoundError, NotADirectoryError):
        return None
