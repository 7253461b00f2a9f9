"""Milter macros: which ones are sent at each stage, and their values from the session.

The defaults follow Postfix's ``milter_*_macros`` plus the connection facts Sendmail
sends. A milter may ask for other lists with SMFIR_SETSYMLIST in its negotiation
reply; it then gets exactly the macros it named, of those :func:`value` knows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from elemta import Recipient, Session, StashKey, Transaction

from . import protocol as p

# the SASL mechanism of the session's last AUTH (recorded by the plugin's auth hooks)
AUTH_TYPE = StashKey[str]()

DEFAULTS: dict[int, tuple[str, ...]] = {
    p.STAGE_CONNECT: ("j", "{daemon_name}", "{daemon_addr}", "{daemon_port}", "{if_name}",
                      "{if_addr}", "v", "_", "{client_addr}", "{client_port}",
                      "{client_name}", "{client_ptr}"),
    p.STAGE_HELO: ("{tls_version}", "{cipher}", "{cipher_bits}"),
    p.STAGE_MAIL: ("i", "{auth_type}", "{auth_authen}", "{mail_addr}", "{mail_host}",
                   "{mail_mailer}"),
    p.STAGE_RCPT: ("i", "{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}"),
    p.STAGE_DATA: ("i",),
    p.STAGE_EOH: ("i",),
    p.STAGE_EOM: ("i",),
}

@dataclass
class Facts:
    """What the macros are made of, gathered as the session goes."""

    hostname: str                       # this server ([server] hostname): j, {if_name}
    version: str                        # v
    local_domains: frozenset[str]       # for {rcpt_mailer}: local or smtp
    client_name: str = "unknown"        # verified client host name, or "unknown"
    client_ptr: str | None = None       # the PTR name, verified or not
    extra: dict[str, str] = field(default_factory=dict)


def value(name: str, facts: Facts, session: Session, tx: Transaction | None = None,
          recipient: Recipient | None = None) -> str | None:
    """The value of macro ``name`` (canonical form), or ``None`` when it has none now."""
    tls = session.tls
    match name:
        case "j" | "{if_name}":
            return facts.hostname
        case "v":
            return facts.version
        case "{daemon_name}":
            return session.listener.name
        case "{daemon_addr}" | "{if_addr}":
            return session.local[0]
        case "{daemon_port}":
            return str(session.local[1])
        case "_":
            return f"{facts.client_name} [{session.peer_ip}]"
        case "{client_addr}":
            return session.peer_ip
        case "{client_port}":
            return str(session.peer[1])
        case "{client_name}":
            return facts.client_name
        case "{client_ptr}":
            return facts.client_ptr or facts.client_name
        case "{tls_version}":
            return tls.version if tls else None
        case "{cipher}":
            return tls.cipher if tls else None
        case "{cipher_bits}":
            return str(tls.bits) if tls else None
        case "{auth_authen}":
            return session.auth_user
        case "{auth_type}":
            return session.stash.get(AUTH_TYPE, None) if session.auth_user else None
        case "i":
            return tx.id if tx is not None else None
        case "{mail_addr}":
            return tx.sender if tx is not None else None
        case "{mail_host}":
            return (tx.sender_domain or None) if tx is not None else None
        case "{mail_mailer}":
            return ("local" if tx.sender == "" else "smtp") if tx is not None else None
        case "{rcpt_addr}":
            return recipient.address if recipient is not None else None
        case "{rcpt_host}":
            return recipient.domain if recipient is not None else None
        case "{rcpt_mailer}":
            if recipient is None:
                return None
            return "local" if recipient.domain.rstrip(".") in facts.local_domains else "smtp"
    return facts.extra.get(name)


def for_stage(stage: int, requested: dict[int, tuple[str, ...]], facts: Facts,
              session: Session, tx: Transaction | None = None,
              recipient: Recipient | None = None) -> list[tuple[str, str]]:
    """The (name, value) pairs to send before the command of ``stage``."""
    names = requested.get(stage, DEFAULTS[stage])
    out = []
    for name in names:
        v = value(name, facts, session, tx, recipient)
        if v is not None:
            out.append((name, v))
    return out
