"""Built-in TLS: the certificate in ``[tls] cert_file``/``key_file``, or a self-signed one.

Without configured files a self-signed certificate for ``[server] hostname`` is
generated under ``[server] state_dir``, so STARTTLS works out of the box. Every
TLS listener gets the same context. The server asks ``tls_context`` again on
every reload (SIGHUP): the files are read again, and when they changed, or the
self-signed certificate is due for renewal, a new context is built and
returned, which new connections then use.
When the new files cannot be used, the error is logged and the context in
service stays. A certificate plugin (ACME) answers ``tls_context`` first to take
over.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import ssl
from pathlib import Path

from .config import ListenerSettings, Settings
from .hookspecs import hookimpl
from .smtp.tls import SELF_SIGNED_RENEW_BEFORE, TLSConfigError, ensure_self_signed, server_context

log = logging.getLogger("elemta.tls")

_Signature = bytes


class StaticTLS:
    """One server's certificate files and the context built from them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.context: ssl.SSLContext | None = None
        self._files: tuple[Path, Path] | None = None
        self._signature: _Signature = b""
        self._renew_at: datetime.datetime | None = None  # self-signed only
        self._read_early = False

    def read_configured(self) -> None:
        """Build the context from ``[tls] cert_file``/``key_file`` now, while the key can be
        read (as root, before the server drops privileges): ``tls_context`` answers it
        without reading the files again until the next reload (:meth:`reloading`)."""
        if self._configured() and self.context is None:
            self.context = self._build()
            self._read_early = True

    def reloading(self) -> None:
        """A reload (SIGHUP) begins: look at the files again."""
        self._read_early = False

    @hookimpl(trylast=True)
    def tls_context(self, listener: ListenerSettings) -> ssl.SSLContext | None:
        if listener.tls == "none":
            return None
        if self._read_early:
            return self.context
        if self.context is not None and not self._changed():
            return self.context
        if self.context is None:
            self.context = self._build()  # at start-up a mistake stops the server
            return self.context
        try:
            self.context = self._build()
        except TLSConfigError as e:
            log.error("TLS: certificate not reloaded, new connections keep the current one: %s",
                      e)
            # not retried until the files change again
            self._signature = self._read(*self._files) if self._files else b""
        return self.context

    def _configured(self) -> bool:
        tls = self.settings.tls
        return tls.cert_file is not None and tls.key_file is not None

    def _changed(self) -> bool:
        """Whether the files in use changed, or the self-signed certificate is due."""
        if self._renew_at is not None and datetime.datetime.now(datetime.timezone.utc) \
                >= self._renew_at:
            return True
        if self._files is None:
            return True
        return self._read(*self._files) != self._signature

    @staticmethod
    def _read(*paths: Path) -> _Signature:
        """A digest of the files' contents (a few KiB, read only when asked again)."""
        digest = hashlib.sha256()
        for path in paths:
            try:
                digest.update(Path(path).read_bytes())
            except OSError as e:
                digest.update(f"unreadable: {e.errno}".encode())
            digest.update(b"\0")
        return digest.digest()

    def _certificate_files(self) -> tuple[Path, Path]:
        """The certificate and key to use; raises TLSConfigError naming the config key."""
        settings = self.settings
        tls = settings.tls
        if tls.cert_file is not None and tls.key_file is not None:
            return settings.resolve(tls.cert_file), settings.resolve(tls.key_file)
        try:
            return ensure_self_signed(settings.resolve(settings.server.state_dir),
                                      settings.server.hostname)
        except TLSConfigError as e:
            raise TLSConfigError(f"{settings.source}: [server] state_dir: {e}") from None

    def _build(self) -> ssl.SSLContext:
        cert_file, key_file = self._certificate_files()
        signature = self._read(cert_file, key_file)
        try:
            context, certificate = server_context(cert_file, key_file,
                                                  min_version=self.settings.tls.min_version,
                                                  ciphers=self.settings.tls.ciphers)
        except TLSConfigError as e:
            raise TLSConfigError(f"{self.settings.source}: [tls]: {e}") from None
        self._files, self._signature = (cert_file, key_file), signature
        self._renew_at = None if self._configured() else (
            certificate.not_valid_after_utc - SELF_SIGNED_RENEW_BEFORE)
        log.info("TLS: new connections use %s (serial %x, expires %s)", cert_file,
                 certificate.serial_number, certificate.not_valid_after_utc.date())
        return context


def make_plugin(settings: Settings) -> StaticTLS:
    return StaticTLS(settings)
