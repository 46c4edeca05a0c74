"""``replaced_calls`` sets a layer's ``call`` on the instance and puts the layer back exactly
as it was, whatever happens in the block. Plain objects stand in for layers: the context
manager only touches the instance's ``call`` attribute."""

from __future__ import annotations

import pytest

from bnfreeze.runtime.instance_calls import distinct_layers, replaced_calls


class Layer:
    def call(self, x):
        return ("class", x)


def tagging(path, layer):
    original = layer.call

    def call(x):
        return (path, original(x))

    return call


def test_the_instance_call_is_replaced_then_the_class_call_shows_again():
    layer = Layer()
    with replaced_calls({"a": layer}, tagging):
        assert layer.call(1) == ("a", ("class", 1))
        assert "call" in vars(layer)
    assert "call" not in vars(layer)
    assert layer.call(1) == ("class", 1)


def test_an_instance_call_the_layer_had_is_put_back():
    layer = Layer()

    def own(x):
        return ("own", x)

    layer.call = own
    with replaced_calls({"a": layer}, tagging):
        assert layer.call(2) == ("a", ("own", 2))
    assert vars(layer)["call"] is own


def test_the_layer_is_restored_when_the_block_raises():
    layer = Layer()
    with pytest.raises(RuntimeError), replaced_calls({"a": layer}, tagging):
        raise RuntimeError("the step failed")
    assert "call" not in vars(layer)


def test_the_layers_wrapped_before_a_failing_make_call_are_restored():
    first, second = Layer(), Layer()

    def make(path, layer):
        if layer is second:
            raise ValueError("cannot wrap")
        return tagging(path, layer)

    with pytest.raises(ValueError), replaced_calls({"a": first, "b": second}, make):
        pass
    assert "call" not in vars(first)
    assert "call" not in vars(second)


def test_a_layer_shared_by_two_paths_is_wrapped_once_under_its_first_path():
    shared, other = Layer(), Layer()
    layers = {"a": shared, "b": other, "c": shared}
    assert distinct_layers(layers) == {"a": shared, "b": other}
    made = []

    def make(path, layer):
        made.append(path)
        return tagging(path, layer)

    with replaced_calls(layers, make):
        assert shared.call(3) == ("a", ("class", 3))
    assert made == ["a", "b"]
