"""A private Postfix 3.7 instance for a benchmark: its own configuration and queue, loopback only.

The Debian ``postfix`` package provides the binaries; nothing of the system's own
Postfix (``/etc/postfix``, ``/var/spool/postfix``, its service) is used or touched.
:class:`PostfixInstance` writes ``main.cf`` and ``master.cf`` into a folder of its
own (``config_directory``), with ``queue_directory`` and ``data_directory`` next to
them, lets ``postfix check`` create the queue folders, and runs the master daemon
in the foreground (``master -d``) as a child process in a session of its own, so the
benchmark knows the moment it was spawned, owns its PID and stops it with SIGTERM
(which is what ``postfix stop`` sends). The master runs as root, as Postfix requires;
every daemon it starts runs unprivileged as ``mail_owner`` (``postfix``), not
chrooted.

One ``smtpd`` listens on a loopback port. With ``hold=True`` it puts every message
it accepts on hold (``smtpd_client_restrictions = check_client_access
static:HOLD``): cleanup(8) writes and fsyncs the queue file into ``hold/`` and nothing
delivers it, which is Postfix accepting durably with delivery held. Otherwise every
message is relayed to ``relayhost = [127.0.0.1]:PORT``. :meth:`release_hold` moves
held messages to the deferred queue while the master is stopped (``postsuper -H
ALL``); the queue manager takes them at its next start.

Logging goes to ``<root>/maillog`` through postlogd(8) (``maillog_file``), one line
per SMTP event and per delivery as a production Postfix logs.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from elemta.testing import postfix

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
POSTCONF = shutil.which("postconf") or "/usr/sbin/postconf"
POSTSUPER = shutil.which("postsuper") or "/usr/sbin/postsuper"
QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")

# every message it accepts goes to hold/ (written and fsynced by cleanup(8), never delivered)
HOLD_OPTIONS = {"smtpd_client_restrictions": "check_client_access,static:HOLD"}


class PostfixError(Exception):
    """The instance could not be created, started or stopped."""


def version() -> str:
    out = subprocess.run([POSTCONF, "-dh", "mail_version"], capture_output=True, text=True,
                         timeout=30)
    return out.stdout.strip()


def count_tree(path: Path) -> int:
    """Files under ``path`` (deferred/ is hashed one level deep); 0 if it is missing."""
    n = 0
    stack = [str(path)]
    while stack:  # bounded by the tree
        try:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    else:
                        n += 1
        except FileNotFoundError:
            pass
    return n


class PostfixInstance:
    """One Postfix instance under ``root``: created, spawned, counted, stopped."""

    def __init__(self, root: Path, port: int, sink_port: int, hold: bool,
                 extra_main: list[str] | None = None) -> None:
        self.root = root
        self.conf = root / "conf"
        self.queue = root / "queue"
        self.maillog = root / "maillog"
        self.port = port
        self.sink_port = sink_port
        self.hold = hold
        self.extra_main = extra_main or []
        self.daemons = postfix.daemon_directory()
        self.proc: subprocess.Popen[bytes] | None = None
        self.spawned_at = 0.0

    # -- lifecycle
    def create(self) -> None:
        if os.geteuid() != 0:
            raise PostfixError("Postfix's master daemon must run as root")
        pwd.getpwnam("postfix")  # KeyError: the postfix package is not installed
        self.root.mkdir(parents=True)
        # the daemons run as postfix and must reach the queue through every parent folder
        for p in (self.root, *self.root.parents):
            if p == Path("/"):
                break
            if not os.stat(p).st_mode & 0o001:
                raise PostfixError(f"{p} is not searchable by others: the Postfix daemons "
                                   "(user postfix) could not reach the queue; chmod o+x it")
        postfix.prepare(self.root, self.conf)
        extra = dict(line.split(" = ", 1) for line in self.extra_main)
        (self.conf / "main.cf").write_text(postfix.main_cf(
            self.conf, self.root, hostname="pfx.mta.test",
            relayhost=f"[127.0.0.1]:{self.sink_port}", **extra))
        self.set_hold(self.hold)
        # postsuper with the master stopped writes the log itself, as user postfix
        self.maillog.touch()
        shutil.chown(self.maillog, "postfix", "postfix")
        res = self.postfix("check")  # creates the queue folders with their owners and modes
        if res.returncode != 0:
            raise PostfixError(f"postfix check failed for {self.conf}:\n{res.stdout}")

    def postfix(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([POSTFIX, "-c", str(self.conf), *args], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)

    def set_hold(self, hold: bool) -> None:
        """Switch the smtpd between holding and relaying (takes effect at the next start)."""
        self.hold = hold
        (self.conf / "master.cf").write_text(postfix.master_cf(
            self.port, HOLD_OPTIONS if hold else None))

    def command(self) -> list[str]:
        return [f"{self.daemons}/master", "-c", str(self.conf), "-d"]

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start the master daemon (not waiting for it); its own session and process group:
        on SIGTERM it signals its whole group, which must not include the benchmark."""
        out = open(self.root / "master.out", "ab")
        self.spawned_at = time.perf_counter()
        self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        return self.proc

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 30) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group we created at spawn
            self.proc.wait(10)
        # daemons finish their current work and exit after the master; bounded wait
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._group_alive():
            time.sleep(0.05)

    def _group_alive(self) -> bool:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    # -- queue
    def queue_counts(self) -> dict[str, int]:
        return {q: count_tree(self.queue / q) for q in QUEUES}

    def queued(self) -> int:
        return sum(self.queue_counts().values())

    def held(self) -> int:
        return count_tree(self.queue / "hold")

    def release_hold(self) -> None:
        """Held messages to the deferred queue, due now (master stopped)."""
        res = subprocess.run([POSTSUPER, "-c", str(self.conf), "-H", "ALL"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             timeout=300)
        if res.returncode != 0:
            raise PostfixError(f"postsuper -H ALL failed: {res.stdout}")

    # -- log
    def log_counts(self) -> tuple[int, int]:
        """(deliveries logged status=sent, deliveries logged deferred/bounced/expired)."""
        try:
            log = self.maillog.read_text(errors="replace")
        except OSError:
            return 0, 0
        return (len(re.findall(r" status=sent ", log)),
                len(re.findall(r" status=(?:deferred|bounced|expired)", log)))

    def new_connections(self) -> int:
        """smtp(8) deliveries that opened a connection (the others log conn_use=N)."""
        try:
            log = self.maillog.read_text(errors="replace")
        except OSError:
            return 0
        return sum(1 for line in re.findall(r"postfix/smtp\[\d+\]: .*status=sent.*", log)
                   if "conn_use=" not in line)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.maillog.read_text(errors="replace")[-n:]
        except OSError:
            return ""
