"""A real HTTP/1.1 hook service on 127.0.0.1, written on asyncio streams for these tests.

It is the plugin's independent counterpart: it parses HTTP itself, checks the
HMAC signature and its timestamp with its own secret (a request that fails is
answered ``401`` and recorded in ``refused``), validates every document against
``schema/request.json`` read from the file (problems go to ``invalid``), and
answers what the test's ``answer`` function returns for each request:

* a ``dict``: ``200`` with that JSON;
* ``Raw(bytes)``: those bytes on the wire, as they are (broken HTTP, cut-off bodies);
* ``Status(code, body)``: that status;
* ``Delay(seconds, answer)``: that answer, later;
* ``HANG``: nothing, until the client gives up.

``max_inflight`` is the most requests it was answering at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jsonschema

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schema"
MAX_REQUEST = 16 << 20


@dataclass
class Raw:
    data: bytes
    close: bool = True


@dataclass
class Status:
    code: int
    body: bytes = b""


@dataclass
class Delay:
    seconds: float
    then: Any


HANG = object()
Answer = dict | Raw | Status | Delay | object


def continue_(doc: dict[str, Any]) -> Answer:
    return {"action": "continue"}


class HookService:
    """``async with HookService(secret) as svc: svc.url``; ``svc.answer = fn``."""

    def __init__(self, secret: str, *, tls: ssl.SSLContext | None = None,
                 max_skew: float = 300.0) -> None:
        self.secret = secret.encode()
        self.tls = tls
        self.max_skew = max_skew
        self.answer: Callable[[dict[str, Any]], Answer] = continue_
        self.requests: list[dict[str, Any]] = []       # every verified document, in order
        self.headers: list[dict[str, str]] = []        # their HTTP headers (lower-case names)
        self.refused: list[str] = []                   # why requests were answered 401
        self.invalid: list[str] = []                   # request.json violations
        self.connections = 0
        self.inflight = 0
        self.max_inflight = 0
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        validator = jsonschema.Draft202012Validator
        schema = json.loads((SCHEMA_DIR / "request.json").read_text())
        validator.check_schema(schema)
        self._validator = validator(schema)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/hook"

    async def __aenter__(self) -> "HookService":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()   # the connection handlers see the end of their stream
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=2.0)

    # ------------------------------------------------------------ looking at it

    def stages(self) -> list[str]:
        return [d["stage"] for d in self.requests]

    def at(self, stage: str) -> list[dict[str, Any]]:
        return [d for d in self.requests if d["stage"] == stage]

    async def wait_for(self, stage: str, count: int = 1, timeout: float = 10.0
                       ) -> list[dict[str, Any]]:
        async with asyncio.timeout(timeout):
            while len(self.at(stage)) < count:
                await asyncio.sleep(0.01)
        return self.at(stage)

    # ------------------------------------------------------------ HTTP

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            while await self._one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        line = await reader.readline()
        if not line:
            return False
        method, target, version = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
        headers: dict[str, str] = {}
        while True:
            raw = await reader.readline()
            if raw in (b"\r\n", b"\n", b""):
                break
            name, _, value = raw.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        assert length <= MAX_REQUEST and "transfer-encoding" not in headers
        body = await reader.readexactly(length)
        keep = headers.get("connection", "").lower() != "close" and version == "HTTP/1.1"
        if method != "POST" or target != "/hook":
            return await self._send(writer, Status(404, b"not here"), keep)
        why = self._refusal(headers, body)
        if why is not None:
            self.refused.append(why)
            return await self._send(writer, Status(401, json.dumps({"error": why}).encode()),
                                    keep)
        doc = json.loads(body)
        for error in self._validator.iter_errors(doc):
            path = "/".join(str(p) for p in error.absolute_path)
            self.invalid.append(f"{doc.get('stage')}: {path}: {error.message}")
        self.requests.append(doc)
        self.headers.append(headers)
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            answer = self.answer(doc)
            while isinstance(answer, Delay):
                await asyncio.sleep(answer.seconds)
                answer = answer.then
            return await self._send(writer, answer, keep, reader)
        finally:
            self.inflight -= 1

    def _refusal(self, headers: dict[str, str], body: bytes) -> str | None:
        stamp = headers.get("x-elemta-timestamp", "")
        given = headers.get("x-elemta-signature", "")
        if not stamp.isdigit() or not given.startswith("sha256="):
            return "unsigned request"
        if abs(time.time() - int(stamp)) > self.max_skew:
            return "stale timestamp"
        want = hmac.new(self.secret, stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(want, given[len("sha256="):]):
            return "bad signature"
        try:
            doc = json.loads(body)
        except ValueError:
            return "body is not JSON"
        if doc.get("timestamp") != int(stamp):
            return "timestamp header and document disagree"
        return None

    async def _send(self, writer: asyncio.StreamWriter, answer: Answer, keep: bool,
                    reader: asyncio.StreamReader | None = None) -> bool:
        if answer is HANG:
            if reader is not None:
                await reader.read()      # until the client gives up (or the service stops)
            return False
        if isinstance(answer, Raw):
            writer.write(answer.data)
            await writer.drain()
            return not answer.close
        if isinstance(answer, Status):
            code, body, kind = answer.code, answer.body, "text/plain"
        else:
            code, body, kind = 200, json.dumps(answer).encode(), "application/json"
        reason = {200: "OK", 401: "Unauthorized", 404: "Not Found"}.get(code, "Status")
        head = (f"HTTP/1.1 {code} {reason}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\n"
                f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n")
        writer.write(head.encode() + body)
        await writer.drain()
        return keep
