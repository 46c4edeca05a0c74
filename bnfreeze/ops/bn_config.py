"""BN config values a plan sets besides flags: the frozen-statistics class
(``bn = "frozen-stats"``, as ``freeze --bn-frozen-stats``: :mod:`bnfreeze.ops.frozen_stats`)
and ``synchronized`` (as ``bnfreeze sync-bn``: :mod:`bnfreeze.ops.sync`).

Both are config-only edits: the weights are written as they are read, so the config route
applies them in the same atomic, verified write as the flags."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from bnfreeze.errors import ModelFormatError, SelectionError
from bnfreeze.model import frozen_stats
from bnfreeze.model.records import LayerRecord, ModelFormat
from bnfreeze.ops.request import BnConfig
from bnfreeze.ops.sync import SYNC_CLASS


def apply_bn_config(
    config: dict[str, Any],
    layers: Sequence[LayerRecord],
    edits: BnConfig,
    model_format: ModelFormat,
    source: str,
) -> tuple[dict[str, Any], int]:
    """A copy of ``config`` with ``edits`` applied, and how many layers it changed."""
    from bnfreeze.ops.frozen_stats import BnClass, convert_config

    by_path = {r.path: r for r in layers}
    new = config
    changed = 0
    to_frozen = [by_path[p] for p, c in edits.classes if c == "frozen-stats"]
    to_plain = [by_path[p] for p, c in edits.classes if c == "batchnorm"]
    if to_frozen and model_format is not ModelFormat.KERAS:
        raise ModelFormatError(
            f'{source}: bn = "frozen-stats" rewrites .keras archives; this is a '
            f"{model_format.value} model.",
            hint="Save it as .keras first (keras.models.load_model, then model.save).",
        )
    for records, to in ((to_plain, BnClass.BATCHNORM), (to_frozen, BnClass.FROZEN_STATS)):
        if records:
            new, changes = convert_config(new, tuple(records), to)
            changed += len(changes)
    if edits.synchronized:
        new = copy.deepcopy(new) if new is config else new
        for path, value in edits.synchronized:
            record = by_path[path]
            if not record.config_path:
                raise SelectionError(
                    f"{path} is not listed in the saved config: synchronized cannot be set."
                )
            node: Any = new
            for key in record.config_path:
                node = node[key]
            inner = node.setdefault("config", {})
            before = node.get("class_name") == SYNC_CLASS or inner.get("synchronized") is True
            if node.get("class_name") == SYNC_CLASS:
                node["class_name"] = "BatchNormalization"
            elif before == value:
                continue
            if frozen_stats.is_frozen_stats(node) and value:
                raise SelectionError(
                    f"{path}: a frozen-statistics layer normalizes with its moving statistics, "
                    "so synchronized = true has nothing to synchronize.",
                )
            inner["synchronized"] = value
            changed += 1
    return new, changed
