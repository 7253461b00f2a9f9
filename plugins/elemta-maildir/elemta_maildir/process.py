"""Mailbox writes in a helper process, whose interpreter lock is not the event loop's.

A Maildir delivery makes about fifteen system calls and waits for two
syncs. In threads of the server, each call gives the interpreter lock away
and takes it back, and the event loop, which feeds the deliveries, waits
for it: with twenty deliveries in flight the loop thread spent 28% of its
time waiting for the lock, and the delivery threads half of theirs idle,
waiting for the loop. Here the deliveries run in a second interpreter
(``sys.executable -I -S`` with the server's ``sys.path``) that builds its own
:class:`~elemta_maildir.delivery.Maildirs` from the same settings, and
writes every request that arrived meanwhile as one batch: two syncs for the
batch (:meth:`Maildirs.deliver_many`). The event loop only sends one request
per delivery and reads the outcomes back (``add_reader``: no thread of the
server's is involved).

The two talk over a ``SOCK_SEQPACKET`` socket pair, one pickle per message
(a private channel between the server and the child it started). A request
is ``(id, envelope, recipients)``, followed by the server's log level when
it changed, and carries the message's content as an
open descriptor (``SCM_RIGHTS``): the content path of a resident message,
``/proc/self/fd/N``, means nothing in another process. The helper answers
``("r", id, outcomes)`` and forwards its log records as ``("l", level,
logger, text)``, which the server logs as its own, before the outcome they
belong to. The settings reach it as a memory file, read at its start, as
plain values. The helper's side is :mod:`elemta_maildir.helper`, which
imports only what a delivery needs.

A helper that cannot be started, or that exits, is replaced by the plugin's
threads; a dead one is started again on the first delivery
:data:`RESTART_SECONDS` after it died (longer, up to :data:`MAX_RESTART_SECONDS`,
for one that died again before answering anything). The deliveries it had in flight get
``451 4.3.0`` and are retried; one that reached the mailbox is then found
there (the maildir name is the same for every attempt), not written twice.
At the end of its input (the server stops, or is killed) the helper
finishes the batch it has and exits.
"""

from __future__ import annotations

import array
import asyncio
import errno
import json
import logging
import os
import pickle
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import elemta
from elemta import Envelope, Outcome, RecipientState, write_all

from . import helper

if TYPE_CHECKING:
    from .settings import MaildirSettings

log = logging.getLogger("elemta.maildir")

#: how long after a helper died the next one is started; deliveries meanwhile run in threads.
#: Doubled each time a helper dies without having answered, up to MAX_RESTART_SECONDS.
RESTART_SECONDS = 1.0
MAX_RESTART_SECONDS = 300.0

#: how long stopping the server waits for the helper to finish what it is writing
STOP_SECONDS = 10.0

#: the helper's first line (run with ``-I -S``: no site, the server's path given)
_BOOT = ("import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
         "from elemta_maildir.helper import child_main; child_main(int(sys.argv[2]), "
         "int(sys.argv[3]))")


def _helper_path() -> list[str]:
    """The server's ``sys.path``, after the folders that hold ``elemta`` and this plugin.

    The helper runs without ``site`` (``-S``: 12 ms less to start), so an
    editable install, which ``site`` would have hooked in, is found through
    these folders instead.
    """
    first = [os.path.dirname(os.path.dirname(os.path.abspath(module.__file__ or "")))
             for module in (elemta, sys.modules[__package__ or "elemta_maildir"])]
    return list(dict.fromkeys([*first, *sys.path]))


class HelperGone(Exception):
    """The helper process exited before it answered."""


class DeliveryProcess:
    """The server's side of the helper: requests out, outcomes and log records in."""

    def __init__(self, settings: MaildirSettings, hostname: str,
                 on_failure: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.hostname = hostname
        # told "exited" or "not_started" (the plugin counts them in a metric)
        self.on_failure = on_failure
        self.closed = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watched: socket.socket | None = None   # the socket add_reader watches
        self._out: deque[tuple[bytes, int]] = deque()  # requests the socket had no room for
        self._waiting_room = False   # add_writer waits for room on the socket
        self._pending: dict[int, asyncio.Future[list[Outcome]]] = {}
        self._parts: dict[int, list[Outcome]] = {}   # outcomes of a request, in parts so far
        self._next_id = 0
        self._died_at = float("-inf")
        self._restart_after = RESTART_SECONDS
        self._answered = False          # the running helper has answered a request
        self._level = logging.NOTSET   # the log level the helper has

    @property
    def pid(self) -> int | None:
        """The helper's process id while one runs."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Start a helper with the settings; ``OSError`` when none can be started."""
        if not (hasattr(os, "memfd_create") and hasattr(socket, "SOCK_SEQPACKET")):
            raise OSError(errno.ENOSYS, "this system has no memory files or SOCK_SEQPACKET "
                          "sockets")
        level = log.getEffectiveLevel()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        settings = os.memfd_create("elemta-maildir-settings", os.MFD_CLOEXEC)
        try:
            # plain values: the helper does not import pydantic (50 ms of its start)
            write_all(settings, pickle.dumps((self.settings.model_dump(), self.hostname,
                                              level), pickle.HIGHEST_PROTOCOL))
            os.lseek(settings, 0, os.SEEK_SET)
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _BOOT, json.dumps(_helper_path()),
                 str(theirs.fileno()), str(settings)], stdin=subprocess.DEVNULL, close_fds=True,
                pass_fds=(theirs.fileno(), settings))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
            os.close(settings)
        ours.setblocking(False)
        self._proc, self._sock, self._level = proc, ours, level
        self._answered = False
        log.debug("maildir: delivery process %d started", proc.pid)

    def running(self) -> bool:
        """Whether deliveries go to a helper now: one runs, or could be started again."""
        if self._proc is not None:
            return True
        if self.closed or time.monotonic() - self._died_at < self._restart_after:
            return False
        try:
            self.start()
        except OSError as e:
            self._died_at = time.monotonic()
            self._restart_after = min(self._restart_after * 2, MAX_RESTART_SECONDS)
            log.error("maildir: cannot start the delivery process (%s); deliveries run in "
                      "threads of the server meanwhile", e.strerror or e)
            self._failed("not_started")
            return False
        return True

    async def deliver_all(self, envelope: Envelope, recipients: list[RecipientState],
                          content_path: str) -> list[Outcome] | None:
        """The outcomes of :meth:`Maildirs.deliver_all`, run in the helper; ``None`` when
        the request is larger than :data:`~elemta_maildir.helper.MAX_MESSAGE` (deliver it elsewhere).

        :raises HelperGone: the helper exited before it answered.
        """
        sock = self._sock
        if sock is None:
            raise HelperGone("the delivery process is not running")
        # only what a mailbox delivery reads: the envelope's trace and TLS details stay here
        slim = Envelope(envelope.id, envelope.sender, [], envelope.received_at, envelope.size,
                        attempts=envelope.attempts)
        rcpts = [RecipientState(r.address, attempts=r.attempts, original=r.original)
                 for r in recipients]
        request_id = self._next_id
        # the server's log level now (it changes with a reload), when the helper's differs
        level = log.getEffectiveLevel()
        request: tuple[Any, ...] = (request_id, slim, rcpts)
        if level != self._level:
            request += (level,)
        data = pickle.dumps(request, pickle.HIGHEST_PROTOCOL)
        if len(data) > helper.MAX_MESSAGE:
            return None
        try:
            src = os.open(content_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            log.warning("%s: cannot read the spooled message %s: %s", envelope.id,
                        content_path, e.strerror or e)
            return [Outcome(r.address, 451, "4.3.0", "the spooled message cannot be read")
                    for r in recipients]
        loop = asyncio.get_running_loop()
        if self._watched is not sock:
            loop.add_reader(sock.fileno(), self._readable, sock)
            self._loop, self._watched = loop, sock
        self._next_id += 1
        self._level = level
        future: asyncio.Future[list[Outcome]] = loop.create_future()
        self._pending[request_id] = future
        try:
            self._send(sock, data, src)
            return await future
        finally:
            self._pending.pop(request_id, None)
            self._parts.pop(request_id, None)

    def close(self) -> None:
        """End the helper's input, wait for it to finish what it is writing, reap it."""
        self.closed = True
        proc, sock = self._proc, self._sock
        if proc is None or sock is None:
            return
        self._unwatch(sock)
        self._proc = self._sock = None
        sock.close()
        try:
            proc.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            log.warning("maildir: the delivery process %d did not stop within %g s; killed "
                        "(an interrupted delivery is repeated from the spool)", proc.pid,
                        STOP_SECONDS)
            proc.kill()
            proc.wait()
        self._fail_pending("the server is stopping")

    # ---------------------------------------------------------------- the socket

    def _send(self, sock: socket.socket, data: bytes, fd: int) -> None:
        """Send a request and the descriptor it carries (closed once sent), after any that
        wait for room on the socket."""
        self._out.append((data, fd))
        if len(self._out) == 1:
            self._writable(sock)

    def _writable(self, sock: socket.socket) -> None:
        """Send what waits; what the socket has no room for waits for it to be writable."""
        assert self._loop is not None
        while self._out:
            data, fd = self._out[0]
            try:
                sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                       array.array("i", [fd]))])
            except BlockingIOError:
                if not self._waiting_room:
                    self._loop.add_writer(sock.fileno(), self._writable, sock)
                    self._waiting_room = True
                return
            except OSError:
                pass  # it died: the end of its output fails what is pending
            self._out.popleft()
            os.close(fd)
        if self._waiting_room:  # (removing a writer never added would cost an epoll_ctl)
            self._loop.remove_writer(sock.fileno())
            self._waiting_room = False

    def _readable(self, sock: socket.socket) -> None:
        while True:
            try:
                data = sock.recv(helper.RECV)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._gone(sock)
                return
            try:
                kind, *rest = pickle.loads(data)
            except Exception:  # a bug: a helper that garbles its answers is replaced
                log.exception("maildir: the delivery process sent an unreadable message; "
                              "stopping it")
                if self._proc is not None:
                    self._proc.kill()
                self._gone(sock)
                return
            if kind == "r" or kind == "p":
                self._answered = True
                request_id, outcomes = rest
                if kind == "p":  # a part of the outcomes; the rest follows
                    self._parts.setdefault(request_id, []).extend(outcomes)
                    continue
                outcomes = self._parts.pop(request_id, []) + outcomes
                future = self._pending.get(request_id)
                if future is not None and not future.done():
                    future.set_result(outcomes)
            elif kind == "l":
                level, name, text = rest
                logging.getLogger(name).log(level, "%s", text)

    def _gone(self, sock: socket.socket) -> None:
        self._unwatch(sock)
        proc = self._proc
        if self._sock is not sock or proc is None:
            return
        self._proc = self._sock = None
        self._died_at = time.monotonic()
        # one that never answered (it cannot even start) is not restarted every second
        self._restart_after = (RESTART_SECONDS if self._answered
                               else min(self._restart_after * 2, MAX_RESTART_SECONDS))
        sock.close()
        try:
            code = proc.wait(1)
        except subprocess.TimeoutExpired:  # it closed the socket but lives on: stop it
            proc.kill()
            code = proc.wait()
        if not self.closed:
            log.error("maildir: the delivery process %d exited (status %s) with %d deliveries "
                      "in flight; they are retried, and deliveries run in threads of the "
                      "server until it is started again in %g s", proc.pid, code,
                      len(self._pending), self._restart_after)
            self._failed("exited")
        self._fail_pending(f"the delivery process exited (status {code})")

    def _failed(self, what: str) -> None:
        if self.on_failure is not None:
            try:
                self.on_failure(what)
            except Exception:  # a metric must not stop delivery
                log.exception("maildir: recording a delivery process failure failed")

    def _unwatch(self, sock: socket.socket) -> None:
        if self._watched is sock and self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(sock.fileno())
            self._loop.remove_writer(sock.fileno())
            self._watched = None
        self._waiting_room = False
        while self._out:
            os.close(self._out.popleft()[1])

    def _fail_pending(self, why: str) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(HelperGone(why))
