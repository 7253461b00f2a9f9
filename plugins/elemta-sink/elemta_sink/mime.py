"""What the API and the web UI show of a stored message: its parts, its headers, its
Authentication-Results, and the HTML body made safe to frame.

Plain functions over the message bytes, testable without a server.
"""

from __future__ import annotations

import base64
import email
import email.policy
import re
from dataclasses import dataclass, field
from email.message import EmailMessage, Message
from typing import Any

# inline images (cid:) larger than this are not inlined into the framed HTML
MAX_INLINE_IMAGE = 2 * 1024 * 1024


@dataclass
class Part:
    """One leaf of the MIME tree that is an attachment or an inline (cid:) part."""

    index: int              # its position among the leaves, the id of the download URL
    filename: str | None
    content_type: str
    size: int
    disposition: str        # "attachment" or "inline"
    content_id: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "filename": self.filename,
                "content_type": self.content_type, "size": self.size,
                "disposition": self.disposition, "content_id": self.content_id}


@dataclass
class Parsed:
    text: str | None = None
    html: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    parts: list[Part] = field(default_factory=list)
    leaves: list[Message] = field(default_factory=list)


def parse(raw: bytes) -> Parsed:
    """The text and HTML bodies (the first of each that is not an attachment), every header
    field in order, and the attachments and inline parts."""
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    out = Parsed(headers=[(name, _header_text(value)) for name, value in msg.raw_items()])
    for leaf in _leaves(msg):
        index = len(out.leaves)
        out.leaves.append(leaf)
        ctype = leaf.get_content_type()
        disposition = (leaf.get_content_disposition() or "").lower()
        filename = _filename(leaf)
        is_body = disposition != "attachment" and filename is None
        if is_body and ctype == "text/plain" and out.text is None:
            out.text = _text_of(leaf)
            continue
        if is_body and ctype == "text/html" and out.html is None:
            out.html = _text_of(leaf)
            continue
        if is_body and ctype.startswith("text/") and not leaf.get("Content-ID"):
            continue   # an alternative body of another type: not an attachment
        payload = leaf.get_payload(decode=True) or b""
        cid = leaf.get("Content-ID")
        out.parts.append(Part(
            index=index, filename=filename, content_type=ctype, size=len(payload),
            disposition="attachment" if disposition == "attachment" or (
                filename and not cid) else "inline",
            content_id=cid.strip().strip("<>") if cid else None))
    return out


def _leaves(msg: Message) -> list[Message]:
    """Every non-multipart part, depth first; an attached message/rfc822 is one leaf."""
    if msg.get_content_maintype() == "multipart":
        children = msg.get_payload()
        if isinstance(children, list):
            return [leaf for child in children for leaf in _leaves(child)]
        return []
    return [msg]


def _filename(part: Message) -> str | None:
    try:
        name = part.get_filename()
    except Exception:   # a malformed RFC 2231 parameter
        return None
    return str(name) if name else None


def _text_of(part: Message) -> str:
    try:
        content = part.get_content() if isinstance(part, EmailMessage) else None
        if isinstance(content, str):
            return content
    except Exception:   # unknown charset or broken transfer encoding: decode leniently
        pass
    payload = part.get_payload(decode=True) or b""
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset, "replace")
    except LookupError:
        return payload.decode("utf-8", "replace")


def _header_text(value: Any) -> str:
    text = str(value)
    return re.sub(r"\r?\n[ \t]*", " ", text)


def leaf_bytes(parsed: Parsed, index: int) -> tuple[bytes, str, str | None] | None:
    """The decoded content, content type and file name of leaf ``index``."""
    if not 0 <= index < len(parsed.leaves):
        return None
    leaf = parsed.leaves[index]
    if leaf.get_content_type() == "message/rfc822":
        inner = leaf.get_payload()
        content = inner[0].as_bytes() if isinstance(inner, list) and inner else b""
    else:
        content = leaf.get_payload(decode=True) or b""
    return content, leaf.get_content_type(), _filename(leaf)


# ------------------------------------------------------------------ HTML for the frame

def framed_html(parsed: Parsed) -> str:
    """The HTML body for the sandboxed frame: ``cid:`` images inlined as ``data:`` URIs,
    links opening outside the frame."""
    html = parsed.html or ""
    by_cid: dict[str, Part] = {p.content_id.lower(): p for p in parsed.parts if p.content_id}

    def inline(match: re.Match[str]) -> str:
        part = by_cid.get(match.group(2).lower())
        if part is None or part.size > MAX_INLINE_IMAGE:
            return match.group(0)
        content = parsed.leaves[part.index].get_payload(decode=True) or b""
        data = base64.b64encode(content).decode("ascii")
        return f"{match.group(1)}data:{part.content_type};base64,{data}"

    html = re.sub(r"""((?:src|background)\s*=\s*["']?)cid:([^"'\s>]+)""", inline, html,
                  flags=re.I)
    return '<base target="_blank">' + html


def frame_csp(remote: bool) -> str:
    """The Content-Security-Policy of the framed HTML document: no script ever; images,
    styles and fonts from the message itself only, or from anywhere when ``remote``."""
    source = "* data:" if remote else "data:"
    return ("default-src 'none'; script-src 'none'; object-src 'none'; base-uri 'none'; "
            "form-action 'none'; frame-src 'none'; "
            f"img-src {source}; media-src {source}; font-src {source}; "
            f"style-src 'unsafe-inline' {source}")


# --------------------------------------------------------- Authentication-Results (RFC 8601)

def authentication_results(headers: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Every Authentication-Results field, parsed into its authserv-id and results:
    ``{"authserv_id", "results": [{"method", "result", "reason", "properties", "comment"}],
    "raw"}``; a field that does not parse keeps only ``raw`` and ``error``."""
    out = []
    for name, value in headers:
        if name.lower() != "authentication-results":
            continue
        try:
            out.append(parse_authres(value))
        except ValueError as e:
            out.append({"raw": value, "error": str(e), "authserv_id": None, "results": []})
    return out


_TOKEN = re.compile(r'\s*(?:(\()|("(?:[^"\\]|\\.)*")|(;)|(=)|([^\s;=()"]+))')


def _tokens(value: str) -> list[tuple[str, str]]:
    """(kind, text) tokens: ``comment``, ``word``, ``;`` and ``=``."""
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(value):
        if value[i].isspace():
            i += 1
            continue
        m = _TOKEN.match(value, i)
        if m is None:
            raise ValueError(f"unexpected character {value[i]!r}")
        if m.group(1):
            depth, j = 0, m.start(1)
            while j < len(value):
                c = value[j]
                if c == "\\":
                    j += 2
                    continue
                depth += c == "("
                depth -= c == ")"
                j += 1
                if depth == 0:
                    break
            if depth:
                raise ValueError("unclosed comment")
            out.append(("comment", value[m.start(1) + 1:j - 1].strip()))
            i = j
            continue
        glued = bool(out) and out[-1][0] == "word" and i == m.start() and i > 0 \
            and not value[i - 1].isspace()
        if m.group(2) or m.group(5):
            text = re.sub(r"\\(.)", r"\1", m.group(2)[1:-1]) if m.group(2) else m.group(5)
            if glued:     # local-part"quoted"@domain: one value
                out[-1] = ("word", out[-1][1] + text)
            else:
                out.append(("word", text))
        elif m.group(3):
            out.append((";", ";"))
        elif m.group(4):
            out.append(("=", "="))
        i = m.end()
    return out


def parse_authres(value: str) -> dict[str, Any]:
    """One Authentication-Results value (RFC 8601 §2.2)."""
    tokens = [t for t in _tokens(value)]
    clauses: list[list[tuple[str, str]]] = [[]]
    for token in tokens:
        if token[0] == ";":
            clauses.append([])
        else:
            clauses[-1].append(token)
    head = [t for t in clauses[0] if t[0] == "word"]
    if not head:
        raise ValueError("no authserv-id")
    result: dict[str, Any] = {"authserv_id": head[0][1], "results": [], "raw": value}
    for clause in clauses[1:]:
        words = [t for t in clause if t[0] != "comment"]
        comments = [t[1] for t in clause if t[0] == "comment"]
        if not words:
            continue
        if [w[1] for w in words] == ["none"]:
            continue
        if len(words) < 3 or words[1][0] != "=":
            raise ValueError(f"a result is not method=result: {' '.join(w[1] for w in words)}")
        entry: dict[str, Any] = {"method": words[0][1].lower(), "result": words[2][1].lower(),
                                 "reason": None, "properties": {},
                                 "comment": "; ".join(comments) or None}
        rest = words[3:]
        while rest:
            if len(rest) < 3 or rest[1][0] != "=":
                raise ValueError(f"a property is not name=value in {entry['method']}")
            key, val = rest[0][1], rest[2][1]
            if key.lower() == "reason":
                entry["reason"] = val
            else:
                entry["properties"][key] = val
            rest = rest[3:]
        result["results"].append(entry)
    return result
