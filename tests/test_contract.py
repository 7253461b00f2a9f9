"""The dispatch of every hook is data in the contract, and the docs say the same.

:func:`contract_problems` is the rule; it runs on the real contract and on
deliberately broken samples, so the rule itself is known to catch what it
should.
"""

from __future__ import annotations

import ast
import re
import types
from pathlib import Path

import pluggy
import pytest

from elemta import hookspecs
from elemta.hookcall import HookCaller, HookFailure
from elemta.hookspecs import Dispatch, Mode

ROOT = Path(__file__).resolve().parent.parent
PLUGINS_MD = ROOT / "docs" / "plugins.md"
HOOK_HEADING = re.compile(r"^### (\w+)\(.*\)[ \t]*$", re.M)
DOCS_DISPATCH = re.compile(r"\*\*Dispatch:\*\* ([^\n]*)")
SPEC_DISPATCH = re.compile(r"Dispatch: ([^\n]*)")
MODES_LONGEST_FIRST = sorted(Mode, key=lambda m: len(m.value), reverse=True)


def stated_mode(text: str) -> Mode | None:
    """The mode a "Dispatch: …" sentence names: the longest mode its words start with."""
    for mode in MODES_LONGEST_FIRST:
        if text.startswith(mode.value) and not text[len(mode.value):][:1].isalpha():
            return mode
    return None


def hook_sections(docs: str) -> dict[str, str]:
    matches = list(HOOK_HEADING.finditer(docs))
    return {m.group(1): docs[m.end():nxt.start() if nxt else len(docs)]
            for m, nxt in zip(matches, matches[1:] + [None])}


def contract_problems(module: types.ModuleType, docs: str) -> list[str]:
    """Everything wrong with a contract module and its docs; empty when all is well."""
    problems = []
    specs = {name: obj for name, obj in vars(module).items()
             if callable(obj) and hasattr(obj, hookspecs.PROJECT + "_spec")}
    sections = hook_sections(docs)
    for name, spec in sorted(specs.items()):
        found = getattr(spec, "elemta_dispatch", None)
        if not isinstance(found, Dispatch) or not isinstance(found.mode, Mode):
            problems.append(f"{name}: no dispatch mode in the contract (@dispatch(Mode...))")
            continue
        if found.mode.is_first or found.mode is Mode.STARTUP_COLLECT \
                or found.mode in (Mode.COLLECT, Mode.COLLECT_CONCURRENT):
            if not found.allowed:
                problems.append(f"{name}: {found.mode.value} but no allowed result types")
        elif found.allowed:
            problems.append(f"{name}: {found.mode.value} hooks answer nothing, yet allowed "
                            f"types are given")
        in_spec = [stated_mode(t) for t in SPEC_DISPATCH.findall(spec.__doc__ or "")]
        if in_spec != [found.mode]:
            problems.append(f"{name}: its docstring states {in_spec}, the contract "
                            f"{found.mode.value!r}")
        section = sections.get(name)
        if section is None:
            problems.append(f"{name}: no section in the docs")
            continue
        in_docs = [stated_mode(t) for t in DOCS_DISPATCH.findall(section)]
        if in_docs != [found.mode]:
            shown = [m.value if m else None for m in in_docs]
            problems.append(f"{name}: the docs state dispatch {shown}, the contract "
                            f"{found.mode.value!r}")
    return problems


def test_every_hook_has_one_mode_and_the_docs_state_it():
    assert contract_problems(hookspecs, PLUGINS_MD.read_text()) == []


def test_the_rule_catches_a_hook_without_a_mode_and_docs_that_disagree():
    hookspec = pluggy.HookspecMarker(hookspecs.PROJECT)
    bad = types.ModuleType("bad_contract")

    @hookspec
    def no_mode(session):
        """Dispatch: first verdict wins."""

    @hookspec
    @hookspecs.dispatch(Mode.FIRST_VERDICT, hookspecs.SMTP_VERDICTS)
    def wrong_docs(session):
        """Dispatch: first verdict wins."""

    @hookspec
    @hookspecs.dispatch(Mode.NOTIFY_FATAL)
    def wrong_docstring(app):
        """Dispatch: notify."""

    @hookspec
    @hookspecs.dispatch(Mode.FIRST_ANSWER)
    def no_types(listener):
        """Dispatch: first answer wins."""

    for f in (no_mode, wrong_docs, wrong_docstring, no_types):
        setattr(bad, f.__name__, f)
    docs = ("### no_mode(session)\n**Dispatch:** first verdict wins.\n"
            "### wrong_docs(session)\n**Dispatch:** first answer wins.\n"
            "### wrong_docstring(app)\n**Dispatch:** notify, fatal: start-up stops.\n"
            "### no_types(listener)\n**Dispatch:** first answer wins.\n")
    problems = contract_problems(bad, docs)
    assert problems == [
        "no_mode: no dispatch mode in the contract (@dispatch(Mode...))",
        "no_types: first answer wins but no allowed result types",
        "wrong_docs: the docs state dispatch ['first answer wins'], the contract "
        "'first verdict wins'",
        "wrong_docstring: its docstring states [<Mode.NOTIFY: 'notify'>], the contract "
        "'notify, fatal'",
    ]


def test_stated_mode_takes_the_longest_mode_the_text_names():
    assert stated_mode("notify, in reverse order, exceptions logged") is Mode.NOTIFY_REVERSE
    assert stated_mode("notify. An exception is logged") is Mode.NOTIFY
    assert stated_mode("notifying nobody") is None


def test_no_call_site_chooses_a_mode():
    """Hooks are called by name only: through HookCaller.call/call_at_startup."""
    offenders = []
    for path in sorted((ROOT / "elemta").rglob("*.py")):
        if path.name == "hookcall.py" or "testing" in path.parts:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            if node.attr in ("first", "collect", "notify") and isinstance(node.value, ast.Attribute) \
                    and node.value.attr == "hooks":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: hooks.{node.attr}")
            if isinstance(node.value, ast.Attribute) and node.value.attr == "hook" \
                    and node.attr in hookspecs.hook_names():
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: pm.hook.{node.attr}")
    assert offenders == []


# ------------------------------------------------------------------ the dispatcher obeys


def _caller(*plugins: tuple[str, object]) -> HookCaller:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name, obj in plugins:
        pm.register(obj, name=name)
    return HookCaller(pm, [name for name, _ in plugins], lambda _: 1.0)


def _plugin(**hooks) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{k: hookspecs.hookimpl(v) for k, v in hooks.items()})


async def test_notify_reverse_calls_the_last_plugin_first():
    seen = []
    caller = _caller(("a", _plugin(shutdown=lambda: seen.append("a"))),
                     ("b", _plugin(shutdown=lambda: seen.append("b"))))
    assert (await caller.call("shutdown", app=None)).items == []
    assert seen == ["b", "a"]


async def test_notify_fatal_raises_and_plain_notify_does_not():
    def boom():
        raise OSError("down")

    caller = _caller(("a", _plugin(startup=boom, queued=boom)))
    with pytest.raises(HookFailure, match="plugin a failed in hook startup: OSError: down"):
        await caller.call("startup", app=None)
    await caller.call("queued", session=None, tx=None, envelope=None)


async def test_first_answer_checks_list_items():
    caller = _caller(("t", _plugin(deliver=lambda: ["not an outcome"])))
    with pytest.raises(HookFailure, match="allowed: list of Outcome or None"):
        await caller.call("deliver", envelope=None, route=None, recipients=[],
                          content_path="")


async def test_startup_hooks_need_call_at_startup_and_refuse_coroutines():
    async def register_config():
        return {}

    caller = _caller(("a", _plugin(register_config=register_config)))
    with pytest.raises(TypeError, match="call_at_startup"):
        await caller.call("register_config")
    with pytest.raises(HookFailure, match="a plain def, not async def"):
        caller.call_at_startup("register_config")
    with pytest.raises(TypeError, match="use call()"):
        caller.call_at_startup("rcpt")
