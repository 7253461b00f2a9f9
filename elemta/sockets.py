"""Listening sockets: bound by Elemta itself, so that root can bind and another user serve.

:func:`bind_sockets` binds what ``loop.create_server(host=..., port=...)`` would
(every address the host name has, IPv6 ones IPv6-only) without listening yet:
until the server is ready a connection is refused, not left waiting in the
backlog. :class:`Listening` serves those sockets as one listener.
:func:`listen_problem` says why binding failed, in an operator's words.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from typing import Any, Callable


def bind_sockets(host: str, port: int) -> list[socket.socket]:
    """Bound, not yet listening, sockets for ``host:port``; raises OSError (or
    socket.gaierror when the host name does not resolve)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    bound: list[socket.socket] = []
    try:
        for family, type_, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, type_, proto)
            bound.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.set_inheritable(False)
            sock.bind(addr)
            if port == 0:
                port = sock.getsockname()[1]  # every address on the same chosen port
    except BaseException:
        for sock in bound:
            sock.close()
        raise
    return bound


def probe_bind(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on now, or None when it can (bound and closed)."""
    try:
        for sock in bind_sockets(host, port):
            sock.close()
    except OSError as e:
        return listen_problem(host, port, e)
    return None


def listen_problem(host: str, port: int, e: OSError) -> str:
    """Why binding ``host:port`` failed and what to do."""
    if isinstance(e, socket.gaierror):
        return (f"the host name {host!r} does not resolve ({e.strerror}); write an IP "
                "address of this machine, or 0.0.0.0 for all")
    if e.errno == errno.EADDRINUSE:
        return ("the port is in use (is another mail server, or a second elemta, running? "
                "`ss -ltnp` shows which); stop it or choose another address")
    if e.errno == errno.EADDRNOTAVAIL:
        return (f"this machine has no address {host} (`ip -brief address` lists its "
                "addresses); use one of them, or 0.0.0.0 for all")
    if e.errno in (errno.EACCES, errno.EPERM):
        if port < 1024:
            return (f"port {port} is below 1024 and needs privileges: start elemta as root "
                    'with [server] user = "elemta" (it binds, then becomes that user), or '
                    "grant it CAP_NET_BIND_SERVICE (the shipped systemd unit does)")
        return f"not permitted ({os.strerror(e.errno)})"
    return os.strerror(e.errno) if e.errno else str(e)


class Listening:
    """One listener's servers, one per bound socket, seen as one."""

    def __init__(self, servers: list[asyncio.base_events.Server]) -> None:
        self._servers = servers

    @classmethod
    async def serve(cls, factory: Callable[[], Any], sockets: list[socket.socket],
                    backlog: int = 1024) -> "Listening":
        loop = asyncio.get_running_loop()
        servers = []
        try:
            for sock in sockets:
                servers.append(await loop.create_server(factory, sock=sock, backlog=backlog))
        except BaseException:
            for server in servers:
                server.close()
            raise
        return cls(servers)

    @property
    def sockets(self) -> list[socket.socket]:
        return [s for server in self._servers for s in server.sockets]

    def is_serving(self) -> bool:
        return all(server.is_serving() for server in self._servers)

    def close(self) -> None:
        for server in self._servers:
            server.close()

    async def wait_closed(self) -> None:
        for server in self._servers:
            await server.wait_closed()


__all__ = ["Listening", "bind_sockets", "listen_problem", "probe_bind"]
