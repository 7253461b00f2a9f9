"""The metrics labelled by recipient domain: the label's values, refusal reasons, the queue gauge.

``domain`` takes a bounded set of values (docs/metrics.md): the domains a
:class:`~elemta.metrics.BoundedLabels` was given, ``other`` for the rest and
``none`` where no recipient is known. The objects here wrap prometheus-client
metrics of :class:`~elemta.metrics.Metrics`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from prometheus_client import Gauge, Histogram

#: The ``domain`` label where no recipient is known yet (connect, HELO, AUTH, MAIL).
NO_DOMAIN = "none"

#: ``reason`` of ``smtp_messages_rejected_total``: a small fixed set, so that it
#: multiplies no label.
REJECT_REASONS = ("auth", "size", "resources", "relay_denied", "tempfail", "policy",
                  "protocol")


RELAY_POLICY = "elemta.default_relay"   # the built-in relay policy's plugin name


def reject_reason(stage: str, plugin: str | None, code: int) -> str:
    """Why a refusal happened, in :data:`REJECT_REASONS`, from where and how it was made."""
    if stage == "auth":
        return "auth"
    if code == 552:
        return "size"
    if code == 452:
        return "resources"           # no room in the spool, too many recipients
    if 400 <= code < 500:
        return "tempfail"            # a plugin's TempFail or failure, greylisting
    if stage == "rcpt" and code == 550 and plugin in (None, RELAY_POLICY):
        return "relay_denied"
    if plugin is not None:
        return "policy"              # a plugin's Reject or Disconnect
    return "protocol"                # what the core refuses: bad data, bad sequence


class FoldedDomain:
    """A metric labelled by ``domain`` whose values are folded whoever sets them."""

    def __init__(self, metric: Any, fold: Callable[[str | None], str]) -> None:
        self.metric = metric
        self._fold = fold
        self._children: dict[tuple[Any, ...], Any] = {}  # by label values (_child)

    def labels(self, *, domain: str, **labels: str) -> Any:
        folded = self._fold(domain)
        return _child(self._children, (folded, *labels.items()), self.metric,
                      domain=folded, **labels)


class DeliveryDuration:
    """``smtp_delivery_duration_seconds{domain,type}``.

    Observed per ``deliver`` call with its route and recipients, by the runner
    (:meth:`Metrics.observe_delivery`).
    """

    def __init__(self, histogram: Histogram) -> None:
        self.histogram = histogram
        self._children: dict[tuple[str, str], Any] = {}  # (folded domain, transport)

    def labels(self, *, domain: str, type: str) -> Any:
        return _child(self._children, (domain, type), self.histogram, domain=domain,
                      type=type)


def _child(children: dict[Any, Any], key: tuple[Any, ...], metric: Any, **labels: str) -> Any:
    """``metric.labels(**labels)``, kept in ``children`` under ``key``: prometheus_client's
    ``labels()`` hashes and locks on every call. At most 10,000 are kept (a label of
    open-ended values would otherwise grow the cache without bound)."""
    child = children.get(key)
    if child is None:
        if len(children) >= 10_000:
            children.clear()
        child = children[key] = metric.labels(**labels)
    return child


class QueueSize:
    """``smtp_queue_size{domain,status}``: messages waiting, kept from events.

    Each message waiting for delivery is known by its queue id with its spool
    state (``ready``, ``deferred``, ``hold``) and the domains of its pending
    recipients; every event sets what the message counts for now, so an event
    seen twice changes nothing and the spool is never scanned after start-up.
    About 200 bytes per queued message.
    """

    STATUSES = ("ready", "deferred", "hold")

    def __init__(self, gauge: Gauge, fold: Callable[[str | None], str]) -> None:
        self.gauge = gauge
        self._fold = fold
        # queue id -> (status, domain labels), the pairs shared between messages
        self._messages: dict[str, tuple[str, tuple[str, ...]]] = {}
        self._shapes: dict[tuple[str, tuple[str, ...]], tuple[str, tuple[str, ...]]] = {}
        self._children: dict[tuple[str, str], Any] = {}
        # while the spool is counted at start-up: the messages events changed meanwhile
        self._touched: set[str] | None = None

    def __contains__(self, queue_id: str) -> bool:
        return queue_id in self._messages

    def __len__(self) -> int:
        return len(self._messages)

    def begin_count(self) -> None:
        """The spool is being counted (:meth:`counted`); events are noted meanwhile."""
        self._touched = set()

    def counted(self, queue_id: str, status: str, pending: Iterable[str]) -> None:
        """What the start-up count found, unless an event changed the message since."""
        if self._touched is not None and queue_id in self._touched:
            return
        self.set(queue_id, status, pending)

    def end_count(self) -> None:
        self._touched = None

    def set(self, queue_id: str, status: str, pending: Iterable[str]) -> None:
        """Message ``queue_id`` is in ``status`` with these pending recipient addresses."""
        if self._touched is not None:
            self._touched.add(queue_id)
        if status not in self.STATUSES:
            self.remove(queue_id)
            return
        domains = tuple(sorted({self._fold(a.rpartition("@")[2]) for a in pending}))
        if not domains:
            self.remove(queue_id)
            return
        shape = self._shapes.setdefault((status, domains), (status, domains))
        old = self._messages.get(queue_id)
        if old is shape:
            return
        if old is not None:
            self._add(old, -1)
        self._messages[queue_id] = shape
        self._add(shape, +1)

    def update(self, envelope: Any, status: str = "deferred") -> None:
        """After a delivery attempt: what is still pending waits in ``deferred``."""
        self.set(envelope.id, status, (r.address for r in envelope.pending()))

    def moved(self, queue_id: str, status: str) -> None:
        """The message moved to another spool state without changing its recipients."""
        if self._touched is not None:
            self._touched.add(queue_id)
        old = self._messages.get(queue_id)
        if old is not None and old[0] != status:
            self.set(queue_id, status, (f"@{d}" for d in old[1]))

    def remove(self, queue_id: str) -> None:
        if self._touched is not None:
            self._touched.add(queue_id)
        old = self._messages.pop(queue_id, None)
        if old is not None:
            self._add(old, -1)

    def _add(self, shape: tuple[str, tuple[str, ...]], delta: int) -> None:
        status, domains = shape
        for domain in domains:
            child = self._children.get((domain, status))
            if child is None:
                child = self._children[(domain, status)] = self.gauge.labels(
                    domain=domain, status=status)
            child.inc(delta)
