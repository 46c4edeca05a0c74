"""The layout the README's Architecture section describes is the layout of the tree.

* every path its table names exists, and every module or package at the top of
  ``bnfreeze/`` is named there, so the table cannot drift from the tree;
* imports only go down the rooms' order (``limits``/``errors`` < ``model`` < ``formats`` <
  ``ops`` < ``runtime`` < ``render`` < ``api`` < ``cli``), at module level and inside
  functions alike;
* only ``runtime/`` imports Keras, TensorFlow or tf_keras.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "bnfreeze"
README = (ROOT / "README.md").read_text(encoding="utf-8")

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
    "layers": 6,
    "cli": 7,
    "__main__": 8,
}
KERAS_MODULES = ("keras", "tensorflow", "tf_keras", "keras_hub", "jax", "torch")


def architecture_section() -> str:
    match = re.search(r"^## Architecture\n(.*?)^## ", README, flags=re.M | re.S)
    assert match, "the README has no '## Architecture' section"
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
    walk = architecture_section().split("The path of one command", 1)[1]
    for name in re.findall(r"`((?:[a-z_]+/)+[a-z_]+\.py)`", walk):
        path = PACKAGE / name if not name.startswith("bnfreeze/") else ROOT / name
        assert path.exists(), name


def room_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path) -> list[tuple[str, int]]:
    """Every module ``path`` imports, with its line: at module level and inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "bnfreeze":
                found += [(f"bnfreeze.{a.name}", node.lineno) for a in node.names]
            else:
                found.append((node.module, node.lineno))
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


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
