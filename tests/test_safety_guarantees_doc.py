"""docs/guarantees.md, "Reading and writing files safely": each rule names the test that
proves it, and quotes the figures the code uses."""

from __future__ import annotations

import importlib
import re

import hostile
import pytest

from bnfreeze import limits
from bnfreeze.formats import integrity

PAGE = (hostile.ROOT / "docs" / "guarantees.md").read_text(encoding="utf-8")


def section() -> str:
    found = re.search(r"^## Reading and writing files safely\n(.*)", PAGE, flags=re.M | re.S)
    assert found, "docs/guarantees.md has no 'Reading and writing files safely' section"
    return " ".join(found.group(1).split())


@pytest.mark.parametrize(
    "module, names",
    [
        ("test_outside_reads", ["test_no_outside_file_is_opened"]),
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
    tests = importlib.import_module(module)
    for name in names:
        assert callable(getattr(tests, name, None)), f"{module}.{name} is gone"
        assert name in section()
    assert f"tests/{module}.py" in section()


def test_the_quoted_figures_are_the_codes():
    import test_outside_reads

    text = section()
    assert f"at most {integrity.PIECE // 2**20} MiB of it" in text
    assert f"inflated {integrity.PIECE // 2**20} MiB at a time" in text
    assert f"up to the {limits.MAX_EXPANSION_RATIO}:1 limit" in text
    assert f"at most {limits.MAX_CONFIG_BYTES // 2**20} MiB" in text
    kinds, formats = len(test_outside_reads.KINDS), len(test_outside_reads.FORMATS)
    assert f"on {kinds * formats} files ({kinds} kinds × {formats} formats)" in text
