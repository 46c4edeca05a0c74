"""bnfreeze/limits.py: each limit is enforced, on what the file claims or on raw bytes, before
the claimed amount is allocated; exactly at the limit still works."""

from __future__ import annotations

import io
import json
import os
import time
import tracemalloc
import zipfile

import hostile
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfreeze import limits
from bnfreeze.cli import cli
from bnfreeze.errors import ModelFormatError
from bnfreeze.formats.readers import read_model
from bnfreeze.model.walk import walk


def write(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


class Budget:
    """Python allocations and time of a block: a limit that holds before allocation keeps
    both tiny, whatever the file claims."""

    def __enter__(self):
        tracemalloc.start()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        self.seconds = time.perf_counter() - self.started
        return False


def refused(path, match: str, max_bytes: int = 8 << 20) -> Budget:
    with Budget() as budget, pytest.raises(ModelFormatError, match=match):
        read_model(path)
    assert budget.peak < max_bytes, f"{path.name}: {budget.peak} bytes allocated before refusing"
    return budget


# -- MAX_CONFIG_BYTES ------------------------------------------------------------------------


def test_config_that_claims_a_terabyte_is_refused_on_its_claim(tmp_path):
    path = write(tmp_path, "claims.keras", hostile.lying_size_zip("config.json"))
    budget = refused(path, f"more than the {limits.MAX_CONFIG_BYTES // 2**20} MiB")
    assert budget.seconds < 2


def test_config_over_the_limit_is_refused_before_it_is_inflated(tmp_path):
    path = write(tmp_path, "huge.keras", hostile.shape_bytes("zip:config-huge"))
    with zipfile.ZipFile(path) as z:
        assert z.getinfo("config.json").file_size > limits.MAX_CONFIG_BYTES
    refused(path, "more than the 64 MiB bnfreeze reads")


def test_config_file_over_the_limit_in_a_folder_is_refused_on_its_size(tmp_path):
    folder = tmp_path / "model.keras"
    folder.mkdir()
    with open(folder / "config.json", "wb") as fh:  # sparse: no disk, no memory
        fh.truncate(limits.MAX_CONFIG_BYTES + 1)
    refused(folder, "larger than the 64 MiB")


def test_config_that_lies_small_cannot_inflate_past_its_claim(tmp_path):
    """A member whose header claims 100 bytes but whose data inflates to 60 MiB is cut off at
    the claim (zipfile stops there and the CRC fails): the lie buys nothing."""
    data = bytearray(hostile.bomb_zip("config.json", 60 << 20))
    # Make the central directory's uncompressed size claim 100 bytes.
    at = data.find(b"PK\x01\x02")
    while data[at + 46 : at + 46 + len(b"config.json")] != b"config.json":
        at = data.find(b"PK\x01\x02", at + 4)
    data[at + 24 : at + 28] = (100).to_bytes(4, "little")
    path = write(tmp_path, "liar.keras", bytes(data))
    refused(path, "config.json", max_bytes=1 << 20)


# -- MAX_EXPANSION_RATIO ---------------------------------------------------------------------


@pytest.mark.parametrize("case", ["zip:weights-bomb-1GiB", "zip:config-bomb"])
def test_zip_bomb_is_refused_before_inflating(tmp_path, case):
    path = write(tmp_path, "bomb.keras", hostile.shape_bytes(case))
    member = "model.weights.h5" if "weights" in case else "config.json"
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    assert info.file_size / info.compress_size > limits.MAX_EXPANSION_RATIO
    assert path.stat().st_size < 2 << 20  # a tiny file...
    assert info.file_size >= 60 << 20  # ...that expands to tens of MiB or a GiB
    budget = refused(path, "possible zip bomb", max_bytes=4 << 20)
    assert budget.seconds < 5


def test_compressed_member_under_the_ratio_is_read(tmp_path):
    path = write(tmp_path, "deflated.keras", hostile.shape_bytes("zip:weights-deflated"))
    model = read_model(path)
    assert model.weights is not None and model.weights.variables


# -- MAX_JSON_DEPTH --------------------------------------------------------------------------


def at_depth(total: int) -> bytes:
    """seed_bn.keras whose config nests exactly ``total`` levels deep (a deep list in the BN
    layer's config, five levels down)."""
    data = hostile._with_raw_value(hostile.nested(total - 5))
    assert _depth(json.loads(zipfile.ZipFile(io.BytesIO(data)).read("config.json"))) == total
    return data


def test_depth_exactly_at_the_limit_is_read_and_edited(tmp_path):
    """Every consumer of the config (the walk, deepcopy in the edit, json.dumps in the writer,
    the unsafe-code scan) survives the deepest config the reader accepts."""
    path = write(tmp_path, "deep.keras", at_depth(limits.MAX_JSON_DEPTH))
    assert not limits.json_depth_exceeds(zipfile.ZipFile(path).read("config.json"))
    out = tmp_path / "out.keras"
    runner = CliRunner()
    for args in (
        ["inspect", str(path)],
        ["freeze", str(path), "--bn-inference", "-o", str(out)],
        ["check", str(path), "--expect", "bn-inference"],
    ):
        result = runner.invoke(cli, args)
        assert result.exit_code in (0, 1), (args, result.output, result.exception)
    assert out.exists()
    from bnfreeze.runtime.loading import unsafe_layers

    assert unsafe_layers(read_model(out).config) == []


@pytest.mark.parametrize(
    "case",
    [
        "zip:nested-json-10000",
        "zip:nested-json-10000-objects",
        "zip:nested-json-in-layer-990",
        "zip:nested-json-in-layer-600",
        "h5:model-config-nested-10000",
    ],
)
def test_too_deep_is_refused_before_parsing(tmp_path, monkeypatch, case):
    path = hostile.build(case, tmp_path)

    def no_parse(*args, **kwargs):
        raise AssertionError("json.loads was called on a config over the depth limit")

    monkeypatch.setattr(json, "loads", no_parse)
    refused(path, f"nests more than {limits.MAX_JSON_DEPTH} levels deep")


def test_one_level_over_the_limit_is_refused(tmp_path):
    path = write(tmp_path, "deep.keras", at_depth(limits.MAX_JSON_DEPTH + 1))
    refused(path, "nests more than")


def _depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


# Strings full of the characters that could fool a byte-level count.
tricky_text = st.text(alphabet='[]{}"\\ab', max_size=8)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | tricky_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(tricky_text, inner, max_size=3),
    max_leaves=40,
)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(value=json_values, limit=st.integers(min_value=0, max_value=12))
def test_depth_scan_agrees_with_the_parsed_value(value, limit):
    raw = json.dumps(value).encode()
    assert limits.json_depth_exceeds(raw, limit) == (_depth(value) > limit), raw


@pytest.mark.parametrize(
    "raw, limit, expected",
    [
        (b"[" * 257 + b"]" * 257, 256, True),
        (b"[" * 256 + b"]" * 256, 256, False),
        # Brackets in a string do not count...
        (b'["' + b"[" * 300 + b'"]', 256, False),
        # ...nor can a string of closing brackets hide real depth behind it.
        (b"[" * 5 + b'"' + b"]" * 4 + b'"' + b"[" * 5 + b"]" * 10, 8, True),
        (b'["\\"' + b"[" * 20 + b'"]', 8, False),
        (b"[}", 8, False),  # not JSON: json.loads says so
    ],
)
def test_depth_scan_examples(raw, limit, expected):
    assert limits.json_depth_exceeds(raw, limit) is expected


def test_depth_scan_is_fast_on_a_large_config():
    """About 1 MiB of real-looking config (EfficientNet-sized): a fraction of parsing it."""
    layer = {
        "class_name": "Conv2D",
        "config": {
            "name": "c",
            "kernel_size": [3, 3],
            "kernel_initializer": {"class_name": "GlorotUniform", "config": {"seed": None}},
        },
        "inbound_nodes": [
            {"args": [{"class_name": "__keras_tensor__", "config": {"shape": [None, 8, 8, 3]}}]}
        ],
    }
    raw = json.dumps({"config": {"layers": [layer] * 5000}}).encode()
    assert len(raw) > 1 << 20

    def best(fn):
        # CPU time, not wall-clock: another process taking the core does not count.
        times = []
        for _ in range(5):
            started = time.process_time()
            fn(raw)
            times.append(time.process_time() - started)
        return min(times)

    assert not limits.json_depth_exceeds(raw)
    assert best(limits.json_depth_exceeds) < best(json.loads) / 2


# -- MAX_NESTING_DEPTH and MAX_LAYERS (the walk) ---------------------------------------------


def test_models_nested_to_the_limit_are_walked():
    walked = walk(hostile.nested_layers_config(limits.MAX_NESTING_DEPTH))
    assert max(r.depth for r in walked.layers) == limits.MAX_NESTING_DEPTH


def test_models_nested_past_the_limit_are_refused():
    with pytest.raises(ModelFormatError, match=f"nested more than {limits.MAX_NESTING_DEPTH}"):
        walk(hostile.nested_layers_config(limits.MAX_NESTING_DEPTH + 1))


def test_nesting_limit_fits_in_the_json_depth_limit():
    """The deepest model the walk accepts is a config the reader accepts."""
    raw = json.dumps(hostile.nested_layers_config(limits.MAX_NESTING_DEPTH)).encode()
    # Real layers carry ~7 more levels (inbound_nodes, initializer configs).
    assert not limits.json_depth_exceeds(raw, limits.MAX_JSON_DEPTH - 8)


def test_too_many_layers_are_refused():
    layers = [
        {"class_name": "ReLU", "config": {"name": f"r{i}"}} for i in range(limits.MAX_LAYERS + 1)
    ]
    config = {"class_name": "Sequential", "config": {"name": "s", "layers": layers}}
    with pytest.raises(ModelFormatError, match=f"more than {limits.MAX_LAYERS} layers"):
        walk(config)


def test_limits_are_what_the_module_documents():
    doc = limits.__doc__ or ""
    for name in (
        "MAX_CONFIG_BYTES",
        "MAX_EXPANSION_RATIO",
        "MAX_JSON_DEPTH",
        "MAX_NESTING_DEPTH",
        "MAX_LAYERS",
    ):
        assert f":data:`{name}`" in doc
        assert isinstance(getattr(limits, name), int)
    assert os.fspath(limits.__file__).endswith("limits.py")
