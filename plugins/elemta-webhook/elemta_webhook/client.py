"""The HTTP side: one pooled, signed httpx client per target.

Every request is one POST, signed with HMAC-SHA256 over ``"<timestamp>." +
body`` exactly as elemta-mtahooks signs its requests, so that one verification
routine serves both. It has a connect limit and one deadline for the whole
exchange (waiting for a pooled connection, connecting, TLS, sending, reading
the answer). Nothing is retried here: the delivery runner retries deferred
recipients on its schedule.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path

import httpx

from elemta import service_origin, service_tls_context, sign_body

from .payload import Post
from .settings import TargetSettings

SIGNATURE_HEADER = "X-Elemta-Signature"
TIMESTAMP_HEADER = "X-Elemta-Timestamp"
IDEMPOTENCY_HEADER = "Idempotency-Key"
TARGET_HEADER = "X-Elemta-Target"
# Read of an answer: enough to keep the connection for the next request, and a
# snippet for the log and the bounce; a longer answer closes the connection.
MAX_ANSWER_BYTES = 64 * 1024


class _HideTargetURLs(logging.Filter):
    """httpx logs every request's full URL at INFO; a target's path and query may hold a
    token, so its requests are logged with the origin only."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: dict[str, int] = {}     # target URL -> clients using it

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and self.urls:
            record.args = tuple(f"{service_origin(str(a))}/..." if isinstance(a, httpx.URL)
                                and str(a) in self.urls else a for a in args)
        return True


_hide_urls = _HideTargetURLs()
logging.getLogger("httpx").addFilter(_hide_urls)


class PostError(Exception):
    """A POST that got no HTTP answer. ``kind`` is the metric label (``timeout``,
    ``connect``, ``tls``, ``protocol``); ``str()`` says what happened and what to check."""

    def __init__(self, kind: str, reason: str) -> None:
        self.kind = kind
        super().__init__(reason)


@dataclass(frozen=True)
class Answer:
    """The receiver's answer: its status and the start of its body, on one line."""

    status: int
    snippet: str


def new_boundary(post: Post) -> str:
    """A multipart boundary that occurs in none of the parts (the other fields are JSON
    or short strings the check covers: a boundary is never a JSON token)."""
    texts = [post.text or "", post.html or ""] + [v for _, v in post.headers]
    while True:
        boundary = "elemta-" + secrets.token_hex(16)
        if (post.raw is None or boundary.encode("ascii") not in post.raw) \
                and not any(boundary in t for t in texts):
            return boundary


class TargetClient:
    """The connection pool, limits and secret of one target."""

    def __init__(self, target: TargetSettings, ca_file: Path | None, user_agent: str) -> None:
        self.target = target
        self.origin = service_origin(target.url)
        self._secret = target.secret.get_secret_value().encode("utf-8")
        self._user_agent = user_agent
        self._url = str(httpx.URL(target.url))
        _hide_urls.urls[self._url] = _hide_urls.urls.get(self._url, 0) + 1
        self._client = httpx.AsyncClient(
            verify=service_tls_context(ca_file, "the receiver") if target.url.lower().startswith("https:") else True,
            timeout=httpx.Timeout(target.timeout_seconds,
                                  connect=target.connect_timeout_seconds),
            limits=httpx.Limits(max_connections=target.max_connections,
                                max_keepalive_connections=target.max_connections,
                                keepalive_expiry=30.0),
            # the environment's proxies and .netrc must not change where mail goes
            trust_env=False,
            follow_redirects=False,
            http1=True, http2=False,
        )

    async def close(self) -> None:
        await self._client.aclose()
        left = _hide_urls.urls.pop(self._url, 1) - 1
        if left > 0:
            _hide_urls.urls[self._url] = left

    def headers(self, body: bytes, content_type: str, timestamp: int,
                idempotency_key: str) -> dict[str, str]:
        return {
            "Content-Type": content_type,
            "Accept-Encoding": "identity",
            "User-Agent": self._user_agent,
            TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: sign_body(self._secret, timestamp, body),
            IDEMPOTENCY_HEADER: idempotency_key,
            TARGET_HEADER: self.target.name,
        }

    async def post(self, body: bytes, content_type: str, timestamp: int,
                   idempotency_key: str) -> Answer:
        """POST ``body``; the receiver's answer, whatever its status. Raises
        :class:`PostError` when there is none."""
        target = self.target
        where = f"target {target.name} ({self.origin})"
        try:
            async with asyncio.timeout(target.timeout_seconds):
                return await self._exchange(body, content_type, timestamp, idempotency_key)
        except (TimeoutError, httpx.TimeoutException) as e:
            phase = ("connecting" if isinstance(e, httpx.ConnectTimeout)
                     else "waiting for the answer")
            limit = (f"connect_timeout_seconds = {target.connect_timeout_seconds:g}"
                     if isinstance(e, httpx.ConnectTimeout)
                     else f"timeout_seconds = {target.timeout_seconds:g}")
            raise PostError("timeout", f"{where}: timed out {phase} ({limit}); is the "
                            "receiver overloaded or unreachable?") from None
        except httpx.ConnectError as e:
            text = str(e) or type(e).__name__
            if "CERTIFICATE_VERIFY_FAILED" in text or isinstance(e.__cause__, ssl.SSLError):
                hint = (f"its certificate is not signed by a CA in ca_file ({target.ca_file})"
                        if target.ca_file is not None else
                        "for a private CA, set ca_file to its certificate")
                raise PostError("tls", f"{where}: TLS failed: {text}; {hint}") from None
            raise PostError("connect", f"{where}: cannot connect: {text}; is the receiver "
                            "running, and is url right?") from None
        except httpx.HTTPError as e:
            raise PostError("protocol", f"{where}: the exchange broke off: "
                            f"{e or type(e).__name__}") from None

    async def _exchange(self, body: bytes, content_type: str, timestamp: int,
                        idempotency_key: str) -> Answer:
        request = self._client.build_request(
            "POST", self.target.url, content=body,
            headers=self.headers(body, content_type, timestamp, idempotency_key))
        response = await self._client.send(request, stream=True)
        try:
            got = b""
            async for chunk in response.aiter_raw():
                got += chunk
                if len(got) > MAX_ANSWER_BYTES:
                    break   # closing it unread drops the connection, not the answer
            return Answer(response.status_code, _one_line(got[:300]))
        finally:
            await response.aclose()


def _one_line(data: bytes) -> str:
    """Printable ASCII on one line, as an SMTP reply text is: it may end up in a bounce."""
    text = data.decode("ascii", "replace")
    return " ".join("".join(c if c.isprintable() and c.isascii() else "?" if c == "\ufffd"
                            else " " for c in text).split())
