"""``[plugins.maildir]``: where mailboxes live, quotas, file modes, durability."""

from __future__ import annotations

import string
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .store import resolve_owner

__all__ = ["MaildirSettings", "resolve_owner"]

PLACEHOLDERS = ("domain", "user", "address")


class MaildirSettings(BaseModel):
    """The validated ``[plugins.maildir]`` table (see the plugin's README for every key)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # the route.transport this plugin delivers; other routes are left to other transports
    transport: str = Field("local", min_length=1)
    # mailbox path template; relative paths are relative to the config file's folder
    path: str = "mail/{domain}/{user}/Maildir"
    # characters that separate user and detail in user+detail@domain; "" disables
    recipient_delimiter: str = "+"
    # where user+detail@domain goes: "off" INBOX, "existing" folder .detail if it
    # exists, "create" folder .detail, created when missing
    detail_folder: Literal["off", "existing", "create"] = "existing"
    # default per-mailbox quota in bytes; 0 = unlimited
    quota_bytes: int = Field(0, ge=0)
    # per-mailbox quotas (user@domain, lower case, no +detail) in bytes; 0 = unlimited
    quotas: dict[str, int] = Field(default_factory=dict)
    # create Maildir, cur/, new/ and tmp/ on first delivery (like Dovecot's LDA); off by
    # default: with no recipient check at RCPT, every local part would get a mailbox
    create_mailboxes: bool = False
    # "user" or "user:group" (names or numbers) given every file and directory this
    # plugin creates; None leaves them to the delivering process
    owner: str | None = None
    file_mode: int = Field(0o600, ge=0, le=0o7777)
    dir_mode: int = Field(0o700, ge=0, le=0o7777)
    # fsync every message and new/ before answering 250; off loses mail on power failure
    fsync: bool = True
    # write mailboxes in a helper process (false: in threads of the server)
    helper_process: bool = True

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("path is empty; set it to a template such as "
                             "\"mail/{domain}/{user}/Maildir\"")
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(v) if f is not None]
        except ValueError as e:
            raise ValueError(f"path {v!r} is not a valid template ({e}); write literal "
                             "braces as {{ and }}") from None
        for name in fields:
            if name not in PLACEHOLDERS:
                raise ValueError(f"path {v!r}: unknown placeholder {{{name}}}; use "
                                 + ", ".join("{" + p + "}" for p in PLACEHOLDERS))
        return v

    @field_validator("owner")
    @classmethod
    def _owner(cls, v: str | None) -> str | None:
        if v is not None:
            resolve_owner(v)
        return v

    @field_validator("quotas")
    @classmethod
    def _quotas(cls, v: dict[str, int]) -> dict[str, int]:
        out: dict[str, int] = {}
        for address, limit in v.items():
            if "@" not in address:
                raise ValueError(f"quotas: {address!r} is not an address; write the "
                                 "mailbox as user@domain")
            if limit < 0:
                raise ValueError(f"quotas: {address} = {limit}: a quota is a number of "
                                 "bytes, 0 for unlimited")
            out[address.lower()] = limit
        return out
