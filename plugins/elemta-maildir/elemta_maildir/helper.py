"""The helper process's side of :mod:`elemta_maildir.process`: requests in, outcomes out.

Run as ``python -I -S -c "...child_main(...)"``. This module and what it
imports are all the helper loads: the rules of a Maildir delivery
(:mod:`~elemta_maildir.delivery`), Elemta's contract and the standard
library; not the plugin's hooks, asyncio or pydantic. The first local
deliveries wait for the helper, so its start is on their path: an
interpreter with these imports starts in 65 ms, one that imported the whole
plugin (and ``site``) in 130 ms.
"""

from __future__ import annotations

import array
import logging
import os
import pickle
import signal
import socket
import types
from collections.abc import Callable
from typing import Any

from elemta import Envelope, Outcome, RecipientState

from .delivery import Maildirs

log = logging.getLogger("elemta.maildir")

#: deliveries written and synced together, at most
MAX_BATCH = 100

#: the largest message either side sends: a ``SOCK_SEQPACKET`` message must fit the
#: socket's send buffer (208 KiB by default on Linux). A request larger than this (a
#: message to thousands of recipients) is delivered in the plugin's threads instead;
#: outcomes larger than this come back in parts.
MAX_MESSAGE = 128 * 1024

#: a log record's text is cut here (at most 4 bytes a character: within MAX_MESSAGE)
MAX_LOG_TEXT = 16_384

RECV = 2 * MAX_MESSAGE  # (the server reads with this buffer too)
_FD_SPACE = socket.CMSG_SPACE(array.array("i", [0]).itemsize)


def child_main(channel: int, settings_fd: int) -> None:
    """The helper: deliveries from ``channel`` in batches; outcomes and log records back.

    One thread: every request that arrived while a batch was written forms
    the next batch (two syncs in all), answered as soon as it is named.
    Threads, each with a batch of its own, made it slower: two ran at 0.63 of
    SMTP delivery's rate where one ran at 0.90 (docs/performance.md).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # it stops at the end of its input
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    os.dup2(2, 1)  # a stray print goes to the server's stderr
    with open(settings_fd, "rb") as f:
        fields, hostname, level = pickle.load(f)
    # MaildirSettings' values, already validated by the server, as attributes
    settings = types.SimpleNamespace(**fields)
    sock = socket.socket(fileno=channel)

    def send(message: object) -> None:
        sock.sendall(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))

    root = logging.getLogger()
    root.handlers[:] = [_Forward(send)]
    root.setLevel(level)

    # the settings' path is absolute: nothing left to resolve
    maildirs = Maildirs(settings, _same, hostname)  # type: ignore[arg-type]
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
                _send_outcomes(sock.sendall, job[0], outcomes)
        except OSError:  # the server is gone: what was written stays, the spool repeats it
            return


def _send_outcomes(send: Callable[[bytes], None], request_id: int, outcomes: list[Outcome],
                   last: bool = True) -> None:
    """``("r", id, outcomes)``; halves ``("p", id, some)`` first, then ``("r", id, the
    rest)``, while one message would be larger than :data:`MAX_MESSAGE`. ``send`` sends
    the pickled bytes."""
    data = pickle.dumps(("r" if last else "p", request_id, outcomes), pickle.HIGHEST_PROTOCOL)
    if len(outcomes) > 1 and len(data) > MAX_MESSAGE:
        half = len(outcomes) // 2
        _send_outcomes(send, request_id, outcomes[:half], last=False)
        _send_outcomes(send, request_id, outcomes[half:], last=last)
        return
    send(data)


def _receive(sock: socket.socket) -> list[tuple[int, Envelope, list[RecipientState], int]]:
    """The requests waiting, at least one (blocking for it), at most :data:`MAX_BATCH`;
    none at the end of the input."""
    batch: list[tuple[int, Envelope, list[RecipientState], int]] = []
    flags = 0
    while len(batch) < MAX_BATCH:
        try:
            data, ancillary, _, _ = sock.recvmsg(RECV, _FD_SPACE, flags)
        except BlockingIOError:
            break
        if not data:
            break
        fds = array.array("i")
        for cmsg_level, cmsg_type, payload in ancillary:
            if cmsg_level == socket.SOL_SOCKET and cmsg_type == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        request_id, envelope, rcpts, *level = pickle.loads(data)
        if level:
            logging.getLogger().setLevel(level[0])
        if not fds:  # cannot happen: the server sends every request with its content
            send_back = [Outcome(r.address, 451, "4.3.0", "the spooled message was not "
                                 "passed") for r in rcpts]
            _send_outcomes(sock.sendall, request_id, send_back)
            continue
        for extra in fds[1:]:
            os.close(extra)
        batch.append((request_id, envelope, rcpts, fds[0]))
        flags = socket.MSG_DONTWAIT
    return batch


def _same(path: Any) -> Any:
    return path


class _Forward(logging.Handler):
    """Log records to the server, which logs them as its own."""

    def __init__(self, send: Any) -> None:
        super().__init__()
        self.send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            self.send(("l", record.levelno, record.name, text[:MAX_LOG_TEXT]))
        except Exception:
            self.handleError(record)
