"""Plan parsing, validation (file, line, key in every message) and rule semantics.

The plans' effect on real training is measured in ``tests/cli/test_apply.py``; here the rules
are checked against the walk's records and against each other.
"""

from __future__ import annotations

import contextlib
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paths import ROOT

from bnfreeze.errors import PlanError
from bnfreeze.model.assignments import current_flags
from bnfreeze.model.expectations import ExpectKind
from bnfreeze.ops.inspect import inspect_file
from bnfreeze.ops.plan_schema import BnAction, Only, Selector
from bnfreeze.ops.plans import apply_rules, load_plan, parse_plan, parse_sets

CONFIGS = ROOT / "bnfreeze" / "recipes"
SHIPPED = sorted(CONFIGS.glob("*.toml"))


@pytest.fixture(scope="module")
def guide_layers(samples):
    return tuple(s.layer for s in inspect_file(samples / "guide_pattern.keras").layers)


@pytest.fixture(scope="module")
def nested_layers(samples):
    return tuple(s.layer for s in inspect_file(samples / "bn_under_frozen.keras").layers)


def flags_after(text: str, layers, **params):
    plan = parse_plan(text, "p.toml", params)
    return apply_rules(plan, layers, current_flags(layers)).flags


def error_of(text: str, layers=None, params=None) -> str:
    with pytest.raises(PlanError) as info:
        plan = parse_plan(text, "p.toml", params)
        if layers is not None:
            apply_rules(plan, layers, current_flags(layers))
    return str(info.value)


# --------------------------------------------------------------------------- shipped plans


def test_five_plans_are_shipped():
    assert {p.name for p in SHIPPED} == {
        "keras-guide-finetune.toml",
        "gradual-unfreeze.toml",
        "freeze-backbone.toml",
        "train-bn.toml",
        "freeze-up-to.toml",
    }


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_plan_parses_and_explains_itself(path):
    plan = load_plan(path)
    assert (plan.rules and plan.expectations) or plan.phases
    text = path.read_text()
    comment = [line for line in text.splitlines()[:6] if line.startswith("#")]
    assert len(comment) >= 3, "each plan opens with a comment block on when to use it"
    assert "When to use it" in text


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_plan_applies_to_the_guide_sample(path, guide_layers):
    plan = load_plan(path)
    if not plan.rules:  # a schedule: bnfreeze.finetune runs it, apply refuses it
        assert plan.phases
        return
    outcome = apply_rules(plan, guide_layers, current_flags(guide_layers))
    assert all(m.selected > 0 for m in outcome.matches)


def test_keras_guide_finetune_flags(guide_layers):
    flags = apply_rules(
        load_plan(CONFIGS / "keras-guide-finetune.toml"), guide_layers, current_flags(guide_layers)
    ).flags
    bn = [r for r in guide_layers if r.is_batchnorm]
    others = [r for r in guide_layers if not r.is_batchnorm and r.trainable is not None]
    assert len(bn) == 51
    assert all(flags[r.path] is False for r in bn)
    assert all(flags[r.path] is True for r in others)


def test_freeze_up_to_parameter_default_and_override(guide_layers):
    paths = [r.path for r in guide_layers]
    base = "mobilenetv2_0.35_32/"
    default = apply_rules(
        load_plan(CONFIGS / "freeze-up-to.toml"), guide_layers, current_flags(guide_layers)
    ).flags
    assert default[base + "block_12_add"] is False
    assert default[base + "block_13_expand"] is True
    later = apply_rules(
        load_plan(CONFIGS / "freeze-up-to.toml", {"block": "block_14_add"}),
        guide_layers,
        current_flags(guide_layers),
    ).flags
    assert later[base + "block_13_expand"] is False
    assert later[base + "block_15_expand"] is True
    assert paths.index(base + "block_14_add") < paths.index(base + "block_15_expand")


def test_unknown_set_parameter_is_an_error():
    with pytest.raises(PlanError, match=r"has no parameter 'blok'.*block"):
        load_plan(CONFIGS / "freeze-up-to.toml", {"blok": "x"})


# ------------------------------------------------------------------------------ semantics


def test_later_rules_win(guide_layers):
    text = """
[[rule]]
trainable = false
[[rule]]
layers = "head"
trainable = true
"""
    flags = flags_after(text, guide_layers)
    assert flags["head"] is True
    assert flags["mobilenetv2_0.35_32/Conv1"] is False
    reversed_text = """
[[rule]]
layers = "head"
trainable = true
[[rule]]
trainable = false
"""
    assert flags_after(reversed_text, guide_layers)["head"] is False


@pytest.mark.parametrize(
    ("bn", "trainable", "bn_flag", "other_flag"),
    [
        ("inference", "true", False, True),
        ("train", "false", True, False),
        ("follow", "true", True, True),
        ("follow", "false", False, False),
    ],
)
def test_bn_actions(guide_layers, bn, trainable, bn_flag, other_flag):
    flags = flags_after(f'[[rule]]\ntrainable = {trainable}\nbn = "{bn}"\n', guide_layers)
    base = "mobilenetv2_0.35_32/"
    assert flags[base + "bn_Conv1"] is bn_flag
    assert flags[base + "Conv1"] is other_flag


def test_every_bn_action_member_is_accepted(guide_layers):
    for action in BnAction:
        trainable = "trainable = true\n"
        text = f'[[rule]]\n{trainable}bn = "{action.value}"\n'
        assert parse_plan(text).rules[0].bn is action


def test_bn_only_without_trainable_leaves_other_layers(guide_layers):
    flags = flags_after('[[rule]]\nbn = "train"\n', guide_layers)
    before = current_flags(guide_layers)
    changed = {p for p in flags if flags[p] != before[p]}
    assert changed == {r.path for r in guide_layers if r.is_batchnorm}


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ('layers = "head"', {"head"}),
        ('layers = ["head", "pool"]', {"head", "pool"}),
        (
            'regex = "block_1[0-9]_project$"',
            {f"mobilenetv2_0.35_32/block_{i}_project" for i in range(10, 17)},
        ),
        ('class = "Dense"', {"head"}),
        ('class = "Depthwise*"\nregex = "block_16"', {"mobilenetv2_0.35_32/block_16_depthwise"}),
        (
            'only = "bn"\nregex = "block_16"',
            {f"mobilenetv2_0.35_32/block_16_{k}_BN" for k in ("expand", "depthwise", "project")},
        ),
        ("depth = 0", {"pool", "head"}),
        ("max_depth = 0", {"pool", "head"}),
        ('from = "pool"', {"pool", "head"}),
        ('up_to = "bn_Conv1"', {"mobilenetv2_0.35_32/Conv1", "mobilenetv2_0.35_32/bn_Conv1"}),
    ],
)
def test_selectors(guide_layers, selector, expected):
    plan = parse_plan(f"[[rule]]\n{selector}\ntrainable = true\n")
    assert {r.path for r in plan.rules[0].selector.leaves(guide_layers)} == expected


def test_selectors_intersect_and_only_non_bn(guide_layers):
    plan = parse_plan('[[rule]]\nregex = "block_16_"\nonly = "non-bn"\ntrainable = true\n')
    picked = plan.rules[0].selector.leaves(guide_layers)
    assert picked and not any(r.is_batchnorm for r in picked)
    assert all("block_16_" in r.path for r in picked)


def test_a_container_selects_every_layer_below_it(guide_layers):
    plan = parse_plan('[[rule]]\nclass = "Functional"\ntrainable = true\n')
    picked = plan.rules[0].selector.leaves(guide_layers)
    assert len(picked) == 150
    assert all(r.path.startswith("mobilenetv2_0.35_32/") for r in picked)


def test_min_depth_selects_the_nested_backbone(nested_layers):
    plan = parse_plan("[[rule]]\nmin_depth = 1\ntrainable = false\n")
    picked = {r.path for r in plan.rules[0].selector.leaves(nested_layers)}
    assert picked == {"backbone/inner_dense", "backbone/inner_bn"}


def test_a_rule_covering_a_whole_container_sets_the_container_flag(nested_layers):
    flags = flags_after("[[rule]]\nmin_depth = 1\ntrainable = false\n", nested_layers)
    assert flags["backbone"] is False
    flags = flags_after('[[rule]]\nmin_depth = 1\nonly = "bn"\ntrainable = true\n', nested_layers)
    assert flags["backbone"] is False  # untouched: only its BN leaf was selected


def test_only_enum_members_parse():
    for member in Only:
        text = f'[[rule]]\nonly = "{member.value}"\ntrainable = true\n'
        assert parse_plan(text).rules[0].selector.only is member


def test_expectations_map_onto_the_shared_vocabulary():
    plan = parse_plan(
        """
[[expect]]
bn = "inference"
[[expect]]
bn = "train"
[[expect]]
layers = "head"
trains = true
[[expect]]
trains = false
layers = "mobilenet*"
[[expect]]
min_training = 2
[[expect]]
max_training = 9
""",
        "e.toml",
    )
    kinds = [e.kind for e in plan.expectations]
    assert kinds == [
        ExpectKind.BN_INFERENCE,
        ExpectKind.BN_TRAIN,
        ExpectKind.TRAINS,
        ExpectKind.FROZEN,
        ExpectKind.MIN_TRAINING,
        ExpectKind.MAX_TRAINING,
    ]
    assert plan.expectations[0].scope is None
    assert plan.expectations[2].scope == Selector(layers=("head",))
    assert plan.expectations[4].count == 2
    assert plan.expectations[2].source == "e.toml:6: expect 3"


def test_parameters_substitute_everywhere(guide_layers):
    text = """
[params]
first = "pool"
[[rule]]
name = "from ${first}"
from = "${first}"
trainable = false
[[expect]]
layers = "${first}*"
trains = false
"""
    plan = parse_plan(text)
    assert plan.rules[0].name == "from pool"
    assert plan.rules[0].selector.from_ == "pool"
    assert plan.expectations[0].scope.layers == ("pool*",)
    assert parse_plan(text, params={"first": "head"}).rules[0].selector.from_ == "head"


def test_parse_sets():
    assert parse_sets(["a=b", "c=d=e", "x="]) == {"a": "b", "c": "d=e", "x": ""}
    for bad in ["novalue", "=x", "1a=b", "a b=c"]:
        with pytest.raises(PlanError, match="NAME=VALUE"):
            parse_sets([bad])


# ------------------------------------------------------------------------ errors, located


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[[rule]]\ntrainabel = true\n",
            "p.toml:2: rule 1, key 'trainabel': unknown key 'trainabel'. Did you mean 'trainable'?",
        ),
        (
            "[[rule]]\ntrainable = 1\n",
            "p.toml:2: rule 1, key 'trainable': must be true or false, not the number 1.",
        ),
        (
            '[[rule]]\ntrainable = true\nbn = "infer"\n',
            'p.toml:3: rule 1, key \'bn\': \'infer\' is not one of "inference", "train", "follow", '
            '"frozen-stats".',
        ),
        (
            '\n[[rule]]\ntrainable = true\n\n[[rule]]\nregex = "(("\ntrainable = true\n',
            "p.toml:6: rule 2, key 'regex': bad regex '((': missing ), unterminated subpattern "
            "at position 1.",
        ),
        (
            '[[rule]]\nlayers = "block_[12"\ntrainable = true\n',
            "p.toml:2: rule 1, key 'layers': bad glob 'block_[12': '[' at position 6 is never "
            "closed.",
        ),
        (
            "[[rule]]\nlayers = []\ntrainable = true\n",
            "p.toml:2: rule 1, key 'layers': must be a string or a non-empty list of strings, "
            "not an array.",
        ),
        (
            '[[rule]]\nlayers = "x"\n',
            "p.toml:1: rule 1: the rule has no action: give trainable = true/false, bn = "
            '"inference" | "train" | "frozen-stats", synchronized = true/false, or several.',
        ),
        (
            '[[rule]]\nonly = "bn"\nsynchronized = "off"\n',
            "p.toml:3: rule 1, key 'synchronized': must be true or false, not the string 'off'.",
        ),
        (
            '[[rule]]\nonly = "non-bn"\nsynchronized = false\n',
            "p.toml:3: rule 1, key 'synchronized': the rule selects only non-BN layers "
            '(only = "non-bn"), so synchronized has no effect.',
        ),
        (
            '[[rule]]\nonly = "non-bn"\nbn = "frozen-stats"\n',
            "p.toml:3: rule 1, key 'bn': the rule selects only non-BN layers (only = \"non-bn\"), "
            "so bn has no effect.",
        ),
        (
            '[[rule]]\nbn = "follow"\n',
            "p.toml:2: rule 1, key 'bn': bn = \"follow\" takes the rule's trainable value, but the "
            "rule sets none.",
        ),
        (
            '[[rule]]\nonly = "non-bn"\nbn = "train"\n',
            "p.toml:3: rule 1, key 'bn': the rule selects only non-BN layers (only = \"non-bn\"), "
            "so bn has no effect.",
        ),
        (
            "[[rule]]\ndepth = -1\ntrainable = true\n",
            "p.toml:2: rule 1, key 'depth': must be a whole number >= 0, not the number -1.",
        ),
        (
            "[[rule]]\ndepth = 1\nmax_depth = 2\ntrainable = true\n",
            "p.toml:2: rule 1, key 'depth': give depth, or min_depth / max_depth, not both.",
        ),
        (
            "[[rule]]\nmin_depth = 3\nmax_depth = 2\ntrainable = true\n",
            "p.toml:2: rule 1, key 'min_depth': min_depth 3 is greater than max_depth 2.",
        ),
        (
            '[[rule]]\nup_to = "${block}"\ntrainable = true\n',
            "p.toml:2: rule 1, key 'up_to': unknown parameter ${block} (parameters: none; "
            "declare them in [params]).",
        ),
        (
            "[rule]\ntrainable = true\n",
            "p.toml:1: [rule]: write [[rule]] (an array of tables), not [rule].",
        ),
        ("rules = 1\n", "p.toml:1: key 'rules': unknown key 'rules'. Did you mean 'rule'?"),
        ("[plan]\nname = 3\n", "p.toml:2: [plan], key 'name': must be a string, not the number 3."),
        (
            "[plan]\nschema = 2\n[[rule]]\ntrainable=true\n",
            "p.toml:2: [plan], key 'schema': schema 2 is not supported; this bnfreeze reads "
            "schema 1.",
        ),
        (
            "[params]\nblock = 12\n",
            "p.toml:2: [params], key 'block': parameter 'block' must be a string, not the number "
            "12.",
        ),
        (
            '[[expect]]\nbn = "inference"\ntrains = true\n',
            "p.toml:3: expect 1, key 'trains': an [[expect]] states exactly one of bn, trains, "
            "min_training, max_training (found: bn, trains).",
        ),
        (
            '[[expect]]\nlayers = "x"\n',
            "p.toml:1: expect 1: an [[expect]] states exactly one of bn, trains, min_training, "
            "max_training (found: none).",
        ),
        (
            '[[expect]]\nbn = "follow"\n',
            "p.toml:2: expect 1, key 'bn': an expectation's bn is "
            '"inference", "train" or "frozen-stats".',
        ),
        (
            "[[expect]]\nmin_training = true\n",
            "p.toml:2: expect 1, key 'min_training': must be a whole number >= 0, not the boolean "
            "true.",
        ),
        (
            '[plan]\nname = "empty"\n',
            "p.toml: the plan has no [[rule]], [[expect]] or [[phase]] table. See the shipped "
            "plans (bnfreeze plans) and bnfreeze's docs/plans.md for the schema.",
        ),
        ("[[rule]]\ntrainable = true\nx = \n", "p.toml:3: not valid TOML: Invalid value."),
        (
            "[[rule]\n",
            "p.toml:1: not valid TOML: Expected ']]' at the end of an array declaration.",
        ),
    ],
)
def test_errors_name_file_line_and_key(text, message):
    assert error_of(text) == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[[rule]]\ntrainable = true\n[[rule]]\nlayers = ["head", "nope*"]\ntrainable = false\n',
            "p.toml:4: rule 2, key 'layers': layers 'nope*' matches no layer.",
        ),
        (
            '[[rule]]\n\nregex = "^nope"\ntrainable = false\n',
            "p.toml:3: rule 1, key 'regex': regex '^nope' matches no layer.",
        ),
        (
            '[[rule]]\nclass = "Conv3D"\ntrainable = false\n',
            "p.toml:2: rule 1, key 'class': class 'Conv3D' matches no layer.",
        ),
        (
            '[[rule]]\nup_to = "zzz"\ntrainable = false\n',
            "p.toml:2: rule 1, key 'up_to': no layer named 'zzz' in the model. "
            "Run bnfreeze inspect --all to list layer paths.",
        ),
        (
            '[[rule]]\nfrom = "block_13_expnd"\ntrainable = false\n',
            "p.toml:2: rule 1, key 'from': no layer named 'block_13_expnd' in the model. "
            "Did you mean 'block_13_expand'",
        ),
        (
            "[[rule]]\ndepth = 5\ntrainable = false\n",
            "p.toml:1: rule 1: depth=5 matches no layer whose flag can be set.",
        ),
        (
            '[[rule]]\nlayers = "head"\nonly = "bn"\ntrainable = false\n',
            "p.toml:1: rule 1: layers=head,only=bn matches no layer whose flag can be set.",
        ),
    ],
)
def test_a_rule_that_matches_nothing_is_an_error(guide_layers, text, message):
    assert error_of(text, guide_layers).startswith(message)


def test_a_plan_without_rules_cannot_be_applied(guide_layers):
    plan = parse_plan('[[expect]]\nbn = "inference"\n', "x.toml")
    with pytest.raises(PlanError, match=r"x.toml: the plan has no \[\[rule\]\] table"):
        apply_rules(plan, guide_layers, current_flags(guide_layers))


def test_load_plan_file_errors(tmp_path):
    with pytest.raises(PlanError, match="no such plan file"):
        load_plan(tmp_path / "missing.toml")
    with pytest.raises(PlanError, match="is a directory"):
        load_plan(tmp_path)
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe[[rule]]")
    with pytest.raises(PlanError, match="not UTF-8 text"):
        load_plan(binary)
    huge = tmp_path / "huge.toml"
    huge.write_bytes(b"#" * (2**20 + 10))
    with pytest.raises(PlanError, match="larger than 1 MiB"):
        load_plan(huge)


def test_deep_nesting_is_a_plan_error():
    with pytest.raises(PlanError, match="nested too deeply"):
        parse_plan("a = " + "[" * 50_000)


# ----------------------------------------------------------------------------- hypothesis

_KEYS = [
    "rule",
    "expect",
    "plan",
    "params",
    "layers",
    "regex",
    "class",
    "only",
    "up_to",
    "from",
    "depth",
    "min_depth",
    "max_depth",
    "trainable",
    "bn",
    "name",
    "trains",
    "min_training",
    "max_training",
    "synchronized",
    "schema",
    "block",
]
_VALUES = [
    "true",
    "false",
    "1",
    "-1",
    '"inference"',
    '"train"',
    '"follow"',
    '"frozen-stats"',
    '"bn"',
    '"non-bn"',
    '"*"',
    '"(("',
    '"a["',
    '["x", 1]',
    "[]",
    "{}",
    '"${block}"',
    '"${x}"',
    "1.5",
    '""',
    '"head"',
]

toml_lines = st.one_of(
    st.sampled_from(["[[rule]]", "[[expect]]", "[plan]", "[params]", "[rule]", "[[plan]]"]),
    st.builds(lambda k, v: f"{k} = {v}", st.sampled_from(_KEYS), st.sampled_from(_VALUES)),
    st.text(alphabet=string.printable, max_size=30),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(toml_lines, max_size=12),
    st.dictionaries(st.sampled_from(["block", "x", "bad name"]), st.text(max_size=5), max_size=2),
)
def test_parsing_raises_only_plan_error(lines, params):
    try:
        parse_plan("\n".join(lines), "h.toml", params)
    except PlanError as exc:
        assert str(exc).startswith(("h.toml", "--set"))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_raises_only_plan_error(text):
    with contextlib.suppress(PlanError):
        parse_plan(text, "h.toml")


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.lists(toml_lines, max_size=10))
def test_applying_raises_only_plan_error(guide_layers, lines):
    try:
        plan = parse_plan("\n".join(lines), "h.toml")
        if plan.rules:
            apply_rules(plan, guide_layers, current_flags(guide_layers))
    except PlanError:
        pass


# --------------------------------------------------------------------------- plans by name


def test_shipped_plans_are_package_data_listed_with_their_descriptions():
    from bnfreeze.ops.plans import shipped_plans

    plans = shipped_plans()
    assert [p.name for p in plans] == [p.stem for p in SHIPPED]
    for plan in plans:
        assert plan.path.parent == ROOT / "bnfreeze" / "recipes"
        assert plan.description == load_plan(plan.path).description
        assert plan.description


def test_a_shipped_plan_is_taken_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the checkout: no relative path could find it
    by_name = load_plan("freeze-up-to", {"block": "block_14_add"})
    by_path = load_plan(CONFIGS / "freeze-up-to.toml", {"block": "block_14_add"})
    assert by_name.rules == by_path.rules
    assert by_name.path == str(CONFIGS / "freeze-up-to.toml")
    assert load_plan("train-bn.toml").name == "train-bn"  # the file name works too


def test_an_existing_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("train-bn").write_text('[plan]\nname = "mine"\n[[expect]]\nbn = "inference"\n')
    assert load_plan("train-bn").name == "mine"


def test_an_unknown_plan_name_lists_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PlanError) as info:
        load_plan("keras-guide")
    assert str(info.value) == (
        "keras-guide: no such plan file. Shipped plans, taken by name (bnfreeze plans "
        "describes them): freeze-backbone, freeze-up-to, gradual-unfreeze, "
        "keras-guide-finetune, train-bn."
    )


def test_the_plans_command_lists_and_prints_them():
    from click.testing import CliRunner

    from bnfreeze.cli import cli

    listed = CliRunner().invoke(cli, ["plans"], catch_exceptions=False)
    assert listed.exit_code == 0
    assert listed.stdout.splitlines()[:2] == [
        "freeze-backbone",
        "    Freeze every layer inside nested models; train the top-level head.",
    ]
    assert all(len(line) <= 80 for line in listed.stdout.splitlines())
    shown = CliRunner().invoke(cli, ["plans", "train-bn"], catch_exceptions=False)
    assert shown.exit_code == 0
    assert shown.stdout == (CONFIGS / "train-bn.toml").read_text(encoding="utf-8")
    unknown = CliRunner().invoke(cli, ["plans", "nope"], catch_exceptions=False)
    assert unknown.exit_code == 2
    assert "nope: not a shipped plan; the shipped plans are freeze-backbone" in unknown.stderr


# --------------------------------------------------------------------------------- phases


def test_shipped_schedules_declare_what_each_phase_trains(guide_layers):
    from bnfreeze.ops.phases import BnMode, declare

    guide = load_plan(CONFIGS / "keras-guide-finetune.toml")
    assert guide.rules and guide.expectations  # apply and check are unchanged
    first, second = (declare(p, p.name or "", guide_layers) for p in guide.phases)
    assert first.trains == {"pool", "head"}  # every top-level leaf; pool has no weights
    assert second.trains == {r.path for r in guide_layers if r.kind.value == "layer"}
    assert not first.bn_train and not second.bn_train
    gradual = load_plan(CONFIGS / "gradual-unfreeze.toml")
    assert [p.bn for p in gradual.phases] == [BnMode.INFERENCE] * 3
    assert [p.learning_rate for p in gradual.phases] == [1e-3, 1e-4, 1e-5]
    sizes = [len(declare(p, "", guide_layers).trains) for p in gradual.phases]
    assert sizes[0] < sizes[1] < sizes[2]
    moved = load_plan(CONFIGS / "gradual-unfreeze.toml", {"top": "block_16_expand"})
    assert moved.phases[1].name == "from block_16_expand"


def test_a_phase_table_parses_into_a_phase():
    from bnfreeze.ops.phases import BnMode

    plan = parse_plan(
        '[[phase]]\nname = "top"\nfrom = "block_13_expand"\nepochs = 3\nbn = "flags"\n'
        'learning_rate = 1e-4\nlearning_rates = { "block_1*" = 1e-5, "*" = 2e-4 }\n'
    )
    (phase,) = plan.phases
    assert (phase.name, phase.epochs, phase.bn, phase.learning_rate) == (
        "top",
        3,
        BnMode.FLAGS,
        1e-4,
    )
    assert phase.learning_rates == (("block_1*", 1e-5), ("*", 2e-4))
    assert phase.selector == Selector(from_="block_13_expand")
    assert plan.rules == () and plan.expectations == ()


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("bn = 'inference'", "p.toml:1: phase 1: a phase needs epochs = N"),
        ("epochs = 0", "p.toml:2: phase 1, key 'epochs': must be a whole number >= 1, not 0."),
        ("epochs = 1.5", "p.toml:2: phase 1, key 'epochs': must be a whole number >= 0"),
        (
            "epochs = 1\nbn = 'follow'",
            "p.toml:3: phase 1, key 'bn': 'follow' is not one of \"inference\", \"train\", "
            '"flags", "frozen-stats".',
        ),
        (
            "epochs = 1\nlearning_rate = -1",
            "p.toml:3: phase 1, key 'learning_rate': must be a positive number",
        ),
        (
            "epochs = 1\nlearning_rates = 0.1",
            "p.toml:3: phase 1, key 'learning_rates': must be a table of globs and rates",
        ),
        (
            "epochs = 1\nlearning_rates = { 'a' = 'x' }",
            "p.toml:3: phase 1, key 'learning_rates': must be a positive number, not the string",
        ),
        ("epochs = 1\ntrainable = true", "p.toml:3: phase 1, key 'trainable': unknown key"),
    ],
)
def test_bad_phase_tables_are_located_errors(table, message):
    assert error_of(f"[[phase]]\n{table}\n").startswith(message)


def test_apply_refuses_a_plan_of_phases_only(samples, tmp_path):
    from click.testing import CliRunner

    from bnfreeze.cli import cli

    out = tmp_path / "out.keras"
    args = ["apply", str(samples / "guide_pattern.keras"), "--plan", "gradual-unfreeze"]
    result = CliRunner().invoke(cli, [*args, "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 2
    assert "the plan holds [[phase]] tables and no [[rule]]" in result.stderr
    assert "bnfreeze.finetune(model, PLAN, x, y)" in result.stderr
    assert result.stdout == ""
    assert not out.exists()


# ------------------------------------------- synchronized and bn = "frozen-stats" (fast)


def test_frozen_stats_rule_trains_bn_and_changes_their_class(guide_layers):
    from bnfreeze.ops.plans import resolve_bn_config

    text = '[[rule]]\ntrainable = false\n\n[[rule]]\nonly = "bn"\nbn = "frozen-stats"\n'
    plan = parse_plan(text, "p.toml")
    flags = apply_rules(plan, guide_layers, current_flags(guide_layers)).flags
    bn = {r.path for r in guide_layers if r.is_batchnorm}
    assert {p for p in bn if flags[p] is not True} == set()
    assert flags["mobilenetv2_0.35_32/Conv1"] is False
    config = resolve_bn_config(plan, guide_layers)
    assert dict(config.classes) == dict.fromkeys(bn, "frozen-stats")
    assert config.synchronized == ()
    assert plan.rules[1].describe() == "only=bn: bn=frozen-stats"


def test_later_rules_win_for_class_and_synchronized(guide_layers):
    from bnfreeze.ops.plans import resolve_bn_config

    text = (
        '[[rule]]\nonly = "bn"\nbn = "frozen-stats"\nsynchronized = true\n\n'
        '[[rule]]\nlayers = "*bn_Conv1"\nbn = "inference"\nsynchronized = false\n'
    )
    config = resolve_bn_config(parse_plan(text, "p.toml"), guide_layers)
    first = "mobilenetv2_0.35_32/bn_Conv1"
    assert dict(config.classes)[first] == "batchnorm"
    assert dict(config.synchronized)[first] is False
    others = {p for p, c in config.classes if p != first}
    assert others and all(dict(config.classes)[p] == "frozen-stats" for p in others)
    assert all(dict(config.synchronized)[p] is True for p in others)


def test_a_synchronized_rule_without_bn_layers_is_a_located_error(guide_layers):
    from bnfreeze.ops.plans import resolve_bn_config

    plan = parse_plan('[[rule]]\nlayers = "head"\nsynchronized = false\n', "p.toml")
    with pytest.raises(PlanError) as info:
        resolve_bn_config(plan, guide_layers)
    assert str(info.value) == (
        "p.toml:3: rule 1, key 'synchronized': the rule selects no BatchNormalization layer, "
        "so synchronized has nothing to change."
    )


def test_an_expectation_of_frozen_stats_uses_the_shared_vocabulary():
    plan = parse_plan('[[expect]]\nonly = "bn"\nbn = "frozen-stats"\n', "p.toml")
    assert plan.expectations[0].kind is ExpectKind.BN_FROZEN_STATS


def test_apply_sets_synchronized_in_place_config_only(samples, tmp_path):
    import zipfile

    from click.testing import CliRunner

    from bnfreeze.cli import cli
    from bnfreeze.ops.sync import set_synchronized_file

    source = tmp_path / "sync.keras"
    set_synchronized_file(samples / "sequential.keras", source, synchronized=True)
    plan = tmp_path / "off.toml"
    plan.write_text('[[rule]]\nonly = "bn"\nsynchronized = false\n')
    before = zipfile.ZipFile(source).read("model.weights.h5")
    args = ["apply", str(source), "--plan", str(plan), "--in-place"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    with zipfile.ZipFile(source) as archive:
        assert archive.read("model.weights.h5") == before
        config = archive.read("config.json").decode()
    assert '"synchronized": true' not in config
    assert config.count('"synchronized": false') == 2


def test_check_plan_compares_bn_class_and_synchronized(samples, tmp_path):
    import json

    from click.testing import CliRunner

    from bnfreeze.cli import cli

    plan = tmp_path / "f.toml"
    plan.write_text('[[rule]]\nonly = "bn"\nbn = "frozen-stats"\nsynchronized = false\n')
    source = str(samples / "sequential.keras")
    before = CliRunner().invoke(cli, ["check", source, "--plan", str(plan), "--json"])
    assert before.exit_code == 1
    out = tmp_path / "out.keras"
    applied = CliRunner().invoke(cli, ["apply", source, "--plan", str(plan), "-o", str(out)])
    assert applied.exit_code == 0, applied.stderr
    after = CliRunner().invoke(cli, ["check", str(out), "--plan", str(plan)])
    assert after.exit_code == 0, after.stdout
    failing = [
        (f["path"], f["expected"], f["actual"]) for f in json.loads(before.stdout)["failures"]
    ]
    assert failing == [
        ("bn_2", "trainable=True", "trainable=False"),
        ("bn_1", "bn=frozen-stats", "bn=batchnorm"),
        ("bn_2", "bn=frozen-stats", "bn=batchnorm"),
    ]


def test_apply_frozen_stats_refuses_a_legacy_h5(samples, tmp_path):
    from click.testing import CliRunner

    from bnfreeze.cli import cli

    plan = tmp_path / "f.toml"
    plan.write_text('[[rule]]\nonly = "bn"\nbn = "frozen-stats"\n')
    out = tmp_path / "out.h5"
    args = ["apply", str(samples / "nested_legacy.h5"), "--plan", str(plan), "-o", str(out)]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 2
    assert 'bn = "frozen-stats" rewrites .keras archives' in result.stderr
    assert not out.exists()


def test_a_frozen_stats_phase_declares_the_frozen_stats_expectation(guide_layers):
    from bnfreeze.ops.phases import BnMode, declare

    text = '[[phase]]\nfrom = "block_13_expand"\nepochs = 1\nbn = "frozen-stats"\n'
    phase = parse_plan(text, "p.toml").phases[0]
    assert phase.bn is BnMode.FROZEN_STATS
    d = declare(phase, "phase 1", guide_layers)
    chosen = {r.path for r in phase.chosen(guide_layers)}
    bn = {r.path for r in guide_layers if r.is_batchnorm}
    assert d.bn_frozen_stats == bn & chosen != set()
    assert d.bn_frozen_stats <= d.trains
    assert d.bn_inference == bn - chosen
    assert not d.bn_train


# ----------------------------------------------- the same plans and phases run in Keras


@pytest.fixture(scope="module")
def bn_cases(tmp_path_factory) -> dict:
    """tests/support/plan_bn_cases.py on TensorFlow, in its own process (a tiny Dense+BN
    model; about 15 s of CPU, most of it importing TensorFlow)."""
    import json
    import os
    import sys

    import warm
    from paths import SUPPORT

    work = tmp_path_factory.mktemp("plan_bn")
    out = work / "results.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    env["KERAS_BACKEND"] = "tensorflow"  # the script sets it too; a warm interpreter needs it now
    script = SUPPORT / "plan_bn_cases.py"
    done = warm.run(
        [sys.executable, str(script), "tensorflow", str(work), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text(encoding="utf-8"))


def _bn_case(cases: dict, name: str) -> dict:
    assert "error" not in cases[name], cases[name].get("error")
    return cases[name]


@pytest.mark.keras
def test_a_synchronized_false_plan_rewrites_a_synchronized_file_at_identical_weights(bn_cases):
    case = _bn_case(bn_cases, "synchronized_off")
    assert case["weights_member_identical"] is True
    assert case["saved_synchronized"] == {"bn1": False, "bn2": False}
    assert case["loaded_synchronized"] == {"bn1": False, "bn2": False}
    assert case["weights_equal_by_path"] is True


@pytest.mark.keras
def test_a_frozen_stats_plan_freezes_the_statistics_and_trains_gamma_beta(bn_cases):
    case = _bn_case(bn_cases, "frozen_stats_plan")
    assert case["weights_member_identical"] is True
    assert case["classes"] == {"bn1": "batchnorm", "bn2": "frozen-stats"}
    # One fit() batch, every variable compared by path: bn2's statistics stay bit-identical
    # while its gamma and beta (and bn1's statistics, in training mode) move.
    assert {"bn2/gamma", "bn2/beta", "bn1/moving_mean", "bn1/moving_variance"} <= set(case["moved"])
    assert not {"bn2/moving_mean", "bn2/moving_variance"} & set(case["moved"])
    # Keras computes bn2 with training=True: the output is normalized by moving statistics.
    assert case["bn2_uses_moving_statistics"] is True


@pytest.mark.keras
def test_a_frozen_stats_phase_takes_the_inference_branch_and_does_not_leak(bn_cases):
    case = _bn_case(bn_cases, "frozen_stats_phase")
    every_bn = {"bn1": "frozen-stats", "bn2": "frozen-stats"}
    plain = {"bn1": "batchnorm", "bn2": "batchnorm"}
    assert case["classes"] == [plain, every_bn, plain]
    phase2, phase3 = set(case["moved"][1]), set(case["moved"][2])
    stats = {f"bn{i}/moving_{s}" for i in (1, 2) for s in ("mean", "variance")}
    # Phase 2's first batch: statistics bit-identical, gamma/beta move.
    assert not stats & phase2
    assert {f"bn{i}/{w}" for i in (1, 2) for w in ("gamma", "beta")} <= phase2
    # The guard recorded both BN layers normalizing with moving statistics, as declared.
    assert case["guard_moving"] == case["declared"] == ["bn1", "bn2"]
    assert case["problems"] == [[], [], []]
    # Phase 3 (bn = "train"): plain BN again, its statistics update.
    assert stats <= phase3
