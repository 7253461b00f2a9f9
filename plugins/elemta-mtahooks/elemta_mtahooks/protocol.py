"""The JSON documents: what is sent to a hook, and what its answer means.

Plain functions over Elemta's public objects, testable without a server. The
shapes are in ``schema/request.json`` and ``schema/response.json`` (JSON Schema
draft 2020-12); a response is validated against the latter, then checked for
what the schema cannot say (what a stage allows).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import io
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, BinaryIO, Literal

from elemta import (Accept, AuthResult, Disconnect, Envelope, Message, Outcome, Recipient,
                    RecipientState, Reject, Route, Session, TempFail, Transaction, Verdict)

from .settings import INBOUND_STAGES, HookSettings

PROTOCOL_VERSION = 1

DEFAULTS = {"reject": (550, "5.7.1", "Rejected by policy"),
            "tempfail": (451, "4.7.1", "Try again later")}


class InvalidResponse(Exception):
    """The hook answered something this plugin cannot act on; ``str()`` says what."""


# ------------------------------------------------------------------ schemas


@functools.cache
def schema(name: Literal["request", "response"]) -> dict[str, Any]:
    """``schema/request.json`` or ``schema/response.json`` as shipped with the package."""
    text = resources.files("elemta_mtahooks.schema").joinpath(f"{name}.json").read_text()
    return json.loads(text)


@functools.cache
def _validator(name: Literal["request", "response"]) -> Any:
    import jsonschema

    return jsonschema.Draft202012Validator(schema(name))


def load_schemas() -> None:
    """Read and compile both schemas now (at start-up), not at the first request."""
    import jsonschema

    for name in ("request", "response"):
        jsonschema.Draft202012Validator.check_schema(schema(name))  # type: ignore[arg-type]
    _validator("response")


def schema_problem(name: Literal["request", "response"], document: Any) -> str | None:
    """The most relevant reason ``document`` does not match the schema, or ``None``."""
    import jsonschema

    error = jsonschema.exceptions.best_match(_validator(name).iter_errors(document))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "the document"
    return f"{where}: {error.message}"


# ------------------------------------------------------------------ requests


def safe_text(value: str) -> str:
    """A string safe for JSON: bytes that were not UTF-8 (surrogate escapes) become U+FFFD."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def params_doc(params: dict[str, str | None] | None) -> dict[str, str | None]:
    return {safe_text(str(k)): None if v is None else safe_text(str(v))
            for k, v in (params or {}).items()}


def _tls(tls: Any) -> dict[str, Any] | None:
    if tls is None:
        return None
    if isinstance(tls, dict):
        return {"version": str(tls.get("version", "")), "cipher": str(tls.get("cipher", "")),
                "bits": int(tls.get("bits") or 0), "implicit": bool(tls.get("implicit"))}
    return {"version": tls.version, "cipher": tls.cipher, "bits": int(tls.bits or 0),
            "implicit": bool(tls.implicit)}


def base_request(hook: HookSettings, stage: str, request_id: str, timestamp: int,
                 hostname: str) -> dict[str, Any]:
    return {"protocol": PROTOCOL_VERSION, "requestId": request_id, "hook": hook.name,
            "stage": stage, "timestamp": timestamp,
            "server": {"hostname": hostname, "listener": None, "address": None, "port": None}}


def add_session(doc: dict[str, Any], session: Session) -> None:
    doc["server"].update(listener=session.listener.name, address=session.local[0],
                         port=int(session.local[1]))
    doc["session"] = {
        "id": session.id,
        "client": {"address": session.peer[0], "port": int(session.peer[1])},
        "helo": None if session.helo is None else safe_text(session.helo),
        "esmtp": bool(session.esmtp),
        "tls": _tls(session.tls),
        "authUser": None if session.auth_user is None else safe_text(session.auth_user),
        "relayAllowed": bool(session.relay_allowed),
        "transactions": int(session.transactions),
    }


def inbound_recipient(recipient: Recipient) -> dict[str, Any]:
    return {"address": safe_text(recipient.address), "params": params_doc(recipient.params)}


def add_transaction(doc: dict[str, Any], tx: Transaction) -> None:
    doc["envelope"] = {
        "queueId": tx.id,
        "from": {"address": safe_text(tx.sender), "params": params_doc(tx.mail_params)},
        "to": [inbound_recipient(r) for r in tx.recipients],
    }


def auth_results(results: list[AuthResult]) -> list[dict[str, Any]]:
    return [{"method": safe_text(r.method), "result": safe_text(r.result),
             "reason": None if r.reason is None else safe_text(r.reason),
             "properties": {safe_text(str(k)): safe_text(str(v))
                            for k, v in (r.properties or {}).items()}}
            for r in results]


def outbound_recipient(r: RecipientState) -> dict[str, Any]:
    return {"address": safe_text(r.address), "params": params_doc(r.params), "state": r.state,
            "attempts": int(r.attempts),
            "original": None if r.original is None else safe_text(r.original)}


def add_envelope(doc: dict[str, Any], env: Envelope) -> None:
    """The outbound facts: what the spool kept of the session, and the envelope."""
    peer = env.peer or {}
    doc["server"]["listener"] = env.listener
    doc["session"] = {
        "id": None,
        "client": {"address": peer.get("ip"),
                   "port": int(peer["port"]) if peer.get("port") is not None else None},
        "helo": None if env.helo is None else safe_text(env.helo),
        "esmtp": None,
        "tls": _tls(env.tls),
        "authUser": None if env.auth is None else safe_text(env.auth),
        "relayAllowed": None,
        "transactions": None,
    }
    doc["envelope"] = {
        "queueId": env.id,
        "from": {"address": safe_text(env.sender), "params": params_doc(env.mail_params)},
        "to": [outbound_recipient(r) for r in env.recipients],
    }


def delivery(env: Envelope, recipients: list[str], route: Route | None = None,
             outcome: Outcome | None = None) -> dict[str, Any]:
    return {
        "attempt": int(env.attempts),
        "receivedAt": float(env.received_at),
        "recipients": [safe_text(r) for r in recipients],
        "route": None if route is None else {
            "transport": route.transport, "destination": safe_text(route.destination),
            "host": route.host, "tls": route.tls},
        "outcome": None if outcome is None else {
            "code": int(outcome.code), "enhanced": outcome.enhanced,
            "text": safe_text(outcome.text), "remote": outcome.remote},
    }


# ------------------------------------------------------------------ the message


@dataclass
class BodyPart:
    """What is sent of a body: its size, the bytes sent, whether they are all of it."""

    size: int
    content: bytes | None
    truncated: bool


def _header_end(stream: BinaryIO) -> int:
    """Read ``stream`` through the blank line that ends the header section; its length.

    A message without a blank line is all header section.
    """
    length = 0
    at_line_start = True
    while True:
        line = stream.readline(65536)
        if not line:
            return length
        length += len(line)
        if at_line_start and line in (b"\r\n", b"\n"):
            return length
        at_line_start = line.endswith(b"\n")


def read_body(stream: BinaryIO, total_size: int, limit: int, over_limit: str) -> BodyPart:
    """The body of the message in ``stream`` (positioned at its start), read only as far
    as ``limit`` bytes: truncated, or omitted (``over_limit``) when it is larger.

    Blocking: run it in an executor for a message on disk.
    """
    if isinstance(stream, io.RawIOBase):
        stream = io.BufferedReader(stream, 65536)  # type: ignore[assignment]
    size = max(0, total_size - _header_end(stream))
    if size > limit and over_limit == "omit":
        return BodyPart(size, None, True)
    want = min(size, limit)
    chunks: list[bytes] = []
    got = 0
    while got < want:
        chunk = stream.read(min(65536, want - got))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return BodyPart(size, b"".join(chunks), size > got)


def message_body(message: Message, limit: int, over_limit: str) -> BodyPart:
    with message.open() as stream:
        return read_body(stream, message.size, limit, over_limit)


def file_body(path: str, limit: int, over_limit: str) -> BodyPart:
    with open(path, "rb") as stream:
        return read_body(stream, os.fstat(stream.fileno()).st_size, limit, over_limit)


def file_headers(path: str, limit: int = 1 << 20) -> tuple[int, list[tuple[str, str]]]:
    """The size and the unfolded header fields of the message file at ``path``
    (at most ``limit`` bytes of header section are read). Blocking."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        block = bytearray()
        while len(block) < limit:
            line = f.readline(65536)
            if not line or line in (b"\r\n", b"\n"):
                break
            block += line
    fields: list[tuple[str, str]] = []
    for line in bytes(block).splitlines():
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, f"{value} {line.strip().decode('utf-8', 'replace')}".strip())
            continue
        name, sep, value = line.partition(b":")
        if sep:
            fields.append((name.strip().decode("utf-8", "replace"),
                           value.strip().decode("utf-8", "replace")))
    return size, fields


def message_document(size: int, headers: list[tuple[str, str]], body: BodyPart | None,
                     encoding: str) -> dict[str, Any]:
    doc: dict[str, Any] = {"size": int(size),
                           "headers": [[safe_text(n), safe_text(v)] for n, v in headers]}
    if body is not None:
        content: str | None = None
        if body.content is not None:
            content = (base64.b64encode(body.content).decode("ascii") if encoding == "base64"
                       else body.content.decode("utf-8", "replace"))
        doc["body"] = {"encoding": encoding, "size": body.size, "content": content,
                       "truncated": body.truncated}
    return doc


def encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


# ------------------------------------------------------------------ responses


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str
    text: str
    disconnect: bool = False


@dataclass
class Decision:
    """A hook's validated answer. ``verdict`` is the Elemta verdict of ``reject``,
    ``tempfail`` and ``accept`` (inbound), ``reply`` the code and text (outbound);
    ``modifications`` are prepared: checked and decoded, ready to apply."""

    action: str
    reply: Reply | None = None
    reason: str | None = None
    modifications: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    verdict: Verdict | None = None


def parse_response(raw: bytes, stage: str) -> Decision:
    """The decision in ``raw``; :class:`InvalidResponse` for anything else."""
    try:
        doc = json.loads(raw)
    except UnicodeDecodeError:
        raise InvalidResponse("the response is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise InvalidResponse(f"the response is not JSON: {e.msg} at line {e.lineno} "
                              f"column {e.colno}") from None
    problem = schema_problem("response", doc)
    if problem is not None:
        raise InvalidResponse(f"the response does not match schema/response.json: {problem}")
    action = doc["action"]
    modifications = doc.get("modifications") or []
    if modifications and stage != "data":
        raise InvalidResponse(f"modifications are only allowed at the data stage, not at "
                              f"{stage}")
    outbound = stage not in INBOUND_STAGES
    if outbound and action in ("discard", "quarantine"):
        raise InvalidResponse(f"action {action} is for inbound stages; at {stage} answer "
                              "continue, accept, reject or tempfail")
    response = doc.get("response") or {}
    if outbound and response.get("disconnect"):
        raise InvalidResponse(f"response.disconnect has no meaning at the outbound stage "
                              f"{stage}: there is no client to disconnect")
    reply = None
    verdict: Verdict | None = None
    try:
        if action in DEFAULTS:
            code, enhanced, text = DEFAULTS[action]
            code = response.get("code", code)
            # a code without an enhanced status gets the default one, in the code's class
            enhanced = response.get("enhanced", f"{str(code)[0]}{enhanced[1:]}")
            if enhanced[0] != str(code)[0]:
                raise InvalidResponse(f"response.enhanced {enhanced} does not go with code "
                                      f"{code}: their first digits must agree")
            reply = Reply(code, enhanced, response.get("message", text),
                          bool(response.get("disconnect", False)))
            kind = Disconnect if reply.disconnect else Reject if action == "reject" else TempFail
            verdict = kind(reply.code, reply.enhanced, reply.text)
        elif action == "accept":
            if "message" in response:
                reply = Reply(response.get("code", 250), response.get("enhanced", "2.0.0"),
                              response["message"])
            verdict = Accept(text=reply.text if reply is not None else None)
    except ValueError as e:   # what Elemta's verdicts refuse and the schema let through
        raise InvalidResponse(f"response: {e}") from None
    prepared = prepare_modifications(modifications) if action in (
        "continue", "accept", "quarantine") else []
    return Decision(action, reply, doc.get("reason"), prepared, verdict)


# ------------------------------------------------------------------ modifications


def _body_bytes(mod: dict[str, Any], n: int) -> bytes:
    value = mod["value"]
    if mod.get("encoding", "text") == "base64":
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidResponse(f"modifications/{n}: value is not valid base64") from None
    text = value.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\r\n")
    if text and not text.endswith("\r\n"):
        text += "\r\n"
    return text.encode("utf-8")


def prepare_modifications(mods: list[dict[str, Any]]) -> list[tuple[str, tuple[Any, ...]]]:
    """Check every modification before any is applied (so that a bad one changes
    nothing): header fields as Elemta would write them, addresses, base64."""
    ops: list[tuple[str, tuple[Any, ...]]] = []
    for n, mod in enumerate(mods):
        kind = mod["type"]
        if kind in ("addHeader", "insertHeader", "changeHeader"):
            problem = header_problem(mod["name"], mod["value"])
            if problem:
                raise InvalidResponse(f"modifications/{n} ({kind}): {problem}")
        if kind == "addHeader":
            ops.append((kind, (mod["name"], mod["value"])))
        elif kind == "insertHeader":
            ops.append((kind, (mod["index"], mod["name"], mod["value"])))
        elif kind == "changeHeader":
            ops.append((kind, (mod["name"], mod["value"], mod.get("index", 1))))
        elif kind == "deleteHeader":
            ops.append((kind, (mod["name"], mod.get("index"))))
        elif kind == "replaceBody":
            ops.append((kind, (_body_bytes(mod, n),)))
        elif kind == "addRecipient":
            ops.append((kind, (mod["value"], mod.get("params"))))
        elif kind == "deleteRecipient":
            ops.append((kind, (mod["value"],)))
        elif kind == "changeFrom":
            ops.append((kind, (mod["value"], mod.get("params"))))
        else:   # the schema lists the types; this is a second line of defence
            raise InvalidResponse(f"modifications/{n}: unknown type {kind!r}")
    return ops


def header_problem(name: str, value: str) -> str | None:
    """Why Elemta would refuse this header field, or ``None``."""
    if not name or not name.isascii() or any(c in name for c in ": \t\r\n"):
        return f"invalid header field name {name!r}"
    for line in value.split("\r\n")[1:]:
        if line[:1] not in (" ", "\t"):
            return f"header {name}: a continuation line must start with white space"
    if "\r" in value.replace("\r\n", "") or "\n" in value.replace("\r\n", ""):
        return f"header {name}: the value contains a bare CR or LF"
    return None


async def apply_modifications(ops: list[tuple[str, tuple[Any, ...]]], message: Message,
                              tx: Transaction) -> None:
    """Apply prepared modifications in order (a large new body is written off the loop)."""
    for kind, args in ops:
        if kind == "addHeader":
            message.append_header(*args)
        elif kind == "insertHeader":
            message.insert_header(*args)
        elif kind == "changeHeader":
            name, value, occurrence = args
            message.change_header(name, value, occurrence)
        elif kind == "deleteHeader":
            name, occurrence = args
            if occurrence is None:
                lname = name.lower()
                message.remove_headers(lambda n, v: n.lower() == lname)
            else:
                message.change_header(name, None, occurrence)
        elif kind == "replaceBody":
            (body,) = args
            if len(body) > 256 * 1024:
                await asyncio.to_thread(message.replace_body, body)
            else:
                message.replace_body(body)
        elif kind == "addRecipient":
            address, params = args
            tx.add_recipient(address, params)
        elif kind == "deleteRecipient":
            tx.remove_recipient(args[0])
        elif kind == "changeFrom":
            address, params = args
            tx.set_sender(address, params)
