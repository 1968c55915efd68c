"""`NBNDynamicsLogger`: what it records against the weights themselves."""

import csv
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import nbn_keras
from nbn_keras.training import callbacks
from nbn_keras.models.registry import build_classifier
from nbn_keras.models.cifar_resnet import cifar_resnet

RNG = np.random.default_rng(0)
X = RNG.uniform(0, 255, (16, 8, 8, 3)).astype("float32")
Y = RNG.integers(0, 3, 16)


def classifier(seed=0, nbn=True):
    keras.utils.set_random_seed(seed)
    model = build_classifier(cifar_resnet(14, input_shape=(8, 8, 3)), num_classes=3,
                             input_shape=(8, 8, 3))
    if nbn:
        model = nbn_keras.convert_to_nbn(model)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def leaf(model, name):
    return next(l for l in nbn_keras.conversion.leaf_layers(model) if l.name == name)


def raw(model, name):
    layer = leaf(model, name)
    return np.asarray(layer.gamma, np.float64), np.asarray(layer.beta, np.float64)


def cosine(a, b):
    return np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))


@pytest.mark.slow
def test_records_start_first_step_and_epochs(tmp_path):
    path = str(tmp_path / "dynamics.json")
    model = classifier()
    names = ["v2_stack_2_block1_2_bn", "v2_stack_2_block2_2_bn"]
    start = {n: raw(model, n) for n in names}
    # An identical model trained exactly one step on the first batch.
    one_step = classifier()
    one_step.train_on_batch(X[:8], Y[:8])

    model.fit(X, Y, batch_size=8, epochs=2, shuffle=False, verbose=0,
              callbacks=[callbacks.NBNDynamicsLogger(path)])
    with open(path) as f:
        record = json.load(f)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert record["layers"] == names and record["kind"] == "nbn"
    assert [e["step"] for e in record["epochs"]] == [2, 4]
    for name in names:
        gamma0, beta0 = start[name]
        np.testing.assert_array_equal(record["initial"][name]["gamma"], gamma0)
        np.testing.assert_array_equal(record["initial"][name]["beta"], beta0)
        gamma1, beta1 = raw(one_step, name)
        np.testing.assert_allclose(record["after_step_1"][name]["gamma"], gamma1, rtol=1e-5)
        np.testing.assert_allclose(record["after_step_1"][name]["beta"], beta1, rtol=1e-5)
        # The zero start of beta: the first step throws it far out.
        assert np.linalg.norm(beta1) > 1e3
        gamma, beta = raw(model, name)
        np.testing.assert_allclose(record["final"][name]["gamma"], gamma)
        last = record["epochs"][-1]["layers"][name]
        np.testing.assert_allclose(last["gamma_norm"], np.linalg.norm(gamma))
        np.testing.assert_allclose(last["beta_norm"], np.linalg.norm(beta))
        np.testing.assert_allclose(last["gamma_cos_initial"], cosine(gamma0, gamma))
        np.testing.assert_allclose(last["beta_cos_step1"], cosine(beta1, beta), rtol=1e-5)
    alpha = float(np.asarray(leaf(model, "nbn_scale").scales[0]))
    assert record["epochs"][-1]["scales"] == {"nbn_scale/alpha": alpha}


@pytest.mark.slow
def test_a_resumed_run_keeps_its_start(tmp_path):
    path = str(tmp_path / "dynamics.json")
    model = classifier()
    model.fit(X, Y, batch_size=8, epochs=2, shuffle=False, verbose=0,
              callbacks=[callbacks.NBNDynamicsLogger(path)])
    with open(path) as f:
        first = json.load(f)
    # Resuming at epoch 1 (as BackupAndRestore does) replaces epoch 1 on.
    model.fit(X, Y, batch_size=8, initial_epoch=1, epochs=3, shuffle=False, verbose=0,
              callbacks=[callbacks.NBNDynamicsLogger(path)])
    with open(path) as f:
        second = json.load(f)
    assert second["initial"] == first["initial"]
    assert second["after_step_1"] == first["after_step_1"]
    assert [e["epoch"] for e in second["epochs"]] == [0, 1, 2]
    assert second["epochs"][0] == first["epochs"][0]


@pytest.mark.slow
def test_plain_bn_is_tracked_on_the_layers_nbn_would_convert(tmp_path):
    path = str(tmp_path / "dynamics.json")
    model = classifier(nbn=False)
    model.fit(X, Y, batch_size=8, epochs=1, verbose=0,
              callbacks=[callbacks.NBNDynamicsLogger(path)])
    with open(path) as f:
        record = json.load(f)
    assert record["kind"] == "bn"
    assert record["layers"] == ["v2_stack_2_block1_2_bn", "v2_stack_2_block2_2_bn"]
    np.testing.assert_array_equal(record["initial"]["v2_stack_2_block1_2_bn"]["gamma"],
                                  np.ones(64))


def test_conv_fingerprint_equal_for_bn_and_nbn_of_one_seed():
    bn, nbn = classifier(seed=1, nbn=False), classifier(seed=1)
    assert callbacks.conv_kernel_fingerprint(bn) == callbacks.conv_kernel_fingerprint(nbn)
    assert callbacks.conv_kernel_fingerprint(classifier(seed=2)) != \
        callbacks.conv_kernel_fingerprint(nbn)


def test_history_and_tensorboard_record_each_epochs_learning_rate(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(3)])
    # Epoch e at e / 2 until e = 2, then 0.1 (by hand: 0, 0.5, 1, 0.1).
    schedule = nbn_keras.training.schedules.EpochWarmupStepDecay(
        1.0, steps_per_epoch=2, warmup_epochs=2, boundaries=(2,), factors=(0.1,))
    model.compile(optimizer=keras.optimizers.SGD(schedule),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(X, Y, batch_size=8, epochs=4, verbose=0, callbacks=[
        callbacks.LearningRateLogger(), callbacks.RunCheckpoint(str(tmp_path)),
        keras.callbacks.TensorBoard(str(tmp_path / "tensorboard"))])
    with open(tmp_path / "history.csv", newline="") as f:
        rates = [float(row["lr"]) for row in csv.DictReader(f)]
    np.testing.assert_allclose(rates, [0.0, 0.5, 1.0, 0.1], rtol=1e-6)
    logged = {}
    for path in (tmp_path / "tensorboard" / "train").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag == "epoch_lr":
                    logged[event.step] = float(tf.make_ndarray(value.tensor))
    assert logged == pytest.approx({0: 0.0, 1: 0.5, 2: 1.0, 3: 0.1})


def test_a_non_finite_loss_stops_training_with_its_own_error():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    x = np.ones((8, 2), "float32")
    y = np.zeros((8, 1), "float32")
    history = model.fit(x, y, batch_size=4, epochs=2, verbose=0,
                        callbacks=[callbacks.TerminateOnNonFiniteLoss()])
    assert len(history.history["loss"]) == 2
    y[5] = np.inf  # In the second batch (index 1).
    with pytest.raises(callbacks.NonFiniteLoss, match=r"at batch 1\. Loss value: (inf|nan)"):
        model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0,
                  callbacks=[callbacks.TerminateOnNonFiniteLoss()])
