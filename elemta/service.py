"""Running as a system service: the user to become, its folders, systemd's notifications.

Started as root with ``[server] user`` set, ``elemta serve`` binds its listeners and
reads the configured TLS key (:meth:`elemta.app.App.bind`), makes the spool and
state folders the user's (:func:`own_folders`), then becomes that user for good
(:func:`drop_privileges`) before it opens the spool, a database or a plugin:
everything it creates afterwards is the user's, and no code path can go back to
root.

:func:`notify` speaks systemd's ``sd_notify`` protocol (a datagram to
``$NOTIFY_SOCKET``), so that a ``Type=notify`` unit is "started" only once the
listeners accept and the spool is recovered, and "reloading" while SIGHUP is
handled. Without ``$NOTIFY_SOCKET`` it does nothing.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import socket
from dataclasses import dataclass
from pathlib import Path

from .config import Settings

log = logging.getLogger("elemta")

#: Files and folders created after the drop: never readable by others.
UMASK = 0o027


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int


def account_to_become(settings: Settings) -> Account | None:
    """The ``[server] user`` (and ``group``) to become, or None when there is nothing to
    do: no user configured, or already running as that user. Raises KeyError for an
    unknown name (``elemta check-config`` reports it first)."""
    if settings.server.user is None:
        return None
    entry = pwd.getpwnam(settings.server.user)
    gid = grp.getgrnam(settings.server.group).gr_gid if settings.server.group else entry.pw_gid
    if os.geteuid() == entry.pw_uid and os.getegid() == gid:
        return None
    return Account(entry.pw_name, entry.pw_uid, gid)


def own_folders(settings: Settings, account: Account,
                log_handler: logging.Handler | None = None) -> None:
    """Create the spool and state folders owned by ``account``, mode 0700; a folder made
    earlier (a run without ``[server] user``) is handed over with its contents. The
    log file, if there is one, becomes the account's too, so that it can be reopened."""
    log_file = getattr(log_handler, "baseFilename", None)
    if log_file is not None:
        os.chown(log_file, account.uid, account.gid)
    for path in (settings.resolve(settings.spool.path),
                 settings.resolve(settings.server.state_dir)):
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
        if (st.st_uid, st.st_gid) != (account.uid, account.gid):
            _chown_tree(path, account)
            log.info("%s and its contents now belong to %s", path, account.name)
        if st.st_mode & 0o077:
            path.chmod(0o700)  # mail and keys: the account's alone


def _chown_tree(root: Path, account: Account) -> None:
    os.chown(root, account.uid, account.gid)
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            os.chown(os.path.join(folder, name), account.uid, account.gid,
                     follow_symlinks=False)


def drop_privileges(account: Account) -> None:
    """Become ``account`` for good: its groups, then its group, then its user (real,
    effective and saved ids). Raises OSError if root could be regained."""
    os.setgroups(os.getgrouplist(account.name, account.gid))
    os.setresgid(account.gid, account.gid, account.gid)
    os.setresuid(account.uid, account.uid, account.uid)
    os.umask(UMASK)
    if account.uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise OSError(f"could regain root after becoming {account.name}; refusing to run")
    os.environ["HOME"] = pwd.getpwuid(account.uid).pw_dir
    os.environ["USER"] = os.environ["LOGNAME"] = account.name
    log.info("running as user %s (uid %d, gid %d)", account.name, account.uid, account.gid)


def notify(state: str) -> bool:
    """Tell systemd ``state`` (``"READY=1"``, ``"RELOADING=1"``, ``"STOPPING=1"``,
    ``"STATUS=..."``); whether there was a ``$NOTIFY_SOCKET`` to tell."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as e:
        log.warning("systemd: cannot notify %s at %s: %s", state.split("=")[0], address,
                    os.strerror(e.errno) if e.errno else e)
        return False
    return True


__all__ = ["Account", "account_to_become", "drop_privileges", "notify", "own_folders"]
