"""One POST per message and target, and what its answer means for the recipients.

2xx: delivered. 5xx, a timeout, a refused or broken connection: deferred, and
retried on the delivery runner's schedule. 4xx: bounced, or deferred with
``on_4xx = "defer"``; 401, 408, 425 and 429 are deferred; ``status_actions`` sets
any code. The recipients of one POST share its outcome.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from elemta import Envelope, Outcome, RecipientState

from . import payload
from .client import Answer, PostError, TargetClient, new_boundary
from .settings import TargetSettings

log = logging.getLogger("elemta.webhook")

# A message larger than this is read and encoded off the event loop, at most
# PARSERS at a time: parsing costs about eight times the message's size at its peak.
INLINE_BYTES = 256 * 1024
PARSERS = 2

# Enhanced status codes (RFC 3463) of bounces, by HTTP status; others are 5.0.0.
_BOUNCE_STATUS = {
    400: (554, "5.6.0"), 401: (550, "5.7.0"), 403: (550, "5.7.1"), 404: (550, "5.1.1"),
    410: (550, "5.1.6"), 413: (552, "5.3.4"), 415: (554, "5.6.0"), 422: (554, "5.6.0"),
}
# Enhanced status codes of deferrals, by PostError kind.
_DEFER_KIND = {"timeout": "4.4.2", "connect": "4.4.1", "tls": "4.7.5", "protocol": "4.4.2"}


class Metrics:
    """``smtp_webhook_*``; nothing is counted before ``register``."""

    def __init__(self) -> None:
        self.posts: Any = None
        self.duration: Any = None
        self.responses: Any = None
        self.failures: Any = None
        self.truncated: Any = None

    def register(self, registry: Any) -> None:
        from prometheus_client import Counter, Histogram

        self.posts = Counter("smtp_webhook_posts", "Messages POSTed to webhook targets "
                             "(one per message and target, repeats included).", ["target"],
                             registry=registry)
        self.duration = Histogram(
            "smtp_webhook_duration_seconds", "Time from sending a POST to its answer (or "
            "failure), the wait for a pooled connection included.", ["target"],
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.responses = Counter("smtp_webhook_responses", "Answers of webhook targets, by "
                                 "status class (2xx, 3xx, 4xx, 5xx).", ["target", "status"],
                                 registry=registry)
        self.failures = Counter("smtp_webhook_failures", "POSTs without an answer, by reason "
                                "(timeout, connect, tls, protocol).",
                                ["target", "reason"], registry=registry)
        self.truncated = Counter("smtp_webhook_headers_only", "Messages larger than "
                                 "max_message_bytes, sent as their header section only.",
                                 ["target"], registry=registry)

    def post(self, target: str, seconds: float, status: int | None, failure: str | None
             ) -> None:
        if self.posts is None:
            return
        self.posts.labels(target=target).inc()
        self.duration.labels(target=target).observe(seconds)
        if status is not None:
            self.responses.labels(target=target, status=f"{status // 100}xx").inc()
        if failure is not None:
            self.failures.labels(target=target, reason=failure).inc()

    def headers_only(self, target: str) -> None:
        if self.truncated is not None:
            self.truncated.labels(target=target).inc()


def outcomes_for(target: TargetSettings, answer: Answer, recipients: list[str],
                 remote: str) -> list[Outcome]:
    """One outcome per recipient for the receiver's answer."""
    status = answer.status
    said = f": {answer.snippet}" if answer.snippet else ""
    action = target.action_for(status)
    if action == "delivered":
        code, enhanced, text = 250, "2.0.0", f"posted to webhook {target.name}: HTTP {status}"
    elif action == "bounce":
        code, enhanced = _BOUNCE_STATUS.get(status, (550, "5.0.0"))
        text = f"webhook {target.name} refused the message: HTTP {status}{said}"
    else:
        enhanced = "4.3.2" if status in (429, 503) else "4.3.0"
        hint = (" (redirects are not followed: set url to the final address)"
                if 300 <= status < 400 else "")
        code, text = 451, f"webhook {target.name} answered HTTP {status}{hint}{said}"
    return [Outcome(r, code, enhanced, text[:400], remote) for r in recipients]


def _build(target: TargetSettings, post: payload.Post, content_path: str
           ) -> tuple[bytes, str]:
    payload.describe(content_path, post, max_message_bytes=target.max_message_bytes,
                     raw=target.raw, link_base=target.link_base)
    if target.format == "json":
        return payload.json_body(post), "application/json"
    boundary = new_boundary(post)
    return (payload.multipart_body(post, boundary),
            f"multipart/form-data; boundary={boundary}")


async def post_message(client: TargetClient, metrics: Metrics, parsers: asyncio.Semaphore,
                       envelope: Envelope, recipients: list[RecipientState],
                       content_path: str) -> list[Outcome]:
    """POST the spooled message for ``recipients`` to ``client``'s target; their outcomes."""
    target = client.target
    addresses = [r.address for r in recipients]
    remote = f"webhook:{target.name}"
    post = payload.Post(
        id=envelope.id, idempotency_key=payload.idempotency_key(envelope.id, addresses),
        timestamp=int(time.time()), received_at=envelope.received_at,
        attempt=envelope.attempts, target=target.name, sender=envelope.sender,
        recipients=addresses)
    try:
        if envelope.size > INLINE_BYTES:
            async with parsers:
                body, content_type = await asyncio.to_thread(_build, target, post,
                                                             content_path)
        else:
            body, content_type = _build(target, post, content_path)
    except OSError as e:
        log.warning("%s: webhook %s: cannot read the spooled message %s: %s", envelope.id,
                    target.name, content_path, e.strerror or e)
        return [Outcome(a, 451, "4.3.0", "the spooled message cannot be read") for a in addresses]
    if post.truncated:
        metrics.headers_only(target.name)
        log.info("%s: webhook %s: %d bytes is over max_message_bytes (%d): sending the header "
                 "section only%s", envelope.id, target.name, post.size,
                 target.max_message_bytes, " and a link" if post.link else "")
    started = time.monotonic()
    try:
        answer = await client.post(body, content_type, post.timestamp, post.idempotency_key)
    except PostError as e:
        metrics.post(target.name, time.monotonic() - started, None, e.kind)
        log.warning("%s: %s; recipients deferred", envelope.id, e)
        enhanced = _DEFER_KIND.get(e.kind, "4.4.2")
        return [Outcome(a, 451, enhanced, str(e)[:400], remote) for a in addresses]
    metrics.post(target.name, time.monotonic() - started, answer.status, None)
    outcomes = outcomes_for(target, answer, addresses, remote)
    if not outcomes[0].delivered:
        log.warning("%s: webhook %s (%s) answered HTTP %d: %s", envelope.id, target.name,
                    client.origin, answer.status, answer.snippet[:200] or "(no body)")
    return outcomes
