"""Built-in TLS: the certificate in ``[tls] cert_file``/``key_file``, or a self-signed one.

Without configured files a self-signed certificate for ``[server] hostname`` is
generated under ``[server] state_dir``, so STARTTLS works out of the box. Every
TLS listener shares one context, so :meth:`StaticTLS.reload` (SIGHUP) changes
the certificate of all of them at once. A certificate plugin (ACME) answers
``tls_context`` first to take over.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from .config import ListenerSettings, Settings
from .hookspecs import hookimpl
from .smtp.tls import TLSConfigError, ensure_self_signed, reload_context, server_context

log = logging.getLogger("elemta.tls")


class StaticTLS:
    """One server's certificate files and the context built from them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.context: ssl.SSLContext | None = None

    def _certificate_files(self) -> tuple[Path, Path]:
        """The certificate and key in use; raises TLSConfigError naming the config key."""
        settings = self.settings
        tls = settings.tls
        if tls.cert_file is not None and tls.key_file is not None:
            return settings.resolve(tls.cert_file), settings.resolve(tls.key_file)
        try:
            return ensure_self_signed(settings.resolve(settings.server.state_dir),
                                      settings.server.hostname)
        except TLSConfigError as e:
            raise TLSConfigError(f"{settings.source}: [server] state_dir: {e}") from None

    @hookimpl(trylast=True)
    def tls_context(self, listener: ListenerSettings) -> ssl.SSLContext | None:
        if listener.tls == "none":
            return None
        if self.context is None:
            cert_file, key_file = self._certificate_files()
            try:
                self.context = server_context(cert_file, key_file,
                                              min_version=self.settings.tls.min_version,
                                              ciphers=self.settings.tls.ciphers)
            except TLSConfigError as e:
                raise TLSConfigError(f"{self.settings.source}: [tls]: {e}") from None
        return self.context

    def reload(self) -> bool:
        """Load the certificate files again for new connections on every listener (SIGHUP).

        Re-reads ``[tls] cert_file``/``key_file``, or renews the self-signed
        certificate when it is due. Returns False and logs why when the files
        cannot be used; the certificate in service then stays. Returns True when
        no listener uses TLS.
        """
        if self.context is None:
            return True
        try:
            cert_file, key_file = self._certificate_files()
            certificate = reload_context(self.context, cert_file, key_file)
        except TLSConfigError as e:
            log.error("TLS: certificate not reloaded, new connections keep the current one: %s",
                      e)
            return False
        log.info("TLS: new connections use %s (serial %x, expires %s)", cert_file,
                 certificate.serial_number, certificate.not_valid_after_utc.date())
        return True


def make_plugin(settings: Settings) -> StaticTLS:
    return StaticTLS(settings)
