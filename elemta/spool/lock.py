"""The spool lock: one process owns a spool for writing; and the spool's format version.

A running server holds an exclusive ``flock`` on ``<spool>/.lock`` from start
to stop, so a second server on the same spool refuses to start; ``elemta
queue`` takes it to change a spool no server runs on. The lock belongs to the
open file, so it goes away with the process however that ends: no stale locks
after a crash.

Whoever takes the lock also checks the spool's format (``<spool>/format``, one
number): a spool of a format this version does not know, written by a newer
Elemta, is refused before anything in it is read or changed
(:class:`SpoolFormatError`); a spool without the file was written before the
format was recorded, is format 1. A release that changes the format raises
:data:`SPOOL_FORMAT` and converts a spool of the previous one here, under the
lock, before recovery reads it; the test suite keeps a spool of every earlier
format and starts a server on it. Whoever takes the lock stamps the spool with
this version's format, since from then on it may write what older versions
cannot read.

Formats: 1, the first; 2 adds retire files to the journal (``<seq>.retired``:
resident messages delivered from memory, see ``resident.py``). A format 1
spool is a valid format 2 spool, so converting it is only the new stamp;
format 1 code would replay the messages a retire file retires, delivering
them again, which is why it must refuse a format 2 spool.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from ..durable import write_file_durably
from .layout import Layout

#: The format this version writes and reads.
SPOOL_FORMAT = 2


class SpoolFormatError(Exception):
    """The spool's format is one this version cannot read; ``str()`` says what to do."""


class SpoolLocked(Exception):
    """Another process holds the spool lock (``pid`` when it wrote one)."""

    def __init__(self, path: Path, pid: int | None) -> None:
        self.path = path
        self.pid = pid
        who = f"process {pid}" if pid else "another process"
        super().__init__(f"{path} is locked by {who}")


def lock_spool(spool_root: str | os.PathLike[str]) -> int:
    """Take the spool lock without waiting; its file descriptor (close it to unlock).

    Raises :class:`SpoolLocked` when a server (or another ``elemta queue``
    changing the spool) holds it.
    """
    layout = Layout(spool_root)
    os.makedirs(layout.root, mode=0o700, exist_ok=True)
    fd = os.open(layout.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        pid = _read_pid(fd)
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise SpoolLocked(Path(layout.lock), pid) from None
        raise
    try:
        # only read when the lock is held, for messages naming the holder
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    except OSError:
        pass
    try:
        found = spool_format(layout.root)
        if found is None or found < SPOOL_FORMAT:
            write_file_durably(layout.format, f"{SPOOL_FORMAT}\n".encode("ascii"))
    except BaseException:
        os.close(fd)
        raise
    return fd


def spool_format(spool_root: str | os.PathLike[str]) -> int | None:
    """The format of the spool at ``spool_root``: None when it does not say (new, or
    written before the format was recorded: format 1). Raises :class:`SpoolFormatError`
    for a format this version cannot read."""
    path = Layout(spool_root).format
    try:
        text = Path(path).read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise SpoolFormatError(f"{path}: cannot read the spool format: {e}") from None
    if not text.isdigit():
        raise SpoolFormatError(f"{path}: {text[:20]!r} is not a spool format number; it "
                               f"should hold {SPOOL_FORMAT}")
    found = int(text)
    if found > SPOOL_FORMAT:
        raise SpoolFormatError(
            f"the spool at {spool_root} is format {found}, written by a newer Elemta; this "
            f"version reads format {SPOOL_FORMAT}: run the newer version on it (or let it "
            "deliver the queue, then point this one at a new, empty spool)")
    return found


def unlock_spool(fd: int) -> None:
    os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).strip() or b"0") or None
    except (OSError, ValueError):
        return None
