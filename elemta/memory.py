"""Giving memory back to the operating system after a burst of connections.

Every session holds buffers (its TLS read buffer, OpenSSL's state, the stream
reader's); they are freed when the session ends, but glibc's allocator keeps
freed memory in its heaps, so a thousand sessions that came and went leave
the process as large as it was at their peak. Some of a session is only freed
by the cycle collector (a protocol, its transport and its TLS layer refer to
each other), so a full collection runs first; then ``malloc_trim(0)`` hands
the free pages back. Together they cost tens of milliseconds on a large heap,
so they run only after the number of sessions has fallen to half of a peak
worth the trouble.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
from collections.abc import Callable

log = logging.getLogger("elemta")

TRIM_AFTER_PEAK = 64  # sessions: below this the heap does not grow enough to matter


def _load_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc: nothing to do
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_trim = _load_trim()


class Trimmer:
    """Counts sessions; trims once they fell to half of their peak."""

    def __init__(self, trim: Callable[[int], int] | None = _trim) -> None:
        self._trim = trim
        self.peak = 0
        self.trims = 0

    def opened(self, sessions: int) -> None:
        if sessions > self.peak:
            self.peak = sessions

    def closed(self, sessions: int) -> bool:
        """Whether to trim now (the caller schedules :meth:`trim` off the hot path)."""
        if self._trim is None or self.peak < TRIM_AFTER_PEAK or sessions > self.peak // 2:
            return False
        self.peak = sessions
        return True

    def trim(self) -> None:
        if self._trim is not None:
            gc.collect()
            self._trim(0)
            self.trims += 1
