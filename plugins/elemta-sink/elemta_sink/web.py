"""The JSON API and the web UI: one Starlette application over the message store.

:func:`build_app` makes it from the settings and two callables, one that gives the
store of the running ``store`` plugin and one that queues a message for delivery
(``App.queue_message``), so that it can be served by any ASGI server; the plugin
serves it with uvicorn on Elemta's own event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timezone
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from . import mime
from .settings import SinkSettings

log = logging.getLogger("elemta.sink")

# A comment line on the event stream this often keeps proxies and browsers from
# closing an idle connection.
KEEPALIVE_SECONDS = 15.0
# The note a released message carries in its envelope's trace: route() lets it out.
RELEASE_NOTE = "elemta-sink release"
MAX_RELEASE_RECIPIENTS = 50
_ADDRESS = re.compile(r"^[^@\s<>(),;:\\\"\[\]]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")

StoreGetter = Callable[[], Any]
Queue = Callable[[str, list[str], bytes], Awaitable[str]]


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _iso(when: datetime) -> str:
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def summary_json(s: Any) -> dict[str, Any]:
    return {"id": s.id, "received": _iso(s.received), "sender": s.sender,
            "recipients": list(s.recipients), "subject": s.subject,
            "from": s.from_header, "to": s.to_header, "size": s.size,
            "has_attachments": s.has_attachments, "snippet": s.snippet}


def _int_param(request: Request, name: str, default: int, minimum: int) -> int:
    value = request.query_params.get(name)
    if value is None or value == "":
        return default
    try:
        n = int(value)
    except ValueError:
        raise HTTPError(400, f"{name}={value!r} is not a whole number") from None
    if n < minimum:
        raise HTTPError(400, f"{name}={value} is less than {minimum}")
    return n


def _time_param(request: Request, name: str) -> datetime | None:
    value = request.query_params.get(name)
    if value is None or value == "":
        return None
    text = value.strip()
    try:
        if re.fullmatch(r"\d+(\.\d+)?", text):
            return datetime.fromtimestamp(float(text), timezone.utc)
        when = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except (ValueError, OverflowError, OSError):
        raise HTTPError(400, f"{name}={value!r} is not a time: write an ISO 8601 date or time "
                        "(2026-12-06, 2026-12-06T14:30:00Z) or Unix seconds") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when


class Api:
    """The request handlers; the routes are in :func:`build_app`."""

    def __init__(self, settings: SinkSettings, get_store: StoreGetter, queue: Queue,
                 metrics: Any = None, version: str = "") -> None:
        self.settings = settings
        self._get_store = get_store
        self._queue = queue
        self._metrics = metrics
        self._version = version
        self.stopping = asyncio.Event()

    def store(self) -> Any:
        store = self._get_store()
        if store is None:
            raise HTTPError(503, "the message store is not open (is the store plugin enabled "
                            "in [plugins] enabled?)")
        return store

    def _writable(self) -> None:
        if self.settings.read_only:
            raise HTTPError(403, "read-only: [plugins.sink] read_only = true")

    async def _message(self, request: Request) -> tuple[Any, int]:
        raw_id = request.path_params["id"]
        if not raw_id.isdigit() or len(raw_id) > 18:
            raise HTTPError(404, f"no message {raw_id!r}")
        store = self.store()
        return store, int(raw_id)

    async def _raw(self, request: Request) -> tuple[int, bytes]:
        store, id = await self._message(request)
        raw = await store.raw(id)
        if raw is None:
            raise HTTPError(404, f"no message {id}")
        return id, raw

    # ------------------------------------------------------------------ handlers

    async def info(self, request: Request) -> Response:
        store = self.store()
        return JSONResponse({"version": self._version, "read_only": self.settings.read_only,
                             "capture_all": self.settings.capture_all,
                             "messages": await store.count(),
                             "page_size": self.settings.page_size,
                             "max_page_size": self.settings.max_page_size})

    async def list_messages(self, request: Request) -> Response:
        q = request.query_params
        unknown = sorted(set(q) - {"q", "query", "text", "to", "from", "sender", "since",
                                   "before", "limit", "offset"})
        if unknown:
            raise HTTPError(400, f"unknown parameter {unknown[0]!r}: the parameters are q, "
                            "to, from, since, before, limit and offset")
        limit = _int_param(request, "limit", self.settings.page_size, 1)
        limit = min(limit, self.settings.max_page_size)
        offset = _int_param(request, "offset", 0, 0)
        since = _time_param(request, "since")
        before = _time_param(request, "before")
        text = q.get("q") or q.get("query") or q.get("text") or None
        if text is not None and len(text) > 1000:
            raise HTTPError(400, "q is longer than 1000 characters")
        store = self.store()
        try:
            page = await store.search(text=text, to=q.get("to") or None,
                                      sender=q.get("from") or q.get("sender") or None,
                                      since=since, before=before, offset=offset, limit=limit)
        except ValueError as e:
            raise HTTPError(400, f"bad search: {e}") from None
        return JSONResponse({"total": page.total, "offset": offset, "limit": limit,
                             "count": len(page.items),
                             "messages": [summary_json(s) for s in page.items]})

    async def get_message(self, request: Request) -> Response:
        store, id = await self._message(request)
        stored = await store.get(id)
        raw = await store.raw(id) if stored is not None else None
        if stored is None or raw is None:
            raise HTTPError(404, f"no message {id}")
        parsed = await asyncio.get_running_loop().run_in_executor(None, mime.parse, raw)
        env = stored.envelope
        body = summary_json(stored.summary())
        body.update({
            "headers": [[n, v] for n, v in stored.headers],
            "envelope": {"queue_id": env.queue_id, "sender": env.sender,
                         "recipients": list(env.recipients), "helo": env.helo,
                         "peer": env.peer, "auth": env.auth},
            "text": parsed.text,
            "html": parsed.html is not None,
            "attachments": [p.as_dict() for p in parsed.parts],
            "authentication_results": mime.authentication_results(stored.headers),
            "links": {"raw": f"/api/v1/messages/{id}/raw",
                      "html": f"/api/v1/messages/{id}/html",
                      "parts": f"/api/v1/messages/{id}/parts"},
        })
        return JSONResponse(body)

    async def raw(self, request: Request) -> Response:
        id, raw = await self._raw(request)
        headers = {"Content-Disposition": f'inline; filename="message-{id}.eml"'}
        if request.query_params.get("download"):
            headers["Content-Disposition"] = f'attachment; filename="message-{id}.eml"'
        return Response(raw, media_type="message/rfc822", headers=headers)

    async def parts(self, request: Request) -> Response:
        _, raw = await self._raw(request)
        parsed = await asyncio.get_running_loop().run_in_executor(None, mime.parse, raw)
        return JSONResponse({"text": parsed.text, "html": parsed.html,
                             "attachments": [p.as_dict() for p in parsed.parts]})

    async def html(self, request: Request) -> Response:
        _, raw = await self._raw(request)
        remote = request.query_params.get("remote", "0") in ("1", "true", "yes")
        parsed = await asyncio.get_running_loop().run_in_executor(None, mime.parse, raw)
        if parsed.html is None:
            raise HTTPError(404, "this message has no HTML part")
        doc = mime.framed_html(parsed)
        return Response(doc, media_type="text/html; charset=utf-8", headers={
            "Content-Security-Policy": mime.frame_csp(remote),
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store"})

    async def part(self, request: Request) -> Response:
        _, raw = await self._raw(request)
        index_text = request.path_params["index"]
        if not index_text.isdigit():
            raise HTTPError(404, f"no part {index_text!r}")
        parsed = await asyncio.get_running_loop().run_in_executor(None, mime.parse, raw)
        found = mime.leaf_bytes(parsed, int(index_text))
        if found is None:
            raise HTTPError(404, f"no part {index_text}")
        content, ctype, filename = found
        name = filename or f"part-{index_text}"
        ascii_name = re.sub(r'[^A-Za-z0-9._ -]', "_", name)[:200] or "part"
        from urllib.parse import quote
        return Response(content, media_type=ctype, headers={
            "Content-Disposition": f"attachment; filename=\"{ascii_name}\"; "
                                   f"filename*=UTF-8''{quote(name)}",
            "Content-Security-Policy": "sandbox",
            "X-Content-Type-Options": "nosniff"})

    async def delete(self, request: Request) -> Response:
        self._writable()
        store, id = await self._message(request)
        if not await store.delete(id):
            raise HTTPError(404, f"no message {id}")
        return JSONResponse({"deleted": id})

    async def clear(self, request: Request) -> Response:
        self._writable()
        store = self.store()
        return JSONResponse({"deleted": await store.clear()})

    async def release(self, request: Request) -> Response:
        self._writable()
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise HTTPError(400, 'the body is not JSON; send {"to": ["someone@example.com"]}'
                            ) from None
        to = body.get("to") if isinstance(body, dict) else None
        if isinstance(to, str):
            to = [to]
        if not isinstance(to, list) or not to or not all(isinstance(a, str) for a in to):
            raise HTTPError(400, 'give the recipients as {"to": ["someone@example.com"]}')
        if len(to) > MAX_RELEASE_RECIPIENTS:
            raise HTTPError(400, f"at most {MAX_RELEASE_RECIPIENTS} recipients")
        bad = [a for a in to if not _ADDRESS.match(a)]
        if bad:
            raise HTTPError(400, f"{bad[0]!r} is not an address such as someone@example.com")
        store, id = await self._message(request)
        stored = await store.get(id)
        raw = await store.raw(id) if stored is not None else None
        if stored is None or raw is None:
            raise HTTPError(404, f"no message {id}")
        content = re.sub(rb"\r?\n", b"\r\n", raw)
        if not content.endswith(b"\r\n"):
            content += b"\r\n"
        try:
            queue_id = await self._queue(stored.sender, to, content)
        except Exception as e:
            log.error("sink: release of message %s to %s could not be queued: %s", id,
                      ", ".join(to), e)
            if self._metrics is not None:
                self._metrics.released("failed")
            raise HTTPError(503, f"the message could not be queued: {e}") from None
        if self._metrics is not None:
            self._metrics.released("queued")
        log.info("sink: message %s released to %s as %s", id, ", ".join(to), queue_id)
        return JSONResponse({"released": id, "to": to, "queue_id": queue_id},
                            status_code=202)

    async def events(self, request: Request) -> Response:
        store = self.store()
        subscription = store.subscribe()
        metrics = self._metrics

        async def stream() -> AsyncIterator[bytes]:
            if metrics is not None:
                metrics.stream(+1)
            iterator = subscription.__aiter__()
            stop = asyncio.ensure_future(self.stopping.wait())
            nxt: asyncio.Future[Any] | None = None
            try:
                yield b"retry: 2000\n: connected\n\n"
                while True:
                    if nxt is None:
                        nxt = asyncio.ensure_future(iterator.__anext__())
                    done, _ = await asyncio.wait({nxt, stop}, timeout=KEEPALIVE_SECONDS,
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if stop in done:
                        return
                    if nxt not in done:
                        yield b": keepalive\n\n"
                        continue
                    finished, nxt = nxt, None
                    if finished.exception() is not None:    # StopAsyncIteration: closed
                        return
                    event = finished.result()
                    data = json.dumps(event, separators=(",", ":"), default=str)
                    yield f"event: {event.get('type', 'message')}\ndata: {data}\n\n".encode()
            finally:
                stop.cancel()
                if nxt is not None:
                    if nxt.done():
                        nxt.exception()
                    else:
                        nxt.cancel()
                subscription.close()
                if metrics is not None:
                    metrics.stream(-1)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store",
                                          "X-Accel-Buffering": "no"})

    async def openapi(self, request: Request) -> Response:
        text = resources.files(__package__).joinpath("openapi.json").read_text()
        return Response(text, media_type="application/json")

    async def index(self, request: Request) -> Response:
        return _static("index.html", {
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                                       "frame-src 'self'; object-src 'none'; base-uri 'none'; "
                                       "form-action 'self'; frame-ancestors 'none'",
            "X-Frame-Options": "DENY", "Cache-Control": "no-store"})

    async def asset(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in ("app.js", "style.css"):
            raise HTTPError(404, f"no file {name!r}")
        return _static(name, {"Cache-Control": "no-cache"})


def _static(name: str, headers: dict[str, str]) -> Response:
    path = resources.files(__package__).joinpath("static", name)
    return FileResponse(str(path), headers={"X-Content-Type-Options": "nosniff", **headers})


# ---------------------------------------------------------------- middleware

class Guard:
    """Basic auth (when configured), errors as JSON, and the request counter."""

    def __init__(self, app: ASGIApp, settings: SinkSettings, metrics: Any = None) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self._verified: dict[bytes, bool] = {}
        self._hasher: Any = None
        if settings.password_hash is not None:
            from argon2 import PasswordHasher
            self._hasher = PasswordHasher()

    async def _allowed(self, scope: Scope) -> bool:
        if self.settings.username is None:
            return True
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, value = header.partition(b" ")
        if scheme.lower() != b"basic":
            return False
        digest = hashlib.sha256(value.strip()).digest()
        if digest in self._verified:
            return self._verified[digest]
        try:
            user, _, password = base64.b64decode(value.strip(), validate=True).decode(
                "utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        if user != self.settings.username:
            return False
        ok = await asyncio.get_running_loop().run_in_executor(None, self._verify, password)
        if ok:
            if len(self._verified) > 1000:
                self._verified.clear()
            self._verified[digest] = True
        return ok

    def _verify(self, password: str) -> bool:
        from argon2.exceptions import Argon2Error, InvalidHashError
        try:
            return bool(self._hasher.verify(self.settings.password_hash, password))
        except (Argon2Error, InvalidHashError):
            return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [0]

        async def counting_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if not await self._allowed(scope):
                response: Response = JSONResponse(
                    {"error": "authentication required"}, status_code=401,
                    headers={"WWW-Authenticate": 'Basic realm="elemta sink", charset="UTF-8"'})
                await response(scope, receive, counting_send)
                return
            try:
                await self.app(scope, receive, counting_send)
            except HTTPError as e:
                if status[0]:
                    raise
                await _error(e.status, e.message)(scope, receive, counting_send)
        finally:
            if self.metrics is not None:
                endpoint = getattr(scope.get("endpoint"), "__name__", None) or "unknown"
                self.metrics.request(endpoint, status[0] or 500)


def build_app(settings: SinkSettings, get_store: StoreGetter, queue: Queue,
              metrics: Any = None, version: str = "") -> tuple[Starlette, Api]:
    api = Api(settings, get_store, queue, metrics, version)

    async def not_found(request: Request, exc: Exception) -> Response:
        return _error(404, f"no such page {request.url.path!r}; the API is under /api/v1 "
                      "(see /api/openapi.json)")

    async def not_allowed(request: Request, exc: Exception) -> Response:
        return _error(405, f"{request.method} is not allowed on {request.url.path}")

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPError)
        return _error(exc.status, exc.message)

    def r(path: str, endpoint: Any, methods: list[str], name: str) -> Route:
        return Route(path, endpoint, methods=methods, name=name)

    routes = [
        r("/", api.index, ["GET"], "ui"),
        r("/static/{name}", api.asset, ["GET"], "static"),
        r("/api/openapi.json", api.openapi, ["GET"], "openapi"),
        r("/api/v1/info", api.info, ["GET"], "info"),
        r("/api/v1/events", api.events, ["GET"], "events"),
        r("/api/v1/messages", api.list_messages, ["GET"], "list"),
        r("/api/v1/messages/{id}", api.get_message, ["GET"], "message"),
        r("/api/v1/messages/{id}", api.delete, ["DELETE"], "delete"),
        r("/api/v1/messages/{id}/raw", api.raw, ["GET"], "raw"),
        r("/api/v1/messages/{id}/parts", api.parts, ["GET"], "parts"),
        r("/api/v1/messages/{id}/parts/{index}", api.part, ["GET"], "part"),
        r("/api/v1/messages/{id}/html", api.html, ["GET"], "html"),
        r("/api/v1/messages/{id}/release", api.release, ["POST"], "release"),
        r("/api/v1/clear", api.clear, ["POST"], "clear"),
        # the short names of the first API, kept as aliases
        r("/messages", api.list_messages, ["GET"], "list"),
        r("/messages/{id}", api.get_message, ["GET"], "message"),
        r("/clear", api.clear, ["POST"], "clear"),
    ]
    app = Starlette(routes=routes, exception_handlers={
        404: not_found, 405: not_allowed, HTTPError: http_error},
        middleware=[Middleware(Guard, settings=settings, metrics=metrics)])
    return app, api
