"""Where passwords are checked: the contract of a password source.

The datasource answers the ``auth`` hook by asking one password source,
chosen by ``[plugins.datasource.auth] source``:

* ``"directory"``: hashes stored with the users of the directory (SQLite,
  PostgreSQL or the TOML file); ``elemta users`` sets them.
* ``"passwd-file"``: a Dovecot passwd-file, read-only.
* ``"ldap"``: an LDAP server; the password is checked by binding as the user.
* ``"dovecot"``: a running Dovecot's authentication service, over its socket.

What a user may do once logged in (the addresses they may send as, their
message size and daily quota, whether they are disabled) always comes from
the directory, whatever the source.
"""

from __future__ import annotations

from typing import Protocol


class PasswordSource(Protocol):
    """Checks a login and a password. Every method may raise ``BackendUnavailable``."""

    #: Whether ``elemta users passwd`` can write passwords here (and logins upgrade
    #: old hashes to argon2id).
    writable: bool

    async def open(self) -> None:
        """Get ready (connect, read a file); ``BackendUnavailable`` if it cannot now."""

    async def close(self) -> None:
        """Release connections and threads."""

    async def verify(self, login: str, password: str, *, peer_ip: str, secured: bool,
                     local_ip: str | None = None) -> str | None:
        """The canonical login if ``password`` is right for ``login``, else ``None``.

        ``None`` for an unknown login and a wrong password alike, in about
        the same time. ``peer_ip``, ``local_ip`` (the address the client
        connected to) and ``secured`` (the client's connection is encrypted)
        are for sources that log or decide on them (Dovecot).
        A temporary failure (server down, time-out) raises
        ``BackendUnavailable``, which the client sees as ``454 4.7.0``.
        """
