"""Room on the spool's file system: when to stop taking new mail, and whether a batch fits.

Two lines, both measured with ``statvfs`` of the spool folder (the journal
lives there too):

* **The reserve** (``[spool] min_free_bytes``, ``min_free_inodes``). Below it
  the server refuses new mail at ``MAIL`` (and at ``DATA`` when the declared
  size would not fit) with ``452 4.3.1``, before the client sends a body; the
  delivery runner keeps delivering, which gives the room back.
* **The floor of a commit.** The journal acknowledges a batch only when the
  file system can also hold the files the write-out will make of it, and of
  every message acknowledged before it and not placed yet. So an acknowledged
  message can always be written out, after a crash too, and recovery never
  needs room it did not have.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("elemta.spool")

# What a batch needs beyond its bytes: the new inodes' and directory blocks' share.
SLACK_BYTES = 64 << 10
SLACK_INODES = 16

#: ``fits`` answers from a reading this recent, without a ``statvfs`` of its own, while
#: that reading showed at least HEADROOM_BYTES and HEADROOM_INODES more than the batch
#: needs: filling that much in 50 ms takes 20 GB/s. Nearer the floor, every batch reads
#: afresh. (The call hands the interpreter lock to the event loop and back: about
#: 100 µs of each commit under load.)
FITS_REUSE_SECONDS = 0.05
HEADROOM_BYTES = 1 << 30
HEADROOM_INODES = 1 << 16


@dataclass(frozen=True, slots=True)
class Space:
    """One ``statvfs`` reading, for the unprivileged user."""

    free_bytes: int
    free_inodes: int
    total_bytes: int
    at: float


class SpaceMonitor:
    """The spool file system's free space and inodes, read at most every ``interval`` seconds."""

    def __init__(self, path: str, *, min_free_bytes: int = 0, min_free_inodes: int = 0,
                 interval: float = 0.5,
                 statvfs: Callable[[str], os.statvfs_result] = os.statvfs,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.min_free_bytes = min_free_bytes
        self.min_free_inodes = min_free_inodes
        self.interval = interval
        self._statvfs = statvfs
        self._clock = clock
        self._lock = threading.Lock()
        self._last: Space | None = None
        #: Bytes acknowledged by the journal whose files are not written yet.
        self.unplaced_bytes = 0
        self.unplaced_messages = 0

    def read(self, max_age: float | None = None) -> Space:
        """A reading no older than ``max_age`` (default: the interval); ``0`` for a fresh one."""
        max_age = self.interval if max_age is None else max_age
        now = self._clock()
        last = self._last
        if last is not None and now - last.at <= max_age:
            return last
        try:
            st = self._statvfs(self.path)
        except OSError as e:
            # unknown is not "room enough": a spool we cannot stat takes no mail
            log.error("spool: cannot read the free space of %s: %s", self.path, e)
            reading = Space(0, 0, 0, now)
        else:
            reading = Space(st.f_bavail * st.f_frsize, st.f_favail, st.f_blocks * st.f_frsize,
                            now)
        self._last = reading
        return reading

    def refusal(self, size: int = 0) -> str | None:
        """Why new mail (of ``size`` bytes, if known) must be refused now, or ``None``."""
        space = self.read()
        left = space.free_bytes - self.unplaced_bytes
        if left < self.min_free_bytes + size:
            if size and left >= self.min_free_bytes:
                return (f"a message of {size} bytes does not fit: {_mib(left)} free in the "
                        f"spool, {_mib(self.min_free_bytes)} kept in reserve")
            return (f"{_mib(left)} free in the spool, below the reserve of "
                    f"{_mib(self.min_free_bytes)} ([spool] min_free_bytes)")
        if space.free_inodes < self.min_free_inodes:
            return (f"{space.free_inodes} free inodes in the spool, below the reserve of "
                    f"{self.min_free_inodes} ([spool] min_free_inodes)")
        return None

    def fits(self, batch_bytes: int, batch_messages: int) -> bool:
        """Whether a journal batch may be acknowledged (the journal thread; a fresh reading
        unless a recent one shows room to spare, see :data:`FITS_REUSE_SECONDS`).

        Its records go into the journal and its files follow: twice its bytes,
        on top of what earlier batches still need for their files.
        """
        with self._lock:
            need = 2 * batch_bytes + self.unplaced_bytes + SLACK_BYTES
            inodes = 2 * (batch_messages + self.unplaced_messages) + SLACK_INODES
            space = self._last
            if (space is None or self._clock() - space.at > FITS_REUSE_SECONDS
                    or space.free_bytes < need + HEADROOM_BYTES
                    or space.free_inodes < inodes + HEADROOM_INODES):
                space = self.read(max_age=0)
            if space.free_bytes < need or space.free_inodes < inodes:
                return False
            self.unplaced_bytes += batch_bytes
            self.unplaced_messages += batch_messages
            return True

    def placed(self, nbytes: int, messages: int) -> None:
        """Files of acknowledged messages are written (or the messages were delivered)."""
        with self._lock:
            self.unplaced_bytes = max(0, self.unplaced_bytes - nbytes)
            self.unplaced_messages = max(0, self.unplaced_messages - messages)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"
