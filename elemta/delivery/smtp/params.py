"""RFC 3461 DSN parameters to pass on with a message, when the server offers DSN."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DSNParams:
    """``RET`` and ``ENVID`` for MAIL, and ``NOTIFY``/``ORCPT`` for each RCPT, in recipient order.

    Values are sent as stored (they were checked when the message was received);
    nothing is sent to a server that does not advertise DSN.
    """

    ret: str | None = None
    envid: str | None = None
    recipients: Sequence[Mapping[str, str | None]] = ()

    @classmethod
    def of(cls, mail_params: Mapping[str, str | None],
           recipients: Sequence[tuple[Mapping[str, str | None], str | None]]) -> DSNParams | None:
        """From an envelope: its MAIL parameters and, per recipient, ``(params, original)``.

        A recipient rewritten from another address (alias, redirect) without an
        ORCPT of its own gets ``ORCPT=rfc822;<original>`` (RFC 3461 §4.2), so
        the reports name the address the sender wrote. ``None`` when there is
        nothing to pass on.
        """
        per_rcpt = []
        for params, original in recipients:
            out = {k: params[k] for k in ("NOTIFY", "ORCPT") if params.get(k)}
            if "ORCPT" not in out and original:
                out["ORCPT"] = orcpt(original)
            per_rcpt.append(out)
        dsn = cls(mail_params.get("RET") or None, mail_params.get("ENVID") or None,
                  tuple(per_rcpt))
        if dsn.ret is None and dsn.envid is None and not any(per_rcpt):
            return None
        return dsn

    def mail(self, utf8: bool = True) -> str:
        """The MAIL parameters; without ``utf8`` (no SMTPUTF8 in this transaction) a
        non-ASCII ENVID is left out: servers want its xtext to decode to ASCII."""
        envid = self.envid if self.envid and (utf8 or self.envid.isascii()) else None
        return (f" RET={self.ret}" if self.ret else "") + (f" ENVID={envid}" if envid else "")

    def rcpt(self, index: int, utf8: bool = True) -> str:
        params = self.recipients[index] if index < len(self.recipients) else {}
        return "".join(f" {k}={_ascii_orcpt(params[k]) if k == 'ORCPT' and not utf8 else params[k]}"
                       for k in ("NOTIFY", "ORCPT") if params.get(k))


def _ascii_orcpt(value: str | None) -> str:
    """An ORCPT value without non-ASCII characters: RFC 6533 ``utf-8;`` with ``\\x{HEX}``."""
    assert value is not None
    if value.isascii():
        return value
    _type, _, address = value.partition(";")
    return "utf-8;" + "".join(c if c.isascii() else f"\\x{{{ord(c):X}}}" for c in address)


def orcpt(address: str) -> str:
    """An ORCPT value for ``address``: ``rfc822;`` xtext, or RFC 6533 ``utf-8;`` with
    ``\\x{HEX}`` for non-ASCII characters, so the value stays ASCII either way."""
    if address.isascii():
        return "rfc822;" + xtext(address)
    return "utf-8;" + xtext("".join(c if c.isascii() else f"\\x{{{ord(c):X}}}" for c in address))


def xtext(text: str) -> str:
    """RFC 3461 §4 xtext: "+", "=", controls and spaces as ``+HH``; non-ASCII kept (RFC 6533)."""
    return "".join(f"+{ord(c):02X}" if c in "+=" or (c.isascii() and not "!" <= c <= "~")
                   else c for c in text)
