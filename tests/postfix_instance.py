"""A private Postfix on a loopback port, holding what it receives, for interoperability tests.

Everything lives in a temporary directory: configuration, queue, log. Mail it
accepts goes to the hold queue (``check_client_access static:HOLD``), where
``postcat`` shows the envelope as Postfix recorded it, DSN fields included, and
``debug_peer_list`` logs every command the client sent. Needs root (Postfix's
master runs as root and its daemons as the ``postfix`` user) and Debian's
``postfix`` package (``make test-tools``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from elemta.testing import postfix
from elemta.testing.process import free_port

class Postfix:
    """``with Postfix() as pf:`` then send to ``127.0.0.1:pf.port``.

    The directory is made under the system's temporary directory, readable by the
    ``postfix`` user (pytest's own temporary directories are not), and removed at the end.
    """

    def __init__(self, *, smtputf8: bool = True) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="elemta-postfix-"))
        self.root.chmod(0o755)
        self.conf = self.root / "conf"
        self.port = free_port()
        self.smtputf8 = smtputf8

    def __enter__(self) -> "Postfix":
        if os.geteuid() != 0 or shutil.which("postfix") is None:
            shutil.rmtree(self.root, ignore_errors=True)
            pytest.skip("needs root and Postfix (make test-tools)")
        postfix.prepare(self.root, self.conf)
        (self.conf / "main.cf").write_text(postfix.main_cf(
            self.conf, self.root, hostname="postfix.test",
            # everything it accepts is held, where postcat shows the envelope
            smtpd_client_restrictions="check_client_access static:HOLD",
            debug_peer_list="127.0.0.1", debug_peer_level="2",
            smtputf8_enable="yes" if self.smtputf8 else "no"))
        (self.conf / "master.cf").write_text(postfix.master_cf(self.port))
        self._postfix("check")
        r = self._postfix("start")
        if r.returncode != 0:
            raise RuntimeError(f"postfix start failed: {r.stdout}\n{self.log()}")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"postfix did not listen on {self.port}:\n{self.log()}")

    def __exit__(self, *exc: object) -> None:
        pid_file = self.root / "queue" / "pid" / "master.pid"
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pid = None
        self._postfix("stop")
        deadline = time.monotonic() + 15
        while pid is not None and time.monotonic() < deadline:
            try:
                os.kill(pid, 0)      # the master we started, until it has exited
            except ProcessLookupError:
                break
            time.sleep(0.05)
        shutil.rmtree(self.root, ignore_errors=True)

    def _postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["postfix", "-c", str(self.conf), *args], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=60)

    def log(self) -> str:
        try:
            return (self.root / "maillog").read_text(errors="replace")
        except OSError:
            return ""

    def held(self) -> list[dict]:
        """``postqueue -j`` for the messages in the hold queue."""
        r = subprocess.run(["postqueue", "-c", str(self.conf), "-j"], capture_output=True,
                           text=True, timeout=30)
        return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]

    def wait_held(self, n: int, timeout: float = 20.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            held = self.held()
            if len(held) >= n:
                return held
            time.sleep(0.2)
        raise AssertionError(f"Postfix holds {len(self.held())} message(s), not {n}:\n"
                             f"{self.log()[-3000:]}")

    def postcat(self, queue_id: str, *options: str) -> str:
        r = subprocess.run(["postcat", "-c", str(self.conf), *options, "-q", queue_id],
                           capture_output=True, text=True, timeout=30)
        return r.stdout
