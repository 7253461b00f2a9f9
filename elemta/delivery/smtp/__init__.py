"""The outbound SMTP client: one connection to one address of an MX host, reused for many messages.

The same client speaks LMTP (RFC 2033) to a local delivery agent such as
Dovecot, over TCP or a unix socket: :meth:`SMTPConnection.open_lmtp`.

The caller has already resolved the MX and picked an address; this module never
resolves the names of mail hosts (``ip`` must be an IP literal), so every lookup
goes through the one shared resolver (an LMTP server's host name, a local
service, is left to the operating system). ``mx_host`` is the name the
certificate is checked against, the SNI, and the name in logs and results
(``mx.example[192.0.2.1]:25``).

It is a small client of its own on asyncio streams rather than a wrapper around
aiosmtplib. aiosmtplib does not pipeline (four round trips per message instead
of two), does not add SMTPUTF8 or BODY=8BITMIME for raw bytes and does not wrap
long lines; even without any of that it took about twice the CPU per message
(``bench/smtp_client.py`` measures both on the same load).

Behaviour worth knowing:

* **Per-recipient outcome, not exceptions.** :meth:`SMTPConnection.send` returns
  one :class:`RecipientResult` per recipient: the RCPT reply for a rejected
  recipient, the end-of-DATA reply for the accepted ones. A lost connection or
  a timeout becomes a temporary result for every recipient not yet decided.
  :class:`SMTPError` is raised only while opening a connection (and by
  :meth:`SMTPConnection.reset`).
* **PIPELINING** (RFC 2920): MAIL, every RCPT and DATA go out in one write and
  the replies are read in order. When DATA gets 354 although every RCPT failed,
  the content is not sent; a lone dot ends the empty transaction.
* **STARTTLS** by :class:`TLSPolicy`: ``opportunistic`` uses TLS when offered and,
  when the handshake fails, connects again and delivers in plaintext (Postfix's
  "may"); ``required`` and ``verify`` fail temporarily instead. ``verify`` also
  checks that the certificate is valid for ``mx_host``.
* **SMTPUTF8**: a message that needs it (the ``utf8`` flag, or a non-ASCII
  address) is not sent to a server that does not offer it; its recipients get
  ``553 5.6.7`` without anything being sent (RFC 6531 §3.2).
* **8-bit content without 8BITMIME is sent as it is.** RFC 6152 would have the
  client convert it; the alternative Postfix and most MTAs take is to send it
  and let the server cope, since every server met in practice accepts 8-bit
  data and a MIME down-conversion would break DKIM signatures.
* **SIZE**: the size is declared when the server advertises SIZE, and a message
  larger than the advertised limit fails with ``552 5.3.4`` without being sent.
* **Content** goes out with CRLF line ends (a bare LF or CR becomes CRLF),
  dot-stuffed, and ending in CRLF before the final dot. A line longer than 998
  octets is broken, as Postfix's ``smtp_line_length_limit`` does, by inserting
  CRLF SPACE, in headers and body alike: the space keeps a continuation from
  ever starting with a dot or looking like a MIME boundary, in a header it is
  folding. Where the line has a space or tab in its second half, the break goes
  before it and no character is added, so a folded header unfolds to the
  original. A hard break never splits a UTF-8 sequence. Files are read in
  chunks; a 20 MiB message never sits in memory whole.
* **Reuse**: after a completed transaction the server has reset itself (RFC 5321
  §4.1.1.4), so the next MAIL follows directly; after an aborted one a RSET is
  pipelined in front of the next MAIL. A 421 reply, a lost connection or a
  timeout makes the connection unusable (:attr:`SMTPConnection.usable`).
* **Timeouts** default to RFC 5321 §4.5.3.2 and Postfix's values; tests pass
  short ones (:meth:`Timeouts.uniform`).
* Credentials are sent only over TLS unless ``allow_plaintext_auth`` is set, and
  no command or reply of the AUTH exchange is ever logged.
* **LMTP** (:meth:`SMTPConnection.open_lmtp`): LHLO instead of EHLO (and no HELO
  fallback), never STARTTLS or AUTH, a TCP address or a unix socket, and after
  the final dot one reply per accepted recipient, in RCPT order (RFC 2033
  §4.2), so each recipient gets its own end-of-data result. A connection lost
  in the middle of those replies leaves the recipients already answered with
  their reply and makes the others temporary. Everything else (pipelining,
  BODY/SMTPUTF8/SIZE, content encoding, reuse, timeouts) is as for SMTP.

* **CHUNKING** (RFC 3030): content marked ``BODY=BINARYMIME`` goes in BDAT
  chunks, octet for octet, and only to a server that offers BINARYMIME and
  CHUNKING (otherwise ``554 5.6.3``, nothing sent; LMTP never takes it);
  with ``chunking=True`` text goes in BDAT chunks too whenever CHUNKING is
  offered (CRLF line ends and long lines wrapped as for DATA, no dot-stuffing).
  Chunks are 256 KiB, pipelined two deep when PIPELINING is offered; after a
  refused chunk nothing more is sent.
* **DSN** (RFC 3461): ``RET``/``ENVID`` on MAIL and ``NOTIFY``/``ORCPT`` on
  each RCPT go to a server that offers DSN, and only to one that does.

A connection is for one task at a time: ``send`` must not be called again before
the previous call returned.
"""

from __future__ import annotations

from .connection import SMTPConnection, lmtp_remote
from .encoding import DataEncoder
from .params import DSNParams
from .results import DeliveryResult, RecipientResult, SMTPError, default_enhanced
from .settings import Timeouts, TLSPolicy

__all__ = [
    "DSNParams",
    "DataEncoder",
    "DeliveryResult",
    "RecipientResult",
    "SMTPConnection",
    "SMTPError",
    "TLSPolicy",
    "Timeouts",
    "default_enhanced",
    "lmtp_remote",
]
