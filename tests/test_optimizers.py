import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from nbn_keras.training.optimizers import CoupledSGD

LEARNING_RATES = [0.1, 0.1, 0.05, 0.05, 0.01, 0.01]
WD = 0.01


def lr_schedule():
    # Values[i] up to and including boundary i: steps 0-1, 2-3, 4-5.
    return keras.optimizers.schedules.PiecewiseConstantDecay(
        [1, 3], [0.1, 0.05, 0.01]
    )


def np_sgd(w0, grads, lrs, mu, wd, torch_form=True, nesterov=False):
    """Reference SGD. `torch_form`: v = mu v + g; w -= lr v (PyTorch,
    dampening 0). Otherwise Keras': m = mu m - lr g; w += m."""
    w = np.array(w0, np.float64)
    buf = np.zeros_like(w)
    for g, lr in zip(grads, lrs):
        g = g + wd * w
        if torch_form:
            buf = mu * buf + g
            w = w - lr * ((g + mu * buf) if nesterov else buf)
        else:
            buf = mu * buf - lr * g
            w = w + buf
    return w


def run_keras(optimizer, w0, grads):
    variables = [keras.Variable(w, name=name) for name, w in w0.items()]
    for step_grads in grads:
        optimizer.apply([step_grads[name] for name in w0], variables)
    return {v.name: np.asarray(v) for v in variables}


@pytest.fixture
def problem():
    rng = np.random.default_rng(0)
    w0 = {"kernel": rng.normal(size=(3, 2)), "alpha": np.array(1.5)}
    grads = [
        {k: rng.normal(size=np.shape(w)).astype("float32") for k, w in w0.items()}
        for _ in LEARNING_RATES
    ]
    return w0, grads


@pytest.mark.parametrize("nesterov", [False, True])
def test_matches_pytorch_sgd_with_changing_lr(problem, nesterov):
    w0, grads = problem
    optimizer = CoupledSGD(
        lr_schedule(), momentum=0.9, nesterov=nesterov, coupled_weight_decay=WD,
        exclude_from_coupled_decay=["alpha"],
    )
    result = run_keras(optimizer, w0, grads)
    for name, wd in [("kernel", WD), ("alpha", 0.0)]:
        expected = np_sgd(
            w0[name], [g[name] for g in grads], LEARNING_RATES, 0.9, wd,
            nesterov=nesterov,
        )
        np.testing.assert_allclose(result[name], expected, rtol=1e-5, atol=1e-6)


def test_keras_momentum_form(problem):
    w0, grads = problem
    optimizer = CoupledSGD(
        lr_schedule(), momentum=0.9, coupled_weight_decay=WD, torch_momentum=False
    )
    result = run_keras(optimizer, w0, grads)
    for name in w0:
        g = [step[name] for step in grads]
        keras_form = np_sgd(w0[name], g, LEARNING_RATES, 0.9, WD, torch_form=False)
        torch_form = np_sgd(w0[name], g, LEARNING_RATES, 0.9, WD)
        np.testing.assert_allclose(result[name], keras_form, rtol=1e-5, atol=1e-6)
        # The two forms differ once the learning rate changes...
        assert np.abs(keras_form - torch_form).max() > 1e-3


def test_forms_agree_for_constant_lr(problem):
    w0, grads = problem
    results = [
        run_keras(
            CoupledSGD(0.05, momentum=0.9, coupled_weight_decay=WD,
                       torch_momentum=torch_momentum),
            w0, grads,
        )
        for torch_momentum in (True, False)
    ]
    for name in w0:
        np.testing.assert_allclose(results[0][name], results[1][name], rtol=1e-5)


def test_plain_sgd_without_momentum_or_decay(problem):
    w0, grads = problem
    result = run_keras(CoupledSGD(lr_schedule()), w0, grads)
    expected = np_sgd(
        w0["kernel"], [g["kernel"] for g in grads], LEARNING_RATES, 0.0, 0.0
    )
    np.testing.assert_allclose(result["kernel"], expected, rtol=1e-5)


def test_exclusion_matches_layer_paths():
    inputs = keras.Input((3,))
    outputs = keras.layers.Dense(2, name="nbn_scale_like")(
        keras.layers.Dense(3, name="features")(inputs)
    )
    model = keras.Model(inputs, outputs)
    optimizer = CoupledSGD(
        0.1, coupled_weight_decay=0.5, exclude_from_coupled_decay=["nbn_scale"]
    )
    before = [np.asarray(v) for v in model.trainable_variables]
    zeros = [np.zeros_like(w) for w in before]
    optimizer.apply(zeros, model.trainable_variables)
    for variable, old in zip(model.trainable_variables, before):
        factor = 1.0 if "nbn_scale" in variable.path else 1 - 0.1 * 0.5
        np.testing.assert_allclose(np.asarray(variable), old * factor, rtol=1e-6)


def test_config_and_model_saving(tmp_path):
    optimizer = CoupledSGD(
        0.2, momentum=0.9, coupled_weight_decay=5e-4,
        exclude_from_coupled_decay=["nbn_scale"], torch_momentum=False,
    )
    config = keras.saving.serialize_keras_object(optimizer)
    assert config["registered_name"] == "nbn_keras>CoupledSGD"
    restored = keras.saving.deserialize_keras_object(config)
    for key in ("coupled_weight_decay", "exclude_from_coupled_decay",
                "torch_momentum", "momentum"):
        assert restored.get_config()[key] == optimizer.get_config()[key]

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(np.ones((4, 2)), np.zeros((4, 2)), verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.optimizer, CoupledSGD)
    assert loaded.optimizer.coupled_weight_decay == 5e-4
    for a, b in zip(loaded.optimizer.variables, model.optimizer.variables):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="not both"):
        CoupledSGD(coupled_weight_decay=1e-4, weight_decay=1e-4)
    with pytest.raises(ValueError, match=">= 0"):
        CoupledSGD(coupled_weight_decay=-1.0)


_DISTRIBUTED_SCRIPT = textwrap.dedent(
    """
    import numpy as np
    import tensorflow as tf
    import keras
    from nbn_keras.training.losses import DeferredReweighting, build_loss
    from nbn_keras.training.optimizers import CoupledSGD

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 5)).astype("float32")
    y = rng.integers(0, 3, size=32)
    counts = [20, 8, 4]

    def train(strategy, loss_name):
        with strategy.scope():
            keras.utils.set_random_seed(1)
            model = keras.Sequential([
                keras.Input((5,)), keras.layers.Dense(8, activation="relu"),
                keras.layers.Dense(3, name="head")])
            loss = build_loss(loss_name, counts, **(
                {"drw_start_epoch": 1} if loss_name == "ldam_drw" else {}))
            optimizer = CoupledSGD(
                keras.optimizers.schedules.PiecewiseConstantDecay(
                    [3], [0.1, 0.01]),
                momentum=0.9, coupled_weight_decay=5e-3,
                exclude_from_coupled_decay=["head"])
            model.compile(optimizer=optimizer, loss=loss)
        history = model.fit(
            x, y, batch_size=16, epochs=3, shuffle=False, verbose=0,
            callbacks=[DeferredReweighting()] if loss_name == "ldam_drw" else [])
        return model, loss, history.history["loss"]

    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    one = tf.distribute.OneDeviceStrategy("/cpu:0")
    single, _, _ = train(one, "cross_entropy")
    multi, _, _ = train(mirrored, "cross_entropy")
    for a, b in zip(single.get_weights(), multi.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    model, loss, losses = train(mirrored, "ldam_drw")
    assert float(np.asarray(loss.drw_active)) == 1.0
    assert np.all(np.isfinite(losses)), losses
    print("OK", losses)
    """
)


def test_distributed_fit_matches_single_device(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, "-c", _DISTRIBUTED_SCRIPT],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout
