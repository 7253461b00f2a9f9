"""The import graph of ``elemta/``: no cycles, and no arrow from a lower layer to a higher one.

The layers are the table in ``docs/architecture.md`` ("Layers"): the test reads
them from there, so the picture and the code cannot drift apart. Imports under
``if TYPE_CHECKING:`` are type hints only and do not count. The rules run on
the real package and on deliberately broken samples.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURE_MD = ROOT / "docs" / "architecture.md"
LAYER_ROW = re.compile(r"^\| (\d) \w[^|]*\| ([^|]+)\|", re.M)


def modules_of(root: Path, package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        name = ".".join(path.relative_to(root).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(name: str, path: Path, known: set[str], package: str) -> set[str]:
    """The modules of ``package`` that ``name`` imports at run time (anywhere in its body)."""
    found: set[str] = set()
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    parts = base[:len(base) - child.level + 1]
                    module = ".".join(parts + ([child.module] if child.module else []))
                else:
                    module = child.module or ""
                found.add(module)
                found.update(f"{module}.{alias.name}" for alias in child.names)
            visit(child)

    visit(ast.parse(path.read_text()))
    out = set()
    for module in found:
        while module and module not in known:
            module = module.rpartition(".")[0]
        if module and module not in (name, package) and not name.startswith(module + "."):
            out.add(module)
    return out


def graph_of(root: Path, package: str) -> dict[str, set[str]]:
    mods = modules_of(root, package)
    known = set(mods)
    return {name: imports_of(name, path, known, package) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return found


def layers_from(markdown: str) -> dict[str, int]:
    """``module or package prefix → layer`` from the Layers table of architecture.md."""
    out: dict[str, int] = {}
    for number, cell in LAYER_ROW.findall(markdown):
        for prefix in re.findall(r"`([\w.]+)`", cell):
            out[prefix] = int(number)
    return out


def layer_of(module: str, layers: dict[str, int]) -> int | None:
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        layer = layers.get(".".join(parts[:i]))
        if layer is not None:
            return layer
    return None


def layer_problems(graph: dict[str, set[str]], layers: dict[str, int], package: str) -> list[str]:
    problems = []
    for module in sorted(graph):
        if module == package:
            continue  # the package's face (the public API) re-exports from every layer
        own = layer_of(module, layers)
        if own is None:
            problems.append(f"{module} is in no layer of docs/architecture.md")
            continue
        for target in sorted(graph[module]):
            theirs = layer_of(target, layers)
            if theirs is not None and theirs > own:
                problems.append(f"{module} (layer {own}) imports {target} (layer {theirs})")
    return problems


# ------------------------------------------------------------------ the real package


def test_elemta_has_no_import_cycle():
    assert cycles(graph_of(ROOT, "elemta")) == []


def test_every_module_is_in_a_layer_and_imports_only_its_own_or_lower_ones():
    layers = layers_from(ARCHITECTURE_MD.read_text())
    assert len(set(layers.values())) >= 5, layers
    assert layer_problems(graph_of(ROOT, "elemta"), layers, "elemta") == []


def test_the_runner_is_given_what_it_needs_not_the_app():
    graph = graph_of(ROOT, "elemta")
    assert "elemta.app" not in graph["elemta.delivery.runner"]
    source = (ROOT / "elemta" / "delivery" / "runner.py").read_text()
    assert "from ..app import" not in source


MAX_LINES = 520  # "about 500"
WHY = "Longer than 500 lines because"


def long_files_without_a_reason(root: Path, package: str) -> list[str]:
    out = []
    for path in sorted((root / package).rglob("*.py")):
        text = path.read_text()
        lines = text.count("\n")
        if lines > MAX_LINES and WHY not in (ast.get_docstring(ast.parse(text)) or ""):
            out.append(f"{path.relative_to(root)}: {lines} lines")
    return out


def test_core_files_stay_small_or_say_why_at_the_top():
    assert long_files_without_a_reason(ROOT, "elemta") == []


SPOOL_NAME = re.compile(r"\.json\b|(^|/)(ready|deferred|hold|failed|messages|journal|tmp)/"
                        r"|\A\.lock\Z")


def spool_names_outside_the_layout(root: Path, package: str) -> list[str]:
    """String constants in code that spell out a spool folder or file name, but in ``layout.py``.

    Docstrings describe the layout; code asks ``spool/layout.py`` for it.
    """
    out = []
    for path in sorted((root / package).rglob("*.py")):
        if path.name == "layout.py" and path.parent.name == "spool":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                           ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and id(node) not in docstrings and SPOOL_NAME.search(node.value):
                out.append(f"{path.relative_to(root)}:{node.lineno}: {node.value[:40]!r}")
    return out


def test_only_the_spool_layout_spells_out_spool_names():
    assert spool_names_outside_the_layout(ROOT, "elemta") == []


# ------------------------------------------------------------------ the rules catch breakage


def test_a_spool_name_outside_the_layout_is_found(tmp_path):
    write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/runner.py": 'def f(root, i):\n    return f"{root}/deferred/{i}.json"\n',
        "pkg/spool/layout.py": 'SUFFIX = ".json"\n',
    })
    assert spool_names_outside_the_layout(tmp_path, "pkg") == [
        "pkg/runner.py:2: '/deferred/'", "pkg/runner.py:2: '.json'"]


def test_a_long_file_without_a_reason_is_found(tmp_path):
    write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/long.py": '"""A long module."""\n' + "x = 1\n" * 600,
        "pkg/said.py": f'"""A long module.\n\n{WHY} it must be."""\n' + "x = 1\n" * 600,
    })
    assert long_files_without_a_reason(tmp_path, "pkg") == ["pkg/long.py: 601 lines"]


def write_package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_cycle_is_found_and_type_checking_imports_are_not_one(tmp_path):
    write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from . import b\n",
        "pkg/b.py": "def f():\n    from .c import g\n",
        "pkg/c.py": "from .a import x\n",
        "pkg/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .e import y\n",
        "pkg/e.py": "from .d import z\n",
    })
    assert cycles(graph_of(tmp_path, "pkg")) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_an_arrow_up_and_a_module_without_a_layer_are_found(tmp_path):
    write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/low.py": "from .high import App\n",
        "pkg/high.py": "from .low import thing\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/deep.py": "from ..low import thing\n",
        "pkg/stray.py": "",
    })
    layers = layers_from("| layer | modules |\n|---|---|\n| 0 base | `pkg.low`, `pkg.sub` |\n"
                         "| 1 top | `pkg.high` |\n")
    assert layer_problems(graph_of(tmp_path, "pkg"), layers, "pkg") == [
        "pkg.low (layer 0) imports pkg.high (layer 1)",
        "pkg.stray is in no layer of docs/architecture.md",
    ]
