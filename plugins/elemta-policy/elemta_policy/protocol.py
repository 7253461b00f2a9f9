"""The Postfix SMTP access policy delegation protocol, as plain functions.

A request is ``name=value`` lines ended by an empty line; so is the reply, whose
``action`` attribute is what a Postfix access(5) table could answer
(``DUNNO``, ``REJECT text``, ``450 4.2.0 text``, ``PREPEND Header: value``…).
See Postfix's SMTPD_POLICY_README and access(5).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

#: a reply longer than this, or with more lines, is not a policy reply
MAX_REPLY_BYTES = 16_384
MAX_REPLY_LINES = 64
#: an SMTP reply line is at most 512 bytes (RFC 5321); the text of a verdict stays well below
MAX_TEXT = 400


class ProtocolError(ValueError):
    """The service answered something that is not a policy reply."""


def clean(value: object) -> str:
    """A value as it may be sent: one line (CR, LF and NUL become spaces)."""
    text = "" if value is None else str(value)
    if "\r" in text or "\n" in text or "\0" in text:
        text = text.replace("\r", " ").replace("\n", " ").replace("\0", " ")
    return text


def encode_request(attributes: Mapping[str, object]) -> bytes:
    """``name=value\\n`` for every attribute, then the empty line that ends the request."""
    text = "".join(f"{name}={clean(value)}\n" for name, value in attributes.items()) + "\n"
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace")


def parse_reply(lines: Iterable[bytes]) -> dict[str, str]:
    """The attributes of a reply (its lines without the final empty one).

    :raises ProtocolError: a line without ``=``, or no ``action``.
    """
    attributes: dict[str, str] = {}
    for raw in lines:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        name, sep, value = line.partition("=")
        if not sep or not name or not name.replace("_", "").isalnum():
            raise ProtocolError(f"not a name=value line: {_shown(line)}")
        attributes.setdefault(name, value)
    if "action" not in attributes:
        raise ProtocolError("the reply has no action= line")
    return attributes


def _shown(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


# ------------------------------------------------------------------ actions

#: action words that take no decision in Elemta and let the other plugins decide
NEUTRAL = frozenset({"ok", "dunno", "defer_if_reject", "warn", "info", "filter"})


@dataclass(frozen=True, slots=True)
class Action:
    """One ``action=`` value, parsed.

    ``word`` is the lower-case action (``"ok"``, ``"dunno"``, ``"reject"``, ``"defer"``,
    ``"defer_if_permit"``, ``"defer_if_reject"``, ``"reply"`` for ``4xx``/``5xx``,
    ``"prepend"``, ``"hold"``, ``"discard"``, ``"filter"``, ``"redirect"``, ``"bcc"``,
    ``"warn"``, ``"info"``) or ``"unknown"``. ``enhanced`` is the enhanced status code a
    reply code or the text of ``REJECT``/``DEFER…`` started with (in the class of the reply:
    ``450 5.1.1`` gives ``4.1.1``, as in Postfix), or ``""``.
    """

    word: str
    text: str = ""
    code: int = 0
    enhanced: str = ""
    header: tuple[str, str] | None = None
    address: str = ""
    raw: str = ""

    @property
    def label(self) -> str:
        """The value of the ``action`` metric label: the word, ``4xx`` or ``5xx``."""
        if self.word == "reply":
            return f"{str(self.code)[0]}xx"
        return self.word


_WORDS = {"OK", "DUNNO", "REJECT", "DEFER", "DEFER_IF_PERMIT", "DEFER_IF_REJECT", "PREPEND",
          "HOLD", "DISCARD", "FILTER", "REDIRECT", "BCC", "WARN", "INFO"}
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")
_HEADER_NAME = re.compile(r"^[!-9;-~]+$")   # printable ASCII but the colon (RFC 5322 ftext)
_ADDRESS = re.compile(r"^[^\s<>]+@[^\s<>@]+$")


def parse_action(value: str) -> Action:
    """What an ``action=`` value asks for.

    :raises ProtocolError: a known word with an argument that cannot be used (a
        ``PREPEND`` without a header, a ``REDIRECT`` without an address).
    An action Elemta does not know is ``Action("unknown")``, not an error.
    """
    raw = value.strip()
    word, _, rest = raw.partition(" ")
    rest = rest.strip()
    if "\t" in word:
        word, _, more = word.partition("\t")
        rest = (more + " " + rest).strip()
    text = rest[:MAX_TEXT]
    if word.isdigit():
        if len(word) == 3 and word[0] in "45":
            return _reply(int(word), rest, raw)
        if word.isascii() and not rest:
            return Action("ok", raw=raw)      # access(5): an all-numerical result is OK
        return Action("unknown", raw=raw)
    upper = word.upper()
    if upper not in _WORDS:
        return Action("unknown", raw=raw)
    kind = upper.lower()
    if kind == "prepend":
        name, sep, header_value = rest.partition(":")
        name = name.strip()
        if not sep or not _HEADER_NAME.match(name) or "\r" in header_value \
                or "\0" in header_value:
            raise ProtocolError(f"PREPEND needs 'Header-Name: value', got {_shown(rest)}")
        return Action(kind, header=(name, header_value.strip()), raw=raw)
    if kind in ("redirect", "bcc"):
        address = rest.removeprefix("<").removesuffix(">")
        if not _ADDRESS.match(address):
            raise ProtocolError(f"{upper} needs a mail address (local@domain), got "
                                f"{_shown(rest)}")
        return Action(kind, address=address, raw=raw)
    if kind in ("reject", "defer", "defer_if_permit", "defer_if_reject"):
        # the text may start with an enhanced status code (postgrey sends "4.2.0 Greylisted")
        first = "5" if kind == "reject" else "4"
        enhanced, text = _split_enhanced(first, rest)
        return Action(kind, text=text, enhanced=enhanced, raw=raw)
    return Action(kind, text=text, raw=raw)


def _split_enhanced(first: str, text: str) -> tuple[str, str]:
    """``(enhanced, rest)`` of a reply text, the enhanced status code in class ``first``
    (``"4"`` or ``"5"``); ``""`` when the text does not start with one."""
    match = _ENHANCED.match(text)
    if match is None:
        return "", text.strip()[:MAX_TEXT]
    return f"{first}.{match.group(2)}.{match.group(3)}", text[match.end():].strip()[:MAX_TEXT]


def _reply(code: int, rest: str, raw: str) -> Action:
    """``4NN text`` / ``5NN text``, with an enhanced status code when the text starts with one.

    An enhanced code of the wrong class (``450 5.1.1``) gets the class of the reply code, as
    Postfix does.
    """
    first = str(code)[0]
    enhanced, text = _split_enhanced(first, rest)
    return Action("reply", text=text, code=code, enhanced=enhanced or f"{first}.7.1", raw=raw)
