"""Files of removed messages, unlinked off the event loop.

Removing a message renames its envelope into ``tmp/`` on the event loop: from
then on nobody sees the message (the envelope in its state directory *is* the
message), and a rename frees no blocks, so it costs about 10 µs where an
unlink of a file already on disk costs about 100 µs on ext4. This thread then
unlinks the renamed envelope and the content. What a crash leaves behind is
deleted by recovery at the next start: every file in ``tmp/``, and content
without an envelope ("orphan content", ``recovery.py``).
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger("elemta.spool")


#: paths waiting for the thread past which the caller unlinks them itself: a disk whose
#: unlinks stall (while reads still come from the page cache) must not grow memory
MAX_PENDING = 100_000


class Remover:
    """A thread that unlinks the paths it is handed, in the order given, in batches."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._paths: list[str] = []
        self._stopping = False
        self._thread: threading.Thread | None = None

    def unlink_later(self, path: str) -> None:
        with self._cond:
            waiting = len(self._paths)
            if waiting < MAX_PENDING:
                self._paths.append(path)
                if waiting == 0:
                    self._cond.notify()
        if waiting >= MAX_PENDING:
            _unlink(path)
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name="spool-remover",
                                            daemon=True)
            self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Unlink what is left, then stop the thread."""
        thread = self._thread
        if thread is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify()
        thread.join(timeout)
        self._thread = None
        self._stopping = False

    def abandon(self) -> None:
        """Tests: stop as a crash would, leaving what was not unlinked yet."""
        with self._cond:
            self._paths.clear()
        self.close()

    def _main(self) -> None:
        while True:
            with self._cond:
                while not self._paths and not self._stopping:
                    self._cond.wait()
                batch, self._paths = self._paths, []
                last = self._stopping and not batch
            for path in batch:
                _unlink(path)
            if last:
                return


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:  # left for recovery, which removes what is in tmp/ and orphan content
        log.warning("spool: cannot remove %s: %s", path, e)
