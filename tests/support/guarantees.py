"""The figures the README's "Guarantees" section quotes, and what the suite actually ran.

:func:`planned` computes them from the same generators the tests use (deterministic: fixed
offsets, fixed seeds, fixed hypothesis budgets). The tests :func:`count` what they really
tried; ``tests/conftest.py`` prints both at the end of the run and writes them to
``tests/.guarantees.json`` (not committed), and ``tests/test_guarantees_doc.py`` checks that
the README quotes :func:`planned` and the fuzz tests check that they ran exactly that many.
"""

from __future__ import annotations

import json

import hostile
from paths import REGRESSIONS, TESTS

from bnfreeze import limits

SUMMARY = TESTS / ".guarantees.json"

#: Hypothesis examples per run of the mutation fuzzer (``tests/cli/test_fuzz.py``).
FUZZ_EXAMPLES = 150
#: CPU seconds one command may spend on one bad input (typical: 0.02 s); the README quotes it.
CPU_BUDGET = 5.0
#: Commands run on every bad input: inspect, freeze --bn-inference -o OUT, check --expect.
COMMANDS = ("inspect", "freeze", "check")
#: SIGKILL moments per scenario in ``tests/formats/test_atomic_interrupt.py`` (new output,
#: existing output).
KILL_POINTS = 8
KILL_SCENARIOS = ("new output", "existing output")
#: Of each scenario's kills, how many at least must land mid-write: the process dies of the
#: signal with the output's temporary file still there (asserted, not assumed).
MID_WRITE_KILLS = 4
#: Full-disk cases: the output fills a small tmpfs (or a simulated ENOSPC).
FULL_DISK_CASES = 3
#: Rounds of two ``freeze`` processes racing for the same output; each must be seen to
#: overlap (both temporary files at once).
RACE_ROUNDS = 3

ran: dict[str, int] = {}


def count(key: str, n: int = 1) -> None:
    ran[key] = ran.get(key, 0) + n


def planned() -> dict[str, int]:
    corpus = len(hostile.corpus_names())
    regressions = len(list(REGRESSIONS.glob("*.json")))
    return {
        "corpus_cases": corpus,
        "fuzz_examples": FUZZ_EXAMPLES,
        "regression_cases": regressions,
        "bad_inputs": corpus + FUZZ_EXAMPLES + regressions,
        "commands_per_input": len(COMMANDS),
        "kill_points": KILL_POINTS * len(KILL_SCENARIOS),
        "kills_mid_write": MID_WRITE_KILLS * len(KILL_SCENARIOS),
        "full_disk_cases": FULL_DISK_CASES,
        "race_rounds": RACE_ROUNDS,
        "race_rounds_overlapped": RACE_ROUNDS,
        "max_config_mib": limits.MAX_CONFIG_BYTES // 2**20,
        "max_expansion_ratio": limits.MAX_EXPANSION_RATIO,
        "max_json_depth": limits.MAX_JSON_DEPTH,
        "max_nesting_depth": limits.MAX_NESTING_DEPTH,
        "max_layers": limits.MAX_LAYERS,
    }


def write_summary() -> None:
    SUMMARY.write_text(json.dumps({"planned": planned(), "ran": ran}, indent=2) + "\n")
