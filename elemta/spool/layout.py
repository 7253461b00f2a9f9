"""The spool on disk: every folder and file name. No other module spells them out.

Under the spool root::

    .lock               held (flock) by the process that owns the spool
    format              the spool format version, one number ("1\n"); see lock.py
    journal/<seq>.log   write-ahead journal: committed messages not yet checkpointed
    tmp/                in-progress files; emptied at start-up
    messages/<ID>       message content (RFC 5322, CRLF); immutable once committed
    ready/<ID>.json     envelope of a message waiting for delivery
    deferred/<ID>.json, hold/<ID>.json, failed/<ID>.json
    failed/<ID>.json.corrupt   an envelope that could not be read, kept for the operator

A queue id is a file name, so only ``[A-Za-z0-9_-]{1,64}`` is ever one.
Paths are plain strings: they are built per message, in threads, where
``pathlib`` costs more than the system call.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from .envelope import STATES

QUEUE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# what elemta.new_id makes: Crockford base 32, ordered as the ids were made
NEW_ID = re.compile(r"[0-9A-HJKMNP-TV-Z]{20}")
ENVELOPE_SUFFIX = ".json"
CORRUPT_SUFFIX = ".json.corrupt"
SEGMENT_SUFFIX = ".log"
RETIRED_SUFFIX = ".retired"   # retire records of a segment's messages
LOCK_NAME = ".lock"
FORMAT_NAME = "format"


class FreshIds:
    """Queue ids the journal may take as new to the spool without looking in ``messages/``.

    A message is in the spool when its queue id awaits a checkpoint or has a
    content file, so before a commit is journaled its id is looked up there.
    On the journal thread that ``lstat`` gives the interpreter lock away and
    must win it back from the busy event loop, which made it 0.4-0.8 ms of a
    3-4 ms commit at ten sessions. Ids made by ``elemta.new_id`` grow with
    time: one above every id the spool held at start-up (:attr:`newest`), and
    not journaled since (:attr:`recent`), cannot be in the spool. Every other id
    (another form, an older one, one journaled before) is still looked up.
    :attr:`recent` is bounded: when it is full, :attr:`newest` moves up to its
    highest id and it starts again. Used by the journal thread alone.
    """

    LIMIT = 1 << 16

    def __init__(self, present: Iterable[str] = ()) -> None:
        self.newest = max((i for i in present if NEW_ID.fullmatch(i)), default="")
        self.recent: set[str] = set()

    def surely_new(self, queue_id: str) -> bool:
        return (queue_id > self.newest and queue_id not in self.recent
                and NEW_ID.fullmatch(queue_id) is not None)

    def journaled(self, queue_id: str) -> None:
        if queue_id <= self.newest or NEW_ID.fullmatch(queue_id) is None:
            return  # looked up whenever it comes again
        recent = self.recent
        if len(recent) >= self.LIMIT:
            self.newest = max(recent)
            recent.clear()
            if queue_id <= self.newest:
                return
        recent.add(queue_id)


class InvalidQueueId(ValueError):
    """A queue id that could walk out of the spool (or is no id at all)."""


def check_id(queue_id: str) -> str:
    if not QUEUE_ID.fullmatch(queue_id):
        raise InvalidQueueId(f"invalid queue id {queue_id!r}")
    return queue_id


def is_queue_id(text: str) -> bool:
    return QUEUE_ID.fullmatch(text) is not None


def check_state(state: str) -> str:
    if state not in STATES:
        raise ValueError(f"unknown spool state {state!r} (one of {', '.join(STATES)})")
    return state


def segment_name(seq: int) -> str:
    return f"{seq:016d}{SEGMENT_SUFFIX}"


def segment_seq(name: str) -> int | None:
    """The sequence number in a segment's file name; ``None`` for any other file."""
    stem = name.removesuffix(SEGMENT_SUFFIX)
    if stem == name or not stem.isdigit() or not stem.isascii():
        return None
    return int(stem)


def queue_id_of(envelope_name: str) -> str | None:
    """The queue id an envelope file name stands for; ``None`` for any other name."""
    if not envelope_name.endswith(ENVELOPE_SUFFIX):
        return None
    return envelope_name[:-len(ENVELOPE_SUFFIX)]


class Layout:
    """The paths of one spool."""

    __slots__ = ("root", "tmp", "messages", "journal", "lock", "format")

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.fspath(root)
        self.tmp = f"{self.root}/tmp"
        self.messages = f"{self.root}/messages"
        self.journal = f"{self.root}/journal"
        self.lock = f"{self.root}/{LOCK_NAME}"
        self.format = f"{self.root}/{FORMAT_NAME}"

    def folders(self) -> list[str]:
        """Every folder of the spool, the root first."""
        return [self.root, self.tmp, self.messages, self.journal,
                *(self.state_dir(s) for s in STATES)]

    def state_dir(self, state: str) -> str:
        return f"{self.root}/{check_state(state)}"

    def envelope(self, state: str, queue_id: str) -> str:
        return f"{self.root}/{check_state(state)}/{queue_id}{ENVELOPE_SUFFIX}"

    def corrupt_envelope(self, queue_id: str) -> str:
        return f"{self.root}/failed/{queue_id}{CORRUPT_SUFFIX}"

    def content(self, queue_id: str) -> str:
        return f"{self.messages}/{queue_id}"

    def tmp_file(self, queue_id: str, kind: str) -> str:
        """A file being written for a message: ``kind`` is ``envelope``, ``content``, ``body``…"""
        return f"{self.tmp}/{queue_id}.{kind}"

    def segment(self, seq: int) -> str:
        return f"{self.journal}/{segment_name(seq)}"

    def retire_file(self, seq: int) -> str:
        """The retire records of segment ``seq``'s messages (``resident.py``)."""
        return f"{self.journal}/{seq:016d}{RETIRED_SUFFIX}"

    def retire_files(self) -> list[tuple[int, str]]:
        """``(seq, path)`` of every retire file in ``journal/``."""
        out: list[tuple[int, str]] = []
        try:
            with os.scandir(self.journal) as it:
                for entry in it:
                    stem = entry.name.removesuffix(RETIRED_SUFFIX)
                    if stem != entry.name and stem.isdigit() and stem.isascii():
                        out.append((int(stem), entry.path))
        except FileNotFoundError:
            pass
        return sorted(out)

    def ids_in(self, state: str) -> list[str]:
        """The queue ids with an envelope in ``state`` (a directory listing; no envelope read)."""
        try:
            with os.scandir(self.state_dir(state)) as it:
                return [e.name[:-len(ENVELOPE_SUFFIX)] for e in it
                        if e.name.endswith(ENVELOPE_SUFFIX)]
        except FileNotFoundError:
            return []

    def entries_in(self, state: str) -> Iterator[os.DirEntry[str]]:
        """Every file in a state directory (recovery looks at what is not an envelope too)."""
        with os.scandir(self.state_dir(state)) as it:
            yield from it

    def journal_segments(self) -> tuple[list[tuple[int, str]], list[str]]:
        """``(seq, path)`` of every segment in ``journal/``, in order; and any other files."""
        segments: list[tuple[int, str]] = []
        others: list[str] = []
        try:
            with os.scandir(self.journal) as it:
                for entry in it:
                    seq = segment_seq(entry.name)
                    if seq is None:
                        if not entry.name.endswith(RETIRED_SUFFIX):
                            others.append(entry.path)
                    else:
                        segments.append((seq, entry.path))
        except FileNotFoundError:
            pass
        segments.sort()
        return segments, others

    def has_journal(self) -> bool:
        """Whether a journal was left behind (a server that did not stop cleanly)."""
        return bool(self.journal_segments()[0])

    def path(self) -> Path:
        return Path(self.root)
