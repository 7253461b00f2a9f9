"""The plugin's Prometheus metrics, ``smtp_milter_*``, labelled by milter name.

Milter names come from the configuration, so the label sets are bounded. Until
``register_metrics`` ran (a plugin used without a server), every call is a no-op.
"""

from __future__ import annotations

from typing import Any

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.calls: Any = None
        self.latency: Any = None
        self.results: Any = None
        self.failures: Any = None
        self.connections: Any = None
        # labelled children by label values (bounded: milter names come from the settings)
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._results: dict[tuple[str, str, str], Any] = {}

    def register(self, registry: Any) -> None:
        from prometheus_client import Counter, Histogram

        self.calls = Counter(
            "smtp_milter_calls", "Milter stages run, by milter and stage (connect, helo, "
            "mail, rcpt, data: the message from DATA to the final answer).",
            ["milter", "stage"], registry=registry)
        self.latency = Histogram(
            "smtp_milter_latency_seconds", "Time a milter took for a stage, by milter and "
            "stage.", ["milter", "stage"], buckets=LATENCY_BUCKETS, registry=registry)
        self.results = Counter(
            "smtp_milter_results", "Milter answers that decided a stage, by milter, stage "
            "and result (continue, accept, reject, tempfail, replycode, discard, "
            "quarantine, disconnect).", ["milter", "stage", "result"], registry=registry)
        self.failures = Counter(
            "smtp_milter_failures", "Milters that could not be used, by milter, reason "
            "(connect, timeout, closed, protocol, edit) and the action taken (tempfail, "
            "accept, reject).", ["milter", "reason", "action"], registry=registry)
        self.connections = Counter(
            "smtp_milter_connections", "Connections to milters by how they were had: "
            "opened (new) or taken from the idle pool (reused).", ["milter", "how"],
            registry=registry)

    def call(self, milter: str, stage: str, seconds: float) -> None:
        if self.calls is not None:
            children = self._children.get((milter, stage))
            if children is None:
                children = self._children[(milter, stage)] = (
                    self.calls.labels(milter=milter, stage=stage),
                    self.latency.labels(milter=milter, stage=stage))
            children[0].inc()
            children[1].observe(seconds)

    def result(self, milter: str, stage: str, result: str) -> None:
        if self.results is not None:
            child = self._results.get((milter, stage, result))
            if child is None:
                child = self._results[(milter, stage, result)] = self.results.labels(
                    milter=milter, stage=stage, result=result)
            child.inc()

    def failure(self, milter: str, reason: str, action: str) -> None:
        if self.failures is not None:
            self.failures.labels(milter=milter, reason=reason, action=action).inc()

    def connection(self, milter: str, how: str) -> None:
        if self.connections is not None:
            self.connections.labels(milter=milter, how=how).inc()
