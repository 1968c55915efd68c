"""The private Keras APIs of `nbn_keras.keras_internals` still work, and nothing else uses any."""

import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from nbn_keras import keras_internals

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nbn_keras")
PRIVATE = re.compile(r"\._(inbound_nodes|outbound_nodes|keras_history|symbolic_build|"
                     r"maybe_symbolic_build)\b|keras\.src\b")


def two_branch_model():
    inputs = keras.Input((3,), name="x")
    left = keras.layers.Dense(2, name="left")(inputs)
    right = keras.layers.Dense(2, name="right")(inputs)
    outputs = keras.layers.Add(name="sum")([left, right])
    return keras.Model(inputs, outputs)


def test_the_installed_keras_is_the_checked_one():
    assert keras.__version__.startswith(keras_internals.CHECKED_AGAINST + ".")


def test_nodes_and_producing_operation_describe_the_graph():
    model = two_branch_model()
    left, add = model.get_layer("left"), model.get_layer("sum")
    assert [node.operation for node in keras_internals.outbound_nodes(left)] == [add]
    assert [node.operation for node in keras_internals.inbound_nodes(add)] == [add]
    parents = keras_internals.inbound_nodes(add)[0].arguments.args[0]
    assert [keras_internals.producing_operation(t) for t in parents] == [
        left, model.get_layer("right")]
    assert keras_internals.producing_operation(model.output) is add


def test_build_for_fit_builds_once_and_fit_does_not_build_again(monkeypatch):
    # Under a strategy, `fit` builds again from a batch it reduces across
    # replicas (what multi-worker training cannot do), unless told not to.
    with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
        model = two_branch_model()
        model.compile(optimizer="sgd", loss="mse", metrics=["mae"])
        batch = (np.ones((4, 3), "float32"), np.zeros((4, 2), "float32"))
        keras_internals.build_for_fit(model, batch)

    def refuse(*args, **kwargs):
        raise AssertionError("fit built the model again")

    monkeypatch.setattr(model, "_symbolic_build", refuse)
    history = model.fit(*batch, epochs=1, verbose=0)
    assert set(history.history) == {"loss", "mae"}


def test_no_other_module_uses_private_keras_apis():
    found = []
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            path = os.path.join(directory, name)
            if name.endswith(".py") and path != keras_internals.__file__:
                for number, line in enumerate(open(path, encoding="utf-8"), 1):
                    if PRIVATE.search(line):
                        found.append(f"{os.path.relpath(path, PACKAGE)}:{number}: {line.strip()}")
    assert found == []


@pytest.mark.parametrize("line", ["x._inbound_nodes", "from keras.src import ops",
                                  "model._maybe_symbolic_build = f"])
def test_the_scan_sees_private_uses(line):
    assert PRIVATE.search(line)
