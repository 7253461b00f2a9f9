"""Logging on the stdlib: one line per record, text or JSON, secrets redacted.

Structured fields travel in ``extra={"fields": {...}}``; :func:`kv` and
:func:`bind` are shorthands. Text lines look like::

    2026-11-21T18:00:00.123Z info elemta.smtp message accepted id=4f2a size=1834

JSON lines carry ``ts``, ``level``, ``logger``, ``msg`` and the fields.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Mapping, MutableMapping, TextIO

from elemta.config import LogSettings

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO,
           "warning": logging.WARNING, "error": logging.ERROR}
REDACTED = "***"

# Substring match on purpose: "smtp_password", "api_token" and "db_secret" are
# the same secret under another name. Over-redacting costs a useless log value;
# under-redacting leaks a credential.
_SECRET_KEY = re.compile(r"passw(?:or)?d|pwd|secret|token|credential", re.IGNORECASE)
_SECRET_IN_TEXT = re.compile(
    # AUTH with an initial response: the payload is base64 of user and password.
    r"(?P<auth>\bAUTH\s+(?:PLAIN|LOGIN|XOAUTH2|OAUTHBEARER|CRAM-MD5|DIGEST-MD5|NTLM|GSSAPI"
    r"|SCRAM-[A-Z0-9-]+)\s+)\S+"
    # key=value / key: value written into a message by hand; no leading name
    # pattern, so a long base64 line costs linear time, and "smtp_password="
    # still matches at "password=".
    r"|(?P<kv>(?:passw(?:or)?d|secret|token|credentials?)[\w.-]*['\"]?\s*[=:]\s*)"
    r"(?:\"[^\"]*\"|'[^']*'|[^\s,;&]+)",
    re.IGNORECASE)


# Every match of _SECRET_IN_TEXT contains one of these (case-insensitively), or
# "auth" followed by white space: most log lines contain none, and these tests
# cost a tenth of the scan. ("auth" alone would send every "queued ... auth=-"
# line through it: 9.5 µs a message instead of 0.5.)
_TRIGGERS = ("passw", "secret", "token", "credential")
_AUTH_TRIGGER = re.compile(r"auth\s").search


def redact_text(text: str) -> str:
    """``text`` with AUTH payloads and ``password=...``-style values replaced by ``***``."""
    folded = text.casefold()   # as re.IGNORECASE matches: "ſecret", "TO\u212aEN"
    if not (any(t in folded for t in _TRIGGERS)
            or ("auth" in folded and _AUTH_TRIGGER(folded))):
        return text
    return _SECRET_IN_TEXT.sub(_redact_match, text)


def _redact_match(m: re.Match[str]) -> str:
    return (m.group("auth") or m.group("kv")) + REDACTED


def redact_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``fields`` with secret-named values (at any depth) replaced by ``***``."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if _SECRET_KEY.search(str(key)):
            out[key] = REDACTED
        elif isinstance(value, Mapping):
            out[key] = redact_fields(value)
        elif isinstance(value, str):
            out[key] = redact_text(value)
        else:
            out[key] = value
    return out


class RedactingFilter(logging.Filter):
    """Keeps passwords out of the log, whatever the caller wrote.

    Installed on the handler, not a logger: logger filters do not see records
    propagated from child loggers, and plugins log under their own names.
    The record is rewritten in place (message rendered, ``args`` dropped, a
    traceback formatted and redacted) so every later formatter sees the safe text.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        # Rendering once here also spares the formatter a second %-formatting.
        record.msg, record.args = redact_text(record.getMessage()), None
        fields = getattr(record, "fields", None)
        if fields:
            record.fields = redact_fields(fields)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True


class _AiosmtpdNoise(logging.Filter):
    """aiosmtpd warns on every AUTH that its own code touches ``Session.login_data``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str)
                    and record.msg.startswith("Session.login_data is deprecated"))


# the formatted second of the last record: most lines share it (strftime is 1 µs a line)
_SECOND: tuple[int, str] = (-1, "")


def _timestamp(record: logging.LogRecord) -> str:
    global _SECOND
    second = int(record.created)
    cached = _SECOND  # one read: another thread may replace it meanwhile
    if cached[0] != second:
        cached = _SECOND = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{cached[1]}.{int(record.msecs):03d}Z"


def _plain(value: Any) -> str:
    if isinstance(value, str):
        s = value
    elif isinstance(value, bool):
        s = "true" if value else "false"
    elif value is None:
        s = "null"
    elif isinstance(value, (int, float)):
        return str(value)
    else:
        s = str(value)
    if not s or any(c in s for c in ' "=\\\r\n\t'):
        return json.dumps(s, ensure_ascii=False)
    return s


class TextFormatter(logging.Formatter):
    """``<ts> <level> <logger> <message> key=value...``; one line unless a traceback follows."""

    def format(self, record: logging.LogRecord) -> str:
        # CR/LF in a message (a client's HELO name, a header) must not forge a new line.
        message = record.getMessage().replace("\r", "\\r").replace("\n", "\\n")
        parts = [_timestamp(record), record.levelname.lower(), record.name, message]
        fields = getattr(record, "fields", None)
        if fields:
            parts.extend(f"{_plain_key(k)}={_plain(v)}" for k, v in fields.items())
        line = " ".join(parts)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def _plain_key(key: Any) -> str:
    return re.sub(r"[^\w.-]", "_", str(key)) or "_"


class JSONFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg``, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            for key, value in fields.items():
                key = str(key)
                # A field never overwrites the envelope a log pipeline parses on.
                out[f"field.{key}" if key in out else key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out.setdefault("exc", record.exc_text)
        if record.stack_info:
            out.setdefault("stack", self.formatStack(record.stack_info))
        return json.dumps(out, ensure_ascii=False, default=str)


def setup_logging(settings: LogSettings, stream: TextIO | None = None, *,
                  path: Path | None = None) -> logging.Handler:
    """Send all logging to ``stream`` (stderr), or to the file ``path``, in
    ``settings.format`` at ``settings.level``.

    Calling it again replaces the handler it installed before, so tests and a
    config reload never double the output. Returns the installed handler. A log
    file is created mode 0640 and appended to; :func:`reopen` opens it again
    (SIGUSR1, after logrotate moved it away).
    """
    level = _LEVELS[settings.level]
    # Neither formatter prints the caller, thread or process: do not collect
    # them (the logging HOWTO's "Optimization"; a frame walk per record).
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler: logging.Handler
    if path is not None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        os.close(fd)  # created with the mode; FileHandler opens it by name
        handler = logging.FileHandler(path, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JSONFormatter() if settings.format == "json" else TextFormatter())
    handler.addFilter(RedactingFilter())
    handler._elemta = True  # type: ignore[attr-defined]

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_elemta", False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("elemta").setLevel(level)

    # aiosmtpd logs every client line at INFO/DEBUG, AUTH LOGIN's bare base64
    # password included, where no pattern can recognise it: keep it at WARNING
    # even when the operator asks for debug.
    for name in ("mail.log", "mail.debug"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING)
        if not any(isinstance(f, _AiosmtpdNoise) for f in logger.filters):
            logger.addFilter(_AiosmtpdNoise())
    return handler


def reopen(handler: logging.Handler) -> None:
    """Open a log file again under its name (a no-op for stderr): the next line goes to
    the new file logrotate expects, and nothing is lost or written to the moved one."""
    if isinstance(handler, logging.FileHandler):
        handler.acquire()
        try:
            old, handler.stream = handler.stream, handler._open()
            if old is not None:
                old.close()
        finally:
            handler.release()
        logging.getLogger("elemta").info("log file %s reopened", handler.baseFilename)


def kv(logger: logging.Logger | logging.LoggerAdapter[Any], level: int, msg: str, /,
       **fields: Any) -> None:
    """Log ``msg`` with structured ``fields``: ``kv(log, logging.INFO, "queued", id=qid)``."""
    if logger.isEnabledFor(level):
        logger.log(level, msg, extra={"fields": fields}, stacklevel=2)


class FieldsAdapter(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger that adds the same fields (a session id, a peer) to every record."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = kwargs.get("extra") or {}
        fields = dict(self.extra or {})
        fields.update(extra.get("fields") or {})
        kwargs["extra"] = {**extra, "fields": fields}
        return msg, kwargs


def bind(logger: logging.Logger, **fields: Any) -> FieldsAdapter:
    """``bind(log, session="a1b2", peer="192.0.2.1")``: every record gets these fields."""
    return FieldsAdapter(logger, fields)
