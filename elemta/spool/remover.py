"""Files of removed messages, unlinked off the event loop, by a helper process.

Removing a message renames its envelope into ``tmp/`` on the event loop: from
then on nobody sees the message (the envelope in its state directory *is* the
message), and a rename frees no blocks, so it costs about 10 µs where an
unlink of a file already on disk costs about 100 µs on ext4. The renamed
envelope and the content are then unlinked elsewhere. What a crash leaves
behind is deleted by recovery at the next start: every file in ``tmp/``, and
content without an envelope ("orphan content", ``recovery.py``).

*Elsewhere* is a helper process where one can be started: a second Python
interpreter (``sys.executable -I -S``) that reads NUL-terminated paths from a
pipe and unlinks them. A thread of this process did the same, but every
unlink gave the interpreter lock away and took it back, twice per message,
and the event loop waited for it: a held queue of 5,000 messages drained at a
steady 1,586-1,729 messages a second with the thread, 1,928-2,021 with the
helper (docs/performance.md). The event loop writes the paths of one turn
to the pipe with one ``write``; the pipe does not block it: what does not
fit waits in memory for the next turn, and past :data:`MAX_PENDING` paths they are unlinked at
once, so a stalled disk cannot grow memory. A helper that cannot be started,
or that dies, is replaced by the thread. When the server is killed, the
helper unlinks what it has read and exits at the end of its pipe.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import subprocess
import sys
import threading

log = logging.getLogger("elemta.spool")


#: how soon the event loop writes again to a helper whose pipe was full
RETRY_SECONDS = 0.05

#: paths waiting (in memory, for the helper or the thread) past which the caller
#: unlinks them itself: a disk whose unlinks stall must not grow memory
MAX_PENDING = 100_000

# The helper: NUL-terminated paths on stdin, unlinked in order; gone at end of input.
_HELPER = r"""
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)   # it stops at the end of its input
signal.signal(signal.SIGHUP, signal.SIG_IGN)
buf = b""
read = sys.stdin.buffer.raw.read
while True:
    chunk = read(1 << 16)
    if not chunk:
        break
    *paths, buf = (buf + chunk).split(b"\0")
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
        except OSError as e:
            print("elemta spool remover: cannot remove %s: %s; the next start removes it"
                  % (os.fsdecode(p), e.strerror), file=sys.stderr, flush=True)
"""


class Remover:
    """Unlinks the paths it is handed, in the order given: in a helper process, or in a
    thread (``process=False``, or when no helper can run)."""

    def __init__(self, process: bool = True) -> None:
        self._process_wanted = process
        self._proc: subprocess.Popen[bytes] | None = None
        self._pipe = -1
        self._out = bytearray()    # for the helper, not written to its pipe yet
        self._out_paths = 0        # paths in _out
        self._out_cut = False      # _out begins with the rest of a path partly written
        self._flush_due = False
        # the thread
        self._cond = threading.Condition(threading.Lock())
        self._paths: list[str] = []
        self._stopping = False
        self._thread: threading.Thread | None = None

    def unlink_later(self, path: str) -> None:
        if self._process_wanted and (self._pipe >= 0 or self._start_helper()):
            if self._out_paths >= MAX_PENDING:
                _unlink(path)
                return
            self._out += os.fsencode(path) + b"\0"
            self._out_paths += 1
            self._schedule_flush()
            return
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
        """Unlink what is left, then stop the helper or the thread."""
        if self._pipe >= 0:
            os.set_blocking(self._pipe, True)
            self._flush()
            self._stop_helper(timeout)
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
        self._out.clear()
        self._out_paths = 0
        self._out_cut = False
        if self._pipe >= 0:
            self._stop_helper(30.0)
        with self._cond:
            self._paths.clear()
        self.close()

    # ------------------------------------------------------------------ the helper

    def _start_helper(self) -> bool:
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _HELPER],
                                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                    close_fds=True, start_new_session=True)
        except OSError as e:
            log.warning("spool: cannot start the helper process that removes files (%s); "
                        "a thread removes them", e)
            self._process_wanted = False
            return False
        assert proc.stdin is not None
        self._proc = proc
        self._pipe = os.dup(proc.stdin.fileno())
        proc.stdin.close()
        os.set_blocking(self._pipe, False)
        return True

    def _schedule_flush(self, delay: float = 0.0) -> None:
        """Flush at the end of this turn of the event loop (or ``delay`` seconds later);
        at once where no event loop runs (a command line)."""
        if self._flush_due:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            if not delay:
                self._flush()
            return  # behind, with no loop: the next removal, or close(), tries again
        self._flush_due = True
        if delay:
            loop.call_later(delay, self._flush)
        else:
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Write what waits into the pipe, as much as it takes now."""
        self._flush_due = False
        out = self._out
        while out and self._pipe >= 0:
            try:
                n = os.write(self._pipe, out)
            except BlockingIOError:  # the helper is behind
                self._schedule_flush(RETRY_SECONDS)
                break
            except OSError as e:
                self._helper_lost(e)
                return
            if n:
                self._out_cut = out[n - 1] != 0
                del out[:n]
        self._out_paths = out.count(b"\0") if out else 0

    def _helper_lost(self, error: OSError) -> None:
        """The helper died (``EPIPE``): the thread takes over what it did not get."""
        why = "it exited" if error.errno == errno.EPIPE else error.strerror or error
        log.warning("spool: the helper process that removes files stopped (%s); a thread "
                    "removes them from now on", why)
        pending = bytes(self._out).split(b"\0")
        if self._out_cut:
            # the rest of a path the helper got the start of: left to recovery
            del pending[0]
        self._out.clear()
        self._out_paths = 0
        self._out_cut = False
        self._stop_helper(0.0)
        self._process_wanted = False
        for path in map(os.fsdecode, filter(None, pending)):
            self.unlink_later(path)

    def _stop_helper(self, timeout: float) -> None:
        proc, pipe = self._proc, self._pipe
        self._proc, self._pipe = None, -1
        if pipe >= 0:
            try:
                os.close(pipe)
            except OSError:
                pass
        if proc is not None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("spool: the helper process that removes files is still busy "
                            "after %.0f s; it finishes on its own", timeout)

    # ------------------------------------------------------------------ the thread

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
