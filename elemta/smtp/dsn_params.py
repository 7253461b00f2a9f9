"""The DSN parameters of MAIL and RCPT (RFC 3461 §4), checked as they arrive.

``RET=FULL|HDRS`` and ``ENVID=<xtext>`` on MAIL, ``NOTIFY=NEVER|SUCCESS,FAILURE,DELAY``
and ``ORCPT=<addr-type>;<xtext>`` on RCPT. Each is kept as the client wrote it
(keywords upper-cased), in the transaction's parameters, so the spool envelope
holds them (``mail_params`` and each recipient's ``params``) and the relay
passes them on unchanged. With SMTPUTF8 a value may also hold UTF-8 characters
(RFC 6533 §3); without it, the address parser has already refused them.
"""

from __future__ import annotations

import re

from . import replies
from .replies import Reply

MAX_ENVID_CHARS = 100    # RFC 3461 §4.4
MAX_ORCPT_CHARS = 500    # RFC 3461 §4.2

# xtext: "!".."~" except "+" and "=", or "+" and two upper-case hex digits;
# non-ASCII characters are allowed here and checked by the parser (SMTPUTF8 only).
_XTEXT = re.compile(r"(?:[!-*,-<>-~\u0080-\U0010ffff]|\+[0-9A-F]{2})+")
_ADDR_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*", re.ASCII)
_NOTIFY_WORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})


def is_xtext(value: str) -> bool:
    return _XTEXT.fullmatch(value) is not None


def check_mail(params: dict[str, str | None]) -> Reply | None:
    """Check and normalise RET and ENVID in place; the refusal, if any."""
    ret = params.get("RET", "")
    if ret != "":
        if ret is None or ret.upper() not in ("FULL", "HDRS"):
            return replies.RET_SYNTAX
        params["RET"] = ret.upper()
    envid = params.get("ENVID", "")
    if envid != "":
        if envid is None or len(envid) > MAX_ENVID_CHARS or not is_xtext(envid):
            return replies.ENVID_SYNTAX
    return None


def check_rcpt(params: dict[str, str | None]) -> Reply | None:
    """Check and normalise NOTIFY and ORCPT in place; the refusal, if any."""
    if "NOTIFY" in params:
        value = params["NOTIFY"]
        if value is None:
            return replies.NOTIFY_SYNTAX
        words = [w.upper() for w in value.split(",")]
        if words == ["NEVER"]:
            params["NOTIFY"] = "NEVER"
        elif not words or len(set(words)) != len(words) or not set(words) <= _NOTIFY_WORDS:
            return replies.NOTIFY_SYNTAX
        else:
            params["NOTIFY"] = ",".join(words)
    if "ORCPT" in params:
        value = params["ORCPT"]
        if value is None or len(value) > MAX_ORCPT_CHARS:
            return replies.ORCPT_SYNTAX
        addr_type, sep, address = value.partition(";")
        if not sep or _ADDR_TYPE.fullmatch(addr_type) is None or not is_xtext(address):
            return replies.ORCPT_SYNTAX
    return None
