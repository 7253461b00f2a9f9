"""Prometheus metrics and the small HTTP server that exposes them.

:class:`Metrics` owns a private :class:`~prometheus_client.CollectorRegistry`:
tests start several servers in one process, and the global default registry
would make their metric names collide. :class:`MetricsServer` serves
``/metrics``, ``/healthz`` and ``/readyz`` over plain HTTP/1.1 on asyncio, so
scraping needs no thread and no extra dependency.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any, Awaitable, Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.process_collector import ProcessCollector

from .domain_metrics import NO_DOMAIN, DeliveryDuration, FoldedDomain, QueueSize, reject_reason

log = logging.getLogger("elemta.metrics")

SpoolCounts = Callable[[], Mapping[str, int]]
Readiness = Callable[[], "tuple[bool, str] | Awaitable[tuple[bool, str]]"]

# Powers of four keep 1 KiB .. 64 MiB to nine buckets; a scrape pays per bucket.
MESSAGE_SIZE_BUCKETS = tuple(float(1024 * 4 ** i) for i in range(9))
# A DNS-free plugin answers in well under a millisecond, a slow one hits its
# 30 s default timeout; both ends need buckets.
HOOK_DURATION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                         0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# fsync latency: sub-millisecond on SSDs, seconds on a struggling disk.
SPOOL_COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                        1.0, 2.5, 5.0)


class _SpoolCollector:
    """``elemta_spool_messages{state}`` read from the spool's in-memory counts at scrape time."""

    NAME = "elemta_spool_messages"
    HELP = "Messages in the spool, by state."

    def __init__(self) -> None:
        self.counts: SpoolCounts | None = None

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(self.NAME, self.HELP, labels=["state"])]

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=["state"])
        if self.counts is not None:
            try:
                counts = self.counts()
            except Exception:
                # One broken gauge must not take every other metric off the scrape.
                log.exception("spool counts failed; %s left out of this scrape", self.NAME)
                counts = {}
            for state, n in sorted(counts.items()):
                family.add_metric([state], n)
        yield family


DELIVERY_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
                             300)

class Metrics:
    """The server's metrics, in a registry of their own.

    Attributes (label names in braces):

    - ``connections_total{listener}`` — ``smtp_connections_total``
    - ``connections_active{listener}`` — ``smtp_connections_active``
    - ``connections_refused{listener,reason}`` — ``smtp_connections_refused_total``;
      reason is e.g. ``"global_limit"`` or ``"per_ip_limit"``
    - ``messages_received{listener,domain}`` — ``smtp_messages_received_total``
    - ``messages_rejected{stage,plugin,code,domain,reason}`` —
      ``smtp_messages_rejected_total``; plugin is ``"core"`` when the core itself
      rejected, reason one of ``domain_metrics.REJECT_REASONS``
    - ``message_size{domain}`` — ``smtp_message_size_bytes``
    - ``messages_sent{domain}`` — ``smtp_messages_sent_total``, per recipient delivered
    - ``delivery_duration{domain,type}`` — ``smtp_delivery_duration_seconds``, observed
      per ``deliver`` call (:meth:`observe_delivery`)
    - ``queue_size`` — ``smtp_queue_size{domain,status}``, a :class:`QueueSize`
    - ``hook_duration{hook,plugin}`` — ``smtp_hook_duration_seconds``
    - ``spool_commit`` — ``smtp_spool_commit_seconds``
    - ``auth_attempts{listener,mechanism,result}`` — ``smtp_auth_attempts_total``
    - ``spool_free_bytes``, ``spool_free_inodes``, ``spool_refusing`` — the spool's room
    - ``elemta_spool_messages{state}``, fed by :meth:`bind_spool`

    ``domain`` is a recipient domain folded by :attr:`domain_label` into the
    ``domains`` given (the local domains and ``[metrics] domains``) or
    ``other``; ``none`` where there is no recipient yet. A message is counted
    once for each domain among its recipients.

    ``.labels(...)`` hashes its arguments and takes a lock on every call. On the
    SMTP hot path look the child up once (per listener, per hook and plugin) and
    keep it: ``received = metrics.messages_received.labels(listener="mx")``, then
    ``received.inc()`` per message.
    """

    def __init__(self, *, process_metrics: bool = True, domains: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        #: Folds a domain into the bounded set a ``domain`` label takes.
        self.domain_label = BoundedLabels(domains)
        self.connections_total = Counter(
            "smtp_connections", "SMTP connections accepted.", ["listener"], registry=r)
        self.connections_active = Gauge(
            "smtp_connections_active", "SMTP connections open now.", ["listener"], registry=r)
        self.connections_refused = Counter(
            "smtp_connections_refused", "SMTP connections refused before the greeting.",
            ["listener", "reason"], registry=r)
        self.messages_received = Counter(
            "smtp_messages_received", "Messages accepted and committed to the spool, once "
            "per recipient domain.", ["listener", "domain"], registry=r)
        self.messages_rejected = Counter(
            "smtp_messages_rejected", "Commands and messages refused, by stage, plugin, reply "
            "code, recipient domain and reason.",
            ["stage", "plugin", "code", "domain", "reason"], registry=r)
        self.message_size = Histogram(
            "smtp_message_size_bytes", "Size of accepted messages, once per recipient domain.",
            ["domain"], buckets=MESSAGE_SIZE_BUCKETS, registry=r)
        self.hook_duration = Histogram(
            "smtp_hook_duration_seconds", "Time one plugin spent in one hook call.",
            ["hook", "plugin"], buckets=HOOK_DURATION_BUCKETS, registry=r)
        self.spool_commit = Histogram(
            "smtp_spool_commit_seconds", "Time to make a message durable before the 250 reply.",
            buckets=SPOOL_COMMIT_BUCKETS, registry=r)
        self.messages_sent = FoldedDomain(Counter(
            "smtp_messages_sent", "Recipients delivered, by recipient domain.",
            ["domain"], registry=r), self.domain_label)
        self.delivery_duration = DeliveryDuration(Histogram(
            "smtp_delivery_duration_seconds",
            "Time one delivery (one route, one connection's transaction) took, by recipient "
            "domain and transport.",
            ["domain", "type"], buckets=DELIVERY_DURATION_BUCKETS, registry=r))
        self.queue_size = QueueSize(Gauge(
            "smtp_queue_size", "Messages waiting for delivery, by recipient domain and spool "
            "state (ready, deferred, hold).", ["domain", "status"], registry=r),
            self.domain_label)
        self.delivery_attempts = Counter(
            "smtp_delivery_attempts", "Recipient delivery attempts, by result "
            "(delivered, deferred, failed).", ["result"], registry=r)
        self.auth_attempts = Counter(
            "smtp_auth_attempts", "AUTH exchanges, by listener, mechanism and result "
            "(success, failure, locked, tempfail, aborted).",
            ["listener", "mechanism", "result"], registry=r)
        self.spool_free_bytes = Gauge(
            "smtp_spool_free_bytes", "Free space on the spool's file system.", registry=r)
        self.spool_free_inodes = Gauge(
            "smtp_spool_free_inodes", "Free inodes on the spool's file system.", registry=r)
        self.spool_refusing = Gauge(
            "smtp_spool_refusing", "1 while new mail is refused with 452 4.3.1 for lack of "
            "room in the spool ([spool] min_free_bytes, min_free_inodes).", registry=r)
        self._spool = _SpoolCollector()
        r.register(self._spool)
        if process_metrics:
            # The default registry would add these by itself; ours has to ask.
            ProcessCollector(registry=r)

    def domains_of(self, addresses: Iterable[str]) -> set[str]:
        """The ``domain`` labels of these recipient addresses (``{"none"}`` for none)."""
        fold = self.domain_label
        labels = {fold(a.rpartition("@")[2]) for a in addresses}
        return labels or {NO_DOMAIN}

    def count_rejected(self, stage: str, plugin: str | None, code: int,
                       recipients: Iterable[str] = ()) -> None:
        """One refusal, by ``plugin`` (``None``: the core), for these recipients."""
        reason = reject_reason(stage, plugin, code)
        for domain in self.domains_of(recipients):
            self.messages_rejected.labels(stage=stage, plugin=plugin or "core", code=str(code),
                                          domain=domain, reason=reason).inc()

    def observe_delivery(self, route: Any, recipients: Iterable[Any], seconds: float) -> None:
        """One ``deliver`` call: ``seconds`` for ``recipients`` along ``route``."""
        labels = self.delivery_duration.labels
        for domain in self.domains_of(r.address for r in recipients):
            labels(domain=domain, type=route.transport).observe(seconds)

    def bind_spool(self, counts: SpoolCounts) -> None:
        """Read ``elemta_spool_messages{state}`` from ``counts()`` at every scrape.

        ``counts`` runs on the event loop thread, so it may read the spool's
        in-memory state without locking; it must not do I/O.
        """
        self._spool.counts = counts

    def render(self) -> bytes:
        """The registry in Prometheus text exposition format."""
        return generate_latest(self.registry)


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 503: "Service Unavailable"}
_TEXT = "text/plain; charset=utf-8"


class _Reply(Exception):
    """Answer the request now with this status and text, then close."""

    def __init__(self, status: int, text: str, headers: str = "") -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.headers = headers


class MetricsServer:
    """HTTP/1.1 on asyncio: ``GET /metrics``, ``/healthz``, ``/readyz``.

    One request per connection (``Connection: close``). A request must arrive
    whole within ``read_timeout_seconds`` and its head must fit in
    ``max_header_bytes``; at most ``max_connections`` are served at once, so a
    slow or hostile client can neither hang the server nor exhaust it.

    ``ready()`` returns ``(ok, reason)`` (or an awaitable of it): ``/readyz``
    answers 200 with the reason (``"ready"`` when empty) or 503 with the reason.
    """

    def __init__(self, metrics: Metrics, host: str, port: int,
                 ready: Readiness, *, read_timeout_seconds: float = 5.0,
                 max_header_bytes: int = 8192, max_connections: int = 64) -> None:
        self.metrics = metrics
        self.host = host
        self._requested_port = port
        self.ready = ready
        self.read_timeout_seconds = read_timeout_seconds
        self.max_header_bytes = max_header_bytes
        self.max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def port(self) -> int:
        """The bound port (meaningful after :meth:`start`, also when 0 was asked for)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("MetricsServer is not started")
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("MetricsServer is already started")
        self._server = await asyncio.start_server(
            self._handle, self.host, self._requested_port,
            limit=self.max_header_bytes, reuse_address=True)
        log.info("metrics listening on http://%s:%d/metrics", self.host, self.port)

    async def stop(self) -> None:
        """Stop listening and drop connections still being served."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if len(self._tasks) > self.max_connections:
                writer.transport.abort()
                return
            await self._serve(reader, writer)
        except (ConnectionError, TimeoutError):
            writer.transport.abort()
        except asyncio.CancelledError:
            writer.transport.abort()
            raise
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head_only = False
        unread = False
        try:
            async with asyncio.timeout(self.read_timeout_seconds):
                request = await self._read_head(reader)
            if request is None:
                return
            method, path = request
            head_only = method == "HEAD"
            status, ctype, body = await self._route(path)
            extra = ""
        except _Reply as r:
            status, ctype, body, extra = r.status, _TEXT, (r.text + "\n").encode(), r.headers
            unread = True
        except TimeoutError:
            status, ctype, body, extra = 408, _TEXT, b"request timeout\n", ""
            unread = True
        except ConnectionError:
            raise
        except Exception:
            # A plugin's collector may raise during a scrape; answer instead of dropping.
            log.exception("metrics request failed")
            status, ctype, body, extra = 500, _TEXT, b"internal error\n", ""
        head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                f"Content-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\n"
                "Cache-Control: no-store\r\n"
                f"{extra}"
                "Connection: close\r\n\r\n").encode("latin-1")
        writer.write(head if head_only else head + body)
        # A client that never reads would otherwise keep this task (and the body) forever.
        async with asyncio.timeout(self.read_timeout_seconds):
            await writer.drain()
        if unread:
            await self._linger(reader, writer)

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Half-close, then swallow what the client is still sending.

        Closing a socket with unread input makes the kernel send a reset, and
        the client may lose the error reply before it reads it.
        """
        if writer.can_write_eof():
            writer.write_eof()
        try:
            async with asyncio.timeout(min(1.0, self.read_timeout_seconds)):
                swallowed = 0
                while swallowed < 65536:
                    chunk = await reader.read(4096)
                    if not chunk:
                        break
                    swallowed += len(chunk)
        except (TimeoutError, ConnectionError, ValueError):
            pass

    async def _read_head(self, reader: asyncio.StreamReader) -> tuple[str, str] | None:
        """``(method, path)`` of the request, ``None`` if the client sent nothing."""
        try:
            line = await reader.readline()
        except ValueError:
            raise _Reply(431, "request line too long") from None
        if not line:
            return None
        total = len(line)
        while True:
            try:
                header = await reader.readline()
            except ValueError:
                raise _Reply(431, "request header too large") from None
            total += len(header)
            if total > self.max_header_bytes:
                raise _Reply(431, "request header too large")
            if header in (b"\r\n", b"\n"):
                break
            if not header:
                raise _Reply(400, "incomplete request")
            if b":" not in header:
                raise _Reply(400, "malformed header line")
        parts = line.rstrip(b"\r\n").split(b" ")
        if len(parts) != 3 or parts[2] not in (b"HTTP/1.0", b"HTTP/1.1"):
            raise _Reply(400, "malformed request line")
        method, target = parts[0].decode("latin-1"), parts[1].decode("latin-1")
        if not method.isalpha() or not method.isupper():
            raise _Reply(400, "malformed request method")
        if method not in ("GET", "HEAD"):
            raise _Reply(405, "method not allowed", "Allow: GET, HEAD\r\n")
        if target.startswith(("http://", "https://")):
            target = "/" + target.split("/", 3)[3] if target.count("/") >= 3 else "/"
        if not target.startswith("/"):
            raise _Reply(400, "malformed request target")
        return method, target.split("?", 1)[0]

    async def _route(self, path: str) -> tuple[int, str, bytes]:
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, self.metrics.render()
        if path == "/healthz":
            return 200, _TEXT, b"ok\n"
        if path == "/readyz":
            ok, reason = await self._readiness()
            text = reason or ("ready" if ok else "not ready")
            return (200 if ok else 503), _TEXT, (text + "\n").encode()
        raise _Reply(404, "not found")

    async def _readiness(self) -> tuple[bool, str]:
        try:
            result = self.ready()
            if inspect.isawaitable(result):
                async with asyncio.timeout(self.read_timeout_seconds):
                    result = await result
            ok, reason = result
        except TimeoutError:
            log.error("readiness check took longer than %gs", self.read_timeout_seconds)
            return False, "readiness check timed out"
        except Exception as e:
            log.exception("readiness check failed")
            return False, f"readiness check failed: {type(e).__name__}"
        return bool(ok), str(reason)


class BoundedLabels:
    """Label values from an open set (domains) folded into a bounded one.

    ``labels("Example.ORG.")`` is ``"example.org"`` when that domain is in
    ``allowed``, and ``other`` otherwise, so that a metric labelled by domain
    cannot grow without bound with the domains strangers send from.
    """

    def __init__(self, allowed: Iterable[str], other: str = "other") -> None:
        self.allowed = frozenset(a.lower().rstrip(".") for a in allowed)
        self.other = other

    def __call__(self, value: str | None) -> str:
        if not value:
            return self.other
        v = value.lower().rstrip(".")
        return v if v in self.allowed else self.other
