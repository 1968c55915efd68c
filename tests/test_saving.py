"""`.keras` files written by the training command load in fresh processes."""

import ast
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import nbn_keras

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")

_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import keras
    import tensorflow as tf

    paths, saved_model_dir = sys.argv[1].split(","), sys.argv[2]
    report = {}

    # 1. Without importing nbn_keras: Keras' own error.
    assert "nbn_keras" not in sys.modules
    try:
        keras.models.load_model(paths[0])
    except Exception as error:
        report["no_import"] = [type(error).__name__, str(error)]
    else:
        report["no_import"] = None

    # 2. After `import nbn_keras`, plain load_model with everything compiled.
    import nbn_keras

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (6, 32, 32, 3)).astype("float32")
    y = np.array([0, 1, 2, 3, 4, 5], "int32")
    served = tf.saved_model.load(saved_model_dir).signatures["serving_default"]
    report["served_logits"] = served(images=tf.constant(x))["logits"].numpy().tolist()

    def describe(model):
        optimizer = model.optimizer
        schedule = optimizer._learning_rate
        logits = np.asarray(model(x, training=False))
        results = model.evaluate(x, y, batch_size=6, verbose=0, return_dict=True)
        return {
            "optimizer": type(optimizer).__name__,
            "iterations": int(optimizer.iterations.numpy()),
            "momentum": float(optimizer.momentum),
            "coupled_weight_decay": float(optimizer.coupled_weight_decay),
            "schedule": type(schedule).__name__,
            "schedule_config": schedule.get_config(),
            "logits": logits.tolist(),
            "results": {k: float(v) for k, v in results.items()},
        }

    for path in paths:
        report[path] = describe(keras.models.load_model(path))
    report["helper"] = describe(nbn_keras.load_model(paths[0]))

    # 3. With the registry emptied, custom_objects alone must suffice.
    registry = keras.saving.get_custom_objects()
    for name in [n for n in registry if n.startswith("nbn_keras>")]:
        del registry[name]
    try:
        keras.models.load_model(paths[0])
    except TypeError:
        report["unregistered_fails"] = True
    else:
        report["unregistered_fails"] = False
    report["custom_objects"] = describe(keras.models.load_model(
        paths[0], custom_objects=nbn_keras.custom_objects()))
    print("REPORT" + json.dumps(report))
    """
)


def read_config(path):
    flags = {}
    for line in open(path):
        line = line.strip()
        if line.startswith("--") and "=" in line:
            name, value = line[2:].split("=", 1)
            flags[name] = value
    return flags


@pytest.mark.slow
def test_trained_files_load_in_fresh_processes(trained_run, tmp_path):
    run_dir = trained_run["run_dir"]
    paths = [str(run_dir / "best.keras"), str(run_dir / "model.keras")]
    (tmp_path / "load.py").write_text(_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(tmp_path / "load.py"), ",".join(paths),
         str(trained_run["version_dir"])],
        capture_output=True, text=True, env=ENV, cwd=REPO, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.split("REPORT", 1)[1])

    # Without the import Keras cannot find the classes; the package name is
    # in its message only as the module of the quoted configuration.
    kind, message = report["no_import"]
    assert kind == "TypeError"
    assert "Could not locate class" in message and "nbn_keras" in message

    # The recipe the run used: its resolved flags.
    config = read_config(run_dir / "flags.cfg")
    learning_rate = float(config["base_lr"]) * int(config["global_batch_size"]) / 256
    served_logits = np.asarray(report["served_logits"])
    labels = np.arange(6)
    for name in paths + ["helper", "custom_objects"]:
        loaded = report[name]
        assert loaded["optimizer"] == "CoupledSGD"
        assert loaded["iterations"] == 2  # --epochs=1 --steps_per_epoch=2
        assert loaded["momentum"] == pytest.approx(float(config["momentum"]))
        assert loaded["coupled_weight_decay"] == pytest.approx(
            float(config["weight_decay"]))
        assert loaded["schedule"] == "WarmupStepDecay"
        assert loaded["schedule_config"] == {
            "base_learning_rate": pytest.approx(learning_rate),
            "steps_per_epoch": int(config["steps_per_epoch"]),
            "warmup_epochs": int(config["warmup_epochs"]),
            "boundaries": [int(e) for e in config["lr_drop_epochs"].split(",")],
            "factors": [float(f) for f in config["lr_drop_factors"].split(",")],
        }
        # The same network as the exported SavedModel (folded NBN).
        logits = np.asarray(loaded["logits"])
        np.testing.assert_allclose(logits, served_logits, atol=1e-4)
        # The loss and the metrics are the compiled ones, against NumPy.
        shifted = logits - logits.max(1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
        results = loaded["results"]
        assert results["loss"] == pytest.approx(
            -log_probs[labels, labels].mean(), rel=1e-4)
        assert results["top1"] == pytest.approx(
            (logits.argmax(1) == labels).mean())
        assert {"many", "medium", "few", "balanced"} <= set(results)
    assert report["unregistered_fails"]


def test_custom_objects_cover_every_registered_class():
    registered = {name for name in keras.saving.get_custom_objects()
                  if name.startswith("nbn_keras>")}
    assert registered == set(nbn_keras.custom_objects())
    # Everything the trainer can put into a compiled model is registered.
    for name in ("CoupledSGD", "WarmupStepDecay", "WarmupCosineDecay",
                 "LDAMLoss", "BalancedSoftmaxCrossEntropy",
                 "LogitAdjustedCrossEntropy", "GroupAccuracy",
                 "BalancedAccuracy", "PerClassAccuracy",
                 "NormalizedBatchNormalization", "NBNScale", "GroupedConv2D"):
        assert f"nbn_keras>{name}" in registered


def test_import_registers_everything_in_a_fresh_process():
    script = (
        "import keras, nbn_keras\n"
        "print(sorted(n for n in keras.saving.get_custom_objects()"
        " if n.startswith('nbn_keras>')))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True,
                            text=True, env=ENV, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    names = ast.literal_eval(result.stdout.strip().splitlines()[-1])
    assert set(names) == set(nbn_keras.custom_objects())
