"""The README's "Guarantees" section quotes the suite's own figures
(``tests/support/guarantees.py``): how many bad inputs each run tries, how many interruption
points, and the limits. Change a generator or a limit and this fails until the README says
the same."""

from __future__ import annotations

import re

import guarantees
import hostile
import pytest
from paths import ROOT

from bnfreeze import limits

README = (ROOT / "README.md").read_text(encoding="utf-8")


def section() -> str:
    found = re.search(r"^## Guarantees\n(.*?)(?=^## )", README, flags=re.M | re.S)
    assert found, "README.md has no '## Guarantees' section"
    return " ".join(found.group(1).split())  # one line: phrases may wrap anywhere


PLAN = guarantees.planned()


@pytest.mark.parametrize(
    "phrase",
    [
        f"**{PLAN['bad_inputs']} bad inputs**",
        f"{PLAN['corpus_cases']} generated from the sample models",
        f"each of {len(hostile.MUTATED_SAMPLES)} samples cut at {hostile.TRUNCATIONS_PER_SAMPLE} "
        f"offsets and with {hostile.FLIPS_PER_SAMPLE} bits flipped",
        f"{PLAN['fuzz_examples']} hypothesis mutations",
        f"{PLAN['regression_cases']} regression cases",
        f"through {PLAN['commands_per_input']} commands",
        f"**{PLAN['kill_points']} interruption points**",
        f"({guarantees.KILL_POINTS} with no previous output, {guarantees.KILL_POINTS} with one)",
        f"at least {PLAN['kills_mid_write']} of them ({guarantees.MID_WRITE_KILLS} per scenario)",
        f"{PLAN['full_disk_cases']} full-disk cases",
        f"({PLAN['race_rounds']} rounds)",
        "Each round is seen to overlap"
        if PLAN["race_rounds_overlapped"] == PLAN["race_rounds"]
        else f"{PLAN['race_rounds_overlapped']} rounds are seen to overlap",
        "within 5 CPU seconds",
        f"| {PLAN['max_config_mib']} MiB |",
        f"| {PLAN['max_expansion_ratio']}:1 |",
        f"| {PLAN['max_json_depth']} levels |",
        f"| {PLAN['max_nesting_depth']} |",
        f"| {PLAN['max_layers']:,} |",
    ],
)
def test_readme_quotes_the_suite(phrase):
    assert phrase in section()


def test_figures_add_up():
    assert PLAN["bad_inputs"] == (
        PLAN["corpus_cases"] + PLAN["fuzz_examples"] + PLAN["regression_cases"]
    )
    assert PLAN["corpus_cases"] == len(hostile.corpus_names())
    assert PLAN["max_json_depth"] == limits.MAX_JSON_DEPTH


def test_quoted_cpu_budget_is_the_tests():
    assert f"within {guarantees.CPU_BUDGET:g} CPU seconds" in section()
