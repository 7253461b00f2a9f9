"""TLS on a session: STARTTLS (RFC 3207) and the handshake of implicit-TLS listeners.

Both are the same in-place upgrade of the connection: the plain transport is
handed to an ``asyncio.sslproto.SSLProtocol`` that speaks TLS to the client
and to the session as a new transport (aiosmtpd's machinery, including the
buffer flush that keeps plaintext pipelined after STARTTLS out of the TLS
session: CVE-2024-34083). An implicit-TLS listener does it before the greeting,
STARTTLS after its ``220``.

The TLS context is asked for at that moment, from the listener's current one
(:meth:`~elemta.smtp.context.SMTPContext.tls_context`), which a reload of the
``tls_context`` hook replaces: a new connection gets the new certificate, a
session already encrypted keeps its own.

A handshake has ``[server] tls_handshake_timeout_seconds``, from the moment it
is asked for, on both kinds of listener; at most ``[server]
max_tls_handshakes`` run at once (a session waits for a slot within the same
limit), and each holds a 32 KiB read buffer rather than asyncio's 256 KiB.
"""

from __future__ import annotations

import asyncio
import logging
from asyncio import sslproto
from typing import TYPE_CHECKING

from . import replies
from .errors import Close
from .tls import tls_info

if TYPE_CHECKING:
    from .protocol import ElemtaSMTP

log = logging.getLogger("elemta.smtp")


def offered(proto: ElemtaSMTP) -> bool:
    """Whether EHLO lists STARTTLS: a STARTTLS listener, not yet encrypted."""
    return (proto.listener.tls == "starttls" and proto.conn is not None
            and proto.conn.tls is None and proto.ctx.tls_context(proto.listener.name) is not None)


async def command(proto: ElemtaSMTP, arg: str | None) -> None:
    """STARTTLS."""
    conn = proto.conn
    assert conn is not None
    if arg:
        proto.reply(replies.STARTTLS_SYNTAX)
        return
    if conn.tls is not None:
        proto.reply(replies.TLS_ALREADY_ACTIVE)
        return
    if not offered(proto):
        proto.reply(replies.STARTTLS_UNAVAILABLE)
        return
    if conn.helo is None:
        proto.reply(replies.EHLO_FIRST)
        return
    deadline = proto.loop.time() + proto.ctx.settings.server.tls_handshake_timeout_seconds
    if not await _slot(proto, deadline):
        # RFC 3207 §4: the session goes on in plaintext; the client may try again
        proto.reply(replies.TLS_BUSY)
        return
    try:
        proto.reply(replies.READY_FOR_TLS)
        proto.flush()
        await _handshake(proto, deadline, implicit=False)
    finally:
        proto.ctx.handshakes.release()


async def implicit(proto: ElemtaSMTP) -> None:
    """The handshake of an implicit-TLS (465-style) listener, before the greeting."""
    deadline = proto.loop.time() + proto.ctx.settings.server.tls_handshake_timeout_seconds
    if not await _slot(proto, deadline):
        _close(proto)
        raise Close
    try:
        await _handshake(proto, deadline, implicit=True)
    finally:
        proto.ctx.handshakes.release()


async def _slot(proto: ElemtaSMTP, deadline: float) -> bool:
    """One of ``[server] max_tls_handshakes``, waited for until ``deadline``.

    Every handshake in progress holds buffers and OpenSSL state; this bounds
    what stalled handshakes (or many at once) can make the server hold.
    """
    try:
        async with asyncio.timeout_at(deadline):
            await proto.ctx.handshakes.acquire()
        return True
    except TimeoutError:
        conn = proto.conn
        log.warning("session %s: no TLS handshake slot free within %ss ([server] "
                    "max_tls_handshakes)", conn.id if conn else "-",
                    proto.ctx.settings.server.tls_handshake_timeout_seconds)
        return False


class _SSLProtocol(sslproto.SSLProtocol):
    """asyncio's TLS protocol with a 32 KiB read buffer instead of 256 KiB.

    Its buffer is allocated per connection; a TLS record is at most 16 KiB, so
    32 KiB reads lose nothing, and a thousand idle sessions keep 32 MiB of
    buffers instead of 256.
    """

    max_size = 32 * 1024


async def _handshake(proto: ElemtaSMTP, deadline: float, *, implicit: bool) -> None:
    """Upgrade the connection to TLS; raises ``Close`` (the connection is gone) on failure."""
    conn = proto.conn
    assert conn is not None
    context = proto.ctx.tls_context(proto.listener.name)
    if context is None:
        log.error("session %s: listener %s has no TLS context", conn.id, proto.listener.name)
        _close(proto)
        raise Close
    waiter = proto.loop.create_future()
    tls_protocol = _SSLProtocol(proto.loop, proto, context, waiter, server_side=True)
    proto._tls_protocol = tls_protocol
    proto._original_transport = proto.transport
    proto._original_transport.set_protocol(tls_protocol)  # type: ignore[union-attr]
    proto.transport = tls_protocol._app_transport
    proto.implicit_tls = implicit
    tls_protocol.connection_made(proto._original_transport)
    if implicit:
        _replay(proto, tls_protocol)
    try:
        async with asyncio.timeout_at(deadline):
            await waiter
    except (Exception, TimeoutError) as e:
        log.info("session %s: TLS handshake failed: %s", conn.id,
                 "timed out" if isinstance(e, TimeoutError) else e or type(e).__name__)
        _close(proto)
        raise Close from None


def _replay(proto: ElemtaSMTP, tls_protocol: sslproto.SSLProtocol) -> None:
    """Hand the TLS layer what arrived before it took over the connection.

    On an implicit-TLS listener the client speaks TLS from its first byte: what
    the session's reader holds already (the ClientHello, sent right behind a
    PROXY header or while the handshake waited for a slot) is the handshake's.
    """
    pending = proto._reader._buffer  # type: ignore[attr-defined]
    data = bytes(pending)
    pending.clear()
    view = memoryview(data)
    while view:
        buffer = tls_protocol.get_buffer(len(view))
        n = min(len(buffer), len(view))
        buffer[:n] = view[:n]
        tls_protocol.buffer_updated(n)
        view = view[n:]


def _close(proto: ElemtaSMTP) -> None:
    proto._closing = True
    transport = proto._original_transport or proto.transport
    if transport is not None:
        transport.close()


def upgraded(proto: ElemtaSMTP) -> None:
    """The handshake is done (the session's second ``connection_made``)."""
    conn = proto.conn
    assert conn is not None
    transport = proto.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport else None
    if ssl_object is not None:
        conn.tls = tls_info(ssl_object, implicit=proto.implicit_tls)
    # RFC 3207 §4.2: forget everything learnt before the handshake.
    conn.helo = None
    conn.esmtp = False
    proto.tx = None
