"""A real HTTP/1.1 receiver on 127.0.0.1, written on asyncio streams for these tests.

It is the plugin's independent counterpart: it parses HTTP itself, checks every
request's signature with the verification function the README gives receivers
(extracted from the README and run as it is written), decodes the JSON or
multipart/form-data body, and answers what the test scripted:

* ``answers``: consumed one per request, then ``default`` (200);
* an ``int``: that status, with ``body``;
* ``Hold()``: no answer until the client goes away or ``release()`` is called
  (then 200);
* ``Delay(seconds, then)``: that answer, later.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import json
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_verifier() -> Any:
    """The ``verify`` function of the README's receiver example."""
    text = README.read_text()
    [code] = [c for c in re.findall(r"```python\n(.*?)```", text, re.S) if "def verify(" in c]
    scope: dict[str, Any] = {}
    exec(compile(code, str(README), "exec"), scope)
    return scope["verify"]


@dataclass
class Delay:
    seconds: float
    then: Any


@dataclass
class Hold:
    released: asyncio.Event = field(default_factory=asyncio.Event)

    def release(self) -> None:
        self.released.set()


@dataclass
class Request:
    headers: dict[str, str]
    body: bytes
    document: dict[str, Any]          # the JSON document, or the form fields decoded
    files: dict[str, tuple[str, str, bytes]]   # name -> (filename, content type, bytes)
    answered: int | None = None


class Receiver:
    """``async with Receiver(secret) as r: r.url``."""

    def __init__(self, secret: str, *, tls: ssl.SSLContext | None = None,
                 max_skew: float = 300.0) -> None:
        self.secret = secret
        self.tls = tls
        self.max_skew = max_skew
        self.verify = readme_verifier()
        self.answers: list[Any] = []
        self.default: Any = 200
        self.body = b'{"ok":true}'
        self.requests: list[Request] = []          # verified requests, in order
        self.refused: list[str] = []               # why requests were answered 401
        self.connections = 0
        self.held = asyncio.Event()                # set when a Hold answer is being held
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}/inbound?token=t0ps3cret"

    async def __aenter__(self) -> "Receiver":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()

    async def wait(self, count: int, timeout: float = 10.0) -> list[Request]:
        async with asyncio.timeout(timeout):
            while len(self.requests) < count:
                await asyncio.sleep(0.01)
        return self.requests

    def delivered(self) -> list[Request]:
        return [r for r in self.requests if r.answered is not None and 200 <= r.answered < 300]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            while await self._one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
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
        assert "transfer-encoding" not in headers
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        keep = headers.get("connection", "").lower() != "close"
        if method != "POST" or target != "/inbound?token=t0ps3cret":
            return await self._send(writer, 404, b"not here", keep)
        try:
            ok = self.verify(self.secret.encode(), headers.get("x-elemta-timestamp", ""),
                             headers.get("x-elemta-signature", ""), body,
                             max_age_seconds=self.max_skew)
        except Exception as e:   # the README's function must refuse, never raise
            ok = False
            self.refused.append(f"verify raised {e!r}")
        if not ok:
            self.refused.append("bad signature or timestamp")
            return await self._send(writer, 401, b"bad signature", keep)
        request = Request(headers, body, *decode(headers["content-type"], body))
        self.requests.append(request)
        answer = self.answers.pop(0) if self.answers else self.default
        while isinstance(answer, Delay):
            await asyncio.sleep(answer.seconds)
            answer = answer.then
        if isinstance(answer, Hold):
            self.held.set()
            gone = asyncio.ensure_future(reader.read())
            released = asyncio.ensure_future(answer.released.wait())
            await asyncio.wait({gone, released}, return_when=asyncio.FIRST_COMPLETED)
            gone.cancel()
            released.cancel()
            if not answer.released.is_set():
                return False       # the client went away: it never saw an answer
            answer = 200
        request.answered = answer
        return await self._send(writer, answer, self.body, keep)

    async def _send(self, writer: asyncio.StreamWriter, code: int, body: bytes,
                    keep: bool) -> bool:
        head = (f"HTTP/1.1 {code} Status\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n"
                f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n")
        writer.write(head.encode() + body)
        await writer.drain()
        return keep


def decode(content_type: str, body: bytes
           ) -> tuple[dict[str, Any], dict[str, tuple[str, str, bytes]]]:
    """The JSON document, or the form fields (JSON values decoded) and files."""
    if content_type == "application/json":
        return json.loads(body), {}
    prefix = "multipart/form-data; boundary="
    assert content_type.startswith(prefix), content_type
    delimiter = b"--" + content_type[len(prefix):].encode()
    preamble, *parts = body.split(b"\r\n" + delimiter)   # RFC 2046: CRLF belongs to it
    assert preamble.startswith(delimiter) and parts[-1] == b"--\r\n", "bad multipart framing"
    parts = [preamble[len(delimiter):]] + parts[:-1]
    fields: dict[str, Any] = {}
    files: dict[str, tuple[str, str, bytes]] = {}
    for part in parts:
        assert part.startswith(b"\r\n")
        head, _, data = part[2:].partition(b"\r\n\r\n")
        headers = email.parser.BytesHeaderParser(policy=email.policy.HTTP).parsebytes(head)
        disposition = headers["Content-Disposition"]
        assert disposition.content_disposition == "form-data"
        name = disposition.params["name"]
        if "filename" in disposition.params:
            files[name] = (disposition.params["filename"], headers.get_content_type(), data)
        else:
            assert name not in fields, f"field {name} twice"
            fields[name] = data.decode("utf-8")
    return fields, files
