"""Start-up: make the spool consistent after whatever happened to the last run.

1. Create the folders that are missing; empty ``tmp/``.
2. Replay every journal segment left behind, in order: each valid record's
   content and envelope are written and renamed over whatever is there
   (unless the envelope has since moved to another state). Reading a segment
   stops at the first record that is incomplete, fails its checksum or belongs
   to another segment: a batch cut short by a crash was never acknowledged.
   The replayed files are made durable, then the segments deleted.
3. Delete content files without an envelope; move an envelope whose content
   is missing, or that cannot be read, to ``failed/`` with an error logged, so
   that nothing is dropped silently.

A crash during recovery just means replaying again, to the same result; it
can bring back messages that were journaled but not acknowledged
(duplicates, never losses).
"""

from __future__ import annotations

import logging
import os
import shutil

from ..durable import fsync_dir, write_file_durably
from .envelope import STATES, parse_envelope
from .layout import CORRUPT_SUFFIX, Layout, queue_id_of
from .replay import Syncer, replay_segment
from .threads import SpoolStats

log = logging.getLogger("elemta.spool")

_DIR_MODE = 0o700
CONTENT_MISSING = "message content missing from the spool at start-up"


def recover(layout: Layout, syncer: Syncer, stats: SpoolStats) -> tuple[dict[str, int], int]:
    """Recover the spool; the messages per state, and the last journal sequence number seen."""
    created = False
    for d in layout.folders():
        if not os.path.isdir(d):
            os.makedirs(d, mode=_DIR_MODE, exist_ok=True)
            created = True
    if created:
        fsync_dir(layout.root)

    removed_tmp = 0
    with os.scandir(layout.tmp) as it:
        for entry in it:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
            removed_tmp += 1

    syncer.open()
    last_seq = replay_journal(layout, syncer, stats)

    with os.scandir(layout.messages) as it:
        contents = {e.name for e in it}
    # List every state first: envelopes moved to failed/ below must not be
    # seen a second time.
    listing = {state: [e.name for e in layout.entries_in(state)] for state in STATES}
    counts = dict.fromkeys(STATES, 0)
    referenced: set[str] = set()
    seen_in: dict[str, str] = {}
    for state, names in listing.items():
        for name in names:
            if name.endswith(CORRUPT_SUFFIX):
                # kept for the operator, and so is its content
                referenced.add(name.removesuffix(CORRUPT_SUFFIX))
                continue
            queue_id = queue_id_of(name)
            if queue_id is None:
                log.warning("spool: ignoring unexpected file %s/%s", layout.state_dir(state), name)
                continue
            referenced.add(queue_id)
            final_state = _check_envelope(layout, state, queue_id, queue_id in contents)
            if final_state is None:
                continue
            if queue_id in seen_in:
                log.error("spool: message %s has envelopes in both %s/ and %s/; "
                          "resolve by hand", queue_id, seen_in[queue_id], final_state)
            seen_in[queue_id] = final_state
            counts[final_state] += 1

    orphans = contents - referenced
    for name in orphans:
        os.unlink(layout.content(name))
    if orphans:
        fsync_dir(layout.messages)
    if removed_tmp or orphans:
        log.info("spool: removed %d unfinished file(s) from tmp/ and %d orphan content "
                 "file(s) from messages/", removed_tmp, len(orphans))
    return counts, last_seq


def replay_journal(layout: Layout, syncer: Syncer, stats: SpoolStats) -> int:
    """Replay, sync and delete the segments in ``journal/``; the highest sequence number seen."""
    segments, others = layout.journal_segments()
    for path in others:
        log.warning("spool: ignoring unexpected file %s", path)
    if not segments:
        return 0
    entries: list[tuple[str, str]] = []
    for seq, path in segments:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            entries += replay_segment(layout, fd, seq, path)
        finally:
            os.close(fd)
    if entries:
        syncer.make_durable(entries)
    for _, path in segments:
        os.unlink(path)
    fsync_dir(layout.journal)
    stats.replayed = len(entries)
    if entries:
        log.info("spool: replayed %d message(s) from %d journal segment(s)", len(entries),
                 len(segments))
    return segments[-1][0]


def _check_envelope(layout: Layout, state: str, queue_id: str, has_content: bool) -> str | None:
    """Check one envelope at start-up; the state it ends up in, ``None`` if quarantined."""
    path = layout.envelope(state, queue_id)
    failed_dir = layout.state_dir("failed")
    try:
        with open(path, "rb") as f:
            env = parse_envelope(f.read(), queue_id)
    except ValueError as e:
        target = layout.corrupt_envelope(queue_id)
        os.replace(path, target)
        fsync_dir(failed_dir)
        fsync_dir(layout.state_dir(state))
        log.error("spool: unreadable envelope %s (%s); moved to %s", path, e, target)
        return None
    if has_content:
        return state
    if state == "failed" and env.last_error == CONTENT_MISSING:
        return state  # found and reported at an earlier start-up
    env.last_error = CONTENT_MISSING
    write_file_durably(layout.envelope("failed", queue_id), env.to_json(),
                       tmp=layout.tmp_file(queue_id, "envelope"))
    if state != "failed":
        os.unlink(path)
        fsync_dir(layout.state_dir(state))
    log.error("spool: message %s has an envelope in %s/ but no content; the envelope "
              "is now in failed/", queue_id, state)
    return "failed"
