"""The message of one transaction: its header section and body, and the edits plugins make.

:class:`Message` is what the ``data`` stage hooks receive; it reads the
received header section lazily, streams a body spilled to disk, and takes
every edit a milter can make (``docs/plugins.md`` maps them) while keeping
the memory bound of the received message.
"""

from __future__ import annotations

import io
import os
import re
from typing import BinaryIO, Callable, Iterable

from .stash import Stash

__all__ = ["Message", "BodyWriter", "check_header", "split_header_fields", "parse_header_block"]


class _Field:
    """One field of the header section: its name, unfolded value and bytes as written."""

    __slots__ = ("name", "value", "raw")

    def __init__(self, name: str, value: str, raw: bytes) -> None:
        self.name = name
        self.value = value
        self.raw = raw

    @classmethod
    def new(cls, name: str, value: str) -> "_Field":
        """A field a plugin writes (``value`` may be folded with CRLF + white space)."""
        return cls(name, _unfold(value),
                   f"{name}: {value}\r\n".encode("utf-8", "surrogateescape"))


class Message:
    """The message received in DATA, and what the ``data`` stage makes of it.

    The header section is parsed (``headers``); the body stays in the spool file
    or buffer. Use :meth:`open` to stream it and :meth:`as_bytes` only when the
    whole message is needed.

    Plugins change it the way a milter can (``docs/plugins.md`` maps every
    milter action): :meth:`add_header` prepends a trace field at commit;
    :meth:`append_header`, :meth:`insert_header`, :meth:`change_header` and
    :meth:`remove_headers` edit the header section in place; :meth:`replace_body`
    (or :meth:`body_writer`, chunk by chunk) replaces the body, spilled to disk
    past ``memory_bytes`` as the received one was. Every edit is visible at once
    to the plugins after, and the spooled message is the edited one.
    """

    __slots__ = ("_header_block", "_body", "_body_path", "_size", "_fields", "_edited",
                 "added", "stash", "_spill", "_temp_paths", "_body_size")

    def __init__(self, header_block: bytes, body: bytes | None, body_path: str | None,
                 size: int, *, spill: tuple[str, str, int] | None = None) -> None:
        self._header_block = header_block
        self._body = body
        self._body_path = body_path
        self._size = size
        self._body_size = size - len(header_block)
        self._fields: list[_Field] | None = None
        self._edited = False
        self.added: list[tuple[str, str]] = []
        self.stash = Stash()
        # (tmp folder, queue id, memory_bytes): where a replaced body spills
        self._spill = spill
        self._temp_paths: list[str] = []

    # ------------------------------------------------------------ reading

    def _parsed(self) -> list[_Field]:
        if self._fields is None:
            self._fields = [_Field(n, v, raw) for (n, v), raw in
                            zip(parse_header_block(self._header_block),
                                split_header_fields(self._header_block))]
        return self._fields

    @property
    def headers(self) -> list[tuple[str, str]]:
        """The header fields as (name, unfolded value), edits included."""
        return [(f.name, f.value) for f in self._parsed()]

    def header(self, name: str) -> str | None:
        """The first header field called ``name`` (case-insensitive), unfolded."""
        lname = name.lower()
        for f in self._parsed():
            if f.name.lower() == lname:
                return f.value
        return None

    def get_all(self, name: str) -> list[str]:
        lname = name.lower()
        return [f.value for f in self._parsed() if f.name.lower() == lname]

    @property
    def size(self) -> int:
        """The size of the message as it stands: header section and body, edits included."""
        if not self._edited:
            return self._size
        return len(self.header_bytes()) + self._body_size

    # ------------------------------------------------------------ header edits

    def add_header(self, name: str, value: str) -> None:
        """Prepend ``name: value`` to the message when it is committed (a trace field)."""
        check_header(name, value)
        self.added.append((name, value))

    def append_header(self, name: str, value: str) -> None:
        """Add ``name: value`` at the end of the header section (milter ADDHEADER)."""
        check_header(name, value)
        self._parsed().append(_Field.new(name, value))
        self._edited = True

    def insert_header(self, index: int, name: str, value: str) -> None:
        """Insert ``name: value`` before the ``index``-th field (0: at the top; past the
        end: at the end), as milter INSHEADER does."""
        check_header(name, value)
        fields = self._parsed()
        fields.insert(max(0, min(index, len(fields))), _Field.new(name, value))
        self._edited = True

    def change_header(self, name: str, value: str | None, occurrence: int = 1) -> bool:
        """Set the ``occurrence``-th field called ``name`` (1: the first) to ``value``, or
        remove it with ``None``; whether there was one. A missing occurrence is appended,
        as milter CHGHEADER does, unless ``value`` is ``None``."""
        if occurrence < 1:
            raise ValueError("occurrence counts from 1")
        if value is not None:
            check_header(name, value)
        fields = self._parsed()
        lname, seen = name.lower(), 0
        for i, f in enumerate(fields):
            if f.name.lower() == lname:
                seen += 1
                if seen == occurrence:
                    if value is None:
                        del fields[i]
                    else:
                        fields[i] = _Field.new(f.name, value)
                    self._edited = True
                    return True
        if value is not None:
            self.append_header(name, value)
        return False

    def remove_headers(self, predicate: Callable[[str, str], bool]) -> int:
        """Drop header fields for which ``predicate(name, value)`` is true; how many."""
        fields = self._parsed()
        keep = [f for f in fields if not predicate(f.name, f.value)]
        n = len(fields) - len(keep)
        if n:
            fields[:] = keep
            self._edited = True
        return n

    @property
    def modified(self) -> bool:
        """True when the header section or the body was changed."""
        return self._edited

    def header_bytes(self) -> bytes:
        """The header section as it stands (without the fields :meth:`add_header` adds)."""
        if not self._edited:
            return self._header_block
        raw_fields = split_header_fields(self._header_block)
        tail = self._header_block[sum(len(f) for f in raw_fields):]
        return b"".join(f.raw for f in self._parsed()) + tail

    # ------------------------------------------------------------ the body

    def body_writer(self) -> "BodyWriter":
        """A new body, written chunk by chunk: ``with message.body_writer() as w:
        w.write(chunk)``. It replaces the body when it is closed without an error."""
        return BodyWriter(self)

    def replace_body(self, data: bytes | Iterable[bytes]) -> None:
        """Replace the body (CRLF line ends), at once or from an iterable of chunks."""
        with self.body_writer() as w:
            if isinstance(data, (bytes, bytearray, memoryview)):
                w.write(bytes(data))
            else:
                for chunk in data:
                    w.write(chunk)

    def _set_body(self, body: bytes | None, path: str | None, size: int) -> None:
        self._body, self._body_path, self._body_size = body, path, size
        self._parsed()   # the size now follows the fields
        self._edited = True

    def _temp_file(self) -> tuple[str, BinaryIO]:
        if self._spill is None:
            raise RuntimeError("this message cannot spill a new body to disk")
        folder, queue_id, _ = self._spill
        path = os.path.join(folder, f"{queue_id}.body{len(self._temp_paths) + 1}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self._temp_paths.append(path)
        return path, os.fdopen(fd, "wb")

    def discard_temp_files(self) -> None:
        """Remove the files of replaced bodies (after the commit, or when refused)."""
        for path in self._temp_paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._temp_paths.clear()

    def open(self) -> BinaryIO:
        """A binary file object over the message as it stands (headers then body)."""
        if self._body_path is None:
            return io.BytesIO(self.header_bytes() + (self._body or b""))
        return _ChainReader(self.header_bytes(), self._body_path)

    def as_bytes(self) -> bytes:
        with self.open() as f:
            return f.read()

    @property
    def body_path(self) -> str | None:
        return self._body_path

    @property
    def body(self) -> bytes | None:
        return self._body


class BodyWriter:
    """A replacement body being written: in memory, then spilled past ``memory_bytes``."""

    def __init__(self, message: Message) -> None:
        self._message = message
        self._limit = message._spill[2] if message._spill is not None else 1 << 62
        self._buffer = bytearray()
        self._path: str | None = None
        self._file: BinaryIO | None = None
        self._size = 0

    def write(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._file is not None:
            self._file.write(chunk)
            return
        self._buffer += chunk
        if len(self._buffer) > self._limit:
            self._path, self._file = self._message._temp_file()
            self._file.write(self._buffer)
            self._buffer = bytearray()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._message._set_body(None if self._path is not None else bytes(self._buffer),
                                self._path, self._size)

    def __enter__(self) -> "BodyWriter":
        return self

    def __exit__(self, kind: object, *exc: object) -> None:
        if kind is None:
            self.close()
        elif self._file is not None:
            self._file.close()


def _unfold(value: str) -> str:
    return " ".join(part.strip() for part in value.split("\r\n")).strip()


_NOT_IN_NAME = re.compile("[: \t\r\n]")


def check_header(name: str, value: str) -> None:
    """Refuse a header that would break the message or inject another field."""
    if not name or not name.isascii() or _NOT_IN_NAME.search(name):
        raise ValueError(f"invalid header field name {name!r}")
    if "\r" not in value and "\n" not in value:
        return                          # one line: nothing more to check
    for line in value.split("\r\n")[1:]:
        if not line[:1] in (" ", "\t"):
            raise ValueError(f"header {name} continuation lines must start with white space")
    if "\n" in value.replace("\r\n", "") or "\r" in value.replace("\r\n", ""):
        raise ValueError(f"header {name} value contains a bare CR or LF")


def split_header_fields(block: bytes) -> list[bytes]:
    """Split a header section into raw fields (each with its continuation lines)."""
    fields: list[bytes] = []
    for line in block.splitlines(keepends=True):
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def parse_header_block(block: bytes) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for raw in split_header_fields(block):
        name, sep, value = raw.partition(b":")
        if not sep:
            out.append(("", raw.decode("utf-8", "surrogateescape").strip()))
            continue
        text = value.decode("utf-8", "surrogateescape")
        unfolded = " ".join(part.strip() for part in text.splitlines())
        out.append((name.decode("ascii", "replace").strip(), unfolded.strip()))
    return out


class _ChainReader(io.RawIOBase):
    """Read a bytes prefix, then a file: a received message whose body was spilled."""

    def __init__(self, prefix: bytes, path: str) -> None:
        self._prefix = memoryview(prefix)
        self._pos = 0
        self._file = open(path, "rb")

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        if self._pos < len(self._prefix):
            n = min(len(b), len(self._prefix) - self._pos)
            b[:n] = self._prefix[self._pos:self._pos + n]
            self._pos += n
            return n
        return self._file.readinto(b)

    def close(self) -> None:
        self._file.close()
        super().close()
