"""The message as DKIM reads it: the header section, and the body canonicalized in chunks.

dkimpy canonicalizes a body with a few regular-expression passes over the whole
body at once. Each pass is one C call that holds the GIL, so on a large message a
worker thread doing it would stall the event loop for as long (50 ms per MiB
measured). Here the body is read and canonicalized in chunks of whole lines
(:data:`CHUNK_BYTES`), so the GIL is released between chunks and while hashing,
and a message is never held in memory whole. The output is byte for byte what
dkimpy's ``Simple``/``Relaxed.canonicalize_body`` give (``tests`` compares them
on random bodies), line ends normalized as dkimpy's parser does (a bare LF counts
as CRLF).
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

CHUNK_BYTES = 64 * 1024
# a header section larger than this is not read: the message is not signed or verified
MAX_HEADER_BYTES = 1024 * 1024

_LINE_END = re.compile(rb"\r?\n")
_TRAILING_WSP = re.compile(rb"[\t ]+\r\n")
# one space stays as it is; only runs and tabs are rewritten (far fewer matches)
_WSP_RUN = re.compile(rb"[\t ]{2,}|\t")


class HeaderTooLarge(Exception):
    """The header section is longer than :data:`MAX_HEADER_BYTES`."""


def buffered(f: BinaryIO) -> BinaryIO:
    """``f`` with an efficient ``readline`` (``Message.open()`` may be a raw stream)."""
    if isinstance(f, io.RawIOBase):
        return io.BufferedReader(f, CHUNK_BYTES)  # type: ignore[return-value]
    return f


def read_header_section(f: BinaryIO) -> bytes:
    """The header section of the message ``f`` is positioned at, up to and including
    the empty line that ends it (or all of a message without one); ``f`` is left at
    the first byte of the body.

    :raises HeaderTooLarge: past :data:`MAX_HEADER_BYTES`.
    """
    parts: list[bytes] = []
    size = 0
    while True:
        line = f.readline(MAX_HEADER_BYTES + 1 - size)
        if not line:
            break
        parts.append(line)
        size += len(line)
        if line in (b"\r\n", b"\n"):
            break
        if size > MAX_HEADER_BYTES:
            raise HeaderTooLarge(f"the header section is larger than "
                                 f"{MAX_HEADER_BYTES // 1024} KiB")
    return b"".join(parts)


class BodyCanonicalizer:
    """RFC 6376 §3.4.3 (simple) or §3.4.4 (relaxed) body canonicalization, fed in chunks.

    :meth:`feed` and :meth:`finish` return the canonical bytes that are final so
    far; together they are the canonical body.
    """

    def __init__(self, relaxed: bool) -> None:
        self.relaxed = relaxed
        self._carry = b""        # a line whose end has not arrived yet
        self._empty_lines = 0    # empty lines held back: they count only before a non-empty one
        self._emitted = False

    def feed(self, data: bytes) -> bytes:
        data = self._carry + data if self._carry else data
        cut = data.rfind(b"\n") + 1
        self._carry = data[cut:]
        if cut == 0:
            return b""
        return self._lines(data[:cut])

    def _lines(self, block: bytes) -> bytes:
        """Whole lines (``block`` ends with a line end), canonicalized."""
        # each regular expression runs only when the (much faster) search says it
        # has something to do: in most mail there is no bare LF, no trailing space
        # and no run of spaces
        if block.count(b"\n") != block.count(b"\r\n"):
            block = _LINE_END.sub(b"\r\n", block)
        if self.relaxed:
            if b" \r\n" in block or b"\t\r\n" in block:
                block = _TRAILING_WSP.sub(b"\r\n", block)
            if b"  " in block or b"\t" in block:
                block = _WSP_RUN.sub(b" ", block)
        end = len(block)
        while block.endswith(b"\r\n", 0, end):
            end -= 2
        trailing = (len(block) - end) // 2   # line ends after the last non-empty line
        if end == 0:
            self._empty_lines += trailing
            return b""
        held = b"\r\n" * self._empty_lines
        self._empty_lines = trailing - 1
        self._emitted = True
        return held + block[:end] + b"\r\n"

    def finish(self) -> bytes:
        out = b""
        if self._carry:
            # the last line has no line end: it gets one (dkimpy compresses its
            # whitespace but, as it has no CRLF, keeps its trailing whitespace)
            line = _WSP_RUN.sub(b" ", self._carry) if self.relaxed else self._carry
            out = b"\r\n" * self._empty_lines + line + b"\r\n"
            self._emitted = True
        self._carry = b""
        self._empty_lines = 0
        if not self._emitted:
            return b"" if self.relaxed else b"\r\n"
        return out


@dataclass(frozen=True, slots=True)
class BodyHashSpec:
    """What one signature needs from the body: its canonicalization, hash and ``l=``."""

    relaxed: bool
    algorithm: str          # "sha256" or "sha1"
    length: int | None      # l=, or None for the whole body


@dataclass(frozen=True, slots=True)
class BodyHash:
    digest: bytes
    hashed: int             # canonical bytes hashed (less than total with l=)
    total: int              # canonical body length


_HASHES = {"sha256": hashlib.sha256, "sha1": hashlib.sha1}


class _Hasher:
    def __init__(self, spec: BodyHashSpec) -> None:
        self.spec = spec
        self.hash = _HASHES[spec.algorithm]()
        self.hashed = 0

    def update(self, data: bytes) -> None:
        limit = self.spec.length
        if limit is not None:
            room = limit - self.hashed
            if room <= 0:
                return
            if len(data) > room:
                data = data[:room]
        self.hash.update(data)
        self.hashed += len(data)


def body_hashes(f: BinaryIO, specs: Iterable[BodyHashSpec],
                chunk_bytes: int = CHUNK_BYTES) -> dict[BodyHashSpec, BodyHash]:
    """Read the body from ``f`` to its end once, and hash it for every spec.

    Blocking: run it in a worker thread.
    """
    hashers = {spec: _Hasher(spec) for spec in set(specs)}
    if not hashers:
        return {}
    canons = {relaxed: BodyCanonicalizer(relaxed) for relaxed in {s.relaxed for s in hashers}}
    totals = dict.fromkeys(canons, 0)

    def emit(relaxed: bool, data: bytes) -> None:
        if not data:
            return
        totals[relaxed] += len(data)
        for spec, hasher in hashers.items():
            if spec.relaxed == relaxed:
                hasher.update(data)

    while True:
        chunk = f.read(chunk_bytes)
        if not chunk:
            break
        for relaxed, canon in canons.items():
            emit(relaxed, canon.feed(chunk))
    for relaxed, canon in canons.items():
        emit(relaxed, canon.finish())
    return {spec: BodyHash(h.hash.digest(), h.hashed, totals[spec.relaxed])
            for spec, h in hashers.items()}
