"""A throw-away ``redis-server`` for tests (the ``redis_server`` fixture).

The distribution's own server (Debian: ``apt-get install redis-server``;
``make test`` installs it) on a free loopback port with a private folder, no
persistence. :meth:`RedisServer.stop` and :meth:`start` on the same port let
a test take Redis away and bring it back. A missing binary skips the tests,
or fails them under ``CI=true``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .process import free_port, require_tool_or_skip

START_TIMEOUT = 10.0


class RedisServer:
    """One ``redis-server`` process; ``url`` reaches it."""

    def __init__(self, password: str | None = None) -> None:
        self.binary = require_tool_or_skip("redis-server", "redis-server")
        self.port = free_port()
        self.password = password
        self.root = Path(tempfile.mkdtemp(prefix="elemta-redis-"))
        self.log_path = self.root / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.root), "--save", "", "--appendonly", "no",
                "--logfile", str(self.log_path), "--daemonize", "no"]
        if self.password is not None:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log_path.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    reply = s.recv(64)
                    if reply.startswith((b"+PONG", b"-NOAUTH")):
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer within {START_TIMEOUT} s")
            time.sleep(0.05)

    def stop(self) -> None:
        """Kill it (SIGKILL: as if the machine went away)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def flush(self) -> None:
        """Forget every key (between tests sharing the server)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            if self.password is not None:
                s.sendall(f"AUTH {self.password}\r\n".encode())
                s.recv(64)
            s.sendall(b"FLUSHALL\r\n")
            s.recv(64)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
