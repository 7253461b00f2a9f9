"""``elemta serve`` in a process of its own, for a benchmark: started, ready, stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

ELEMTA = Path(sys.executable).parent / "elemta"


@contextlib.contextmanager
def serving(config: Path, timeout: float = 30.0) -> Iterator[subprocess.Popen[bytes]]:
    """The server on ``config``, once it accepts connections; stopped with SIGTERM after.

    Its log goes to ``server.log`` next to the configuration: a pipe that
    nobody reads would block the server once it filled up.
    """
    ready = config.parent / "ready"
    log = config.parent / "server.log"
    ready.unlink(missing_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(ELEMTA), "serve", "--config", str(config)],
                                env={**os.environ, "ELEMTA_READY_FILE": str(ready)},
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"elemta serve did not start:\n{log.read_text()}")
            time.sleep(0.05)
        time.sleep(0.5)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def elemta(config: Path, *args: str, stdin: str | None = None) -> str:
    """``elemta --config CONFIG ARGS…``; its output (it must succeed)."""
    return subprocess.run([str(ELEMTA), "--config", str(config), *args], input=stdin,
                          text=True, check=True, capture_output=True).stdout
