"""Elemta: a plugin-driven mail filter pipeline server.

This module is Elemta's public API: everything a plugin needs is importable
from ``elemta`` (and, for tests, from ``elemta.testing``), and nothing else is
promised. Submodules (``elemta.spool``, ``elemta.smtp``…) are private: they
change without notice. ``docs/plugins.md`` ("Public API") lists every name.

``__api_version__`` is ``MAJOR.MINOR``: MINOR grows when names or hooks are
added; MAJOR grows when a public name goes away or changes meaning, or a hook
loses an argument or changes its dispatch. A plugin written for ``1.x`` works
with every ``1.y``, ``y >= x``.

The names of the contract (hooks, verdicts, the objects hooks receive) load
with the package; the rest (the server, settings, DNS, durable files, the
SMTP/LMTP client, command-line helpers) load when first used, so that a
plugin module imports quickly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .hookspecs import hookimpl
from .models import (AuthResult, Credentials, DkimKey, Message, Outcome, Recipient, Route,
                     ScramKeys, Session, TLSInfo, Transaction, new_id)
from .spool.envelope import DELIVERED, FAILED, PENDING, Envelope, RecipientState
from .stash import Stash, StashKey
from .verdicts import Accept, Discard, Disconnect, Quarantine, Reject, TempFail, Verdict

if TYPE_CHECKING:
    from .app import App, StartupError
    from .cli.context import current_settings, plugin_settings
    from .config import ConfigError, ListenerSettings, Secret, Settings, load_settings
    from .cli.plugin_control import control_request
    from .control import ControlError, ServerNotRunning
    from .delivery.smtp import (DeliveryResult, RecipientResult, SMTPConnection, SMTPError,
                                Timeouts, TLSPolicy, default_enhanced, lmtp_remote)
    from .dns import (MX, DNSError, InvalidName, NoData, NotFound, NullMX, NXDomain, Resolver,
                      TempError)
    from .durable import (check_write_back, fsync_dir, have_syncfs, sync_data, syncfs,
                          write_all, write_file_durably)
    from .helper_process import (HELPER_READY, HelperGone, HelperProcess, helper_answers,
                                 helper_start, receive_request)
    from .hookcall import HookFailure
    from .metrics import BoundedLabels
    from .state import Rate, StateEntry, StateStore, StateUnavailable, state_store
    from .webservice import (check_secret, check_service_url, existing_ca_file,
                             plain_http_host, service_origin, service_tls_context, sign_body)

__version__ = "0.1.0"
__api_version__ = "1.6"

# name → the private module it comes from, imported on first use
_LAZY = {
    "App": "app", "StartupError": "app",
    "current_settings": "cli.context", "plugin_settings": "cli.context",
    "ConfigError": "config", "ListenerSettings": "config", "Secret": "config",
    "Settings": "config", "load_settings": "config",
    "ControlError": "control", "ServerNotRunning": "control",
    "control_request": "cli.plugin_control",
    "DeliveryResult": "delivery.smtp", "RecipientResult": "delivery.smtp",
    "SMTPConnection": "delivery.smtp", "SMTPError": "delivery.smtp", "Timeouts": "delivery.smtp",
    "TLSPolicy": "delivery.smtp", "default_enhanced": "delivery.smtp",
    "lmtp_remote": "delivery.smtp",
    "MX": "dns", "DNSError": "dns", "InvalidName": "dns", "NoData": "dns", "NotFound": "dns",
    "NullMX": "dns", "NXDomain": "dns", "Resolver": "dns", "TempError": "dns",
    "fsync_dir": "durable", "sync_data": "durable", "write_all": "durable",
    "syncfs": "durable", "have_syncfs": "durable", "check_write_back": "durable",
    "write_file_durably": "durable",
    "HookFailure": "hookcall",
    "HelperProcess": "helper_process", "HelperGone": "helper_process",
    "helper_start": "helper_process", "receive_request": "helper_process",
    "helper_answers": "helper_process", "HELPER_READY": "helper_process",
    "BoundedLabels": "metrics",
    "check_secret": "webservice", "check_service_url": "webservice",
    "existing_ca_file": "webservice", "plain_http_host": "webservice",
    "service_origin": "webservice", "service_tls_context": "webservice",
    "sign_body": "webservice",
    "Rate": "state", "StateStore": "state", "StateUnavailable": "state", "StateEntry": "state",
    "state_store": "state",
}

__all__ = sorted([
    # the contract
    "hookimpl",
    "Verdict", "Accept", "Reject", "TempFail", "Disconnect", "Discard", "Quarantine",
    "Session", "Transaction", "Recipient", "Message", "AuthResult", "Credentials", "ScramKeys",
    "DkimKey", "TLSInfo", "Route", "Outcome", "Envelope", "RecipientState", "PENDING", "DELIVERED",
    "FAILED",
    "Stash", "StashKey", "new_id",
    *_LAZY,
])


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'elemta' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
