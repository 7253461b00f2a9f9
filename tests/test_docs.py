"""The documentation is part of the contract: these tests fail when it drifts.

- every hook in ``elemta/hookspecs.py`` has a ``### name(args)`` section in
  ``docs/plugins.md`` with its exact arguments, and a ``test_hook_<name>`` test;
- every verdict class is in the verdict table of ``docs/plugins.md``, with its defaults;
- every example plugin in ``docs/plugins.md`` loads as a valid plugin;
- every configuration key is in the table of its section in ``docs/configuration.md``,
  and every ``elemta.toml`` example there parses (or fails with the error shown).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import re
import types
import typing
from pathlib import Path

import pluggy
import pydantic
import pytest

from elemta import hookspecs, verdicts
from elemta.config import ConfigError, Settings, parse_settings

ROOT = Path(__file__).resolve().parent.parent
PLUGINS_MD = ROOT / "docs" / "plugins.md"
CONFIGURATION_MD = ROOT / "docs" / "configuration.md"
TESTS = ROOT / "tests"

HOOKS = hookspecs.hook_names()

# settings fields that are not keys an operator writes
INTERNAL_FIELDS = {"source", "tables"}
# the [plugins.<name>] tables: their keys come from each plugin's register_config
PLUGIN_TABLES = "[plugins.<name>]"
TOP_LEVEL = "(top level)"

HOOK_HEADING = re.compile(r"^### (\w+)\((.*)\)[ \t]*$", re.M)
KEY_ROW = re.compile(r"^\| `([A-Za-z_][A-Za-z0-9_]*)` \|", re.M)
VERDICT_ROW = re.compile(r"^\| `(\w+)(\(.*?\))?` \|", re.M)
CODE_BLOCK = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)


@functools.cache
def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def sections(text: str, level: int) -> dict[str, str]:
    """Section heading (without ``#`` and backticks) → its text, up to the next
    heading of the same or a higher level."""
    out: dict[str, str] = {}
    pattern = re.compile(rf"^#{{1,{level}}} (.*)$", re.M)
    matches = list(pattern.finditer(text))
    for m, nxt in zip(matches, matches[1:] + [None]):
        if not m.group(0).startswith("#" * level + " "):
            continue
        title = m.group(1).strip().replace("`", "")
        out[title] = text[m.end():nxt.start() if nxt else len(text)]
    return out


def code_blocks(text: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in CODE_BLOCK.finditer(text)]


# ------------------------------------------------------------------ hooks


def documented_hooks() -> dict[str, list[list[str]]]:
    out: dict[str, list[list[str]]] = {}
    for m in HOOK_HEADING.finditer(read(PLUGINS_MD)):
        args = [a.strip() for a in m.group(2).split(",") if a.strip()]
        out.setdefault(m.group(1), []).append(args)
    return out


def test_contract_has_hooks():
    assert len(HOOKS) > 10, HOOKS


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented_with_its_signature(hook):
    expected = list(inspect.signature(getattr(hookspecs, hook)).parameters)
    headings = documented_hooks().get(hook)
    heading = f"### {hook}({', '.join(expected)})"
    assert headings, f"docs/plugins.md has no section for hook {hook!r}: add `{heading}`"
    assert len(headings) == 1, f"docs/plugins.md documents hook {hook!r} more than once"
    assert headings[0] == expected, (
        f"docs/plugins.md documents {hook}({', '.join(headings[0])}); "
        f"the hookspec is `{heading[4:]}`"
    )


def test_plugins_md_documents_only_real_hooks():
    unknown = sorted(set(documented_hooks()) - set(HOOKS))
    assert not unknown, f"docs/plugins.md documents hooks that are not in hookspecs.py: {unknown}"


@functools.cache
def suite_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(TESTS.rglob("*.py")))


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_test(hook):
    pattern = re.compile(rf"def test_hook_{hook}\b")
    assert pattern.search(suite_text()), (
        f"hook {hook!r} has no test: write `def test_hook_{hook}(...)` under tests/"
    )


# ------------------------------------------------------------------ verdicts

VERDICT_CLASSES = sorted(
    (obj for obj in vars(verdicts).values()
     if isinstance(obj, type) and issubclass(obj, verdicts.Verdict) and obj is not verdicts.Verdict),
    key=lambda cls: cls.__name__,
)


def verdict_rows() -> dict[str, str | None]:
    """Verdict table of docs/plugins.md: class name → its ``(...)`` call text."""
    section = sections(read(PLUGINS_MD), 2).get("Verdicts")
    assert section is not None, "docs/plugins.md has no `## Verdicts` section"
    return {m.group(1): m.group(2) for m in VERDICT_ROW.finditer(section)}


def test_contract_has_verdicts():
    assert {"Accept", "Reject", "TempFail"} <= {cls.__name__ for cls in VERDICT_CLASSES}


@pytest.mark.parametrize("cls", VERDICT_CLASSES, ids=lambda cls: cls.__name__)
def test_verdict_is_documented_with_its_defaults(cls):
    rows = verdict_rows()
    assert cls.__name__ in rows, (
        f"the verdict table in docs/plugins.md has no row for {cls.__name__}"
    )
    call = ast.parse(cls.__name__ + (rows[cls.__name__] or "()"), mode="eval").body
    assert isinstance(call, ast.Call) and not call.args
    documented = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    expected = {f.name: f.default for f in dataclasses.fields(cls) if not f.kw_only}
    assert documented == expected, (
        f"docs/plugins.md shows {cls.__name__}{rows[cls.__name__]}; the class's "
        f"arguments and defaults are {expected}"
    )


def test_verdict_table_names_only_real_verdicts():
    names = {cls.__name__ for cls in VERDICT_CLASSES} | {"None"}
    unknown = sorted(set(verdict_rows()) - names)
    assert not unknown, f"the verdict table in docs/plugins.md lists unknown verdicts: {unknown}"


# ------------------------------------------------------------------ examples

PYTHON_EXAMPLES = [code for lang, code in code_blocks(read(PLUGINS_MD)) if lang == "python"]
# ```python test blocks: tests a plugin author would write, run as they are
TEST_EXAMPLES = [code for lang, code in code_blocks(read(PLUGINS_MD)) if lang == "python test"]


def example_id(code: str) -> str:
    hooks = re.findall(r"^\s*(?:async )?def (\w+)\(", code, re.M)
    return "-".join(h for h in hooks if h in HOOKS) or "example"


def test_plugins_md_has_examples():
    assert len(PYTHON_EXAMPLES) >= len(HOOKS)


@pytest.mark.parametrize("code", PYTHON_EXAMPLES, ids=[example_id(c) for c in PYTHON_EXAMPLES])
def test_plugins_md_example_is_a_valid_plugin(code):
    module = types.ModuleType("elemta_docs_example")
    # dont_inherit: the example runs as its own module would, without this file's __future__
    exec(compile(code, str(PLUGINS_MD), "exec", dont_inherit=True), module.__dict__)
    plugin = getattr(module, "plugin", module)
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(plugin, name="example")
    pm.check_pending()
    assert pm.get_hookcallers(plugin), "the example implements no hook"


def test_plugins_md_has_test_examples():
    assert TEST_EXAMPLES


@pytest.mark.parametrize("code", TEST_EXAMPLES, ids=lambda c: re.findall(r"def (test_\w+)", c)[0])
def test_plugins_md_test_example_passes_as_written(code, tmp_path):
    import subprocess
    import sys

    (tmp_path / "test_from_the_docs.py").write_text(code)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "asyncio_mode=auto",
         "-o", "asyncio_default_fixture_loop_scope=function", "test_from_the_docs.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    tests = len(re.findall(r"^(?:async )?def test_", code, re.M))
    assert run.returncode == 0 and f"{tests} passed" in run.stdout, run.stdout + run.stderr


# ------------------------------------------------------------------ configuration


def _is_model(tp: object) -> bool:
    return isinstance(tp, type) and issubclass(tp, pydantic.BaseModel)


def _nested(annotation: object) -> tuple[str, type[pydantic.BaseModel]] | None:
    """How a field nests another settings model: a table, an array of tables, or a
    table of named tables; ``None`` for a plain key."""
    if _is_model(annotation):
        return "table", annotation  # type: ignore[return-value]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (tuple, list) and args and _is_model(args[0]):
        return "array", args[0]
    if origin is dict and len(args) == 2 and _is_model(args[1]):
        return "named", args[1]
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            found = _nested(arg)
            if found is not None:
                return found
    return None


def config_tables(model: type[pydantic.BaseModel] = Settings,
                  heading: str = TOP_LEVEL, dotted: str = "") -> dict[str, set[str]]:
    """Every table of the settings tree, as its section heading → its keys."""
    out: dict[str, set[str]] = {}
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        if name in INTERNAL_FIELDS:
            continue
        nested = _nested(field.annotation)
        if nested is None:
            keys.add(name)
            continue
        kind, sub = nested
        path = f"{dotted}.{name}" if dotted else name
        if kind == "table":
            out.update(config_tables(sub, f"[{path}]", path))
        elif kind == "array":
            out.update(config_tables(sub, f"[[{path}]]", path))
        else:
            out.update(config_tables(sub, f"[{path}.<name>]", f"{path}.<name>"))
    if keys or heading == TOP_LEVEL:
        out[heading] = keys
    return out


CONFIG_TABLES = config_tables()
CONFIG_KEYS = sorted((table, key) for table, keys in CONFIG_TABLES.items() for key in keys)


def config_sections() -> dict[str, str]:
    return sections(read(CONFIGURATION_MD), 2)


def test_settings_have_keys():
    assert len(CONFIG_KEYS) > 20, CONFIG_KEYS
    assert "[server]" in CONFIG_TABLES and "[[listeners]]" in CONFIG_TABLES


@pytest.mark.parametrize("table,key", CONFIG_KEYS, ids=[f"{t}-{k}" for t, k in CONFIG_KEYS])
def test_config_key_is_documented(table, key):
    section = config_sections().get(table)
    assert section is not None, f"docs/configuration.md has no `## {table}` section"
    assert key in KEY_ROW.findall(section), (
        f"docs/configuration.md: section {table} has no row `| `{key}` | type | default | "
        f"meaning |`"
    )


def test_plugin_tables_are_documented():
    assert PLUGIN_TABLES in config_sections()


def test_configuration_md_documents_only_real_keys():
    problems = []
    for title, text in config_sections().items():
        rows = KEY_ROW.findall(text)
        if not title.startswith("["):
            if rows:
                problems.append(f"section {title!r} documents keys {rows} outside a table section")
            continue
        known = set() if title == PLUGIN_TABLES else CONFIG_TABLES.get(title)
        if known is None:
            problems.append(f"section {title} is not a table of the settings")
            continue
        problems += [f"{title}: {key!r} is not a key of this table" for key in rows
                     if key not in known]
        dupes = sorted({key for key in rows if rows.count(key) > 1})
        problems += [f"{title}: {key!r} is documented twice" for key in dupes]
    assert not problems, "docs/configuration.md:\n" + "\n".join(problems)


CONFIG_EXAMPLE_SOURCE = Path("/etc/elemta/elemta.toml")


def toml_examples() -> list[tuple[str, str, str | None]]:
    """Every elemta.toml example of the docs, with the text block that follows it."""
    out = []
    for path in (CONFIGURATION_MD, PLUGINS_MD):
        blocks = code_blocks(read(path))
        for i, (lang, code) in enumerate(blocks):
            if lang != "toml" or "[project" in code:
                continue
            following = blocks[i + 1] if i + 1 < len(blocks) else None
            output = following[1] if following and following[0] == "text" else None
            out.append((path.name, code, output))
    return out


TOML_EXAMPLES = toml_examples()


@pytest.mark.parametrize("doc,code,output", TOML_EXAMPLES,
                         ids=[f"{d}-{i}" for i, (d, _, _) in enumerate(TOML_EXAMPLES)])
def test_toml_example_parses_or_shows_its_real_error(doc, code, output):
    try:
        parse_settings(code, CONFIG_EXAMPLE_SOURCE)
    except ConfigError as e:
        assert output is not None, f"{doc}: this example is invalid:\n{e}"
        assert output.rstrip("\n") == str(e), (
            f"{doc}: the error shown after this example is not what Elemta says:\n{e}"
        )


# ------------------------------------------------------------------ plugin READMEs

PLUGIN_DIRS = sorted(p.parent for p in (ROOT / "plugins").glob("*/pyproject.toml"))
README_SECTIONS = ["## Safe default", "## Configuration", "## Hooks used", "## Things to know"]


def test_repository_has_plugins():
    assert len(PLUGIN_DIRS) >= 3


def readme_problems(plugin_dir: Path, plugin: object) -> list[str]:
    """What the README of a plugin package lacks of the house shape and of its own plugin."""
    import tomllib

    problems = []
    readme = (plugin_dir / "README.md").read_text()
    meta = tomllib.loads((plugin_dir / "pyproject.toml").read_text())
    dist = meta["project"]["name"]
    if not readme.startswith(f"# {dist}\n"):
        problems.append("title: the distribution name")
    headings = [line for line in readme.splitlines() if line.startswith("## ")]
    if headings != README_SECTIONS:
        problems.append(f"sections are {headings}, not {README_SECTIONS}")
        return problems
    config = readme.split("## Configuration", 1)[1].split("## Hooks used", 1)[0]
    if not re.search(r"^\| ?key ?\| ?type ?\| ?default ?\| ?meaning ?\|", config, re.M):
        problems.append("the configuration table has no key | type | default | meaning columns")
    [(name, _)] = meta["project"]["entry-points"]["elemta"].items()
    schemas = plugin.register_config()
    if name not in schemas:
        return problems + [f"the plugin registers no [plugins.{name}] table"]
    # one table per settings model: "| key |" for the plugin's table, "| key (of `sub`) |"
    # for a nested one; a row may document several keys ("| `a`, `b` |")
    tables = re.split(r"^(?=\| ?key\b)", config, flags=re.M)[1:]
    for table in tables:
        sub = re.match(r"\| ?key \(of `([a-z_]+)`\)", table)
        model = schemas[name]
        if sub is not None:
            field = model.model_fields.get(sub.group(1))
            nested = None if field is None else _settings_model(field.annotation)
            if nested is None:
                problems.append(f"documented table {sub.group(1)} is not a nested table")
                continue
            model = nested
        rows = re.findall(r"^\| ((?:`[a-z0-9_]+`(?:, )?)+) \|", table, re.M)
        documented = {k for row in rows for k in re.findall(r"`([a-z0-9_]+)`", row)}
        keys = set(model.model_fields)
        where = f" of {sub.group(1)}" if sub else ""
        problems += [f"undocumented key {k}{where}" for k in sorted(keys - documented)]
        problems += [f"documented key {k}{where} does not exist"
                     for k in sorted(documented - keys)]
    used = readme.split("## Hooks used", 1)[1].split("## Things to know", 1)[0]
    problems += [f"hook {hook} is not described under 'Hooks used'"
                 for hook in plugin_hooks_of(plugin) if not re.search(rf"`{hook}[`(]", used)]
    return problems


def _settings_model(annotation):
    """The settings model of a nested table (``Model``, ``Model | None``) or of an array of
    tables (``list[Model]``); ``None`` for a plain value."""
    import typing

    if hasattr(annotation, "model_fields"):
        return annotation
    for arg in typing.get_args(annotation):
        found = _settings_model(arg)
        if found is not None:
            return found
    return None


@pytest.mark.parametrize("plugin_dir", PLUGIN_DIRS, ids=lambda p: p.name)
def test_plugin_readme_has_the_common_shape_and_every_key(plugin_dir):
    import importlib.metadata
    import tomllib

    meta = tomllib.loads((plugin_dir / "pyproject.toml").read_text())
    [(name, target)] = meta["project"]["entry-points"]["elemta"].items()
    [ep] = [e for e in importlib.metadata.entry_points(group="elemta") if e.name == name]
    assert ep.value == target, f"{plugin_dir.name} is installed (pip install -e {plugin_dir})"
    obj = ep.load()
    assert readme_problems(plugin_dir, obj() if isinstance(obj, type) else obj) == []


def plugin_hooks_of(plugin) -> list[str]:
    names = set(hookspecs.hook_names())
    return sorted(n for n in dir(plugin) if n in names and callable(getattr(plugin, n)))


def test_docs_stand_alone():
    """The project's documents and code never point at files outside the repository."""
    outside = re.compile(r"/work/|\.\./shared\b")
    found = []
    for path in [*ROOT.glob("*.md"), *ROOT.glob("docs/**/*.md"), *ROOT.glob("plugins/*/README.md"),
                 *ROOT.glob("bench/*.py")]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if outside.search(line):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert found == []
