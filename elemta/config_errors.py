"""How a validation error of the settings reads: one line per problem, with the key and a fix.

Kept apart from :mod:`elemta.config` (the settings themselves): it knows
pydantic's error records, not Elemta's keys.
"""

from __future__ import annotations

import difflib
from typing import Any

import pydantic
from pydantic import BaseModel


def suggest(word: str, choices: list[str]) -> list[str]:
    """The choice the operator probably meant: a close spelling or a truncation."""
    close = difflib.get_close_matches(word, choices, 1, 0.6)
    if not close and len(word) >= 3:
        close = [c for c in choices if c.startswith(word) or word.startswith(c)][:1]
    return close


def _toml_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _model_at(loc: tuple[Any, ...], root: type[BaseModel]) -> type[BaseModel] | None:
    """The settings class a validation error location points into, from ``root``."""
    model: Any = root
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return None
        ann = fields[part].annotation
        model = _inner_model(ann)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _inner_model(ann: Any) -> Any:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()) or ():
        m = _inner_model(arg)
        if m is not None:
            return m
    return None


def format_validation_error(err: pydantic.ValidationError, source: str,
                            prefix: tuple[Any, ...] = (),
                            model: type[BaseModel] | None = None,
                            root: type[BaseModel] | None = None) -> list[str]:
    """One line per problem: the file, the key (TOML path), what is wrong, a fix.

    ``model`` is the settings class the error is about when it is not nested in
    ``root`` (a plugin's table); an unknown key is answered with the closest
    valid one.
    """
    problems = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        key = _toml_path(prefix + loc)
        if e["type"] == "extra_forbidden":
            parent = (model if model is not None and len(loc) == 1
                      else _model_at(loc[:-1], root) if model is None and root is not None
                      else None)
            hint = ""
            if parent is not None:
                close = suggest(str(loc[-1]), list(parent.model_fields))
                valid = ", ".join(k for k in parent.model_fields if k not in ("source", "tables"))
                hint = f'; did you mean "{close[0]}"?' if close else f"; valid keys here: {valid}"
            problems.append(f"{source}: {key}: unknown key{hint}")
        else:
            problems.append(f"{source}: {key or '(top level)'}: {_explain(e)}")
    return problems


# what a value of each kind looks like in elemta.toml
_EXAMPLES = {
    "int": "a whole number such as 25",
    "float": "a number such as 30 or 2.5",
    "bool": "true or false (without quotes)",
    "string": 'text in quotes, such as "mx.example.com"',
    "list": 'a list in brackets, such as ["a", "b"]',
    "tuple": 'a list in brackets, such as ["a", "b"]',
    "dict": "a table, such as { key = \"value\" }",
    "model": "a table, such as { key = \"value\" }",
}


def _explain(e: Any) -> str:
    """A pydantic error record in an operator's words: what was given, what is expected."""
    kind, msg = e["type"], e["msg"].removeprefix("Value error, ")
    given = e.get("input")
    if kind == "missing":
        return "this key is required"
    if kind == "literal_error":
        return f"got {given!r}; {msg[0].lower()}{msg[1:]}"
    base = kind.split("_")[0]
    if kind.endswith(("_parsing", "_type")) and base in _EXAMPLES:
        return f"got {_shown(given)}; write {_EXAMPLES[base]}"
    if msg.startswith("Input should be "):
        return f"got {_shown(given)}; it must be {msg.removeprefix('Input should be ')}"
    return msg


def _shown(value: Any) -> str:
    """A value as the operator wrote it in TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, (list, tuple)):
        return "a list"
    return repr(value)
