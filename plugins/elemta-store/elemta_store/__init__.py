"""elemta-store: a delivery transport into a searchable message store.

Enabled as ``store``; the core makes one :class:`StorePlugin` per server. It
routes the recipients ``[plugins.store]`` names to its transport and answers
``deliver`` for that transport by writing each message, its envelope, parsed
headers and searchable text into SQLite (or PostgreSQL). :mod:`elemta_store.api`
is the query API; :func:`current_store` is the store the running plugin uses.
"""

from __future__ import annotations

from .api import (Event, Page, StoredEnvelope, StoredMessage, Store, StoreError, Subscription,
                  Summary, current_store)
from .plugin import StorePlugin
from .settings import StoreSettings

__all__ = ["Event", "Page", "Store", "StoreError", "StorePlugin", "StoreSettings",
           "StoredEnvelope", "StoredMessage", "Subscription", "Summary", "current_store"]
__version__ = "0.1.0"
