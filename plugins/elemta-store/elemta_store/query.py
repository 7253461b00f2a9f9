"""Search words as typed, made safe for FTS5 ``MATCH`` and for ``LIKE``."""

from __future__ import annotations

import re

_TOKEN = re.compile(r'"([^"]*)"|(\S+)')
_WORD = re.compile(r"\w+")


def terms(text: str) -> list[tuple[str, bool]]:
    """``(words, prefix)`` for each term: a quoted phrase, or a word (``*`` at the end: prefix).

    Punctuation separates words, as the index's tokenizer does: ``bob@example.com``
    is the phrase ``bob example com``.
    """
    out = []
    for m in _TOKEN.finditer(text):
        phrase, word = m.group(1), m.group(2)
        raw = phrase if phrase is not None else word
        prefix = phrase is None and raw.endswith("*")
        words = " ".join(_WORD.findall(raw))
        if words:
            out.append((words, prefix))
    return out


def fts_query(text: str) -> str:
    """An FTS5 query: every term must match (AND); no operator of the user's reaches FTS5."""
    parts = []
    for words, prefix in terms(text):
        parts.append(f'"{words}"' + ("*" if prefix else ""))
    return " AND ".join(parts)


def like_pattern(text: str) -> str:
    """``%text%`` for ``LIKE ... ESCAPE '\\'``, with the wildcards in ``text`` taken literally."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"
