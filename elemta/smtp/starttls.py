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
session already encrypted keeps its own. The handshake has the command
timeout as its limit, on both kinds of listener.
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
    proto.reply(replies.READY_FOR_TLS)
    proto.flush()
    await handshake(proto, implicit=False)


async def handshake(proto: ElemtaSMTP, *, implicit: bool) -> None:
    """Upgrade the connection to TLS; raises ``Close`` (the connection is gone) on failure."""
    conn = proto.conn
    assert conn is not None
    context = proto.ctx.tls_context(proto.listener.name)
    if context is None:
        log.error("session %s: listener %s has no TLS context", conn.id, proto.listener.name)
        proto._closing = True
        proto.transport.close()  # type: ignore[union-attr]
        raise Close
    waiter = proto.loop.create_future()
    tls_protocol = sslproto.SSLProtocol(proto.loop, proto, context, waiter, server_side=True)
    proto._tls_protocol = tls_protocol
    proto._original_transport = proto.transport
    proto._original_transport.set_protocol(tls_protocol)  # type: ignore[union-attr]
    proto.transport = tls_protocol._app_transport
    proto.implicit_tls = implicit
    tls_protocol.connection_made(proto._original_transport)
    try:
        async with asyncio.timeout(proto.ctx.settings.server.command_timeout_seconds):
            await waiter
    except (Exception, TimeoutError) as e:
        log.info("session %s: TLS handshake failed: %s", conn.id, e or type(e).__name__)
        proto._closing = True
        if proto._original_transport is not None:
            proto._original_transport.close()
        raise Close from None


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
