"""docs/guarantees.md, "Reading and writing files safely": each rule names the test that
proves it, and quotes the figures the code uses."""

from __future__ import annotations

import importlib.util
import re

import paths
import pytest

from bnfreeze import limits
from bnfreeze.formats import integrity

PAGE = (paths.ROOT / "docs" / "guarantees.md").read_text(encoding="utf-8")


def _load(module: str):
    """A test module of tests/formats/, by path (test folders are not packages)."""
    path = paths.TESTS / "formats" / f"{module}.py"
    spec = importlib.util.spec_from_file_location(f"_doc_{module}", path)
    assert spec is not None and spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def section() -> str:
    found = re.search(r"^## Reading and writing files safely\n(.*)", PAGE, flags=re.M | re.S)
    assert found, "docs/guarantees.md has no 'Reading and writing files safely' section"
    return " ".join(found.group(1).split())


@pytest.mark.parametrize(
    "module, names",
    [
        ("test_readers_self_contained", ["test_no_outside_file_is_opened"]),
        (
            "test_integrity",
            [
                "test_a_damaged_weights_member_is_refused",
                "test_in_place_on_a_damaged_file_leaves_it_as_it_was",
                "test_a_member_that_changes_during_the_copy_is_refused",
                "test_inflating_a_member_is_capped",
            ],
        ),
        (
            "test_destinations",
            [
                "test_export_onto_the_input_is_refused",
                "test_a_special_file_is_never_replaced",
                "test_in_place_through_a_symlink_edits_the_file_it_points_to",
            ],
        ),
    ],
)
def test_each_rule_names_a_test_that_exists(module, names):
    tests = _load(module)
    for name in names:
        assert callable(getattr(tests, name, None)), f"{module}.{name} is gone"
        assert name in section()
    assert f"tests/formats/{module}.py" in section()


def test_the_quoted_figures_are_the_codes():
    outside = _load("test_readers_self_contained")

    text = section()
    assert f"at most {integrity.PIECE // 2**20} MiB of it" in text
    assert f"inflated {integrity.PIECE // 2**20} MiB at a time" in text
    assert f"up to the {limits.MAX_EXPANSION_RATIO}:1 limit" in text
    assert f"at most {limits.MAX_CONFIG_BYTES // 2**20} MiB" in text
    kinds, formats = len(outside.KINDS), len(outside.FORMATS)
    assert f"on {kinds * formats} files ({kinds} kinds × {formats} formats)" in text
