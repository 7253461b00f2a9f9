"""The HTTP side: one pooled, bounded, signed client per configured hook (httpx).

Every request is one POST with a JSON body, signed with HMAC-SHA256 over
``"<timestamp>." + body``; it has one deadline (``timeout_seconds``) that covers
waiting for a free slot (``max_concurrency``), connecting, sending and reading
the whole answer, which is read only up to ``max_response_bytes``. Nothing is
retried: a failure is reported as :class:`HookError` and the caller applies the
hook's ``on_failure``.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import httpx

from elemta import service_tls_context, sign_body

from .settings import HookSettings

SIGNATURE_HEADER = "X-Elemta-Signature"
TIMESTAMP_HEADER = "X-Elemta-Timestamp"
REQUEST_ID_HEADER = "X-Elemta-Request-Id"
STAGE_HEADER = "X-Elemta-Stage"
HOOK_HEADER = "X-Elemta-Hook"


class HookError(Exception):
    """A request that got no usable answer. ``kind`` is the metric label (``timeout``,
    ``connect``, ``tls``, ``http_status``, ``protocol``, ``too_large``); ``str()`` is
    the reason for the log, with what to check."""

    def __init__(self, kind: str, reason: str) -> None:
        self.kind = kind
        super().__init__(reason)


class HookClient:
    """The connection pool and limits of one hook."""

    def __init__(self, hook: HookSettings, ca_file: Path | None, user_agent: str) -> None:
        self.hook = hook
        self._secret = hook.secret.get_secret_value().encode("utf-8")
        self._slots = asyncio.Semaphore(hook.max_concurrency)
        self._user_agent = user_agent
        self._client = httpx.AsyncClient(
            verify=service_tls_context(ca_file, "the hook service") if hook.url.lower().startswith("https:") else True,
            timeout=httpx.Timeout(hook.timeout_seconds),
            limits=httpx.Limits(max_connections=hook.max_concurrency,
                                max_keepalive_connections=hook.max_concurrency,
                                keepalive_expiry=30.0),
            # the environment's proxies and .netrc must not change where mail goes
            trust_env=False,
            follow_redirects=False,
            http1=True, http2=False,
        )

    async def close(self) -> None:
        await self._client.aclose()

    def headers(self, body: bytes, timestamp: int, request_id: str, stage: str
                ) -> dict[str, str]:
        return {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "Accept-Encoding": "identity",
            "User-Agent": self._user_agent,
            TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: sign_body(self._secret, timestamp, body),
            REQUEST_ID_HEADER: request_id,
            STAGE_HEADER: stage,
            HOOK_HEADER: self.hook.name,
        }

    async def post(self, body: bytes, timestamp: int, request_id: str, stage: str, *,
                   want_body: bool = True) -> bytes:
        """POST ``body``; the response body of a ``200`` (any ``2xx`` without
        ``want_body``). Raises :class:`HookError`."""
        hook = self.hook
        try:
            async with asyncio.timeout(hook.timeout_seconds):
                async with self._slots:
                    return await self._exchange(body, timestamp, request_id, stage, want_body)
        except TimeoutError:
            raise HookError("timeout", f"no complete answer from {hook.url} within "
                            f"{hook.timeout_seconds:g}s (timeout_seconds); is the service "
                            "overloaded, or max_concurrency too low?") from None
        except httpx.TimeoutException:
            raise HookError("timeout", f"no complete answer from {hook.url} within "
                            f"{hook.timeout_seconds:g}s (timeout_seconds)") from None
        except httpx.ConnectError as e:
            text = str(e) or type(e).__name__
            if "CERTIFICATE_VERIFY_FAILED" in text or isinstance(e.__cause__, ssl.SSLError):
                hint = (f"the certificate is not signed by a CA in ca_file "
                        f"({hook.ca_file})" if hook.ca_file is not None else
                        "for a private CA, set ca_file to its certificate")
                raise HookError("tls", f"TLS with {hook.url} failed: {text}; {hint}") from None
            raise HookError("connect", f"cannot connect to {hook.url}: {text}; is the hook "
                            "service running, and is url right?") from None
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as e:
            raise HookError("protocol", f"{hook.url} broke off the exchange: "
                            f"{e or type(e).__name__}") from None
        except httpx.HTTPError as e:
            raise HookError("protocol", f"HTTP error with {hook.url}: "
                            f"{e or type(e).__name__}") from None

    async def _exchange(self, body: bytes, timestamp: int, request_id: str, stage: str,
                        want_body: bool) -> bytes:
        hook = self.hook
        request = self._client.build_request(
            "POST", hook.url, content=body,
            headers=self.headers(body, timestamp, request_id, stage))
        response = await self._client.send(request, stream=True)
        try:
            status = response.status_code
            if want_body and status != 200 or not 200 <= status < 300:
                snippet = await _read_some(response, 300)
                hint = (" (redirects are not followed: set url to the final address)"
                        if 300 <= status < 400 else "")
                raise HookError("http_status", f"{hook.url} answered HTTP {status}"
                                f"{hint}: {snippet!r}")
            if not want_body:
                return b""
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() \
                    and int(declared) > hook.max_response_bytes:
                raise HookError("too_large", f"{hook.url} announced a {declared}-byte "
                                f"response, more than max_response_bytes "
                                f"({hook.max_response_bytes})")
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_raw():
                size += len(chunk)
                if size > hook.max_response_bytes:
                    raise HookError("too_large", f"{hook.url} sent more than "
                                    f"max_response_bytes ({hook.max_response_bytes})")
                chunks.append(chunk)
            return _decoded(response, b"".join(chunks))
        finally:
            await response.aclose()


def _decoded(response: httpx.Response, raw: bytes) -> bytes:
    """The body without its ``Content-Encoding`` (gzip, deflate), still bounded."""
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return raw
    raise HookError("protocol", f"the response has Content-Encoding {encoding}; this client "
                    "asks for none: send the JSON as is")


async def _read_some(response: httpx.Response, limit: int) -> str:
    got = b""
    try:
        async for chunk in response.aiter_raw():
            got += chunk
            if len(got) >= limit:
                break
    except httpx.HTTPError:
        pass
    return got[:limit].decode("utf-8", "replace")
