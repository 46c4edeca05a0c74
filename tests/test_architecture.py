"""The layout the README's Architecture section describes is the layout of the tree.

* every path its table names exists, and every module or package at the top of
  ``bnfreeze/`` is named there, so the table cannot drift from the tree;
* imports only go down the rooms' order (``limits``/``errors`` < ``model`` < ``formats`` <
  ``ops`` < ``runtime`` < ``render`` < ``api`` < ``commands``/``cli``), at module level and inside
  functions alike;
* no two bnfreeze modules import each other, directly or round a longer cycle, at module
  level or inside functions (an ``if TYPE_CHECKING:`` import runs for type checkers only);
* no bnfreeze module is imported through ``importlib`` (or ``__import__``), where the checks
  above cannot see it;
* only ``runtime/`` imports Keras, TensorFlow or tf_keras;
* no module is longer than :data:`MAX_LINES` lines, the HDF5 reader apart.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "bnfreeze"
PAGE = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")

#: The rooms in import order: a module may import from its own room or one ranked lower.
RANK = {
    "limits": 0,
    "errors": 0,
    "model": 1,
    "formats": 2,
    "ops": 3,
    "runtime": 4,
    "render": 5,
    "api": 6,
    "commands": 7,
    "layers": 6,
    "cli": 7,
    "__main__": 8,
}
KERAS_MODULES = ("keras", "tensorflow", "tf_keras", "keras_hub", "jax", "torch")

#: A room that grows past this is split by job (issue 19).
MAX_LINES = 500
#: Modules allowed past it: the HDF5 reader is one format, read in one place.
LONG_MODULES = {"bnfreeze/formats/readers/_hdf5.py"}


def architecture_section() -> str:
    match = re.search(r"^# Architecture\n(.*)", PAGE, flags=re.M | re.S)
    assert match, "docs/architecture.md has no '# Architecture' title"
    return match.group(1)


def named_paths() -> set[str]:
    table = [ln for ln in architecture_section().splitlines() if ln.startswith("| `")]
    assert table, "the Architecture section has no table of rooms"
    return {p.rstrip("/") for ln in table for p in re.findall(r"`(bnfreeze/[^`]*)`", ln)}


def test_every_room_the_readme_names_exists():
    missing = sorted(p for p in named_paths() if not (ROOT / p).exists())
    assert missing == []


def test_every_top_level_module_is_in_the_readme():
    tree = {
        f"bnfreeze/{p.name}"
        for p in PACKAGE.iterdir()
        if (p.is_dir() and (p / "__init__.py").exists())
        or (p.suffix == ".py" and p.name not in ("__init__.py", "__main__.py"))
    }
    assert sorted(tree - named_paths()) == []


def test_the_command_walk_names_real_modules():
    walk = architecture_section().split("## One command's walk", 1)[1]
    for name in re.findall(r"`((?:[a-z_]+/)+[a-z_]+\.py)`", walk):
        path = PACKAGE / name if not name.startswith("bnfreeze/") else ROOT / name
        assert path.exists(), name


def room_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def dotted_name(path: Path) -> str:
    """``bnfreeze/ops/plans.py`` -> ``bnfreeze.ops.plans``; a package is its ``__init__``."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(PACKAGE.rglob("*.py"))
NAMES = {dotted_name(p) for p in MODULES}


def imports(path: Path) -> list[tuple[str, int]]:
    """Every module ``path`` imports, with its line: at module level and inside functions.
    ``from package import name`` counts as importing ``package.name`` when that is a module;
    relative imports are resolved."""
    package = dotted_name(path) if path.name == "__init__.py" else dotted_name(path.parent)
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append((sub if sub in NAMES else base, node.lineno))
    return found


def type_checking_only(tree: ast.AST) -> set[int]:
    """The ids of the nodes under ``if TYPE_CHECKING:``: never run."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for stmt in node.body:
                skipped.update(id(n) for n in ast.walk(stmt))
    return skipped


def import_graph() -> dict[str, set[str]]:
    """Which bnfreeze modules each one imports when it runs (module level or in a function)."""
    graph: dict[str, set[str]] = {}
    for path in MODULES:
        name = dotted_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skipped = type_checking_only(tree)
        lines = {n.lineno for n in ast.walk(tree) if id(n) in skipped and hasattr(n, "lineno")}
        graph[name] = {
            module
            for module, line in imports(path)
            if module in NAMES and module != name and line not in lines
        }
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def dynamic_imports(path: Path) -> list[str]:
    """``importlib.import_module(...)`` / ``__import__(...)`` calls in ``path`` that could
    name a bnfreeze module: a literal starting with ``bnfreeze``, or any argument when the
    module holds such a literal anywhere (a table of module names, say)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    literals = {
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant)
        and isinstance(n.value, str)
        and re.fullmatch(r"bnfreeze(\.[a-z_0-9]+)+", n.value)
    }
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        if name not in ("importlib.import_module", "import_module", "__import__"):
            continue
        first = node.args[0] if node.args else None
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            if first.value.startswith("bnfreeze"):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif literals:
            found.append(
                f"line {node.lineno}: {ast.unparse(node)} (module names {sorted(literals)})"
            )
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_bnfreeze_module_is_imported_by_name(path):
    assert dynamic_imports(path) == []


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_is_too_long(path):
    name = str(path.relative_to(ROOT))
    if name in LONG_MODULES:
        return
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it by job"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_only_go_down(path):
    dotted = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if dotted == "bnfreeze.__init__":
        return  # the package's lazy front door may name anything
    mine = room_of(dotted)
    upward = []
    for module, line in imports(path):
        if not module.startswith("bnfreeze."):
            continue
        theirs = room_of(module)
        if theirs not in RANK:  # a name of the top-level package, such as __version__
            continue
        if RANK[theirs] > RANK[mine]:
            upward.append(f"line {line}: {module}")
    assert upward == [], f"{dotted} ({mine}) imports upward"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_only_runtime_imports_keras(path):
    dotted = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if room_of(dotted) == "runtime":
        return
    heavy = [
        f"line {line}: {module}"
        for module, line in imports(path)
        if module.split(".")[0] in KERAS_MODULES
    ]
    assert heavy == []


def test_every_path_the_architecture_page_names_exists():
    page = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    named = set(re.findall(r"(bnfreeze/[a-z_/.]+[a-z/])", page))
    assert named, "docs/architecture.md names no path"
    assert sorted(p for p in named if not (ROOT / p.rstrip("/")).exists()) == []
