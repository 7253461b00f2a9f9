"""The spool lock: one process owns a spool for writing.

A running server holds an exclusive ``flock`` on ``<spool>/.lock`` from start
to stop, so a second server on the same spool refuses to start; ``elemta
queue`` takes it to change a spool no server runs on. The lock belongs to the
open file, so it goes away with the process however that ends: no stale locks
after a crash.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from .layout import Layout


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
    return fd


def unlock_spool(fd: int) -> None:
    os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).strip() or b"0") or None
    except (OSError, ValueError):
        return None
