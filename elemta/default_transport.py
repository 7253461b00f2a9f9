"""Built-in routing and outbound SMTP transport.

Routing (``route``): mail for a local domain goes to the ``local`` transport
(a maildir or LMTP plugin delivers it; without one it stays queued rather than
looping back to our own MX); otherwise a ``[delivery.routes]`` entry for the
recipient's domain, then ``"*"``, names a relay or smarthost; otherwise the
domain's MX is used.

Transport (``deliver`` for ``transport = "smtp"``): MX lookup through the
core's resolver, preference order with every host tried in turn, the domain's
own addresses when it has no MX (RFC 5321 §5.1), an immediate bounce for a
null MX (RFC 7505), opportunistic STARTTLS unless the route demands more,
AUTH to smarthosts, connection reuse and a per-destination limit on
concurrent connections.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import Settings, parse_hostport
from .dns import DNSError, NoData, NullMX, NXDomain, Resolver
from .delivery.smtp import (DSNParams, SMTPConnection, SMTPError, Timeouts, TLSPolicy,
                                   default_enhanced)
from .helper_process import HelperGone, HelperProcess
from .hookspecs import hookimpl
from .models import Outcome, Route
from .spool.envelope import Envelope, RecipientState
from .spool.incoming import HEADER_CAP_BYTES

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger("elemta.delivery")

LOCAL = "local"


@dataclass(frozen=True, slots=True)
class Target:
    host: str   # the MX (or relay) name, for SNI, verification and logs
    ip: str
    port: int


class DeliveryFailure(Exception):
    """No host can be tried: the outcome applies to every recipient of the route."""

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        super().__init__(text)
        self.code, self.enhanced, self.text = code, enhanced, text


class SMTPTransport:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.delivery = settings.delivery
        self.local_domains = settings.local_domains
        self.helo = self.delivery.helo_name or settings.server.hostname
        self.resolver: Resolver | None = None  # the server's own, from startup
        self.timeouts = Timeouts.scaled(self.delivery.connect_timeout_seconds,
                                        self.delivery.command_timeout_seconds)
        self._idle: dict[tuple[str, int, str, str | None], list[tuple[SMTPConnection, float]]] = {}
        self._limits: dict[tuple[str, int], asyncio.Semaphore] = {}
        # [delivery] transport_process: the deliveries run in a helper process once it is
        # ready (elemta.transport_helper)
        self.process: HelperProcess | None = None
        self._helper_failures: Any = None   # smtp_delivery_helper_failures, with the process
        # deliveries on this loop under way (those waiting for a connection included: a
        # full queue can have a hundred waiting when the helper gets ready)
        self._here = 0

    @hookimpl(trylast=True)
    def register_metrics(self, registry: Any) -> None:
        if self.delivery.enabled and self.delivery.transport_process:
            from prometheus_client import Counter

            self._helper_failures = Counter(
                "smtp_delivery_helper_failures", "Times the SMTP transport process exited "
                "while the server ran, or could not be started (deliveries then run in the "
                "server's event loop), by what happened (exited, not_started).", ["what"],
                registry=registry)

    def _helper_failed(self, what: str) -> None:
        if self._helper_failures is not None:
            self._helper_failures.labels(what=what).inc()

    @hookimpl(trylast=True)
    def startup(self, app: App) -> None:
        self.resolver = app.resolver
        if self.delivery.enabled and self.delivery.transport_process:
            self.process = HelperProcess(
                "elemta.transport_helper:child_main", self.settings,
                name="SMTP transport process", logger=log, on_failure=self._helper_failed,
                meanwhile="deliveries run in the server's event loop",
                # a delivery it finished after the server died would be repeated
                dies_with_server=True, acknowledge=True)
            self.process.running()  # started now; until it is ready the loop delivers

    # ------------------------------------------------------------- routing

    @hookimpl(trylast=True)
    def route(self, envelope: Envelope, recipient: RecipientState) -> Route:
        domain = recipient.address.rpartition("@")[2].lower().rstrip(".")
        if domain in self.local_domains or not domain:
            return Route(transport=LOCAL, destination=domain)
        static = self.delivery.routes.get(domain) or self.delivery.routes.get("*")
        if static is not None:
            auth = None
            if static.username is not None and static.password is not None:
                auth = (static.username, static.password.get_secret_value())
            ca_file = str(self.settings.resolve(static.ca_file)) if static.ca_file else None
            return Route("smtp", destination=static.host, host=static.host, tls=static.tls,
                         auth=auth, ca_file=ca_file)
        return Route("smtp", destination=domain, tls=self.delivery.tls)

    # ------------------------------------------------------------- delivery

    @hookimpl(trylast=True)
    async def deliver(self, envelope: Envelope, route: Route, recipients: list[RecipientState],
                      content_path: str) -> list[Outcome] | None:
        if route.transport != "smtp":
            return None
        process = self.process
        if process is not None and process.running() and process.ready:
            if self._idle and not self._here:
                # the loop delivered while the helper started, and is done: its connections
                # would only wait, each holding a place a remote server counts against us
                self._close_idle()
            try:
                outcomes = await process.request((envelope, route, recipients), content_path)
            except HelperGone as e:
                return [Outcome(r.address, 451, "4.4.2", f"delivery was interrupted: {e}")
                        for r in recipients]
            except OSError as e:
                log.warning("%s: cannot read the spooled message %s: %s", envelope.id,
                            content_path, e.strerror or e)
                return [Outcome(r.address, 451, "4.3.0", "the spooled message cannot be read")
                        for r in recipients]
            if outcomes is not None:
                return outcomes
            # a request too large for the helper's channel: delivered here
        self._here += 1
        try:
            return await self._deliver_here(envelope, route, recipients, content_path)
        finally:
            self._here -= 1

    async def _deliver_here(self, envelope: Envelope, route: Route,
                            recipients: list[RecipientState], content_path: str) -> list[Outcome]:
        addresses = [r.address for r in recipients]
        try:
            targets = await self.targets(route)
        except DeliveryFailure as f:
            return [Outcome(a, f.code, f.enhanced, f.text) for a in addresses]
        last = Outcome("", 451, "4.4.1", f"no mail host of {route.destination} answered")
        for target in targets:
            try:
                outcomes = await self._send(target, route, envelope, recipients, content_path)
            except SMTPError as e:
                log.info("%s: %s[%s]:%d: %s %s", envelope.id, target.host, target.ip,
                         target.port, e.code, e.text)
                if e.stage == "auth":
                    # Wrong relay credentials are the operator's to fix, not the
                    # sender's fault: keep the mail queued (Postfix's soft bounce).
                    last = Outcome("", 454, "4.7.0", f"authentication to {target.host} "
                                   f"failed: {e.code} {e.text}", target.host)
                    break
                last = Outcome("", e.code, e.enhanced or ("4.4.2" if e.temporary else "5.0.0"),
                               e.text, target.host)
                continue
            except OSError as e:
                last = Outcome("", 451, "4.4.1", f"connect to {target.host}[{target.ip}]:"
                               f"{target.port}: {e.strerror or e}", target.host)
                log.info("%s: %s", envelope.id, last.text)
                continue
            if not all(o.temporary and o.remote is None for o in outcomes):
                return outcomes
            # the connection failed us before any reply about the message: the next host
            last = Outcome("", outcomes[0].code, outcomes[0].enhanced, outcomes[0].text,
                           target.host)
        return [Outcome(a, last.code, last.enhanced, last.text, last.remote) for a in addresses]

    async def targets(self, route: Route) -> list[Target]:
        """The hosts to try, in order, for one route."""
        if route.host is not None:
            host, port = parse_hostport(route.host, "route host")
            return [Target(host, ip, port) for ip in await self._addresses(host)]
        domain = route.destination
        try:
            mxs = [mx.host for mx in await self._resolver().mx(domain)]
        except NullMX:
            raise DeliveryFailure(556, "5.1.10",
                                  f"{domain} does not accept mail (null MX)") from None
        except NXDomain:
            raise DeliveryFailure(550, "5.1.2", f"domain {domain} does not exist") from None
        except NoData:
            mxs = [domain]  # RFC 5321 §5.1: the implicit MX
        except DNSError as e:
            raise DeliveryFailure(451, "4.4.3", f"MX lookup for {domain} failed: "
                                  f"{e.reason}") from None
        targets: list[Target] = []
        temp: DNSError | None = None
        for mx in mxs:
            override = self.delivery.mx_overrides.get(mx.lower().rstrip("."))
            if override is not None:
                ip, port = parse_hostport(override)
                targets.append(Target(mx, ip, port))
                continue
            try:
                targets.extend(Target(mx, ip, self.delivery.port)
                               for ip in await self._resolver().addresses(mx))
            except (NXDomain, NoData):
                continue
            except DNSError as e:
                temp = e
        if not targets:
            if temp is not None:
                raise DeliveryFailure(451, "4.4.3", f"address lookup for the mail hosts of "
                                      f"{domain} failed: {temp.reason}")
            raise DeliveryFailure(550, "5.4.4", f"no address for any mail host of {domain}")
        return targets

    def _resolver(self) -> Resolver:
        if self.resolver is None:
            raise DeliveryFailure(451, "4.3.0", "the SMTP transport has not started")
        return self.resolver

    async def _addresses(self, host: str) -> list[str]:
        if _ip_literal(host):
            return [host]
        try:
            return await self._resolver().addresses(host)
        except (NXDomain, NoData):
            raise DeliveryFailure(550, "5.4.4", f"relay host {host} has no address") from None
        except DNSError as e:
            raise DeliveryFailure(451, "4.4.3", f"address lookup for {host} failed: "
                                  f"{e.reason}") from None

    async def _send(self, target: Target, route: Route, envelope: Envelope,
                    recipients: list[RecipientState], content_path: str) -> list[Outcome]:
        """One outcome per recipient; ``remote`` is ``None`` on those the server never
        answered about (lost connection, timeout), which the next host may take."""
        limit = self._limits.get((target.ip, target.port))
        if limit is None:
            limit = self._limits[(target.ip, target.port)] = asyncio.Semaphore(
                self.delivery.max_per_destination)
        params = envelope.mail_params
        addresses = [r.address for r in recipients]
        dsn = DSNParams.of(params, [(r.params, r.original) for r in recipients])
        utf8 = "SMTPUTF8" in params and _needs_smtputf8(envelope, content_path)
        await limit.acquire()
        try:
            for _ in range(2):  # a pooled connection may have died while idle
                conn = await self._connection(target, route)
                result = await conn.send(envelope.sender, addresses, content_path,
                                         utf8=utf8,
                                         eight_bit=params.get("BODY") == "8BITMIME",
                                         binary=params.get("BODY") == "BINARYMIME",
                                         chunking=self.delivery.chunking, dsn=dsn,
                                         size=envelope.size)
                if not result.stale:
                    break
                await conn.close()
        except BaseException:
            limit.release()
            raise
        self._release(target, route, conn, limit)  # gives the place back, now or later
        if all(r.temporary and r.local for r in result.results):
            log.info("%s: %s[%s]:%d: %s", envelope.id, target.host, target.ip, target.port,
                     result.results[0].text if result.results else "no reply")
            return [Outcome(r.recipient, r.code, r.enhanced or "4.4.2", r.text)
                    for r in result.results]
        remote = f"{target.host}[{target.ip}]:{target.port}"
        return [Outcome(r.recipient, r.code, r.enhanced or default_enhanced(r.code), r.text,
                        remote, relayed=True, dsn_passed=result.dsn) for r in result.results]

    def _key(self, target: Target, route: Route) -> tuple[str, int, str, str | None]:
        return (target.ip, target.port, route.tls, route.auth[0] if route.auth else None)

    async def _connection(self, target: Target, route: Route) -> SMTPConnection:
        idle = self._idle.get(self._key(target, route))
        now = time.monotonic()
        while idle:
            conn, since = idle.pop()
            if conn.usable and now - since < self.delivery.idle_connection_seconds:
                return conn
            await conn.close()
        tls = TLSPolicy(route.tls, cafile=route.ca_file) if route.tls == "verify" \
            else TLSPolicy(route.tls)
        return await SMTPConnection.open(target.ip, target.port, mx_host=target.host,
                                         helo=self.helo, tls=tls, auth=route.auth,
                                         timeouts=self.timeouts)

    def _release(self, target: Target, route: Route, conn: SMTPConnection,
                 limit: asyncio.Semaphore) -> None:
        """A connection done with its message: kept for the next one, or closed; and its
        place among the destination's ``max_per_destination``."""
        if conn.usable and self.delivery.idle_connection_seconds > 0:
            self._idle.setdefault(self._key(target, route), []).append((conn, time.monotonic()))
        else:
            asyncio.get_running_loop().create_task(conn.close())
        limit.release()

    def _close_idle(self) -> list[asyncio.Task[None]]:
        """Close the connections kept for reuse (QUIT, then the socket)."""
        loop = asyncio.get_running_loop()
        conns = [c for idle in self._idle.values() for c, _ in idle]
        self._idle.clear()
        return [loop.create_task(c.close()) for c in conns]

    @hookimpl(trylast=True)
    async def shutdown(self) -> None:
        if self.process is not None:
            # the helper finishes what it is delivering (10 s at most), then exits
            await self.process.stop()
        await asyncio.gather(*self._close_idle(), return_exceptions=True)


def _needs_smtputf8(envelope: Envelope, content_path: str) -> bool:
    """Whether a message received with SMTPUTF8 still needs it: a non-ASCII address or
    header field. One that has neither goes to a server without SMTPUTF8 as it is."""
    if not envelope.sender.isascii() or not all(r.address.isascii()
                                                for r in envelope.recipients):
        return True
    try:
        with open(content_path, "rb") as f:
            head = f.read(HEADER_CAP_BYTES)
    except OSError:
        return True
    end = head.find(b"\r\n\r\n")
    return not (head if end < 0 else head[:end]).isascii()


def make_plugin(settings: Settings) -> SMTPTransport:
    return SMTPTransport(settings)


@functools.lru_cache(maxsize=1024)
def _ip_literal(host: str) -> bool:
    """Whether a route's host is an address; asked for every delivery to a relay host."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
