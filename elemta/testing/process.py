"""``elemta serve`` as a subprocess, for tests that need a real server process.

Also the helpers such tests need: :func:`free_port`, :func:`listener` (a
``[[listeners]]`` entry), :func:`wait_until`, :func:`find_tool` and
:func:`require_tool_or_skip` for external programs (swaks, smtp-source).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

READY_TIMEOUT = 20.0

# Debian installs Postfix's tools (smtp-source, smtp-sink) in /usr/sbin, which
# is often not on an unprivileged user's PATH.
_EXTRA_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/lib/postgresql")


def find_tool(name: str) -> str | None:
    """The path of an external program, looking in the sbin folders too."""
    found = shutil.which(name)
    if found is None:
        found = shutil.which(name, path=os.pathsep.join(_EXTRA_DIRS))
    return found


def require_tool_or_skip(name: str, package: str | None = None) -> str:
    """The path of ``name``; skip the test if it is missing, or fail under ``CI=true``."""
    path = find_tool(name)
    if path is not None:
        return path
    package = package or ("postfix" if name.startswith("smtp-") else name)
    reason = (f"{name} is not installed (install it with `make test-tools`, or "
              f"`apt-get install {package}`)")
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and a required tool is missing: {reason}", pytrace=False)
    pytest.skip(reason)


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something true; that value.

    A 250 means the message is in the spool's journal; its files appear in the
    spool directories a moment later, which is what this waits for.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not true within {timeout} s (last value {value!r})",
                        pytrace=False)
        time.sleep(0.02)


def free_port() -> int:
    """A TCP port that was free a moment ago (the listener config needs a fixed one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listener(name: str, port: int, mode: str = "smtp", tls: str = "none",
             **extra: Any) -> dict[str, Any]:
    return {"name": name, "address": f"127.0.0.1:{port}", "mode": mode, "tls": tls, **extra}


def elemta_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "elemta", *args]


class ServerProcess:
    """``elemta serve --config PATH`` in a subprocess, ready once it wrote its PID."""

    def __init__(self, config: Path, workdir: Path, env: dict[str, str] | None, n: int,
                 wait_ready: bool = True) -> None:
        self.config = config
        self.log_path = workdir / f"server-{n}.log"
        self.ready_file = workdir / f"ready-{n}"
        self.ready_file.unlink(missing_ok=True)
        self._log = open(self.log_path, "wb")
        full_env = {**os.environ, **(env or {}), "ELEMTA_READY_FILE": str(self.ready_file)}
        full_env.pop("ELEMTA_LOAD_PLUGINS", None)
        self.proc = subprocess.Popen(elemta_command("serve", "--config", str(config)),
                                     cwd=workdir, env=full_env, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        if wait_ready:
            self._wait_ready()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"elemta serve exited with status {self.proc.returncode} before "
                            f"it was ready; its output:\n{self.output()}", pytrace=False)
            try:
                if self.ready_file.read_text().strip() == str(self.proc.pid):
                    return
            except FileNotFoundError:
                pass
            time.sleep(0.05)
        self.kill()
        pytest.fail(f"elemta serve did not write {self.ready_file} within {READY_TIMEOUT}s; "
                    f"its output:\n{self.output()}", pytrace=False)

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"elemta serve did not exit within {timeout}s; its output:\n"
                        f"{self.output()}", pytrace=False)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:  # pragma: no cover - the kernel is stuck
                pass
        self._log.close()


def server_factory(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Factory: ``start(config_path, env=None, wait_ready=True)`` → a :class:`ServerProcess`.

    With ``wait_ready`` (the default) it returns once the server accepts connections.
    """
    started: list[ServerProcess] = []

    def start(config: Path, env: dict[str, str] | None = None,
              wait_ready: bool = True) -> ServerProcess:
        server = ServerProcess(config, tmp_path, env, len(started), wait_ready)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


