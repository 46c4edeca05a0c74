"""The public API surface is pinned: the names ``bnfreeze`` exports and each function's
signature. A change here is a change to users' code, so it must be made on purpose, here."""

from __future__ import annotations

import inspect

import pytest

import bnfreeze

EXPORTS = [
    "__version__",
    "inspect",
    "freeze",
    "unfreeze",
    "recompile",
    "RecompileWarning",
    "load_model",
    "recalibrate",
    "sync_bn",
    "finetune",
    "Phase",
    "Report",
    "Finding",
    "WarningCode",
    "EditResult",
    "BatchNormGuard",
]

SIGNATURES = {
    "inspect": (
        "(model_or_path: 'ModelOrPath', *, runtime: 'Runtime | None' = None, "
        "from_file: 'bool' = False) -> 'Report'"
    ),
    "freeze": (
        "(model_or_path: 'ModelOrPath', *, layers: 'Sequence[str]' = (), "
        "up_to: 'str | None' = None, bn_inference: 'bool' = False, train_bn: 'bool' = False, "
        "output: 'str | os.PathLike[str] | None' = None, dry_run: 'bool' = False, "
        "in_place: 'bool' = False, "
        "optimizer_state: 'str | None' = None, engine: 'str' = 'auto', "
        "custom_objects: 'str | Mapping[str, Any] | None' = None, "
        "unsafe: 'bool' = False, bn_frozen_stats: 'bool' = False) "
        "-> 'EditResult | ConvertResult'"
    ),
    "unfreeze": (
        "(model_or_path: 'ModelOrPath', *, layers: 'Sequence[str]' = (), "
        "from_: 'str | None' = None, keep_bn_inference: 'bool' = False, "
        "output: 'str | os.PathLike[str] | None' = None, dry_run: 'bool' = False, "
        "in_place: 'bool' = False, "
        "optimizer_state: 'str | None' = None, engine: 'str' = 'auto', "
        "custom_objects: 'str | Mapping[str, Any] | None' = None, "
        "unsafe: 'bool' = False) -> 'EditResult'"
    ),
    "recompile": "(model: 'ModelT') -> 'ModelT'",
    "recalibrate": (
        "(model: 'Any', data: 'Any', *, batch_size: 'int' = 32, batches: 'int | None' = None, "
        "layers: 'Sequence[str]' = (), up_to: 'str | None' = None, from_: 'str | None' = None) "
        "-> 'Recalibration'"
    ),
    "load_model": "(path: 'str | os.PathLike[str]', **kwargs: 'Any') -> 'Any'",
    "sync_bn": (
        "(path: 'str | os.PathLike[str]', *, synchronized: 'bool', layers: 'Sequence[str]' = (), "
        "output: 'str | os.PathLike[str] | None' = None, dry_run: 'bool' = False, "
        "in_place: 'bool' = False) -> 'SyncResult'"
    ),
    "finetune": (
        "(model: 'Any', phases: 'Sequence[Phase] | str | os.PathLike[str]', x: 'Any', "
        "y: 'Any' = None, *, optimizer_state: 'str' = 'carry', strict: 'bool' = False, "
        "params: 'Mapping[str, str] | None' = None, **fit_kwargs: 'Any') -> 'FinetuneResult'"
    ),
    "Phase": (
        "(epochs: 'int', trains: 'Sequence[str]' = (), "
        "bn: 'BnMode | str' = <BnMode.INFERENCE: 'inference'>, "
        "learning_rate: 'float | None' = None, "
        "learning_rates: 'Mapping[str, float] | Sequence[tuple[str, float]]' = (), "
        "up_to: 'str | None' = None, from_: 'str | None' = None, name: 'str | None' = None, "
        "selector: 'Selector | None' = None) -> None"
    ),
}


def test_exports():
    assert bnfreeze.__all__ == EXPORTS
    assert set(EXPORTS) <= set(dir(bnfreeze))


def test_signatures():
    found = {name: str(inspect.signature(getattr(bnfreeze, name))) for name in SIGNATURES}
    assert found == SIGNATURES


def test_recompile_warning_is_a_user_warning():
    assert issubclass(bnfreeze.RecompileWarning, UserWarning)
    assert bnfreeze.RecompileWarning.__module__ == "bnfreeze.errors"


@pytest.mark.keras
def test_every_export_resolves():
    for name in EXPORTS:  # BatchNormGuard imports Keras: the class is made on first access
        assert getattr(bnfreeze, name) is not None


def test_inspect_of_a_path_asks_keras_as_the_cli_does(tmp_path, monkeypatch):
    """``bnfreeze.inspect(path)`` asks Keras about layers code builds, as ``bnfreeze inspect``
    does (main read the file alone); ``from_file=True`` keeps the file-only route. Keras is
    a stand-in here: what the API passes on, not what Keras says (test_hub_truth measures
    that)."""
    from code_built_files import bn, write_code_built_keras

    from bnfreeze.model import records
    from bnfreeze.model.code_built import Rebuilt
    from bnfreeze.runtime import rebuilt

    path = write_code_built_keras(tmp_path / "m.keras", {"block/bn1": ("bn1", bn())})
    asked = records.LayerRecord(
        path="block/bn1",
        name="bn1",
        class_name="BatchNormalization",
        kind=records.LayerKind.BATCHNORM,
        depth=1,
        parent="block",
        trainable=False,
        source=records.LayerSource.KERAS,
    )
    calls = []

    def ask(model, listed):
        calls.append(model.path)
        return Rebuilt((asked,), {"block/bn1": True}, {}, {}, "3.15.1"), None

    monkeypatch.setattr(rebuilt, "ask", ask)
    report = bnfreeze.inspect(path)
    assert calls == [str(path)]
    assert [(s.layer.source, s.in_fit.normalizes_with) for s in report.batchnorm] == [
        (records.LayerSource.KERAS, records.Normalization.MOVING)
    ]
    by_rule = bnfreeze.inspect(path, from_file=True)
    assert calls == [str(path)]
    assert [s.layer.source for s in by_rule.batchnorm] == [records.LayerSource.WEIGHTS]
