"""What a policy request says about the client and the message: the attributes Postfix sends.

The names, their order and their meaning follow Postfix's SMTPD_POLICY_README.
Values Elemta does not know are sent empty, as Postfix sends them when they do
not apply (``etrn_domain``, ``ccert_*``, ``sasl_method``, ``sasl_sender``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any

from elemta import DNSError, Message, Recipient, Session, Transaction

log = logging.getLogger("elemta.policy")

RCPT = "RCPT"
END_OF_MESSAGE = "END-OF-MESSAGE"

#: the reverse lookup of a client (PTR, then the names' addresses) takes at most this long
CLIENT_NAME_TIMEOUT = 5.0
#: the PTR names checked against their addresses; more are ignored
MAX_PTR_NAMES = 4
UNKNOWN = "unknown"


def client_address(session: Session) -> str:
    """The client's address as Postfix writes it (an IPv4-mapped IPv6 address as IPv4)."""
    try:
        ip = ipaddress.ip_address(session.peer_ip)
    except ValueError:
        return session.peer_ip
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


async def lookup_client_names(resolver: Any, address: str) -> tuple[str, str]:
    """``(client_name, reverse_client_name)`` as Postfix computes them.

    ``reverse_client_name`` is the first PTR name of the address; ``client_name`` is a
    PTR name whose own addresses include the client's (forward-confirmed), else
    ``"unknown"``. Any DNS failure gives ``"unknown"`` (never an error: it is a fact for
    the policy service, not a reason to refuse mail). Bounded by
    :data:`CLIENT_NAME_TIMEOUT`.
    """
    try:
        async with asyncio.timeout(CLIENT_NAME_TIMEOUT):
            return await _names(resolver, address)
    except TimeoutError:
        log.debug("policy: reverse lookup of %s took longer than %g s", address,
                  CLIENT_NAME_TIMEOUT)
        return UNKNOWN, UNKNOWN


async def _names(resolver: Any, address: str) -> tuple[str, str]:
    try:
        ip = ipaddress.ip_address(address)
        names = [n.rstrip(".") for n in await resolver.ptr(address)]
    except (DNSError, ValueError):
        return UNKNOWN, UNKNOWN
    names = [n for n in names if n]
    if not names:
        return UNKNOWN, UNKNOWN
    for name in names[:MAX_PTR_NAMES]:
        try:
            addresses = await resolver.addresses(name)
        except (DNSError, ValueError):
            continue
        for a in addresses:
            try:
                if ipaddress.ip_address(a) == ip:
                    return name, names[0]
            except ValueError:
                continue
    return UNKNOWN, names[0]


def request_attributes(*, state: str, session: Session, tx: Transaction,
                       recipient: Recipient | None = None, message: Message | None = None,
                       client_names: tuple[str, str] = (UNKNOWN, UNKNOWN),
                       policy_context: str = "") -> dict[str, str]:
    """The attributes of one request, in Postfix's order.

    ``state`` is ``"RCPT"`` (with ``recipient``) or ``"END-OF-MESSAGE"`` (with
    ``message``). As in Postfix, ``recipient`` is sent at END-OF-MESSAGE only when the
    message has exactly one recipient, ``recipient_count`` is ``0`` at RCPT, and ``size``
    is the ``MAIL FROM`` ``SIZE=`` at RCPT and the received size at END-OF-MESSAGE.
    """
    if state == RCPT:
        rcpt = recipient.address if recipient is not None else ""
        count = 0
        size = tx.mail_params.get("SIZE") or "0"
    else:
        rcpt = tx.recipients[0].address if len(tx.recipients) == 1 else ""
        count = len(tx.recipients)
        size = str(message.size) if message is not None else tx.mail_params.get("SIZE") or "0"
    tls = session.tls
    local = session.local
    return {
        "request": "smtpd_access_policy",
        "protocol_state": state,
        "protocol_name": "ESMTP" if session.esmtp else "SMTP",
        "helo_name": session.helo or "",
        "queue_id": tx.id,
        "sender": tx.sender,
        "recipient": rcpt,
        "recipient_count": str(count),
        "client_address": client_address(session),
        "client_name": client_names[0],
        "reverse_client_name": client_names[1],
        "instance": tx.id,
        "sasl_method": "",
        "sasl_username": session.auth_user or "",
        "sasl_sender": "",
        "size": str(size),
        "ccert_subject": "",
        "ccert_issuer": "",
        "ccert_fingerprint": "",
        "ccert_pubkey_fingerprint": "",
        "encryption_protocol": tls.version if tls is not None else "",
        "encryption_cipher": tls.cipher if tls is not None else "",
        "encryption_keysize": str(tls.bits) if tls is not None else "0",
        "etrn_domain": "",
        "stress": "",
        "client_port": str(session.peer[1]) if len(session.peer) > 1 else "",
        "policy_context": policy_context,
        "server_address": str(local[0]) if local else "",
        "server_port": str(local[1]) if local and len(local) > 1 else "",
    }
