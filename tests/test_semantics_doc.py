"""docs/semantics.md is the project's own statement of the Keras rules its messages cite.

Every rule names the runtimes it is measured on and the tests that measure it, and each of
those tests exists; ``bnfreeze explain`` numbers its rules as the document does; and nothing
in the package, the README or the docs cites a document a user does not have."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "semantics.md").read_text(encoding="utf-8")
RULES = re.findall(r"^## Rule (\d+): (.+)$", DOC, flags=re.M)


def sections() -> dict[int, str]:
    parts = re.split(r"^## Rule (\d+): .+$", DOC, flags=re.M)
    return {int(number): body for number, body in zip(parts[1::2], parts[2::2], strict=True)}


def test_the_rules_are_numbered_in_order():
    assert [int(n) for n, _ in RULES] == list(range(1, len(RULES) + 1))
    assert len(RULES) >= 7


def defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    }


@pytest.mark.parametrize("number", sorted(sections()), ids=lambda n: f"rule {n}")
def test_every_rule_names_its_backends_and_existing_tests(number):
    body = sections()[number]
    measured = re.search(r"^- Measured on: (.+)\.$", body, flags=re.M)
    assert measured, f"rule {number} does not say which runtimes it is measured on"
    runtimes = {r.strip() for r in measured.group(1).split(",")}
    known = {"Keras 3 / TensorFlow", "Keras 3 / JAX", "tf_keras", "tf_keras (files)"}
    assert runtimes <= known, runtimes - known
    cited = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", body)
    assert cited, f"rule {number} names no test that measures it"
    for file, name in cited:
        path = ROOT / file
        assert path.is_file(), f"rule {number}: {file} does not exist"
        assert name in defined_tests(path), f"rule {number}: {file} has no test {name}"


def test_jax_is_claimed_only_where_a_jax_test_measures_it():
    """A rule "measured on" JAX cites a test of tests/runtime/test_backends.py or
    tests/runtime/test_replicas.py, which run on JAX."""
    for number, body in sections().items():
        if "Keras 3 / JAX" in body:
            assert any(
                f"tests/runtime/{t}.py::" in body for t in ("test_backends", "test_replicas")
            ), f"rule {number}"


def test_explain_numbers_its_rules_as_the_document_does():
    from bnfreeze.runtime.explain import RULES as EXPLAIN_RULES

    titles = dict(RULES)
    for runtime, rules in EXPLAIN_RULES.items():
        numbers = [rule.split(" ", 1)[0] for rule in rules]
        assert numbers == ["1.", "2.", "3.", "4."], runtime
        assert all(str(n) in titles for n in range(1, 5))


PRIVATE = ("SEMAN" + "TICS", "\N{SECTION SIGN}")


@pytest.mark.parametrize(
    "path",
    sorted(
        [
            *(ROOT / "bnfreeze").rglob("*.py"),
            *(ROOT / "bnfreeze").rglob("*.toml"),
            *(ROOT / "docs").glob("*.md"),
            *(ROOT / "tests").rglob("*.py"),
            *(p for p in (ROOT / "tests" / "golden").rglob("*") if p.is_file()),
            ROOT / "README.md",
            ROOT / "CHANGELOG.md",
        ]
    ),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_nothing_cites_a_document_the_user_does_not_have(path):
    text = path.read_text(encoding="utf-8")
    for word in PRIVATE:
        assert word not in text, f"{path.relative_to(ROOT)} cites {word!r}"


def test_the_readme_links_the_document():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "(docs/semantics.md)" in readme
