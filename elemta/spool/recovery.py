"""Start-up: make the spool consistent after whatever happened to the last run.

1. Create the folders that are missing; empty ``tmp/``.
2. Replay every journal segment left behind, in order: each valid record's
   content and envelope are written and renamed over whatever is there
   (unless the envelope has since moved to another state, or the segment's
   retire file says the message was delivered from memory). Reading a segment
   stops at the first record that is incomplete, fails its checksum or belongs
   to another segment: a batch cut short by a crash was never acknowledged.
   The replayed files are made durable, then the segments deleted.
3. Delete content files without an envelope; move an envelope whose content
   is missing, or that cannot be read, to ``failed/`` with an error logged, so
   that nothing is dropped silently. Envelopes in ``ready/`` are not read
   here: the runner reads each of them as soon as it starts, and sets aside
   one it cannot read (:func:`set_aside`); reading them twice held the first
   delivery of a full queue back by 60-100 ms per 5,000 messages.

A crash during recovery just means replaying again, to the same result; it
can bring back messages that were journaled but not acknowledged
(duplicates, never losses).

Recovery always completes, and never needs more room than the spool had: when
the file system is too full to write the files of a segment (``ENOSPC``,
``EDQUOT``), that segment and the ones after it stay in the journal, their
messages are kept out of the clean-up of step 3, and the server starts with
them *pending*: it refuses new mail until :func:`replay_pending` (retried as
deliveries free room) has written them out.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import shutil
import time
from dataclasses import dataclass, field

from ..durable import fsync_dir, write_file_durably
from . import journal
from .envelope import STATES, parse_envelope, read_envelope_file
from .layout import CORRUPT_SUFFIX, FreshIds, Layout, is_queue_id, queue_id_of
from .replay import Syncer, replay_segment
from .threads import Residents, SpoolStats

log = logging.getLogger("elemta.spool")

_DIR_MODE = 0o700
CONTENT_MISSING = "message content missing from the spool at start-up"


NO_ROOM = (errno.ENOSPC, errno.EDQUOT)


@dataclass
class Recovered:
    """What :func:`recover` found: messages per state, the journal left to replay."""

    counts: dict[str, int]
    last_seq: int
    pending: list[tuple[int, str]] = field(default_factory=list)  # (seq, path), in order
    pending_ids: set[str] = field(default_factory=set)
    uncounted: set[str] = field(default_factory=set)  # pending, and no envelope on disk yet
    fresh: FreshIds = field(default_factory=FreshIds)  # ids above all those in the spool


def recover(layout: Layout, syncer: Syncer, stats: SpoolStats) -> Recovered:
    """Recover the spool: the messages per state, the journal segments still to replay."""
    created = False
    for d in layout.folders():
        if not os.path.isdir(d):
            os.makedirs(d, mode=_DIR_MODE, exist_ok=True)
            created = True
    if created:
        fsync_dir(layout.root)

    # (the helper that removed files for the previous run may still be at it:
    # a file gone meanwhile is no error)
    removed_tmp = 0
    with os.scandir(layout.tmp) as it:
        for entry in it:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
            removed_tmp += 1

    syncer.open()
    last_seq, pending, retired = replay_journal(layout, syncer, stats)
    pending_ids = ids_in_segments(pending) - retired

    with os.scandir(layout.messages) as it:
        contents = {e.name for e in it}
    counts = count_envelopes(layout, contents, pending_ids)
    # the content of a message still in the journal is written again from there
    referenced = _referenced(layout)
    orphans = contents - referenced - pending_ids
    for name in orphans:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(layout.content(name))
    if orphans:
        fsync_dir(layout.messages)
    if removed_tmp or orphans:
        log.info("spool: removed %d unfinished file(s) from tmp/ and %d orphan content "
                 "file(s) from messages/", removed_tmp, len(orphans))
    fresh = FreshIds(itertools.chain(contents, referenced, pending_ids))
    return Recovered(counts, last_seq, pending, pending_ids, pending_ids - referenced, fresh)


def count_envelopes(layout: Layout, contents: set[str],
                    pending_ids: set[str] | frozenset[str] = frozenset()) -> dict[str, int]:
    """Check every envelope and count them per state.

    An unreadable one is moved aside; one without content goes to ``failed/``
    (unless its message is still in the journal, to be written out). Those in
    ``ready/`` that have their content are counted without being read.
    """
    # List every state first: envelopes moved to failed/ below must not be
    # seen a second time.
    listing = {state: [e.name for e in layout.entries_in(state)] for state in STATES}
    counts = dict.fromkeys(STATES, 0)
    seen_in: dict[str, str] = {}
    for state, names in listing.items():
        for name in names:
            if name.endswith(CORRUPT_SUFFIX):
                continue
            queue_id = queue_id_of(name)
            if queue_id is None:
                log.warning("spool: ignoring unexpected file %s/%s", layout.state_dir(state), name)
                continue
            has_content = queue_id in contents or queue_id in pending_ids
            if has_content and state == "ready":
                final_state: str | None = state  # read (and checked) by the runner, at once
            else:
                final_state = _check_envelope(layout, state, queue_id, has_content)
            if final_state is None:
                continue
            if queue_id in seen_in:
                log.error("spool: message %s has envelopes in both %s/ and %s/; "
                          "resolve by hand", queue_id, seen_in[queue_id], final_state)
            seen_in[queue_id] = final_state
            counts[final_state] += 1
    return counts


def _referenced(layout: Layout) -> set[str]:
    """The queue ids that have an envelope, or an envelope kept aside as unreadable."""
    out: set[str] = set()
    for state in STATES:
        for entry in layout.entries_in(state):
            name = entry.name
            queue_id = name.removesuffix(CORRUPT_SUFFIX) if name.endswith(CORRUPT_SUFFIX) \
                else queue_id_of(name)
            if queue_id is not None:
                out.add(queue_id)
    return out


def replay_journal(layout: Layout, syncer: Syncer,
                   stats: SpoolStats) -> tuple[int, list[tuple[int, str]], set[str]]:
    """Replay, sync and delete the segments in ``journal/``, in order, as far as room allows.

    Returns the highest sequence number seen, the segments left (from the
    first one whose files did not fit on, ``ENOSPC``/``EDQUOT``) and the
    messages the retire files say were delivered.
    """
    segments, others = layout.journal_segments()
    for path in others:
        log.warning("spool: ignoring unexpected file %s", path)
    if not segments:
        return 0, [], set()
    retired = retired_in(layout, segments)
    entries, pending = replay_segments(layout, syncer, segments, Residents(retired))
    kept = {seq for seq, _ in pending}
    for seq, path in layout.retire_files():  # of segments replayed, or of none left
        if seq not in kept:
            os.unlink(path)
    stats.replayed = len(entries)
    if pending:
        log.error("spool: no room to write out the messages of %d journal segment(s) from %s "
                  "on; they stay in the journal, new mail is refused with 452 4.3.1, and they "
                  "are written out as deliveries free room", len(pending), pending[0][1])
    return segments[-1][0], pending, retired


def retired_in(layout: Layout, segments: list[tuple[int, str]]) -> set[str]:
    """The queue ids the retire files of these segments name: messages delivered from
    memory, which replay skips."""
    out: set[str] = set()
    for seq, _ in segments:
        try:
            fd = os.open(layout.retire_file(seq), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            out.update(rec.queue_id for rec in journal.SegmentReader(
                fd, seq, is_queue_id, retire_file=True))
        finally:
            os.close(fd)
    return out


def replay_segments(layout: Layout, syncer: Syncer, segments: list[tuple[int, str]],
                    residents: Residents | None = None
                    ) -> tuple[list[tuple[str, str]], list[tuple[int, str]]]:
    """Replay segments in order: ``(queue id, state)`` of the records replayed, and the
    segments left for lack of room.

    The replayed ones are made durable and deleted; their records can never
    come back.
    """
    if residents is None:
        residents = Residents(retired_in(layout, segments))
    checked = time.monotonic()  # a checkpoint's sync failing from now on may hold our error
    entries: list[tuple[str, str]] = []
    replayed: list[tuple[int, str]] = []
    pending: list[tuple[int, str]] = []
    for index, (seq, path) in enumerate(segments):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            entries += replay_segment(layout, fd, seq, path, residents)
        except OSError as e:
            if e.errno not in NO_ROOM:
                raise
            log.warning("spool: %s: %s", path, e.strerror or e)
            pending = segments[index:]
            break
        finally:
            os.close(fd)
        replayed.append((seq, path))
    if entries:
        syncer.make_durable(entries, checked)
    for seq, path in replayed:
        os.unlink(path)
    if replayed:
        fsync_dir(layout.journal)
    for seq, _ in replayed:  # only once the segments can never come back
        try:
            os.unlink(layout.retire_file(seq))
        except FileNotFoundError:
            pass
    if entries:
        log.info("spool: replayed %d message(s) from %d journal segment(s)", len(entries),
                 len(replayed))
    return entries, pending


def ids_in_segments(segments: list[tuple[int, str]]) -> set[str]:
    """The queue ids of the valid records of these segments."""
    out: set[str] = set()
    for seq, path in segments:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            out.update(rec.queue_id for rec in journal.SegmentReader(fd, seq, is_queue_id))
        finally:
            os.close(fd)
    return out


def _check_envelope(layout: Layout, state: str, queue_id: str, has_content: bool) -> str | None:
    """Check one envelope at start-up; the state it ends up in, ``None`` if quarantined."""
    path = layout.envelope(state, queue_id)
    try:
        env = parse_envelope(read_envelope_file(path), queue_id)
    except ValueError as e:
        set_aside(layout, state, queue_id, e)
        return None
    if has_content:
        return state
    if state == "failed" and env.last_error == CONTENT_MISSING:
        return state  # found and reported at an earlier start-up
    env.last_error = CONTENT_MISSING
    try:
        write_file_durably(layout.envelope("failed", queue_id), env.to_json(),
                           tmp=layout.tmp_file(queue_id, "envelope"))
    except OSError as e:
        if e.errno not in NO_ROOM:
            raise
        log.error("spool: message %s has an envelope in %s/ but no content; no room to move "
                  "it to failed/ (%s): it stays, and is looked at again at the next start",
                  queue_id, state, e.strerror)
        return state
    if state != "failed":
        os.unlink(path)
        fsync_dir(layout.state_dir(state))
    log.error("spool: message %s has an envelope in %s/ but no content; the envelope "
              "is now in failed/", queue_id, state)
    return "failed"


def set_aside(layout: Layout, state: str, queue_id: str, error: Exception) -> str:
    """Move the unreadable envelope of ``queue_id`` in ``state`` to
    ``failed/<ID>.json.corrupt``, durably, with an error logged; the path it has there.

    The content stays: the operator can rebuild the envelope from it.
    """
    path = layout.envelope(state, queue_id)
    target = layout.corrupt_envelope(queue_id)
    os.replace(path, target)
    fsync_dir(layout.state_dir("failed"))
    fsync_dir(layout.state_dir(state))
    log.error("spool: unreadable envelope %s (%s); moved to %s", path, error, target)
    return target
