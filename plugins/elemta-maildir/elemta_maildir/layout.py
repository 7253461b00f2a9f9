"""From a recipient address to a mailbox on disk, refusing names that could escape it.

Pure functions, no I/O: ``Layout.mailbox(address)`` either returns a
:class:`Mailbox` whose ``root`` lies under the path template's base folder or
raises :class:`UnsafeAddress`.
"""

from __future__ import annotations

import os
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import imap_utf7


class UnsafeAddress(ValueError):
    """The address cannot name a mailbox safely (``str()`` says why)."""


@dataclass(frozen=True, slots=True)
class Mailbox:
    """Where one recipient's mail goes.

    ``address`` is ``user@domain`` (lower case, no ``+detail``): the key of
    ``quotas`` and the value of ``{address}``. ``root`` is the Maildir (INBOX);
    ``detail`` is the sub-address, if any, as the sender wrote it (case kept):
    it may name a Maildir++ folder.
    """

    address: str
    user: str
    domain: str
    detail: str | None
    root: Path


class Layout:
    """The ``path`` template, resolved, with the folder no mailbox may leave."""

    def __init__(self, template: str, resolve: Callable[[Path], Path], delimiter: str,
                 default_domain: str) -> None:
        self.template = template
        self.delimiter = delimiter
        self.default_domain = default_domain.lower().rstrip(".")
        self._resolve = resolve
        self.has_fields = any(f is not None for _, f, _, _ in string.Formatter().parse(template))
        self.base = self._absolute(_template_base(template))

    def _absolute(self, path: str) -> str:
        return os.path.abspath(os.path.normpath(str(self._resolve(Path(path)))))

    def mailbox(self, address: str) -> Mailbox:
        """The mailbox of ``address``; :class:`UnsafeAddress` when it is not a safe name."""
        local, at, domain = address.rpartition("@")
        if not at:
            local, domain = address, ""
        domain = domain.lower().rstrip(".") or self.default_domain
        _check_name(local, "local part", address)
        _check_name(domain, "domain", address)
        user, detail = split_detail(local, self.delimiter)
        user = user.lower()
        canonical = f"{user}@{domain}"
        root = self._absolute(self.template.format(domain=domain, user=user, address=canonical))
        inside = root == self.base if not self.has_fields else (
            root != self.base and os.path.commonpath([self.base, root]) == self.base)
        if not inside:
            raise UnsafeAddress(f"<{address}> would name a mailbox outside {self.base}")
        return Mailbox(canonical, user, domain, detail, Path(root))


def split_detail(local: str, delimiter: str) -> tuple[str, str | None]:
    """``("bob", "lists")`` for ``bob+lists``; every character of ``delimiter`` separates.

    A local part that starts with a delimiter is not split; an empty detail
    (``bob+``) is no detail.
    """
    if not delimiter:
        return local, None
    cut = min((i for i in (local.find(c) for c in delimiter) if i >= 0), default=-1)
    if cut <= 0:
        return local, None
    return local[:cut], local[cut + 1:] or None


def folder_dir(detail: str) -> str | None:
    """The Maildir++ directory of the IMAP folder a detail names; ``None`` for the INBOX.

    The name is written in modified UTF-7 (``café`` → ``.caf&AOk-``, ``r&d`` →
    ``.r&-d``), as Dovecot writes it. A ``.`` is Maildir++'s hierarchy
    separator: ``lists.python`` is the folder ``python`` inside ``lists``. A
    detail with an empty level (``.x``, ``x.``, ``a..b``), a ``/`` or a
    character that is not printable names no folder. ``INBOX`` (any case) is
    the INBOX, and ``inbox.x`` the folder ``INBOX.x``, as in IMAP.
    """
    levels = detail.split(".")
    if not all(levels) or "/" in detail or not detail.isprintable():
        return None
    if levels[0].casefold() == "inbox":
        if len(levels) == 1:
            return None
        levels[0] = "INBOX"
    return "." + imap_utf7.encode(".".join(levels))


def folder_of(entry: str) -> str | None:
    """The IMAP name of the Maildir++ folder in directory ``entry``; ``None`` if it is none.

    Exactly the folders Dovecot can open: ``.`` + the modified UTF-7 of the
    name. ``.café`` (not modified UTF-7), ``.INBOX``, ``.inbox.x`` (Dovecot
    opens ``INBOX.x`` as ``.INBOX.x``) and ``..DOVECOT-TRASHED`` are none.
    """
    if len(entry) < 2 or entry[0] != "." or entry[1] == ".":
        return None
    try:
        name = imap_utf7.decode(entry[1:])
    except ValueError:
        return None
    first = name.split(".", 1)[0]
    if first.casefold() == "inbox" and (first != "INBOX" or name == "INBOX"):
        return None
    return name


def _check_name(part: str, what: str, address: str) -> None:
    if not part:
        raise UnsafeAddress(f"<{address}> has an empty {what}")
    if "/" in part or "\0" in part:
        raise UnsafeAddress(f"the {what} of <{address}> contains '/' or NUL")
    if part.startswith("."):
        raise UnsafeAddress(f"the {what} of <{address}> starts with '.'")
    if not part.isprintable():
        raise UnsafeAddress(f"the {what} of <{address}> contains control characters")


def _template_base(template: str) -> str:
    """The folder of the template's fixed part: ``mail`` for ``mail/{domain}/{user}``."""
    prefix = ""
    for literal, field, _, _ in string.Formatter().parse(template):
        prefix += literal
        if field is not None:
            break
    else:
        return template  # no placeholder: one mailbox for everybody
    head, sep, _ = prefix.rpartition("/")
    if sep and not head:
        return "/"
    return head or "."
