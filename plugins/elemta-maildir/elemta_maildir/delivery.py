"""One recipient, one mailbox: the rules of a Maildir delivery and their reply codes.

:meth:`Maildirs.deliver_many` blocks (file I/O); the plugin runs it in its
helper process or a thread. It never raises for a delivery problem: every result is an
:class:`~elemta.models.Outcome`, and a failure is never a loss (4xx keeps the
message queued).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from elemta import Envelope, Outcome, RecipientState

from . import store, writer
from .layout import Layout, Mailbox, UnsafeAddress, folder_dir, folder_of

if TYPE_CHECKING:  # (pydantic stays out of the helper process: it gets plain settings)
    from .settings import MaildirSettings

log = logging.getLogger("elemta.maildir")

_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


@dataclass(slots=True)
class _Step:
    """A recipient's message written and waiting for its name in ``new/``."""

    envelope: Envelope
    recipient: RecipientState
    box: Mailbox
    folder: Path
    size: int
    sized: bool               # the mailbox has a maildirsize to add the message to
    write: writer.Pending


def _writes(steps: list[list[Outcome | _Step]]) -> list[writer.Pending]:
    """The files a batch's steps wrote."""
    return [step.write for group in steps for step in group if isinstance(step, _Step)]


class Maildirs:
    """Every mailbox of one server, as ``[plugins.maildir]`` lays them out."""

    def __init__(self, settings: MaildirSettings, resolve: Callable[[Path], Path],
                 hostname: str) -> None:
        self.settings = settings
        self.hostname = hostname
        self.layout = Layout(settings.path, resolve, settings.recipient_delimiter, hostname)
        self.owner = store.resolve_owner(settings.owner) if settings.owner else None
        self.dir_syncer = writer.DirSyncer()
        self.writer = writer.Writer(file_mode=settings.file_mode, fsync=settings.fsync,
                                   owner=self.owner, dir_syncer=self.dir_syncer)
        # one folder creation at a time: two details differing only by case
        # (bob+Work, bob+work) must not make two folders
        self._creating = threading.Lock()
        # one maildirsize recalculation at a time: two would scan the same mailbox
        self._recalculating = threading.Lock()
        # address → mailbox, and the Maildirs seen complete: both are pure
        # functions of the name or change only when an operator removes a
        # mailbox (a failed write forgets it, and the next attempt checks again)
        self._mailboxes: dict[str, Mailbox] = {}
        self._known: set[Path] = set()

    def exists(self, box: Mailbox) -> bool:
        """Whether the mailbox is a Maildir (known from a delivery, or ``cur/ new/ tmp/``)."""
        return box.root in self._known or store.is_maildir(box.root)

    def deliver_all(self, envelope: Envelope, recipients: list[RecipientState],
                    content_path: str) -> list[Outcome]:
        """Deliver to every recipient, in order; one outcome each. Never raises."""
        return self.deliver_many([(envelope, recipients, content_path)])[0]

    def deliver_many(self, jobs: list[tuple[Envelope, list[RecipientState], str | int]],
                     ) -> list[list[Outcome]]:
        """:meth:`deliver_all` for each ``(envelope, recipients, content)``, as one batch.

        ``content`` is the spooled message's path, or a descriptor open on it
        (left open).

        Every message of the batch is written first, then all are synced,
        named in ``new/`` and synced again together: two syncs for the batch,
        however many messages it holds. Never raises.

        Each outcome is 250 delivered (or found already delivered), 552 5.2.2
        larger than the quota, 550 5.1.3 unsafe address, 452 4.2.2 mailbox full,
        452 4.3.1 disk full, 450 4.2.1 mailbox missing (``create_mailboxes =
        false``), or 451 4.3.0 for any other file system error.
        """
        opened: list[int] = []
        steps: list[list[Outcome | _Step]] = []
        # bytes and messages of the batch so far, per mailbox: not in maildirsize yet
        reserved: dict[Path, list[int]] = {}
        try:
            for envelope, recipients, content in jobs:
                try:
                    if isinstance(content, int):
                        src = content
                    else:
                        src = os.open(content, os.O_RDONLY | os.O_CLOEXEC)
                        opened.append(src)
                    size = os.fstat(src).st_size
                except OSError as e:
                    log.warning("%s: cannot read the spooled message %s: %s", envelope.id,
                                content, e.strerror or e)
                    steps.append([Outcome(r.address, 451, "4.3.0", "the spooled message "
                                          "cannot be read") for r in recipients])
                    continue
                steps.append([self._guarded(envelope, r, self._start, envelope, r, src, size,
                                            reserved) for r in recipients])
            writes = _writes(steps)
            if writes:
                self.writer.complete(writes)
            return [[step if isinstance(step, Outcome) else self._guarded(
                        step.envelope, step.recipient, self._finish, step)
                     for step in group] for group in steps]
        finally:
            # after a bug above: no file of the batch stays open or in tmp/
            self.writer.discard(_writes(steps))
            for src in opened:
                os.close(src)

    def _guarded(self, envelope: Envelope, recipient: RecipientState,
                 fn: Callable[..., Outcome | _Step], *args: Any) -> Outcome | _Step:
        try:
            return fn(*args)
        except Exception:
            # a bug, not a mailbox problem: keep the message and say where it broke
            log.exception("%s: maildir delivery to <%s> failed unexpectedly",
                          envelope.id, recipient.address)
            return Outcome(recipient.address, 451, "4.3.0", "local delivery failed; "
                           "see the server log")

    def _start(self, envelope: Envelope, recipient: RecipientState, src: int,
               content_size: int, reserved: dict[Path, list[int]]) -> Outcome | _Step:
        """The outcome, when it is known before writing; else the message written, unnamed."""
        address = recipient.address
        box = self._mailboxes.get(address)
        if box is None:
            try:
                box = self.layout.mailbox(address)
            except UnsafeAddress as e:
                return self._failed(envelope, address, 550, "5.1.3",
                                    f"unsafe mailbox name: {e}")
            if len(self._mailboxes) >= 100_000:
                self._mailboxes.clear()
            self._mailboxes[address] = box
        try:
            return self._prepare(envelope, recipient, box, src, content_size, reserved)
        except (store.MailboxMissing, OSError) as e:
            return self._error(envelope, address, box, e)

    def _error(self, envelope: Envelope, address: str, box: Mailbox,
               error: store.MailboxMissing | OSError) -> Outcome:
        if isinstance(error, store.MailboxMissing):
            log.warning("%s: maildir %s for <%s> does not exist and create_mailboxes is off; "
                        "create it (cur/, new/, tmp/) or set create_mailboxes = true",
                        envelope.id, box.root, address)
            return Outcome(address, 450, "4.2.1", f"mailbox of <{box.address}> is not "
                           "available yet")
        self._known.discard(box.root)
        # the path goes to the log only: a reply may end up in a bounce
        reason = error.strerror or str(error)
        log.warning("%s: maildir delivery to <%s> failed: %s (%s)", envelope.id, address,
                    reason, error.filename or box.root)
        if error.errno in _NO_SPACE:
            return Outcome(address, 452, "4.3.1", f"insufficient storage for the mailbox "
                           f"of <{box.address}>: {reason}")
        return Outcome(address, 451, "4.3.0", f"cannot write to the mailbox of "
                       f"<{box.address}>: {reason}")

    def _prepare(self, envelope: Envelope, recipient: RecipientState, box: Mailbox,
                 src: int, content_size: int, reserved: dict[Path, list[int]],
                 ) -> Outcome | _Step:
        settings = self.settings
        address = recipient.address
        if box.root not in self._known:
            if not store.is_maildir(box.root):
                if not settings.create_mailboxes:
                    raise store.MailboxMissing(box.root)
                store.make_maildir(box.root, settings.dir_mode, settings.fsync,
                                   owner=self.owner, file_mode=settings.file_mode)
            self._known.add(box.root)
        folder = self._folder(box)
        head = store.trace_headers(envelope.sender, address, recipient.original)
        size = len(head) + content_size
        name = store.base_name(envelope.id, envelope.received_at, address, self.hostname, size)

        # The runner counts the attempt in progress before calling deliver, so an
        # envelope at 1 has had no attempt recorded before this one. A first
        # attempt does not look in new/: the link (or rename) into new/ finds
        # a copy a crash left there all the same.
        repeated = recipient.attempts > 0 or envelope.attempts > 1
        if repeated:
            folders = [folder] if folder == box.root else [folder, box.root]
            found = store.find_delivered(folders, name, scan_cur=True)
            if found is not None:
                if settings.fsync and found.parent.name == "new":
                    store.fsync_dir(found.parent)  # a crash may have beaten the first fsync
                return self._already(envelope, address, found)

        refusal, sized = self._check_quota(envelope, box, address, size, reserved)
        if refusal is not None:
            return refusal
        write = self.writer.begin(src, str(folder), name, head, size)
        return _Step(envelope, recipient, box, folder, size, sized, write)

    def _finish(self, step: _Step) -> Outcome:
        """The outcome of a message :meth:`Writer.complete` has named (or failed to)."""
        envelope, address, box, write = step.envelope, step.recipient.address, step.box, step.write
        if write.error is not None:
            return self._error(envelope, address, box, write.error)
        if write.already:
            return self._already(envelope, address, write.path)
        if step.sized:
            try:
                store.append_maildirsize(box.root, step.size)
            except OSError as e:  # delivered all the same; Dovecot recalculates the file
                log.warning("%s: cannot update the maildirsize of <%s>: %s", envelope.id,
                            box.address, e.strerror or e)
        # the runner logs the outcome at info; the file is for debugging
        log.debug("%s: delivered to <%s> in %s", envelope.id, address, write.path)
        folder = step.folder
        where = f" folder {folder_of(folder.name)}" if folder != box.root else ""
        return Outcome(address, 250, "2.0.0", f"delivered to the mailbox of "
                       f"<{box.address}>{where}", "maildir")

    def _already(self, envelope: Envelope, address: str, found: str | Path) -> Outcome:
        log.info("%s: <%s> already delivered to %s", envelope.id, address, found)
        return Outcome(address, 250, "2.0.0", "already delivered to the mailbox")

    def _folder(self, box: Mailbox) -> Path:
        """The INBOX, or the Maildir++ folder the detail names, as ``detail_folder`` says.

        The folder spelled exactly as the detail if it exists, else one that
        differs from it only by case, else (``"create"``) a new one.
        """
        mode = self.settings.detail_folder
        if box.detail is None or mode == "off":
            return box.root
        directory = folder_dir(box.detail)
        if directory is None:
            return box.root
        exact = box.root / directory
        if store.is_maildir(exact):
            return exact
        if mode == "existing":
            return store.find_folder(box.root, directory) or box.root
        with self._creating:
            found = store.find_folder(box.root, directory)
            if found is None:
                store.make_maildir(exact, self.settings.dir_mode, self.settings.fsync,
                                   folder=True, owner=self.owner,
                                   file_mode=self.settings.file_mode)
                found = exact
        return found

    def _check_quota(self, envelope: Envelope, box: Mailbox, address: str, size: int,
                     reserved: dict[Path, list[int]]) -> tuple[Outcome | None, bool]:
        """A refusal (or ``None``), and whether the mailbox has a ``maildirsize`` to add to.

        ``reserved`` holds what earlier messages of the batch will add to each mailbox.
        """
        quota, sized = self._quota(envelope, box)
        if quota is None:
            return None, sized
        held = reserved.setdefault(box.root, [0, 0])
        quota = dataclasses.replace(quota, used_bytes=quota.used_bytes + held[0],
                                    used_count=quota.used_count + held[1])
        refusal = self._over_quota(envelope, box, address, size, quota)
        if refusal is None:
            held[0] += size
            held[1] += 1
        return refusal, sized

    def _over_quota(self, envelope: Envelope, box: Mailbox, address: str, size: int,
                    quota: store.Quota) -> Outcome | None:
        if quota.limit_bytes and size > quota.limit_bytes:
            return self._failed(envelope, address, 552, "5.2.2",
                                f"message of {size} bytes is larger than the mailbox quota of "
                                f"<{box.address}> ({quota.limit_bytes} bytes)")
        if quota.limit_bytes and quota.used_bytes + size > quota.limit_bytes:
            return self._failed(envelope, address, 452, "4.2.2",
                                f"mailbox of <{box.address}> is full ({quota.used_bytes} of "
                                f"{quota.limit_bytes} bytes used, the message needs {size})")
        if quota.limit_count and quota.used_count + 1 > quota.limit_count:
            return self._failed(envelope, address, 452, "4.2.2",
                                f"mailbox of <{box.address}> is full ({quota.used_count} of "
                                f"{quota.limit_count} messages)")
        return None

    def _quota(self, envelope: Envelope, box: Mailbox) -> tuple[store.Quota | None, bool]:
        """The mailbox's limits and usage by the Maildir++ rules (``None`` when it has no
        limit), and whether it has a ``maildirsize`` (one was found, or written now).

        ``maildirsize`` gives both while it is current. Otherwise its limits
        (or, without the file, the configured quota) hold, the usage comes
        from a scan, and ``maildirsize`` is written anew, as Dovecot and
        Courier do.
        """
        sizes = store.read_maildirsize(box.root)
        if sizes is not None and sizes.current:
            return sizes.quota, True
        if not any(self._limits(box, sizes)):
            return None, sizes is not None
        with self._recalculating:
            sizes = store.read_maildirsize(box.root)  # recalculated while this thread waited?
            if sizes is not None and sizes.current:
                return sizes.quota, True
            limit_bytes, limit_count = self._limits(box, sizes)
            if not (limit_bytes or limit_count):
                return None, sizes is not None
            usage = store.scan_usage(box.root)
            quota = store.Quota(limit_bytes, limit_count, usage.used_bytes, usage.used_count)
            try:
                store.replace_maildirsize(box.root, quota, usage, owner=self.owner,
                                          file_mode=self.settings.file_mode,
                                          fsync=self.settings.fsync)
            except OSError as e:  # the scan stands; the next delivery tries again
                log.warning("%s: cannot write the maildirsize of <%s>: %s", envelope.id,
                            box.address, e.strerror or e)
        return quota, True

    def _limits(self, box: Mailbox, sizes: store.SizeFile | None) -> tuple[int, int]:
        """Bytes and messages: ``maildirsize``'s limits if it has them, else the configured quota."""
        if sizes is not None:
            return sizes.quota.limit_bytes, sizes.quota.limit_count
        return self.settings.quotas.get(box.address, self.settings.quota_bytes), 0

    def _failed(self, envelope: Envelope, address: str, code: int, enhanced: str,
                text: str) -> Outcome:
        log.info("%s: maildir delivery to <%s> refused: %d %s %s", envelope.id, address, code,
                 enhanced, text)
        return Outcome(address, code, enhanced, text)


