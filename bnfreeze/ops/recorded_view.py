"""How a file with recorded flags loads with :func:`bnfreeze.load_model`: inspect's second view.

``inspect`` rows show a model as ``keras.models.load_model`` rebuilds it (what ``verify``
measures). A file that bnfreeze saved with a ``bnfreeze.json`` member
(:mod:`bnfreeze.formats.recorded_flags`) loads otherwise with :func:`bnfreeze.load_model`,
which sets those flags again: :func:`findings` says which rows that changes, by matching each
row's weights group (``layers/block/bn``) to the recorded paths. No Keras needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from bnfreeze.errors import ModelFormatError
from bnfreeze.formats import recorded_flags
from bnfreeze.model.records import Finding, LayerState, ModelFile, ModelFormat, WarningCode

#: Paths named in a message before "and N more".
SHOWN = 3


def groups(variables: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """Each row's group in the weights file, from its datasets (``/layers/block/bn/vars/0``
    -> ``layers/block/bn``); rows with no weights, or with several layers' (a container's),
    have none."""
    out: dict[str, str] = {}
    for path, datasets in variables.items():
        found = {d.lstrip("/").rpartition("/vars/")[0] for d in datasets}
        if len(found) == 1:
            out[path] = found.pop()
    return out


def findings(
    model: ModelFile, states: Sequence[LayerState], saved: Mapping[str, str]
) -> tuple[Finding, ...]:
    """The ``recorded-flags`` warning for a ``.keras`` archive with recorded flags that differ
    from its rows' flags, or nothing. ``saved``: each row's group in the weights file, the
    path its flag is recorded under (:func:`groups`, or Keras's own walk)."""
    if model.format is not ModelFormat.KERAS:
        return ()
    try:
        recorded = recorded_flags.read(model.path)
    except ModelFormatError as exc:
        return (
            Finding(
                WarningCode.RECORDED_FLAGS,
                None,
                f"{exc} bnfreeze.load_model refuses this file; keras.models.load_model "
                "ignores the member and loads the model as these rows show.",
            ),
        )
    if recorded is None:
        return ()
    changed = _changed(states, saved, recorded.flags)
    if not changed:
        return ()
    to_inference = [s.layer.path for s, flag in changed if s.layer.is_batchnorm and not flag]
    frozen = sum(1 for _, flag in changed if not flag)
    thawed = len(changed) - frozen
    parts = []
    if frozen:
        parts.append(f"{frozen} get trainable=False")
    if thawed:
        parts.append(f"{thawed} get trainable=True")
    bn = ""
    if to_inference:
        bn = (
            f"; {len(to_inference)} BN layer(s) then run in inference mode in fit() "
            f"({_some(to_inference)})"
        )
    return (
        Finding(
            WarningCode.RECORDED_FLAGS,
            None,
            f"{model.path} records in {recorded_flags.MEMBER} the trainable flags of layers "
            f"its code builds, which a plain keras.models.load_model ignores: these rows show "
            f"that load (what verify measures). Loaded with bnfreeze.load_model, "
            f"{len(changed)} of these rows change: {' and '.join(parts)}{bn}.",
        ),
    )


def _changed(
    states: Sequence[LayerState], saved: Mapping[str, str], flags: Mapping[str, bool]
) -> list[tuple[LayerState, bool]]:
    """The rows whose recorded flag differs from their flag, with the recorded flag."""
    out: list[tuple[LayerState, bool]] = []
    for state in states:
        flag = flags.get(saved.get(state.layer.path, ""))
        trainable = state.layer.trainable
        if flag is not None and trainable is not None and flag is not bool(trainable):
            out.append((state, flag))
    return out


def _some(paths: Sequence[str]) -> str:
    shown = ", ".join(paths[:SHOWN])
    return shown if len(paths) <= SHOWN else f"{shown} and {len(paths) - SHOWN} more"
