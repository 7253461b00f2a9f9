"""``[delivery] transport_process`` (on by default): the built-in SMTP transport in a
helper process.

One event loop answers the SMTP sessions and runs the deliveries. At ten
concurrent sessions it is idle a quarter of the time, yet each session
waits for delivery work at every round trip: the SMTP transport (MX
lookups, the connection pool, the client's writes and reads) is about a
fifth of the loop's time when the server relays what it accepts. With this
setting, that work runs in a helper process (:mod:`elemta.helper_process`)
with an event loop, a resolver and a connection pool of its own, built from
the same settings; the server's loop sends one request per delivery,
``(envelope, route, recipients)`` with the content's descriptor, and reads
the outcomes back.

Until the helper is ready, and while none runs, the transport delivers on
the server's loop as it does without the setting: nothing waits for the
helper's start. Deliveries in flight when the helper dies get ``451
4.4.2`` and are retried; one the remote server had already accepted may
then arrive twice, as after a lost connection. At the end of its input (the
server stops, or is killed) the helper finishes its deliveries, closes its
connections and exits.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import socket
from typing import TYPE_CHECKING, Any

from .default_transport import SMTPTransport
from .dns import Resolver
from .helper_process import HELPER_READY, helper_answers, helper_start, receive_request
from .models import Outcome

if TYPE_CHECKING:
    from .config import Settings
    from .models import Route
    from .spool.envelope import Envelope, RecipientState

log = logging.getLogger("elemta.delivery")

#: the request a delivery task serves (each request is a task of its own)
_REQUEST: contextvars.ContextVar[int] = contextvars.ContextVar("request")


class _HoldingTransport(SMTPTransport):
    """The SMTP transport, keeping each connection it is done with from its next command
    (the next message, or QUIT) until the server has taken the outcomes of the request
    it served. The server's runner records a delivery in the step that takes the
    outcomes, as it does when it delivers itself; were the connection used at once, a
    crash of the server before that could repeat a message whose ``250`` the next
    command showed as read (outside RFC 1047's in-flight window)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.held: dict[int, list[tuple[Any, ...]]] = {}

    def _release(self, target: Any, route: Route, conn: Any, limit: Any) -> None:
        # the connection keeps its place among max_per_destination meanwhile: held, it is
        # as busy as one in use, and no second connection is opened in its stead
        request_id = _REQUEST.get(None)
        if request_id is None:
            super()._release(target, route, conn, limit)
        else:
            self.held.setdefault(request_id, []).append((target, route, conn, limit))

    def acknowledged(self, request_id: int) -> None:
        for held in self.held.pop(request_id, ()):
            super()._release(*held)

    def abort_held(self) -> None:
        """Close the connections whose outcomes the server never took, without QUIT: at the
        end of the input the server may be dead, its outcomes unrecorded, and a QUIT would
        tell the remote server its 250 was read."""
        for held in self.held.values():
            for _target, _route, conn, limit in held:
                conn.wire.abort()
                limit.release()
        self.held.clear()


def child_main(channel: int, init_fd: int) -> None:
    """The helper: the SMTP transport on an event loop of its own."""
    sock, settings = helper_start(channel, init_fd)
    sock.setblocking(False)
    asyncio.run(_serve(sock, settings))


async def _serve(sock: socket.socket, settings: Settings) -> None:
    transport = _HoldingTransport(settings)
    transport.resolver = Resolver(settings.dns)
    loop = asyncio.get_running_loop()
    ended = loop.create_future()
    running: set[asyncio.Task[None]] = set()

    async def answer(request_id: int, outcomes: list[Outcome]) -> None:
        try:
            for data in helper_answers(request_id, outcomes):
                await loop.sock_sendall(sock, data)
        except OSError:
            pass  # the server is gone: the spool repeats what it did not hear of

    async def deliver(request_id: int, envelope: Envelope, route: Route,
                      rcpts: list[RecipientState], fd: int) -> None:
        _REQUEST.set(request_id)
        try:
            outcomes = await transport.deliver(envelope, route, rcpts, f"/proc/self/fd/{fd}")
        except Exception as e:  # a bug: the message stays queued
            log.exception("%s: delivery failed unexpectedly", envelope.id)
            outcomes = [Outcome(r.address, 451, "4.3.0", f"delivery failed: {e!r}")
                        for r in rcpts]
        finally:
            os.close(fd)
        await answer(request_id, outcomes or [])

    def readable() -> None:
        while True:
            try:
                request = receive_request(sock)
            except BlockingIOError:
                return
            except OSError:
                request = None
            if request is None:  # the end of the input
                loop.remove_reader(sock.fileno())
                if not ended.done():
                    ended.set_result(None)
                return
            request_id, payload, fd = request
            if payload is None:  # the server took the outcomes of request_id
                transport.acknowledged(request_id)
                continue
            envelope, route, rcpts = payload
            if fd is None:  # cannot happen: the server sends every request with its content
                work = answer(request_id, [Outcome(r.address, 451, "4.3.0", "the spooled "
                                                   "message was not passed") for r in rcpts])
            else:
                work = deliver(request_id, envelope, route, rcpts, fd)
            task = loop.create_task(work)
            running.add(task)
            task.add_done_callback(running.discard)

    loop.add_reader(sock.fileno(), readable)
    await loop.sock_sendall(sock, HELPER_READY)
    await ended
    if running:
        await asyncio.wait(running)
    transport.abort_held()
    await transport.shutdown()
