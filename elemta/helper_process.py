"""Helper processes: a server's work in a second interpreter, over a socket pair.

The event loop answers every SMTP session of the server. Work that would
hold it up (mailbox writes, which make many system calls; the SMTP
transport, a fifth of the loop's time when the server relays what it
accepts) can run in a helper process instead, whose interpreter lock is not
the loop's. The server's side is :class:`HelperProcess`; the helper's side
is a function of the caller's, run as ``python -I -S`` on the server's path,
which uses :func:`helper_start`, :func:`receive_request`, :data:`HELPER_READY`
and :func:`helper_answers`.

The two talk over a ``SOCK_SEQPACKET`` socket pair, one pickle per message
(a private channel between the server and the child it started):

* the server sends ``(id, payload)``, followed by the server's log level
  when it changed since the last request, with one open descriptor
  (``SCM_RIGHTS``, the spooled message's content: a resident message's
  content path, ``/proc/self/fd/N``, means nothing in another process); and,
  for a helper started with ``acknowledge=True``, ``("a", id)`` once the
  caller has taken the answer to request ``id``;
* the helper sends ``("h",)`` once it is ready, ``("r", id, items)`` for
  each request (``("p", id, some)`` first, while the items would not fit
  one message), and its log records as ``("l", level, logger, text)``,
  which the server logs as its own.

``init`` (the caller's settings, already validated) reaches the helper as a
memory file, read at its start. A helper that exits fails its requests in
flight (:class:`HelperGone`) and is started again on the first call to
:meth:`HelperProcess.running` :data:`RESTART_SECONDS` after it died
(doubled, up to :data:`MAX_RESTART_SECONDS`, for one that died again before
it was ready). At the end of its input (the server stops, or is killed) a
helper finishes what it has and exits.
"""

from __future__ import annotations

import array
import asyncio
import errno
import importlib.util
import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from .durable import write_all

#: how long after a helper died the next one is started; doubled each time one dies before
#: it is ready, up to MAX_RESTART_SECONDS
RESTART_SECONDS = 1.0
MAX_RESTART_SECONDS = 300.0

#: the largest message either side sends: a ``SOCK_SEQPACKET`` message must fit the
#: socket's send buffer (208 KiB by default on Linux). A larger request is refused
#: (:meth:`HelperProcess.request` answers ``None``); items come back in parts.
MAX_MESSAGE = 128 * 1024

#: a log record's text is cut here (at most 4 bytes a character: within MAX_MESSAGE)
MAX_LOG_TEXT = 16_384

#: the receive buffer of either side, and the room for one descriptor
RECV = 2 * MAX_MESSAGE
FD_SPACE = socket.CMSG_SPACE(array.array("i", [0]).itemsize)

#: what a helper sends once it is ready for requests
HELPER_READY = pickle.dumps(("h",), pickle.HIGHEST_PROTOCOL)


class HelperGone(Exception):
    """The helper process exited (or the server stopped it) before it answered."""


def boot_code(target: str) -> str:
    """The ``-c`` program of a helper: the server's path, then ``module:function`` called
    with the channel's and the memory file's descriptors."""
    module, _, function = target.partition(":")
    return (f"import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
            f"from {module} import {function}; {function}(int(sys.argv[2]), "
            f"int(sys.argv[3]))")


def helper_path(target: str) -> list[str]:
    """The server's ``sys.path``, after the folders that hold ``elemta`` and the target's
    package: the helper runs without ``site``, which would have hooked an editable
    install in (and costs 10-15 ms of its start)."""
    first = []
    for package in ("elemta", target.partition(":")[0].split(".")[0]):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin:
            folder = os.path.dirname(os.path.abspath(spec.origin))
            # a package's folder is in the one to add; a module's file is in it
            first.append(os.path.dirname(folder) if spec.submodule_search_locations else folder)
    return list(dict.fromkeys([*first, *sys.path]))


class HelperProcess:
    """The server's side of a helper: requests out; readiness, answers and log records in.

    ``target`` is the helper's ``"module:function"``; ``init`` is pickled to it.
    ``name`` names it in log lines ("the maildir delivery process"), and
    ``meanwhile`` says what the caller does while none runs ("deliveries run in
    threads of the server"). ``on_failure`` is told ``"exited"`` or
    ``"not_started"`` (for a metric). Used from the event loop's thread only
    (``dies_with_server`` watches the thread that started the helper).

    At the end of its input a helper finishes what it has, whether the server
    stopped it (:meth:`stop`) or died. ``dies_with_server=True`` kills it
    with the server instead, for work that must not go on unrecorded: a
    message the SMTP transport went on sending after the server died would be
    sent again by the restarted server. ``acknowledge=True`` tells the helper,
    once the caller has taken each answer (in the event loop's next callback:
    the caller's step that records it has run), that it has: the SMTP
    transport's helper keeps a connection from its next command (the next
    message, or QUIT) until then, so that a crash repeats a message only while
    it is in flight, as without a helper.
    """

    def __init__(self, target: str, init: object, *, name: str, meanwhile: str,
                 logger: logging.Logger, on_failure: Callable[[str], None] | None = None,
                 stop_seconds: float = 10.0, dies_with_server: bool = False,
                 acknowledge: bool = False) -> None:
        self.target, self.init, self.name, self.meanwhile = target, init, name, meanwhile
        self.dies_with_server, self.acknowledge = dies_with_server, acknowledge
        self.log = logger
        self.on_failure = on_failure
        self.stop_seconds = stop_seconds
        self.closed = False
        self.ready = False             # the running helper said it is ready
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watched: socket.socket | None = None   # the socket add_reader watches
        self._out: deque[tuple[bytes, int | None]] = deque()  # requests waiting for room
        self._waiting_room = False     # add_writer waits for room on the socket
        self._pending: dict[int, asyncio.Future[list[Any]]] = {}
        self._parts: dict[int, list[Any]] = {}
        self._next_id = 0
        self._died_at = float("-inf")
        self._restart_after = RESTART_SECONDS
        self._level = logging.NOTSET   # the log level the helper has

    @property
    def pid(self) -> int | None:
        """The helper's process id while one runs."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Start a helper; ``OSError`` when none can be started."""
        if not (hasattr(os, "memfd_create") and hasattr(socket, "SOCK_SEQPACKET")):
            raise OSError(errno.ENOSYS, "this system has no memory files or SOCK_SEQPACKET "
                          "sockets")
        level = self.log.getEffectiveLevel()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        init = os.memfd_create("elemta-helper-init", os.MFD_CLOEXEC)
        try:
            write_all(init, pickle.dumps(
                (self.init, level, os.getpid() if self.dies_with_server else None),
                pickle.HIGHEST_PROTOCOL))
            os.lseek(init, 0, os.SEEK_SET)
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", boot_code(self.target),
                 json.dumps(helper_path(self.target)), str(theirs.fileno()), str(init)],
                stdin=subprocess.DEVNULL, close_fds=True, pass_fds=(theirs.fileno(), init))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
            os.close(init)
        ours.setblocking(False)
        self._proc, self._sock, self._level, self.ready = proc, ours, level, False
        self._watch()
        self.log.debug("%s %d started", self.name, proc.pid)

    def running(self) -> bool:
        """Whether a helper runs (ready, or starting: requests wait for it). A dead one is
        started again once its wait is over."""
        if self._proc is not None:
            return True
        if self.closed or time.monotonic() - self._died_at < self._restart_after:
            return False
        try:
            self.start()
        except OSError as e:
            self._died_at = time.monotonic()
            self._restart_after = min(self._restart_after * 2, MAX_RESTART_SECONDS)
            self.log.error("cannot start the %s (%s); %s meanwhile", self.name,
                           e.strerror or e, self.meanwhile)
            self._failed("not_started")
            return False
        return True

    def _watch(self) -> None:
        """Read the helper's messages (readiness, answers, log records) on the running
        event loop, if there is one."""
        sock = self._sock
        if sock is None or self._watched is sock:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        loop.add_reader(sock.fileno(), self._readable, sock)
        self._loop, self._watched = loop, sock

    async def request(self, payload: tuple[Any, ...], content_path: str) -> list[Any] | None:
        """The helper's items for ``payload``, with ``content_path`` open for it; ``None``
        when the request is larger than :data:`MAX_MESSAGE` (do the work elsewhere).

        :raises HelperGone: no helper runs, or it exited before it answered.
        :raises OSError: ``content_path`` cannot be opened.
        """
        sock = self._sock
        if sock is None:
            raise HelperGone(f"the {self.name} is not running")
        request_id = self._next_id
        level = self.log.getEffectiveLevel()
        request: tuple[Any, ...] = (request_id, payload)
        if level != self._level:
            request += (level,)
        data = pickle.dumps(request, pickle.HIGHEST_PROTOCOL)
        if len(data) > MAX_MESSAGE:
            return None
        src = os.open(content_path, os.O_RDONLY | os.O_CLOEXEC)
        self._watch()
        assert self._loop is not None
        self._next_id += 1
        self._level = level
        future: asyncio.Future[list[Any]] = self._loop.create_future()
        self._pending[request_id] = future
        try:
            self._send(sock, data, src)
            return await future
        finally:
            self._pending.pop(request_id, None)
            self._parts.pop(request_id, None)
            if self.acknowledge and self._sock is sock:
                # after the caller's step that takes the answer (the runner records it)
                self._loop.call_soon(self._acknowledged, sock, request_id)

    def _acknowledged(self, sock: socket.socket, request_id: int) -> None:
        if self._sock is sock:
            self._send(sock, pickle.dumps(("a", request_id), pickle.HIGHEST_PROTOCOL), None)

    async def stop(self) -> None:
        """End the helper's input, let it finish what it has (``stop_seconds`` at most, then
        it is killed) and reap it; what is still pending fails."""
        self.closed = True
        proc, sock = self._proc, self._sock
        if proc is None or sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_WR)   # its input ends; its answers still come in
        except OSError:
            pass
        await asyncio.to_thread(self._reap, proc)
        self._unwatch(sock)
        self._proc = self._sock = None
        self.ready = False
        sock.close()
        self._fail_pending("the server is stopping")

    def _reap(self, proc: subprocess.Popen[bytes]) -> None:
        try:
            proc.wait(self.stop_seconds)
        except subprocess.TimeoutExpired:
            self.log.warning("the %s %d did not stop within %g s; killed (interrupted work "
                             "is repeated from the spool)", self.name, proc.pid,
                             self.stop_seconds)
            proc.kill()
            proc.wait()

    # ---------------------------------------------------------------- the socket

    def _send(self, sock: socket.socket, data: bytes, fd: int | None) -> None:
        """Send a request and its descriptor (closed once sent), after any that wait."""
        self._out.append((data, fd))
        if len(self._out) == 1:
            self._writable(sock)

    def _writable(self, sock: socket.socket) -> None:
        """Send what waits, in order; what finds no room waits for the socket."""
        assert self._loop is not None
        while self._out:
            data, fd = self._out[0]
            try:
                sock.sendmsg([data], [] if fd is None else [
                    (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
            except BlockingIOError:
                if not self._waiting_room:
                    self._loop.add_writer(sock.fileno(), self._writable, sock)
                    self._waiting_room = True
                return
            except OSError:
                pass  # it died: the end of its output fails what is pending
            self._out.popleft()
            if fd is not None:
                os.close(fd)
        if self._waiting_room:  # (removing a writer never added would cost an epoll_ctl)
            self._loop.remove_writer(sock.fileno())
            self._waiting_room = False

    def _readable(self, sock: socket.socket) -> None:
        while True:
            try:
                data = sock.recv(RECV)
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
                self.log.exception("the %s sent an unreadable message; stopping it",
                                   self.name)
                if self._proc is not None:
                    self._proc.kill()
                self._gone(sock)
                return
            if kind == "r" or kind == "p":
                request_id, items = rest
                if kind == "p":  # a part of the items; the rest follows
                    self._parts.setdefault(request_id, []).extend(items)
                    continue
                items = self._parts.pop(request_id, []) + items
                future = self._pending.get(request_id)
                if future is not None and not future.done():
                    future.set_result(items)
            elif kind == "l":
                level, name, text = rest
                logging.getLogger(name).log(level, "%s", text)
            elif kind == "h" and sock is self._sock:
                self.ready = True
                self._restart_after = RESTART_SECONDS

    def _gone(self, sock: socket.socket) -> None:
        self._unwatch(sock)
        proc = self._proc
        if self._sock is not sock or proc is None:
            return
        was_ready = self.ready
        self._proc = self._sock = None
        self.ready = False
        self._died_at = time.monotonic()
        if not was_ready:  # one that cannot even start is not started every second
            self._restart_after = min(self._restart_after * 2, MAX_RESTART_SECONDS)
        sock.close()
        try:
            code = proc.wait(1)
        except subprocess.TimeoutExpired:  # it closed the socket but lives on: stop it
            proc.kill()
            code = proc.wait()
        if not self.closed:
            self.log.error("the %s %d exited (status %s) with %d requests in flight; they "
                           "are retried, and %s until it is started again in %g s",
                           self.name, proc.pid, code, len(self._pending), self.meanwhile,
                           self._restart_after)
            self._failed("exited")
        self._fail_pending(f"the {self.name} exited (status {code})")

    def _failed(self, what: str) -> None:
        if self.on_failure is not None:
            try:
                self.on_failure(what)
            except Exception:  # a metric must not stop the work
                self.log.exception("recording a failure of the %s failed", self.name)

    def _unwatch(self, sock: socket.socket) -> None:
        if self._watched is sock and self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(sock.fileno())
            self._loop.remove_writer(sock.fileno())
            self._watched = None
        self._waiting_room = False
        while self._out:
            fd = self._out.popleft()[1]
            if fd is not None:
                os.close(fd)

    def _fail_pending(self, why: str) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(HelperGone(why))


# ------------------------------------------------------------------ the helper's side


def helper_start(channel: int, init_fd: int) -> tuple[socket.socket, Any]:
    """In the helper: ``(socket, init)``. SIGINT, SIGHUP and SIGTERM are ignored (a helper
    stops at the end of its input), stray prints go to the server's stderr, and every log
    record goes to the server at the server's log level. A helper started with
    ``dies_with_server`` is killed by the kernel when the server dies (and exits here if
    the server is already gone)."""
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    os.dup2(2, 1)
    with open(init_fd, "rb") as f:
        init, level, server_pid = pickle.load(f)
    if server_pid is not None:
        _die_with(server_pid)
    sock = socket.socket(fileno=channel)
    root = logging.getLogger()
    root.handlers[:] = [_Forward(sock)]
    root.setLevel(level)
    return sock, init


def _die_with(server_pid: int) -> None:
    """SIGKILL when the server's thread that started this process ends (Linux's
    ``PR_SET_PDEATHSIG``); at once if the server died before this was set."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:  # 1: PR_SET_PDEATHSIG
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != server_pid:
        os._exit(1)


def receive_request(sock: socket.socket, flags: int = 0) -> tuple[int, Any, int | None] | None:
    """In the helper: the next request, ``(id, payload, descriptor)``; ``None`` at the end
    of the input. The descriptor is ``None`` if none came (the server always sends one
    with a request). ``(id, None, None)`` is an acknowledgement: the server has taken the
    answer to request ``id`` (``HelperProcess(acknowledge=True)``). A new log level is
    applied here. ``BlockingIOError`` when a non-blocking socket (or
    ``socket.MSG_DONTWAIT``) has nothing yet."""
    data, ancillary, _, _ = sock.recvmsg(RECV, FD_SPACE, flags)
    if not data:
        return None
    message = pickle.loads(data)
    if message[0] == "a":
        return message[1], None, None
    fds = array.array("i")
    for cmsg_level, cmsg_type, payload in ancillary:
        if cmsg_level == socket.SOL_SOCKET and cmsg_type == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    for extra in fds[1:]:
        os.close(extra)
    request_id, request, *level = message
    if level:
        logging.getLogger().setLevel(level[0])
    return request_id, request, fds[0] if fds else None


def helper_answers(request_id: int, items: list[Any], last: bool = True) -> Iterator[bytes]:
    """The messages that answer a request: ``("r", id, items)``, or halves ``("p", id,
    some)`` first while one message would be larger than :data:`MAX_MESSAGE`."""
    data = pickle.dumps(("r" if last else "p", request_id, items), pickle.HIGHEST_PROTOCOL)
    if len(items) > 1 and len(data) > MAX_MESSAGE:
        half = len(items) // 2
        yield from helper_answers(request_id, items[:half], last=False)
        yield from helper_answers(request_id, items[half:], last=last)
        return
    yield data


class _Forward(logging.Handler):
    """Log records to the server, which logs them as its own."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            data = pickle.dumps(("l", record.levelno, record.name, text[:MAX_LOG_TEXT]),
                                pickle.HIGHEST_PROTOCOL)
            if self.sock.getblocking():
                self.sock.sendall(data)
                return
            try:
                self.sock.send(data)
            except BlockingIOError:  # an event loop's socket, full: wait for room this once
                self.sock.setblocking(True)
                try:
                    self.sock.sendall(data)
                finally:
                    self.sock.setblocking(False)
        except Exception:
            self.handleError(record)
