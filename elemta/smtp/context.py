"""State shared by every SMTP session of one server: settings, hooks, spool, limits."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
from typing import TYPE_CHECKING

from ..memory import Trimmer
from . import replies
from .guard import AuthGuard
from .replies import Reply

if TYPE_CHECKING:
    from ..config import Settings
    from ..hookcall import HookCaller
    from ..metrics import Metrics
    from ..spool.store import Spool
    from .protocol import ElemtaSMTP

log = logging.getLogger("elemta.smtp")


class SMTPContext:
    """What sessions share; also enforces the global and per-IP connection limits."""

    def __init__(self, settings: Settings, hooks: HookCaller, spool: Spool,
                 metrics: Metrics) -> None:
        self.settings = settings
        self.hostname = settings.server.hostname
        self.postmaster = settings.postmaster_address
        self.postmaster_domains = settings.postmaster_domains
        self.hooks = hooks
        self.spool = spool
        self.metrics = metrics
        self.sessions: set[ElemtaSMTP] = set()
        self.stopping = False  # graceful stop: close each session after its current command
        self._per_ip: dict[str, int] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._label_cache: dict[str, tuple[object, object]] = {}
        self._received_cache: dict[tuple[str, str], tuple[object, object]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: The TLS context of each TLS listener, by name, for new connections:
        #: the server fills it from the ``tls_context`` hook and replaces it on reload.
        self.tls_contexts: dict[str, ssl.SSLContext] = {}
        self._trimmer = Trimmer()
        self._trim_pending = False
        #: TLS handshakes in progress, at most ``[server] max_tls_handshakes``.
        self.handshakes = asyncio.Semaphore(settings.server.max_tls_handshakes)
        #: Failed logins per client address and per login (``[auth]``).
        self.auth_guard = AuthGuard(settings.auth)
        #: The SASL mechanisms EHLO offers, known once the plugins have started.
        self.auth_mechanisms: tuple[str, ...] | None = None
        self._relay_networks = _networks(settings.server.relay_networks)
        self._relay_known: dict[str, bool] = {}
        #: Per PROXY-protocol listener, the networks its proxies connect from.
        self._proxy_trusted = {lst.name: _networks(lst.proxy_trusted)
                               for lst in settings.listeners if lst.proxy_protocol}

    def in_relay_networks(self, ip: str) -> bool:
        """Whether a client address is in ``[server] relay_networks``."""
        # asked for every connection: parsing the address and testing each network
        # is 5-10 µs, a dictionary lookup a tenth of one
        known = self._relay_known.get(ip)
        if known is None:
            if len(self._relay_known) >= _KNOWN_ADDRESSES:
                self._relay_known.clear()
            known = self._relay_known[ip] = _in_networks(ip, self._relay_networks)
        return known

    def proxy_trusted(self, listener: str, ip: str) -> bool:
        """Whether ``ip`` may send a PROXY header to ``listener`` (its ``proxy_trusted``)."""
        return _in_networks(ip, self._proxy_trusted.get(listener, ()))

    def tls_context(self, listener: str) -> ssl.SSLContext | None:
        return self.tls_contexts.get(listener)

    def _labels(self, listener: str) -> tuple[object, object]:
        cached = self._label_cache.get(listener)
        if cached is None:
            m = self.metrics
            cached = (m.connections_total.labels(listener=listener),
                      m.connections_active.labels(listener=listener))
            self._label_cache[listener] = cached
        return cached

    def admit(self, proto: ElemtaSMTP) -> Reply | None:
        """Count a new connection; return a 421 reply if it is over a limit."""
        assert proto.conn is not None
        server = self.settings.server
        name = proto.listener.name
        total, active = self._labels(name)
        total.inc()  # type: ignore[attr-defined]
        ip = proto.conn.peer[0]
        if len(self.sessions) >= server.max_connections:
            self.metrics.connections_refused.labels(listener=name, reason="global_limit").inc()
            log.warning("refused %s on %s: %d connections (max_connections)", ip, name,
                        len(self.sessions))
            return replies.too_many_connections(self.hostname)
        if self._per_ip.get(ip, 0) >= server.max_connections_per_ip:
            self.metrics.connections_refused.labels(listener=name, reason="per_ip_limit").inc()
            log.warning("refused %s on %s: too many connections from this address "
                        "(max_connections_per_ip)", ip, name)
            return replies.too_many_from_address(self.hostname)
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        proto._counted_ip = ip
        self.sessions.add(proto)
        self._trimmer.opened(len(self.sessions))
        self._idle.clear()
        active.inc()  # type: ignore[attr-defined]
        return None

    def release(self, proto: ElemtaSMTP) -> None:
        """The connection is gone (called once, from connection_lost)."""
        if proto not in self.sessions:
            return
        self.sessions.discard(proto)
        ip = proto._counted_ip
        if ip is not None:
            n = self._per_ip.get(ip, 1) - 1
            if n:
                self._per_ip[ip] = n
            else:
                self._per_ip.pop(ip, None)
        self._labels(proto.listener.name)[1].dec()  # type: ignore[attr-defined]
        if not self.sessions:
            self._idle.set()
        delay = self._trimmer.closed(len(self.sessions))
        if delay is not None and not self._trim_pending:
            # a moment later at least: the sessions' buffers are freed once their
            # callbacks have run, and a burst of closes makes one trim
            self._trim_pending = True
            asyncio.get_running_loop().call_later(max(1.0, delay), self._trim)
        if proto.conn is not None and self.hooks.impls("disconnect"):
            task = asyncio.get_running_loop().create_task(
                self.hooks.call("disconnect", session=proto.conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _trim(self) -> None:
        self._trim_pending = False
        self._trimmer.trim()

    def session_ended(self, proto: ElemtaSMTP) -> None:
        """The command loop returned: the transport goes away and the session is released.

        Not only from ``connection_lost``: a connection lost during a TLS
        handshake never reports it to the session (asyncio's TLS layer tells
        its application protocol nothing before the handshake completed).
        """
        if proto.transport is not None and not proto.transport.is_closing():
            proto.close()
        original = proto._original_transport
        if original is not None and not original.is_closing():
            original.close()
        if proto._timeout_handle is not None:
            proto._timeout_handle.cancel()
        self.release(proto)

    def count_received(self, listener: str, size: int, recipients: list[str]) -> None:
        """An accepted message: once for each domain among its recipients."""
        m = self.metrics
        for domain in m.domains_of(recipients):
            children = self._received_cache.get((listener, domain))
            if children is None:
                children = self._received_cache[(listener, domain)] = (
                    m.messages_received.labels(listener=listener, domain=domain),
                    m.message_size.labels(domain=domain))
            children[0].inc()  # type: ignore[attr-defined]
            children[1].observe(size)  # type: ignore[attr-defined]

    async def wait_idle(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
            return True
        except TimeoutError:
            return False


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(cidrs: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(n, strict=False) for n in cidrs)


# client addresses whose relay_networks answer is kept (then forgotten all at once)
_KNOWN_ADDRESSES = 4096


def _in_networks(ip: str, networks: tuple[Network, ...]) -> bool:
    if not networks:
        return False
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in networks)
