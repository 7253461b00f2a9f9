"""Writing files that survive a crash: the helpers the spool and delivery plugins share.

A delivery plugin may remove nothing from the spool before the next hop has
the message durably; for a plugin that stores files (maildir, a message
store) that means the data flushed and the directory entry flushed too. These
are the few system calls it takes, with the details right: ``write`` may write
less than asked, ``fdatasync`` does not exist everywhere, and a new or renamed
file is durable only once its directory is fsynced.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

__all__ = ["check_write_back", "fsync_dir", "have_syncfs", "sync_data", "syncfs", "write_all",
           "write_file_durably"]


def write_all(fd: int, *chunks: bytes | bytearray | memoryview) -> None:
    """Write every chunk to ``fd``, however many ``writev`` calls it takes."""
    views = [memoryview(c) for c in chunks if c]
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def sync_data(fd: int) -> None:
    """Flush a file's data (and the size and block map it needs) to the disk."""
    # fdatasync skips only timestamps; not every platform has it.
    if hasattr(os, "fdatasync"):
        os.fdatasync(fd)
    else:
        os.fsync(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory, so that files created, renamed or removed in it stay so."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_durably(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600,
                       tmp: str | os.PathLike[str] | None = None) -> None:
    """Replace ``path`` with ``data`` atomically and durably.

    The data goes to ``tmp`` (by default ``.<name>.tmp`` beside it) with
    ``mode``, is fsynced, renamed over ``path``, and the directory is fsynced:
    after a crash ``path`` holds either the old contents or all of the new.
    """
    target = Path(path)
    tmp_path = Path(tmp) if tmp is not None else target.with_name(f".{target.name}.tmp")
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp_path.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp_path, target)
    fsync_dir(target.parent)


def _load_syncfs():
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_syncfs = _load_syncfs()


def have_syncfs() -> bool:
    """Whether :func:`syncfs` is available (Linux)."""
    return _syncfs is not None


def syncfs(fd: int, path: str | None = None) -> None:
    """Write back and commit everything on the file system that holds ``fd``.

    Linux reports write-back errors that happened after ``fd`` was opened
    (5.8 and later), so keep one descriptor open for the life of the writer.
    ``path`` names ``fd`` in the error.

    :raises OSError: ``ENOSYS`` where there is no ``syncfs``; the write-back error.
    """
    if _syncfs is None:
        raise OSError(errno.ENOSYS, "syncfs is not available")
    if _syncfs(fd) != 0:
        err = ctypes.get_errno()
        if path is None:
            raise OSError(err, f"syncfs: {os.strerror(err)}")
        raise OSError(err, f"syncfs: {os.strerror(err)}", path)


_SYNC_FILE_RANGE_WAIT_AFTER = 4


def _load_sync_file_range():
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


def check_write_back(fd: int) -> None:
    """Raise the error, if any, in writing this file back since ``fd`` was opened.

    For use after :func:`syncfs`, which reports a write-back error of the
    whole file system once, to whichever caller syncs first: a file whose
    write-back failed may belong to another caller's batch than the one
    that was told. On Linux this waits for the file's write-back in
    progress and reads the file's own error (``sync_file_range`` with
    ``SYNC_FILE_RANGE_WAIT_AFTER``), without starting a write or flushing
    the disk's cache; an ``fsync`` would cost a cache flush per file.
    Elsewhere it is an ``fsync``.

    :raises OSError: the write-back error.
    """
    if _sync_file_range is None:
        os.fsync(fd)
        return
    if _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WAIT_AFTER) != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.ESPIPE, errno.EINVAL):  # not a file it can check
            os.fsync(fd)
            return
        raise OSError(err, f"write-back: {os.strerror(err)}")
