"""`.keras` files written by the training command load in fresh processes.

And damaged or wrong `.keras` files are refused with a specific error
(`test_bad_keras_file`, rows of the README's "Bad input" table).
"""

import ast
import json
import subprocess
import sys
import textwrap
import warnings
import zipfile

import keras
import numpy as np
import pytest

import nbn_keras
from tests.helpers import ENV
from tests.helpers import REPO
from tests.helpers import bad_input
from tests.helpers import check_bad_input

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


# --------------------------------------------------------------------------
# Bad `.keras` files (the README's "Bad input" table): copies of the user's
# or the trained `best.keras`, tampered with. Each case asserts its error and
# that the user's files (`user_files`) stay as they were.


def _rezip(source, target, replace=None, drop=()):
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for name in zin.namelist():
            if name in drop:
                continue
            data = zin.read(name)
            if replace and name in replace:
                data = replace[name](data)
            zout.writestr(name, data)


def _load_tampered(tamper):
    """A case: `tamper(ctx)` writes `<tmp>/model.keras`, which is then loaded."""
    def act(ctx):
        tamper(ctx)
        ctx.ready()
        nbn_keras.load_model(ctx.tmp / "model.keras")

    return act


def _cut_trained_file(keep):
    def tamper(ctx):
        path = ctx.trained_copy()
        path.write_bytes(path.read_bytes()[:keep(path.stat().st_size)])

    return tamper


def _rezip_trained_file(**changes):
    return lambda ctx: _rezip(ctx.trained_best(), ctx.tmp / "model.keras", **changes)


def _flip_a_weights_byte(ctx):
    path = ctx.trained_copy()
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("model.weights.h5")
    data = bytearray(path.read_bytes())
    data[info.header_offset + 30 + len(info.filename) + info.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _rename_scale_class(data):
    return data.replace(b'"NBNScale"', b'"NoSuchLayer"').replace(
        b"nbn_keras>NBNScale", b"nbn_keras>NoSuchLayer")


def keras_file_with_other_weights(ctx):
    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    other.save_weights(ctx.tmp / "other.weights.h5")
    weights = (ctx.tmp / "other.weights.h5").read_bytes()
    _rezip(ctx.trained_best(), ctx.tmp / "model.keras",
           replace={"model.weights.h5": lambda data: weights})
    ctx.ready()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras warns per layer first.
        nbn_keras.load_model(ctx.tmp / "model.keras")


def keras_file_with_a_lambda(ctx):
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))
    model.save(ctx.tmp / "lambda.keras")
    ctx.ready()
    nbn_keras.load_model(ctx.tmp / "lambda.keras")


def _add_config_key(ctx):
    def add_key(data):
        config = json.loads(data)
        for layer in config["config"]["layers"]:
            if layer["class_name"] == "NormalizedBatchNormalization":
                layer["config"]["foo"] = 1
        return json.dumps(config).encode()

    _rezip(ctx.user / "run" / "best.keras", ctx.tmp / "model.keras",
           replace={"config.json": add_key})


def _load(path):
    """A case: the file at `path(ctx)`, as it is, is loaded."""
    return lambda ctx: nbn_keras.load_model(path(ctx))


KERAS_FILE_CASES = [
    bad_input("keras_file_cut_in_half", _load_tampered(_cut_trained_file(lambda n: n // 2)),
              ValueError,
              r"not a complete \.keras file \(truncated, or not a Keras zip archive\)",
              slow=True),
    bad_input("keras_file_missing_its_end", _load_tampered(_cut_trained_file(
        lambda n: n - 10)), ValueError, r"not a complete \.keras file", slow=True),
    bad_input("keras_file_with_a_flipped_byte", _load_tampered(_flip_a_weights_byte),
              ValueError,
              r"is damaged: its member 'model\.weights\.h5' does not match its checksum",
              slow=True),
    bad_input("keras_file_with_broken_config", _load_tampered(_rezip_trained_file(
        replace={"config.json": lambda data: data[: len(data) // 2]})), ValueError,
        r"is damaged: its config\.json is not JSON", slow=True),
    bad_input("keras_file_without_weights", _load_tampered(_rezip_trained_file(
        drop=("model.weights.h5",))), ValueError,
        r"is not a complete \.keras file: it has no model\.weights\.h5", slow=True),
    bad_input("keras_file_with_an_unknown_class", _load_tampered(_rezip_trained_file(
        replace={"config.json": _rename_scale_class})), TypeError,
        r"it needs nbn_keras>NoSuchLayer \(module nbn_keras\.layers\), which no imported "
        r"package has registered\. Import nbn_keras", slow=True),
    bad_input("keras_file_with_other_weights", keras_file_with_other_weights, ValueError,
              r"Could not load '\S*model\.keras': A total of \d+ objects could not be "
              r"loaded", slow=True),
    bad_input("keras_file_with_a_lambda", keras_file_with_a_lambda, ValueError,
              r"Could not load .*safe_mode=False"),
    bad_input("keras_file_with_an_unknown_config_key", _load_tampered(_add_config_key),
              TypeError,
              r"\ACould not load '[^']*model\.keras': unknown config key\(s\) 'foo' in "
              r"layer 'batch_normalization' \(NormalizedBatchNormalization\): this version "
              r"of NormalizedBatchNormalization does not take them \(a file from another "
              r"version, or edited\)\.\Z"),
    bad_input("empty_keras_file", _load_tampered(
        lambda ctx: (ctx.tmp / "model.keras").write_bytes(b"")), ValueError,
        r"'\S*model\.keras' is empty \(0 bytes\): not a \.keras file\."),
    bad_input("weights_file_as_model", _load(
        lambda ctx: ctx.user / "run" / "backup" / "latest.weights.h5"), ValueError,
        r"is not a \.keras model file\. A \.weights\.h5 file holds weights only"),
    bad_input("saved_model_as_model", _load(lambda ctx: ctx.user / "saved_models" / "m" / "1"),
              ValueError,
              r"is not a \.keras model file\. A directory may be a TF Serving export"),
    bad_input("missing_keras_file", _load(lambda ctx: ctx.tmp / "absent.keras"),
              FileNotFoundError, r"No model file at '\S*absent\.keras'"),
]


@pytest.mark.parametrize("act, error, message", KERAS_FILE_CASES)
def test_bad_keras_file(act, error, message, user_files):
    check_bad_input(user_files, act, error, message)
