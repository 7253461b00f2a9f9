"""The public API is ``elemta`` (and ``elemta.testing`` for tests); plugin packages use nothing else.

:func:`private_imports` is the rule. It runs on every package under
``plugins/`` — ours are written exactly as a third party would write theirs —
and on a deliberately bad sample.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import elemta
import elemta.testing

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = ROOT / "plugins"
PLUGINS_MD = ROOT / "docs" / "plugins.md"
PUBLIC = {"elemta": set(elemta.__all__), "elemta.testing": set(elemta.testing.__all__)}


def is_test_code(path: Path) -> bool:
    """Tests, and a package's own test helpers, may use ``elemta.testing``."""
    return "tests" in path.parts or path.name.startswith("test_") or path.name == "testing.py" \
        or path.name == "conftest.py"


def private_imports(path: Path, shown: str) -> list[str]:
    """Every use of Elemta in ``path`` that is not a public name."""
    allowed = {"elemta"} | ({"elemta.testing"} if is_test_code(path) else set())
    problems = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module \
                and (node.module == "elemta" or node.module.startswith("elemta.")):
            if node.module not in allowed:
                why = "is for tests" if node.module == "elemta.testing" else "is private"
                problems.append(f"{shown}:{node.lineno}: {node.module} {why}")
                continue
            for alias in node.names:
                if alias.name not in PUBLIC[node.module]:
                    problems.append(f"{shown}:{node.lineno}: {node.module}.{alias.name} is not "
                                    "public")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("elemta.") and alias.name not in allowed:
                    why = "is for tests" if alias.name == "elemta.testing" else "is private"
                    problems.append(f"{shown}:{node.lineno}: {alias.name} {why}")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id == "elemta" and node.attr not in PUBLIC["elemta"] \
                and not node.attr.startswith("__"):
            problems.append(f"{shown}:{node.lineno}: elemta.{node.attr} is not public")
    return problems


def plugin_sources() -> list[Path]:
    return sorted(p for p in PLUGINS.rglob("*.py") if "build" not in p.parts)


def test_there_are_plugin_packages_to_check():
    assert len({p.relative_to(PLUGINS).parts[0] for p in plugin_sources()}) >= 3


def test_plugin_packages_use_only_the_public_api():
    problems = [p for path in plugin_sources()
                for p in private_imports(path, str(path.relative_to(ROOT)))]
    assert problems == []


def test_the_rule_catches_private_imports(tmp_path):
    module = tmp_path / "elemta_bad" / "plugin.py"
    module.parent.mkdir()
    module.write_text(
        "import elemta\n"
        "from elemta import Accept, hookimpl\n"
        "from elemta import HookCaller\n"
        "from elemta.spool.store import Spool\n"
        "from elemta.testing import Sink\n"
        "import elemta.app\n"
        "x = elemta.hookspecs\n"
        "y = elemta.Reject\n")
    assert private_imports(module, "plugin.py") == [
        "plugin.py:3: elemta.HookCaller is not public",
        "plugin.py:4: elemta.spool.store is private",
        "plugin.py:5: elemta.testing is for tests",
        "plugin.py:6: elemta.app is private",
        "plugin.py:7: elemta.hookspecs is not public",
    ]
    test = tmp_path / "tests" / "test_bad.py"
    test.parent.mkdir()
    test.write_text("from elemta.testing import Sink, write_config, nothing_here\n")
    assert private_imports(test, "test_bad.py") == [
        "test_bad.py:1: elemta.testing.nothing_here is not public"]


@pytest.mark.parametrize("module", ["elemta", "elemta.testing"])
def test_every_public_name_imports(module):
    mod = elemta if module == "elemta" else elemta.testing
    for name in PUBLIC[module]:
        if name == "ZoneServer":
            pytest.importorskip("dnslib")
        assert getattr(mod, name) is not None, name


def documented_names() -> dict[str, set[str]]:
    text = PLUGINS_MD.read_text()
    section = text.split("## Public API", 1)[1].split("\n## ", 1)[0]
    found: dict[str, set[str]] = {"elemta": set(), "elemta.testing": set()}
    for module, names in re.findall(r"^\| `(elemta(?:\.testing)?)` \| ([^|]+)\|", section, re.M):
        found[module] |= set(re.findall(r"`(\w+)`", names))
    return found


@pytest.mark.parametrize("module", ["elemta", "elemta.testing"])
def test_the_public_api_section_lists_exactly_the_public_names(module):
    documented = documented_names()[module]
    assert sorted(PUBLIC[module] - documented) == [], "public but not documented"
    assert sorted(documented - PUBLIC[module]) == [], "documented but not public"


def test_the_api_version_and_its_promise_are_stated():
    assert re.fullmatch(r"\d+\.\d+", elemta.__api_version__)
    section = PLUGINS_MD.read_text().split("## Public API", 1)[1].split("\n## ", 1)[0]
    assert f"`elemta.__api_version__` is `{elemta.__api_version__}`" in section
