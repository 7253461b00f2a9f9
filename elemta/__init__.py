"""Elemta: a plugin-driven mail filter pipeline server."""

from .hookspecs import hookimpl
from .models import (AuthResult, Credentials, Message, Outcome, Recipient, Route, Session, TLSInfo,
                     Transaction)
from .stash import Stash, StashKey
from .verdicts import Accept, Discard, Disconnect, Quarantine, Reject, TempFail, Verdict

__version__ = "0.1.0"

__all__ = [
    "Accept", "AuthResult", "Credentials", "Discard", "Disconnect", "Message", "Outcome",
    "Quarantine", "Recipient", "Reject", "Route", "Session", "Stash", "StashKey", "TLSInfo", "TempFail",
    "Transaction", "Verdict", "hookimpl",
]
