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


class UnsafeAddress(ValueError):
    """The address cannot name a mailbox safely (``str()`` says why)."""


@dataclass(frozen=True, slots=True)
class Mailbox:
    """Where one recipient's mail goes.

    ``address`` is ``user@domain`` (lower case, no ``+detail``): the key of
    ``quotas`` and the value of ``{address}``. ``root`` is the Maildir (INBOX);
    ``detail`` is the sub-address, if any, that may name a Maildir++ folder.
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
        local = local.lower()
        domain = domain.lower().rstrip(".") or self.default_domain
        _check_name(local, "local part", address)
        _check_name(domain, "domain", address)
        user, detail = split_detail(local, self.delimiter)
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


def folder_name(detail: str) -> str | None:
    """The Maildir++ folder (``.lists``) for a detail, or ``None`` if it cannot be one."""
    if (not detail or detail.startswith(".") or detail.endswith(".") or ".." in detail
            or any(c in detail for c in "/\0") or not detail.isprintable()):
        return None
    return "." + detail


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
