"""elemta-maildir: deliver local mail into Dovecot-compatible Maildir++ mailboxes.

Enabled as ``maildir``; the core makes one :class:`MaildirPlugin` per server.
It answers ``deliver`` for routes whose transport is ``[plugins.maildir]
transport`` (``"local"``, the built-in route for local domains) and leaves
every other route to other transports. The hooks live in
:mod:`elemta_maildir.plugin`, the rules in :mod:`elemta_maildir.delivery`.

The package itself imports nothing: its helper process imports
:mod:`elemta_maildir.helper` through it and needs neither the hooks (asyncio)
nor the settings (pydantic). Both load when first asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .plugin import MaildirPlugin
    from .settings import MaildirSettings

__all__ = ["MaildirPlugin", "MaildirSettings"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "MaildirPlugin":
        from .plugin import MaildirPlugin
        return MaildirPlugin
    if name == "MaildirSettings":
        from .settings import MaildirSettings
        return MaildirSettings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
