"""The maildir helper process: requests in, batches written, outcomes out.

Run by :class:`elemta.HelperProcess` as ``python -I -S`` on the server's
path (:mod:`elemta_maildir.process` starts it). This module and what it
imports are all the helper loads: the rules of a Maildir delivery
(:mod:`~elemta_maildir.delivery`), Elemta's contract and its helper-process
side, and the standard library; not the plugin's hooks or pydantic (the
settings come as plain values, already validated). The first local
deliveries wait for the helper, so its start is on their path: an
interpreter with these imports starts in about 65 ms, one that imported
the whole plugin (and ``site``) in 130 ms.
"""

from __future__ import annotations

import logging
import os
import socket
import types
from typing import Any

from elemta import (HELPER_READY, Envelope, Outcome, RecipientState, helper_answers,
                    helper_start, receive_request)

from .delivery import Maildirs

log = logging.getLogger("elemta.maildir")

#: deliveries written and synced together, at most
MAX_BATCH = 100


def child_main(channel: int, init_fd: int) -> None:
    """The helper: deliveries from ``channel`` in batches; outcomes and log records back.

    One thread: every request that arrived while a batch was written forms
    the next batch (two syncs in all), answered as soon as it is named.
    Threads, each with a batch of its own, made it slower: two ran at 0.63 of
    SMTP delivery's rate where one ran at 0.90 (docs/performance.md).
    """
    sock, (fields, hostname) = helper_start(channel, init_fd)
    # MaildirSettings' values as attributes; the path is absolute: nothing left to resolve
    settings = types.SimpleNamespace(**fields)
    maildirs = Maildirs(settings, _same, hostname)  # type: ignore[arg-type]
    sock.sendall(HELPER_READY)
    while True:
        batch = _receive(sock)
        if not batch:
            return
        try:
            results = maildirs.deliver_many([(envelope, rcpts, src)
                                             for _, envelope, rcpts, src in batch])
        except BaseException:  # deliver_many does not raise: a bug, and the messages stay
            log.exception("maildir: a batch of %d deliveries failed unexpectedly", len(batch))
            results = [[Outcome(r.address, 451, "4.3.0", "local delivery failed; see the "
                                "server log") for r in job[2]] for job in batch]
        finally:
            for job in batch:
                os.close(job[3])
        try:
            for job, outcomes in zip(batch, results):
                for data in helper_answers(job[0], outcomes):
                    sock.sendall(data)
        except OSError:  # the server is gone: what was written stays, the spool repeats it
            return


def _receive(sock: socket.socket) -> list[tuple[int, Envelope, list[RecipientState], int]]:
    """The requests waiting, at least one (blocking for it), at most :data:`MAX_BATCH`;
    none at the end of the input."""
    batch: list[tuple[int, Envelope, list[RecipientState], int]] = []
    flags = 0
    while len(batch) < MAX_BATCH:
        try:
            request = receive_request(sock, flags)
        except BlockingIOError:
            break
        if request is None:
            break
        request_id, (envelope, rcpts), fd = request
        flags = socket.MSG_DONTWAIT
        if fd is None:  # cannot happen: the server sends every request with its content
            for data in helper_answers(request_id, [
                    Outcome(r.address, 451, "4.3.0", "the spooled message was not passed")
                    for r in rcpts]):
                sock.sendall(data)
            continue
        batch.append((request_id, envelope, rcpts, fd))
    return batch


def _same(path: Any) -> Any:
    return path
