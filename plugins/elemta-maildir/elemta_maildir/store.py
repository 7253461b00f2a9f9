"""Maildir files: names, folders, finding a copy already delivered, Maildir++ quota.

Everything here blocks (file I/O); the plugin calls it from its helper
process or its delivery threads. The write into ``new/`` is
:mod:`elemta_maildir.writer`'s. Every file and directory created here gets
``owner`` (a uid and gid), when one is given.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import hashlib
import os
import pwd
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from elemta import fsync_dir, write_all

from .layout import folder_of

SUBDIRS = ("cur", "new", "tmp")
MAILDIRSIZE = "maildirsize"
#: Maildir++: a ``maildirsize`` this large is recalculated...
MAILDIRSIZE_MAX_BYTES = 5120
#: ...and so is one over quota, when it is this old or has more than one total line.
MAILDIRSIZE_STALE_SECONDS = 15 * 60

#: A uid and a gid, or ``None`` to leave ownership to the process.
Owner = tuple[int, int] | None


def resolve_owner(owner: str) -> tuple[int, int]:
    """The uid and gid of ``"vmail"``, ``"vmail:mail"`` or ``"5000:5000"``.

    Without a group, the user's primary group. ``ValueError`` names what is missing.
    """
    user, sep, group = owner.partition(":")
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        if not user.isdigit():
            raise ValueError(f"owner {owner!r}: there is no user {user!r}") from None
        entry = None
    uid = int(user) if entry is None else entry.pw_uid
    if not sep:
        if entry is None:
            raise ValueError(f"owner {owner!r}: uid {uid} has no user entry to take the "
                             f'group from; write "{uid}:GID"')
        return uid, entry.pw_gid
    try:
        return uid, int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"owner {owner!r}: there is no group {group!r}") from None


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
                own_file(fd, file_mode, owner)
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


def own_file(fd: int, mode: int, owner: Owner) -> None:
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
    with unlinked_if_failed(tmp):
        try:
            own_file(fd, file_mode, owner)
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
def unlinked_if_failed(path: str) -> Iterator[None]:
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
