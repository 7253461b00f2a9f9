"""A throw-away PostgreSQL server for tests (the ``postgresql`` fixture).

It runs the distribution's own ``initdb`` and ``postgres`` (Debian:
``apt-get install postgresql``; ``make test`` installs it) on a free loopback
port with a private data folder, as the ``postgres`` user when the tests run
as root (PostgreSQL refuses to run as root). Each test gets a fresh database
from :meth:`PostgresServer.new_database`. Missing binaries skip the tests, or
fail them under ``CI=true``.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from .process import free_port, require_tool_or_skip

START_TIMEOUT = 30.0


def find_bindir() -> Path | None:
    """The folder holding ``initdb`` and ``postgres``, newest version first."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return Path(candidates[-1]).parent if candidates else None


class PostgresServer:
    """One ``postgres`` process; ``dsn`` connects to its ``postgres`` database."""

    def __init__(self) -> None:
        bindir = find_bindir()
        if bindir is None:
            require_tool_or_skip("initdb", package="postgresql")
            raise AssertionError("unreachable")
        self.bindir = bindir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="elemta-pg-"))
        self.data = self.root / "data"
        self.log_path = self.root / "postgres.log"
        self._prefix: list[str] = []
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                pytest.fail("running as root, and there is no 'postgres' user to run PostgreSQL "
                            "as (install the postgresql package)", pytrace=False)
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._prefix = ["runuser", "-u", "postgres", "--"]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def dsn(self) -> str:
        return self.dsn_for("postgres")

    def dsn_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        init = subprocess.run(
            [*self._prefix, str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust",
             "-U", "postgres", "-E", "UTF8", "--no-sync", "--no-instructions"],
            capture_output=True, text=True, timeout=120)
        if init.returncode != 0:
            pytest.fail(f"initdb failed:\n{init.stdout}\n{init.stderr}", pytrace=False)
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [*self._prefix, str(self.bindir / "postgres"), "-D", str(self.data),
             "-h", "127.0.0.1", "-p", str(self.port), "-k", str(self.root),
             "-c", "fsync=off", "-c", "full_page_writes=off",
             "-c", "synchronous_commit=off", "-c", "max_connections=100"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        log.close()
        self._wait_ready()

    def _wait_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + START_TIMEOUT
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"postgres exited with {self.proc.returncode}:\n{self.output()}",
                            pytrace=False)
            try:
                with psycopg.connect(self.dsn, connect_timeout=2):
                    return
            except psycopg.OperationalError as e:
                last = e
                time.sleep(0.1)
        self.stop()
        pytest.fail(f"postgres did not accept connections within {START_TIMEOUT} s ({last}):\n"
                    f"{self.output()}", pytrace=False)

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def new_database(self) -> str:
        """Create an empty database; its DSN."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn_for(name)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # SIGINT: "fast shutdown"; the process runs as another user, so
            # signal its session through the runuser parent
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)
