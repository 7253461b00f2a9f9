"""Built-in relay policy: no open relay.

A recipient is accepted when its domain is one of ``[domains]`` (we are its
MX), or when the session may relay: it authenticated, its client address is in
``[server] relay_networks``, or a ``connect`` plugin set
``session.relay_allowed``. Everything else is ``550 5.7.1``. (Postmaster is
accepted by the core before any plugin is asked.) It runs last
(``trylast``), so a plugin that knows better (a datasource that rejects unknown
users, a relay allow-list) answers first.
"""

from __future__ import annotations

import ipaddress

from .config import Settings
from .hookspecs import hookimpl
from .models import Recipient, Session
from .verdicts import Accept, Reject

RELAY_DENIED = Reject(550, "5.7.1", "Relaying denied")
ACCEPT = Accept()


class RelayPolicy:
    def __init__(self, settings: Settings) -> None:
        self.local_domains = settings.local_domains
        self.networks = tuple(ipaddress.ip_network(n, strict=False)
                              for n in settings.server.relay_networks)

    def may_relay(self, session: Session) -> bool:
        if session.auth_user is not None or session.relay_allowed:
            return True
        if not self.networks:
            return False
        try:
            ip = ipaddress.ip_address(session.peer_ip)
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.networks)

    @hookimpl(trylast=True)
    def rcpt(self, session: Session, recipient: Recipient) -> Accept | Reject:
        if recipient.domain in self.local_domains:
            return ACCEPT
        if self.may_relay(session):
            return ACCEPT
        return RELAY_DENIED


def make_plugin(settings: Settings) -> RelayPolicy:
    return RelayPolicy(settings)
