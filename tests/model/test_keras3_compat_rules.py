"""The config rule for a Keras 3 operation saved in a legacy .h5 (measured in
tests/model/test_keras3_compat.py::test_keras3_operations_in_a_keras3_h5_are_named)."""

from bnfreeze.model.keras3_compat import incompatibility

TENSOR = {"class_name": "__keras_tensor__", "config": {"keras_history": ["dense", 0, 0]}}


def _layer(class_name: str, args: list, **extra: object) -> dict:
    return {
        "class_name": class_name,
        "config": {"name": "n"},
        **extra,
        "inbound_nodes": [{"args": args, "kwargs": {}}],
    }


def test_an_operation_without_its_module_is_refused():
    why = incompatibility(_layer("Add", [TENSOR, 3.0]))
    assert why is not None and "calls it with 3.0" in why


def test_the_same_operation_with_its_module_loads():
    assert incompatibility(_layer("Add", [TENSOR, 3.0], module="keras.src.ops.numpy")) is None


def test_tensors_only_and_layers_that_take_values_load():
    assert incompatibility(_layer("Add", [[TENSOR, TENSOR]])) is None
    assert incompatibility(_layer("StringLookup", [TENSOR, "x"])) is None
    assert incompatibility(_layer("Dense", [TENSOR, None])) is None
