"""``freeze --bn-frozen-stats`` on a saved ``.keras`` archive: turn the selected
BatchNormalization layers into bnfreeze's ``FrozenStatsBatchNormalization``, and back.

A class change, not a flag change: the converted layer normalizes with its moving statistics
in ``fit()`` and never updates them, while gamma and beta keep following its own
``trainable`` flag (:mod:`bnfreeze.runtime.layers`). Flags are left as they are: a BN
layer with ``trainable=False`` stays frozen, gamma and beta included.

Both classes store their variables in the same place (the class's ``__name__`` is
``BatchNormalization`` for both, measured on Keras 3.15), so only ``config.json`` changes: the
layer's ``module`` and ``registered_name``. Every other member, ``model.weights.h5`` included,
is copied byte for byte; the output is verified and written atomically. No Keras is needed.
"""

from __future__ import annotations

import copy
import enum
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bnfreeze.errors import ModelFormatError, OutputError, SelectionError
from bnfreeze.model import frozen_stats
from bnfreeze.model.records import Finding, LayerRecord, ModelFormat, Report, WarningCode

CONFIG = "config.json"


class BnClass(enum.Enum):
    """The class a conversion gives the selected BN layers."""

    FROZEN_STATS = "frozen-stats"  # bnfreeze.layers.FrozenStatsBatchNormalization
    BATCHNORM = "batchnorm"  # keras.layers.BatchNormalization


@dataclass(frozen=True)
class ClassChange:
    path: str
    before: str
    after: str


@dataclass(frozen=True)
class ConvertResult:
    source: str
    output: str | None
    dry_run: bool
    selected: tuple[str, ...]
    changes: tuple[ClassChange, ...]
    report: Report  # inspect of the result
    warnings: tuple[Finding, ...]
    input_bytes: int
    output_bytes: int | None


def _layer_at(config: dict[str, Any], record: LayerRecord) -> dict[str, Any]:
    node: Any = config
    for key in record.config_path:
        node = node[key]
    if not isinstance(node, dict):
        raise ModelFormatError(f"layer {record.path} has no config entry.")
    return node


def convert_config(
    config: dict[str, Any], records: tuple[LayerRecord, ...], to: BnClass
) -> tuple[dict[str, Any], tuple[ClassChange, ...]]:
    """A copy of ``config`` with each BN record in ``records`` given the class ``to``."""
    new = copy.deepcopy(config)
    changes = []
    for record in records:
        if not record.is_batchnorm or record.from_weights:
            continue
        entry = _layer_at(new, record)
        if to is BnClass.FROZEN_STATS:
            if record.class_name != "BatchNormalization" or not isinstance(
                entry.get("module"), str
            ):
                continue  # tf_keras's SyncBatchNormalization, a legacy .h5 entry
            if entry.get("config", {}).get("renorm"):
                raise SelectionError(
                    f"{record.path} uses batch renormalization (renorm=True), which exists only "
                    "in the training branch: it cannot have frozen statistics.",
                    hint="Leave it out of the selection with --layers.",
                )
            if frozen_stats.to_frozen_stats(entry):
                changes.append(ClassChange(record.path, record.shown_class, frozen_stats.NAME))
        elif frozen_stats.to_batchnorm(entry):
            changes.append(ClassChange(record.path, record.shown_class, "BatchNormalization"))
    return new, tuple(changes)


def convert_file(
    path: str,
    output: str | None,
    to: BnClass,
    *,
    layers: tuple[str, ...] = (),
    up_to: str | None = None,
    from_layer: str | None = None,
    dry_run: bool = False,
    in_place: bool = False,
) -> ConvertResult:
    """Convert the selected BN layers of the ``.keras`` archive ``path`` (every BN layer by
    default); see the module doc."""
    from bnfreeze.formats.readers import read_model
    from bnfreeze.formats.writers.keras_zip import serialize_config
    from bnfreeze.model.selection import select
    from bnfreeze.model.walk import walk
    from bnfreeze.ops.inspect import inspect_model_file

    source = Path(path)
    if in_place and output is not None:
        raise OutputError("--in-place and -o contradict each other; pick one.")
    target = path if in_place else output
    if target is None and not dry_run:
        raise OutputError("give -o OUTPUT, --in-place or --dry-run.")
    model = read_model(source, weights=False)
    if model.format is not ModelFormat.KERAS:
        raise ModelFormatError(
            f"{source}: --bn-frozen-stats rewrites .keras archives; this is a "
            f"{model.format.value} model.",
            hint="Save it as .keras first (keras.models.load_model, then model.save).",
        )
    if target is not None and not dry_run:
        check_keras_output(source, Path(target), in_place)
    walked = walk(model.config, model.path)
    selected = select(walked.layers, layers=layers, up_to=up_to, from_=from_layer)
    bn = tuple(r for r in selected if r.is_batchnorm)
    if not bn:
        raise SelectionError("the selection holds no BatchNormalization layer.")
    new_config, changes = convert_config(model.config, bn, to)
    raw = serialize_config(new_config)
    input_bytes = source.stat().st_size
    output_bytes = None
    written = None
    if target is not None and not dry_run and (changes or not in_place):
        output_bytes = _write_config(source, target, raw)
        written = target
    if written is not None:
        report = inspect_model_file(read_model(written))
    else:
        report = inspect_model_file(replace(read_model(source), config=new_config))
    return ConvertResult(
        source=str(source),
        output=written,
        dry_run=dry_run,
        selected=tuple(r.path for r in bn),
        changes=changes,
        report=report,
        warnings=tuple(f for f in report.warnings if f.code is WarningCode.NEEDS_BNFREEZE),
        input_bytes=input_bytes,
        output_bytes=output_bytes,
    )


def check_keras_output(source: Path, out: Path, in_place: bool) -> None:
    """The output is a ``.keras`` path that can be written, and not the input unless
    ``--in-place`` (``--bn-frozen-stats`` and ``recalibrate`` write ``.keras`` archives)."""
    from bnfreeze.formats.atomic import check_destination

    if out.suffix != ".keras":
        raise OutputError(f"-o {out}: the output must end in .keras.")
    check_destination(out)
    if not in_place and out.exists() and out.samefile(source):
        raise OutputError("-o names the input itself; use --in-place to rewrite it.")


def _write_config(source: Path, target: str, raw: bytes) -> int:
    """Write ``source`` to ``target`` atomically with ``raw`` as its ``config.json``, every
    other member copied as stored; verified before it replaces ``target``. The size written."""
    from bnfreeze.formats.atomic import write_atomically
    from bnfreeze.formats.writers.keras_zip import copy_raw

    with zipfile.ZipFile(source) as archive:
        infos = archive.infolist()
    if not any(i.filename == CONFIG for i in infos):
        raise ModelFormatError(f"{source}: the archive has no {CONFIG}.")

    def produce(tmp: Path) -> None:
        with open(source, "rb") as src, zipfile.ZipFile(tmp, "w") as zout:
            for info in infos:
                if info.filename == CONFIG:
                    member = zipfile.ZipInfo(CONFIG, date_time=info.date_time)
                    member.compress_type = info.compress_type
                    member.external_attr = info.external_attr
                    zout.writestr(member, raw)
                else:
                    copy_raw(src, info, zout)

    def verify(tmp: Path) -> None:
        where = f"the written copy of {source}"
        with zipfile.ZipFile(tmp) as out_zip:
            got = {i.filename: i for i in out_zip.infolist()}
            if list(got) != [i.filename for i in infos]:
                raise OutputError(f"{where} does not hold the input's members.")
            for info in infos:
                if info.filename == CONFIG:
                    if out_zip.read(CONFIG) != raw:
                        raise OutputError(f"{where}: {CONFIG} is not the converted config.")
                elif (got[info.filename].CRC, got[info.filename].file_size) != (
                    info.CRC,
                    info.file_size,
                ):
                    raise OutputError(f"{where}: {info.filename} differs from the input.")
            if out_zip.testzip() is not None:
                raise OutputError(f"{where} fails its CRC check.")

    return write_atomically(target, produce, verify)


def selected_frozen_stats(
    path: str,
    *,
    layers: tuple[str, ...] = (),
    up_to: str | None = None,
    from_layer: str | None = None,
) -> tuple[str, ...]:
    """The FrozenStatsBatchNormalization layers of the ``.keras`` archive ``path`` that a
    selection picks (none for another format or a file bnfreeze cannot read: the edit then
    reports the problem itself)."""
    from bnfreeze.errors import BnfreezeError
    from bnfreeze.formats.readers import read_model
    from bnfreeze.formats.readers.keras_zip import config_may_hold
    from bnfreeze.model.selection import select
    from bnfreeze.model.walk import walk

    if not config_may_hold(Path(path), frozen_stats.NAME.encode()):
        return ()  # most edits: no such layer, and a config of megabytes not parsed twice
    try:
        model = read_model(Path(path), weights=False)
        if model.format is not ModelFormat.KERAS:
            return ()
        walked = walk(model.config, model.path)
        if not any(r.frozen_stats for r in walked.layers):
            return ()
        chosen = select(walked.layers, layers=layers, up_to=up_to, from_=from_layer)
    except BnfreezeError:
        return ()
    return tuple(r.path for r in chosen if r.frozen_stats)


def edit_as_batchnorm(run: Any, *, path: str, output: Any, selection: Any) -> Any:
    """Run a flag edit that sets BN flags (``freeze``, ``freeze --bn-inference``,
    ``unfreeze``) on ``path`` with its selected FrozenStatsBatchNormalization layers converted
    back to Keras's BatchNormalization first: what setting a BN flag on such a layer means, and
    the way back to a file Keras loads without bnfreeze.

    ``run(input_path, output)`` applies the edit (an :class:`~bnfreeze.ops.request.Output`).
    The conversion goes to a temporary ``.keras`` in the output's folder, which the edit reads
    as its input and writes the output from (atomically, as always); the temporary file is
    removed whatever happens. The input is never touched, ``in_place`` included (the output
    is then the input's path). Without such layers, ``run`` gets ``path`` as it is.
    """
    import os

    from bnfreeze.ops.request import Output

    picked = selected_frozen_stats(
        path,
        layers=tuple(selection.layers),
        up_to=selection.up_to,
        from_layer=selection.from_,
    )
    if not picked:
        return run(path, output)
    target = path if output.in_place else output.path
    folder = Path(target if target is not None else path).resolve().parent
    tmp = folder / f".{Path(path).stem}.bnfreeze-plain-{os.getpid()}.keras"
    try:
        convert_file(path, str(tmp), BnClass.BATCHNORM, layers=picked)
        result = run(str(tmp), Output(target, in_place=False, dry_run=output.dry_run))
    finally:
        tmp.unlink(missing_ok=True)
    return replace(result, source=path)
