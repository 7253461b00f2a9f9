"""The spool's write-ahead journal: append-only segment files of checksummed records.

A segment is ``journal/<seq>.log`` (``seq`` zero-padded, increasing; ``layout.py``). It holds
records, one per committed message, back to back::

    header   b"ELJ1"  segment seq  state  id length  envelope length  content length
             4 bytes  u64          u8     u8         u32              u64           (little-endian)
    queue id, envelope JSON, content
    trailer  CRC32 (zlib) of header, id, envelope and content: u32

A *retire* record (state byte 255, no envelope, no content) says that the
message of that queue id, journaled in the segment of the same sequence
number, was delivered (or bounced) from memory before any file of it was
written: replay skips it. Retire records are kept in the segment's retire
file (``<seq>.retired``, ``resident.py``), never in the segment itself, and
need no sync: lost, one only means the message is delivered again after a
crash.

A record counts only if it is complete, its checksum matches and it carries
the segment's own sequence number. The last point lets a checkpointed segment
be reused under a new sequence number without erasing it: its old records then
belong to another segment and end the new one's data, which is what makes
writing into a reused segment cheap (no new blocks, no size change, so an
fdatasync does not wait for a file system journal commit). Reading stops at
the first record that does not count: whatever follows it in that segment is
never replayed. The writer guarantees that nothing acknowledged can follow a
bad record (see ``store.py``).
"""

from __future__ import annotations

import errno
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ..durable import sync_data
from .envelope import STATES

MAGIC = b"ELJ1"
HEADER = struct.Struct("<4sQBBIQ")
TRAILER = struct.Struct("<I")
STATE_INDEX = {state: i for i, state in enumerate(STATES)}
#: The state byte of a retire record, and the state its :class:`Record` has.
RETIRE_INDEX = 255
RETIRED = "retired"

# Larger envelopes do not exist; a header claiming one is damaged, and reading
# it must not allocate what a flipped bit asks for.
MAX_ENVELOPE = 16 << 20
CHUNK = 1 << 20
_IOV_MAX = 1024


def record_head(seq: int, state: str, queue_id: bytes, envelope: bytes,
                content_length: int) -> bytes:
    """Header and queue id of a record, the first bytes its checksum covers."""
    return HEADER.pack(MAGIC, seq, STATE_INDEX[state], len(queue_id), len(envelope),
                       content_length) + queue_id


def retire_record(seq: int, queue_id: bytes) -> bytes:
    """A whole retire record: the message ``queue_id`` needs no replay."""
    head = HEADER.pack(MAGIC, seq, RETIRE_INDEX, len(queue_id), 0, 0) + queue_id
    return head + TRAILER.pack(zlib.crc32(head))


@dataclass(slots=True)
class Record:
    offset: int           # where the record starts in its segment
    queue_id: str
    state: str
    envelope: bytes
    content_offset: int   # the content is read from the segment, never loaded whole
    content_length: int


class SegmentReader:
    """The valid records of one segment, in order; then why reading stopped.

    Reading ends at the end of the file or at the first record that does not
    count. :attr:`problem` is ``None`` at the end of the file; otherwise it says
    what was found, and :attr:`stale`, :attr:`torn` and :attr:`damaged` classify
    it. ``stale``: the data was never a record of this segment (left over from
    the file's previous use, or zeroes): the normal end of a reused segment.
    ``torn``: a record of this segment that is incomplete or fails its
    checksum, with nothing valid after it: a batch cut short by a crash, never
    acknowledged. ``damaged``: the same, but valid records of this segment
    follow it; they were acknowledged, and they are not replayed because after
    damage nothing says where records really begin.
    """

    def __init__(self, fd: int, seq: int, queue_id_ok=None, *, retire_file: bool = False) -> None:
        self.fd = fd
        self.seq = seq
        # a segment holds message records, its retire file only retire records
        self._retire_file = retire_file
        self.size = os.fstat(fd).st_size
        self.end = 0           # end of the last valid record
        self.problem: str | None = None
        self.stale = self.torn = self.damaged = False
        self._queue_id_ok = queue_id_ok
        self._buf = bytearray(CHUNK)

    def __iter__(self) -> Iterator[Record]:
        pos = 0
        while pos < self.size:
            record, why, stale = self._read_one(pos)
            if record is None:
                self.problem = why
                self.damaged = self._valid_record_after(pos)
                self.stale = stale and not self.damaged
                self.torn = not stale and not self.damaged
                return
            pos = record.content_offset + record.content_length + TRAILER.size
            self.end = pos
            yield record

    def _read_one(self, pos: int) -> tuple[Record | None, str, bool]:
        """The record at ``pos``, or ``None``, the reason and whether it is stale data."""
        fd, size = self.fd, self.size
        raw = os.pread(fd, HEADER.size, pos)
        if len(raw) < HEADER.size:
            stale = not raw.startswith(MAGIC[:len(raw)])
            return None, f"incomplete record header at offset {pos}", stale
        magic, seq, state_index, id_len, env_len, content_len = HEADER.unpack(raw)
        if magic != MAGIC:
            if raw.count(0) == len(raw):
                return None, f"zeroed space at offset {pos}", True
            return None, f"no record marker at offset {pos}", True
        if seq != self.seq:
            return None, f"record of segment {seq} at offset {pos}", True
        end = pos + HEADER.size + id_len + env_len + content_len + TRAILER.size
        if end > size:
            return None, f"incomplete record at offset {pos} ({end - size} bytes missing)", False
        if env_len > MAX_ENVELOPE:
            return None, f"implausible envelope length {env_len} at offset {pos}", False
        meta = os.pread(fd, id_len + env_len, pos + HEADER.size)
        crc = zlib.crc32(meta, zlib.crc32(raw))
        content_offset = pos + HEADER.size + id_len + env_len
        crc = crc32_range(fd, content_offset, content_len, self._buf, crc)
        (stored,) = TRAILER.unpack(os.pread(fd, TRAILER.size, end - TRAILER.size))
        if crc != stored:
            return None, f"checksum mismatch in the record at offset {pos}", False
        try:
            queue_id = meta[:id_len].decode("ascii")
            if self._retire_file:
                if state_index != RETIRE_INDEX:
                    raise IndexError(state_index)
                state = RETIRED
            else:
                state = STATES[state_index]
        except (UnicodeDecodeError, IndexError):
            return None, f"record at offset {pos} names no valid queue id or state", False
        if self._queue_id_ok is not None and not self._queue_id_ok(queue_id):
            return None, f"record at offset {pos} names no valid queue id", False
        return Record(pos, queue_id, state, meta[id_len:], content_offset, content_len), "", False

    def _valid_record_after(self, pos: int) -> bool:
        """Whether a valid record of this segment starts anywhere after ``pos``."""
        pattern = MAGIC + struct.pack("<Q", self.seq)
        start = pos + 1
        while start < self.size:
            chunk = os.pread(self.fd, CHUNK + len(pattern) - 1, start)
            if len(chunk) < len(pattern):
                return False
            i = chunk.find(pattern)
            while i >= 0:
                if self._read_one(start + i)[0] is not None:
                    return True
                i = chunk.find(pattern, i + 1)
            start += CHUNK
        return False


# ---------------------------------------------------------------------- I/O helpers


def pwrite_all(fd: int, buffers: list, offset: int) -> int:
    """Write every buffer at ``offset`` with as few ``pwritev`` calls as possible; the new end."""
    i, n = 0, len(buffers)
    while i < n:
        written = os.pwritev(fd, buffers[i:i + _IOV_MAX], offset)
        if written <= 0:
            raise OSError(errno.EIO, "journal write made no progress")
        offset += written
        while i < n and written >= len(buffers[i]):
            written -= len(buffers[i])
            i += 1
        if written:
            buffers[i] = memoryview(buffers[i])[written:]
    return offset


def crc32_range(fd: int, offset: int, length: int, buf: bytearray, crc: int) -> int:
    """Checksum ``length`` bytes of ``fd`` from ``offset``, through one reused buffer."""
    view = memoryview(buf)
    while length:
        n = os.preadv(fd, [view[:min(length, len(buf))]], offset)
        if n <= 0:
            raise OSError(errno.EIO, "file shorter than its journal record")
        crc = zlib.crc32(view[:n], crc)
        offset += n
        length -= n
    return crc


def copy_range(src: int, dst: int, src_offset: int, length: int) -> None:
    """Copy ``length`` bytes of ``src`` from ``src_offset`` to the start of ``dst``, in the kernel."""
    dst_offset = 0
    try:
        while length:
            n = os.copy_file_range(src, dst, length, src_offset, dst_offset)
            if n <= 0:
                raise OSError(errno.EIO, "journal segment shorter than its record")
            src_offset += n
            dst_offset += n
            length -= n
        return
    except OSError as e:
        # not supported between these files: copy through a buffer
        if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    buf = bytearray(min(length, CHUNK))
    view = memoryview(buf)
    while length:
        n = os.preadv(src, [view[:min(length, len(buf))]], src_offset)
        if n <= 0:
            raise OSError(errno.EIO, "journal segment shorter than its record")
        written = os.pwrite(dst, view[:n], dst_offset)
        src_offset += written
        dst_offset += written
        length -= written


def sync_files(paths: Sequence[str]) -> None:
    """Flush each existing file; one that was moved or deleted meanwhile is skipped."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            sync_data(fd)
        finally:
            os.close(fd)
