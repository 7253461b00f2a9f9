"""Maildir files: names, creation, the tmp/ → new/ write, quota usage (blocking I/O).

Everything here blocks; the plugin calls it from a worker thread. Nothing
reads a message into memory: the kernel copies the content (``sendfile``).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from elemta import fsync_dir, write_all

SUBDIRS = ("cur", "new", "tmp")
MAILDIRSIZE = "maildirsize"
CHUNK = 1 << 20
USAGE_CACHE_SECONDS = 10.0

_SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
_SIZE_FIELD = re.compile(r",S=(\d+)")
_QUOTA_PART = re.compile(r"(-?\d+)([SC])\Z")


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


def make_maildir(path: Path, dir_mode: int, fsync: bool, folder: bool = False) -> None:
    """Create ``path`` (and missing parents) with ``cur/``, ``new/`` and ``tmp/``.

    ``folder`` marks a Maildir++ sub-folder with the ``maildirfolder`` file, as
    Dovecot and Courier do. Directories get exactly ``dir_mode`` (no umask).
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
        if _mkdir(d, dir_mode):
            created.append(d)
    for sub in SUBDIRS:
        if _mkdir(path / sub, dir_mode):
            created.append(path / sub)
    if folder:
        marker = path / "maildirfolder"
        if not marker.exists():
            os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
    if fsync:
        for parent in dict.fromkeys(d.parent for d in created):
            fsync_dir(parent)


def _mkdir(path: Path, mode: int) -> bool:
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        if not os.path.isdir(path):
            raise NotADirectoryError(errno.ENOTDIR, "exists but is not a directory; move it "
                                     "away", str(path)) from None
        return False
    os.chmod(path, mode)
    return True


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

    def sync(self, path: Path) -> None:
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
                if not state.running:
                    state.running = True
                    state.started += 1
                    generation = state.started
                    state.cond.release()
                    error: OSError | None = None
                    try:
                        fsync_dir(path)
                    except OSError as e:
                        error = e
                    finally:
                        state.cond.acquire()
                        state.running = False
                        if error is None:
                            state.done = max(state.done, generation)
                        state.cond.notify_all()
                    if error is not None:
                        raise error
                else:
                    state.cond.wait()


class _DirState:
    __slots__ = ("cond", "running", "started", "done")

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.running = False
        self.started = 0   # syncs begun
        self.done = 0      # the latest sync finished without an error


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


def write_message(content_path: str, folder: Path, name: str, head: bytes, size: int, *,
                  file_mode: int, fsync: bool, dir_syncer: DirSyncer | None = None) -> Path:
    """Write ``head`` + the spooled content to ``tmp/name``, then move it to ``new/name``.

    The file is created exclusively (a stale one of the same name, left by a
    crash, is removed first), fsynced, renamed, and ``new/`` is fsynced. On any
    error the partial file in ``tmp/`` is removed and the error raised.
    """
    tmp = folder / "tmp" / name
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(tmp, flags, file_mode)
    except FileExistsError:
        os.unlink(tmp)  # a crash left it half-written
        fd = os.open(tmp, flags, file_mode)
    try:
        try:
            os.fchmod(fd, file_mode)
            write_all(fd, head)
            written = len(head)
            src = os.open(content_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                written += _copy_all(src, fd)
            finally:
                os.close(src)
            if written != size:
                raise OSError(f"the spooled message is {written - len(head)} bytes, expected "
                              f"{size - len(head)}: it changed while it was copied")
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        new = folder / "new" / name
        os.rename(tmp, new)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if fsync:
        if dir_syncer is None:
            fsync_dir(folder / "new")
        else:
            dir_syncer.sync(folder / "new")
    return new


def _copy_all(src: int, dst: int) -> int:
    """Copy ``src`` from its start to ``dst`` in the kernel (``sendfile``); bytes copied."""
    total = 0
    while n := os.sendfile(dst, src, total, CHUNK):
        total += n
    return total


# ------------------------------------------------------------------ quota


@dataclass(frozen=True, slots=True)
class Quota:
    """A mailbox's limit (0 = none) and what it holds now."""

    limit_bytes: int
    limit_count: int
    used_bytes: int
    used_count: int
    source: str  # "maildirsize" or "config"


def read_maildirsize(root: Path) -> Quota | None:
    """Dovecot's ``maildirsize``: ``<bytes>S,<count>C`` then ``<bytes> <count>`` lines.

    ``None`` when the file does not exist or its first line is not a quota
    definition (the configured quota applies then).
    """
    try:
        with open(root / MAILDIRSIZE, "rb") as f:
            raw = f.read(1 << 20).decode("ascii", "replace")
    except FileNotFoundError:
        return None
    lines = raw.split("\n")
    limits = {"S": 0, "C": 0}
    for part in lines[0].strip().split(","):
        m = _QUOTA_PART.match(part.strip())
        if m is None:
            return None
        limits[m.group(2)] = max(int(m.group(1)), 0)
    used_bytes = used_count = 0
    for line in lines[1:]:
        fields = line.split()
        if len(fields) != 2:
            continue  # a partial line from a crashed writer
        try:
            used_bytes += int(fields[0])
            used_count += int(fields[1])
        except ValueError:
            continue
    return Quota(limits["S"], limits["C"], max(used_bytes, 0), max(used_count, 0),
                 MAILDIRSIZE)


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


def scan_usage(root: Path) -> tuple[int, int]:
    """Bytes and messages in ``new/`` and ``cur/`` of the INBOX and every Maildir++ folder.

    Sizes come from the ``,S=`` field of each name; a name without one is stat'ed.
    """
    folders = [root]
    with os.scandir(root) as it:
        folders += [Path(e.path) for e in it
                    if e.name.startswith(".") and e.name not in (".", "..") and e.is_dir()]
    total = count = 0
    for folder in folders:
        for sub in ("new", "cur"):
            try:
                it = os.scandir(folder / sub)
            except FileNotFoundError:
                continue
            with it:
                for entry in it:
                    m = _SIZE_FIELD.search(entry.name)
                    if m is not None:
                        total += int(m.group(1))
                    else:
                        try:
                            total += entry.stat().st_size
                        except FileNotFoundError:
                            continue  # expunged meanwhile
                    count += 1
    return total, count


class UsageCache:
    """Scanned usage per mailbox for a few seconds, plus what this server added since.

    A quota is checked before writing, so concurrent deliveries to one mailbox
    may overshoot it by a message, as with Dovecot.
    """

    def __init__(self, ttl: float = USAGE_CACHE_SECONDS) -> None:
        self.ttl = ttl
        self._lock = threading.Lock()
        self._entries: dict[Path, tuple[float, int, int]] = {}

    def usage(self, root: Path) -> tuple[int, int]:
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get(root)
            if entry is not None and entry[0] > now:
                return entry[1], entry[2]
        used, count = scan_usage(root)
        with self._lock:
            self._entries[root] = (now + self.ttl, used, count)
            if len(self._entries) > 10_000:
                self._entries = {k: v for k, v in self._entries.items() if v[0] > now}
        return used, count

    def added(self, root: Path, size: int) -> None:
        with self._lock:
            entry = self._entries.get(root)
            if entry is not None:
                self._entries[root] = (entry[0], entry[1] + size, entry[2] + 1)
