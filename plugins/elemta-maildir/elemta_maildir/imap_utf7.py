"""IMAP's modified UTF-7 (RFC 3501 §5.1.3): how Maildir++ folder names are spelled on disk.

Printable ASCII stands for itself, except ``&``, written ``&-``. Every other
run of characters is written ``&`` + base64 of its UTF-16BE + ``-``, with
``,`` for ``/`` and no ``=`` padding: ``café`` is ``caf&AOk-``.

:func:`decode` accepts only the one spelling :func:`encode` produces. Dovecot
opens a folder by encoding its name, so a directory spelled any other way
(``.café``, ``.r&d``, ``.&AGE-`` for ``a``) is not a folder it can open, and
not one it counts for the quota.
"""

from __future__ import annotations

import base64
import binascii
import re

_BASE64 = re.compile(r"[A-Za-z0-9+,]+")


def _is_direct(ch: str) -> bool:
    return " " <= ch <= "~"


def encode(name: str) -> str:
    """``name`` in modified UTF-7; ``UnicodeEncodeError`` for a lone surrogate."""
    out: list[str] = []
    start = 0
    while start < len(name):
        ch = name[start]
        if _is_direct(ch):
            out.append("&-" if ch == "&" else ch)
            start += 1
            continue
        end = start + 1
        while end < len(name) and not _is_direct(name[end]):
            end += 1
        raw = name[start:end].encode("utf-16-be")
        out.append("&" + base64.b64encode(raw).decode("ascii").rstrip("=").replace("/", ",")
                   + "-")
        start = end
    return "".join(out)


def decode(text: str) -> str:
    """The name ``text`` spells; ``ValueError`` unless it is exactly ``encode(name)``."""
    out: list[str] = []
    start = 0
    while start < len(text):
        ch = text[start]
        if not _is_direct(ch):
            raise ValueError(f"{text!r}: {ch!r} is not printable ASCII")
        if ch != "&":
            out.append(ch)
            start += 1
            continue
        end = text.find("-", start + 1)
        if end < 0:
            raise ValueError(f"{text!r}: '&' without its closing '-'")
        run = text[start + 1:end]
        if not run:
            out.append("&")
        elif not _BASE64.fullmatch(run):
            raise ValueError(f"{text!r}: {run!r} is not modified base64")
        else:
            try:
                raw = base64.b64decode(run.replace(",", "/") + "=" * (-len(run) % 4),
                                       validate=True)
            except binascii.Error:
                raise ValueError(f"{text!r}: {run!r} is not modified base64") from None
            out.append(raw.decode("utf-16-be"))  # UnicodeDecodeError is a ValueError
        start = end + 1
    name = "".join(out)
    if encode(name) != text:
        raise ValueError(f"{text!r} is not the modified UTF-7 of {name!r}")
    return name
