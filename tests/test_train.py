"""The training command: every config, bad flags, resume, distribution."""

import csv
import dataclasses
import glob
import json
import os
import re
import signal
import select
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from nbn_keras.training import config as config_lib
from nbn_keras.models.ride import network as ride
from nbn_keras.training import driver as train
from tests.helpers import ENV as SERVE_ENV
from tests.helpers import REPO
from tests.helpers import SERVING_CHECK_SCRIPT
from tests.helpers import class_dir
from tests.helpers import jpeg_cut_after_scan_header
from tests.helpers import parse_config
from tests.helpers import parse_run
from tests.helpers import write_fashion_mnist
from tests.helpers import write_jpeg_list_files

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.cfg")))
# Every config either trains a step in `test_config_trains_reports_and_serves` or
# differs from its twin here, which does, only in the data set's imbalance
# factor and the NBN switch (`test_untrained_configs_differ_from_a_trained_twin`).
TWINS = {
    **{f"cifar10_lt_if{f}_{arm}.cfg": "cifar10_lt_if100_nbn.cfg"
       for f in (10, 50, 100) for arm in ("bn", "nbn")},
    **{f"cifar100_lt_if{f}_{arm}.cfg": "cifar100_lt_if100_bn.cfg"
       for f in (10, 50, 100) for arm in ("bn", "nbn")},
    **{f"fashion_mnist_lt_if{f}_{arm}.cfg": "fashion_mnist_lt_if100_nbn.cfg"
       for f in (10, 100) for arm in ("bn", "nbn")},
    "digits_lt_bn.cfg": "digits_lt_nbn.cfg",
    "imagenet_lt_resnet50_bn.cfg": "imagenet_lt_resnet50_nbn.cfg",
    "imagenet_lt_resnext50_nbn.cfg": "imagenet_lt_resnext50_bn.cfg",
    # Also differs in its head (a linear layer, built and checked against
    # PyTorch in test_ride_import.py).
    "imagenet_lt_ride_bn.cfg": "imagenet_lt_ride_nbn.cfg",
    # Also differ in their head (checked against PyTorch in test_backbones.py
    # and test_import_torch.py; RIDE NBN trains its rectified heads here).
    "imagenet_lt_resnet50_fcbn_nbn.cfg": "imagenet_lt_resnet50_nbn.cfg",
    "imagenet_lt_resnet50_fcbn_notaffine_nbn.cfg": "imagenet_lt_resnet50_nbn.cfg",
    # Also differs in its re-training flags (trained in test_finetune.py).
    "imagenet_lt_resnet50_crt_nbn.cfg": "imagenet_lt_resnet50_nbn.cfg",
    **{f"{data}_resnet50_bn.cfg": f"{data}_resnet50_nbn.cfg"
       for data in ("inaturalist", "places_lt")},
    # Also differs in its loss (fitted in test_ride.py, checked against
    # PyTorch in test_losses.py).
    "imagenet_lt_ride_balanced_softmax_nbn.cfg": "imagenet_lt_ride_nbn.cfg",
}
TRAINED_CONFIGS = [c for c in CONFIGS
                   if TWINS.get(os.path.basename(c), os.path.basename(c))
                   == os.path.basename(c)]
TWIN_MAY_DIFFER = {"imbalance_factor", "nbn", "run_dir", "model_name"}
LIST_FILE_FIELDS = ("data", "num_classes", "image_root", "train_list", "val_list",
                   "test_list")
TWIN_ALSO_DIFFERS = {
    "imagenet_lt_ride_bn.cfg": {"nbn_selection", "head"},
    "imagenet_lt_ride_balanced_softmax_nbn.cfg": {"loss"},
    "imagenet_lt_resnet50_fcbn_nbn.cfg": {"head"},
    "imagenet_lt_resnet50_fcbn_notaffine_nbn.cfg": {"head"},
    "imagenet_lt_resnet50_crt_nbn.cfg": {"init_from", "train_only_head", "sampler",
                                         "samples_per_class", "epochs"},
}
QUICK = ["--epochs=1", "--steps_per_epoch=1", "--verbose=0"]
# The smallest digits network, for tests of the command rather than of a config.
SMALL = ["--backbone=resnet8", "--image_size=16", "--nopictures"]
FLOAT16_STEPS = 8


@pytest.fixture(autouse=True)
def float32_policy():
    yield
    keras.mixed_precision.set_global_policy("float32")


def mock_cifar(num_classes, per_class):
    """TFDS mock CIFAR with `per_class` training and 2 test images per class."""

    def as_dataset(self, split, **kwargs):
        size = num_classes * (per_class if str(split) == "train" else 2)
        labels = np.arange(size) % num_classes
        images = np.random.default_rng(0).integers(0, 256, (size, 32, 32, 3), np.uint8)
        ids = [f"{split}_{i:05d}" for i in range(size)]
        return tf.data.Dataset.from_tensor_slices(
            {"image": images, "label": labels, "id": ids})

    return tfds.testing.mock_data(as_dataset_fn=as_dataset)


def refuse_json_constant(name):
    """`json.loads(..., parse_constant=)` hook: NaN and Infinity are not JSON."""
    raise ValueError(f"not strict JSON: {name}")


LIST_FILES = "list_files"  # JPEG list files written by `write_jpeg_list_files`.
FASHION_MNIST = "fashion_mnist_idx"  # idx files written by `write_fashion_mnist`.
# How each config family runs at a tiny size: config-name prefix -> (data,
# extra flags). The longest matching prefix wins; a list-file family (an
# ImageNet-LT-like data set) is one line. Notes:
# - List files: the networks at 32x32 instead of 224x224 (the same layers,
#   the last stage at 1x1, at a fiftieth of the cost), in float32: at this
#   size and batch all 8 float16 steps of ResNet-50 and ResNeXt-50
#   overflowed in trials. Float16 training: test_float16_training_applies_a_step.
# - ResNet-50 / ResNeXt-50 / RIDE at this size (batch 2, last stage 1x1: each BN
#   there normalises 2 values) get gradients of ~1e7 in their first layers,
#   so one step at the recipe's rate makes their kernels ~1e4 and inference
#   logits NaN (measured): a rate of 1e-9 keeps the step and the model finite.
# - CIFAR: mock TFDS data, a small head class so a split holds every class.
# - Fashion-MNIST: generated idx files with their own checksums, and an
#   empty TFDS data directory so that no prepared copy is read instead.
FAMILIES = {
    "imagenet_lt": (LIST_FILES, ["--learning_rate=1e-9"]),
    "imagenet_lt_ride": (LIST_FILES, ["--learning_rate=1e-9", "--ride_experts=2"]),
    "inaturalist": (LIST_FILES, ["--learning_rate=1e-9"]),
    "places_lt": (LIST_FILES, ["--learning_rate=1e-9"]),
    "cifar10_lt": ("mock_cifar10", ["--n_max=100", "--global_batch_size=16"]),
    "cifar100_lt": ("mock_cifar100", ["--n_max=100", "--global_batch_size=16"]),
    "digits_lt": ("digits", []),
    "effect_study": ("digits", []),
    "fashion_mnist_lt": (FASHION_MNIST, []),
}
# The tiny lists have 3 classes (the configs' class counts:
# test_list_file_recipes_...).
LIST_FILE_FLAGS = ["--global_batch_size=2", "--image_size=32", "--nopictures",
                   "--mixed_precision=none", "--num_classes=3"]


def config_family(config):
    """`(data, extra flags)` of a config file, from `FAMILIES`."""
    name = os.path.basename(config)
    prefix = max((p for p in FAMILIES if name.startswith(p)), key=len, default=None)
    assert prefix, f"{name} belongs to no family of FAMILIES"
    return FAMILIES[prefix]


def data_overrides(config, tmp_path):
    data, extra = config_family(config)
    if data == LIST_FILES:
        return write_jpeg_list_files(str(tmp_path / "images")) + LIST_FILE_FLAGS + extra
    if data == FASHION_MNIST:
        _, sha256sums = write_fashion_mnist(str(tmp_path / "fashion"), 102, 2)
        os.makedirs(tmp_path / "no_tfds")
        return [f"--fashion_mnist_dir={tmp_path / 'fashion'}",
                f"--fashion_mnist_sha256={sha256sums}", f"--data_dir={tmp_path / 'no_tfds'}",
                "--fashion_mnist_val_per_class=2", "--n_max=100", "--global_batch_size=16",
                *extra]
    return extra


def serving_inputs(model, tmp_path, count=3):
    """Encoded images and the pixels the model sees for them, independently.

    Random 40x48 images as PNG files, decoded and resized to the model's
    input with TensorFlow's own ops (the exported `serve_image_bytes`
    resizes small-image models bilinearly with antialiasing).
    """
    height, width, channels = model.inputs[0].shape[1:]
    rng = np.random.default_rng(5)
    paths, pixels = [], []
    for i in range(count):
        image = rng.integers(0, 256, (40, 48, channels), np.uint8)
        paths.append(str(tmp_path / f"serve_{i}.png"))
        tf.io.write_file(paths[-1], tf.io.encode_png(image))
        decoded = tf.io.decode_png(tf.io.read_file(paths[-1]), channels=channels)
        pixels.append(tf.image.resize(tf.cast(decoded, tf.float32), [height, width],
                                      antialias=True).numpy())
    return paths, np.stack(pixels)


def expected_logits(model, pixels, is_ride):
    """`model`'s logits; for RIDE, the experts' mean computed here by hand."""
    logits = np.asarray(model(pixels, training=False))
    if not is_ride:
        return logits
    experts = np.asarray(keras.Model(model.inputs, model.get_layer("expert_logits").output)(
        pixels, training=False), np.float64)
    assert experts.shape == (len(pixels), 2, logits.shape[-1])  # --ride_experts=2
    by_hand = (experts[:, 0] + experts[:, 1]) / 2
    np.testing.assert_allclose(logits, by_hand, atol=1e-5)
    return by_hand.astype(np.float32)


@pytest.fixture(scope="session")
def serving_process(tmp_path_factory):
    """A process that cannot import nbn_keras, checking exports on request.

    `tests.helpers.SERVING_CHECK_SCRIPT` reading cases files from stdin: one
    TensorFlow start for every config's check.
    """
    root = tmp_path_factory.mktemp("serving")
    (root / "serve.py").write_text(SERVING_CHECK_SCRIPT)
    with open(root / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-I", str(root / "serve.py"), "-"], cwd=root, env=SERVE_ENV,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True)
    process.stderr_path = root / "stderr.txt"
    yield process
    process.kill()  # Its exit is slow; it holds nothing to flush.
    process.wait(timeout=60)


def check_served_without_nbn_keras(server, run_dir, version_dir, tmp_path, is_ride=False):
    """Serves the export in a process that cannot import nbn_keras (`server`).

    Both signatures must give the logits of `model.keras` (loaded here, with
    nbn_keras imported) on the same images.
    """
    model = keras.models.load_model(run_dir / "model.keras", compile=False)
    paths, pixels = serving_inputs(model, tmp_path)
    np.save(tmp_path / "expected.npy", expected_logits(model, pixels, is_ride))
    np.save(tmp_path / "pixels.npy", pixels)
    case = {"dir": str(version_dir), "expected": str(tmp_path / "expected.npy")}
    cases = [dict(case, images=str(tmp_path / "pixels.npy")), dict(case, bytes=paths)]
    assert b"nbn_keras" not in (version_dir / "saved_model.pb").read_bytes()
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    server.stdin.write(f"{tmp_path / 'cases.json'}\n")
    server.stdin.flush()
    ready, _, _ = select.select([server.stdout], [], [], 300)
    answer = server.stdout.readline() if ready else "no answer in 300 s"
    assert answer.strip() == "checked 2", (
        answer + server.stderr_path.read_text()[-3000:])


@pytest.mark.parametrize("config", sorted(set(CONFIGS) - set(TRAINED_CONFIGS)),
                         ids=os.path.basename)
def test_untrained_configs_differ_from_a_trained_twin(config):
    twin = os.path.join(REPO, "configs", TWINS[os.path.basename(config)])
    assert twin in TRAINED_CONFIGS
    (this, this_place), (other, other_place) = (parse_run(f"--flagfile={config}"),
                                                parse_run(f"--flagfile={twin}"))
    differ = {name for mine, theirs in ((this, other), (this_place, other_place))
              for name, value in vars(mine).items() if getattr(theirs, name) != value}
    may_differ = TWIN_MAY_DIFFER | TWIN_ALSO_DIFFERS.get(os.path.basename(config), set())
    assert differ <= may_differ, sorted(differ - may_differ)
    name = os.path.basename(config).removesuffix(".cfg")
    assert this_place.run_dir == f"runs/{name}" and this_place.model_name == name
    assert this.nbn == name.endswith("_nbn")
    factor = re.search(r"_if(\d+)_", name)
    assert factor is None or this.imbalance_factor == float(factor.group(1))


@pytest.mark.parametrize("recipe, data, classes, lists", [
    ("inaturalist", "inaturalist", 8142, ("iNaturalist18_train.txt", "iNaturalist18_val.txt",
                                          "iNaturalist18_val.txt")),
    ("places_lt", "places_lt", 365, ("Places_LT_train.txt", "Places_LT_val.txt",
                                     "Places_LT_test.txt")),
])
def test_list_file_recipes_follow_the_authors_data_lists(recipe, data, classes, lists):
    # Class counts and list names of the authors' data/iNaturalist18/ and
    # data/Places_LT/ (iNaturalist 2018 has no labelled test split: val twice).
    config = parse_config(f"--flagfile={REPO}/configs/recipes/{recipe}.cfg")
    assert (config.data, config.num_classes) == (data, classes)
    assert tuple(os.path.basename(p) for p in
                 (config.train_list, config.val_list, config.test_list)) == lists
    imagenet = parse_config(f"--flagfile={REPO}/configs/recipes/imagenet_lt.cfg")
    differ = {k for k, v in vars(config).items() if getattr(imagenet, k) != v}
    assert differ == set(LIST_FILE_FIELDS)


@pytest.mark.parametrize("config", TRAINED_CONFIGS, ids=os.path.basename)
def test_config_trains_reports_and_serves(config, tmp_path, serving_process):
    """Every phase of a config, then its export served without nbn_keras."""
    # --export: effect_study.cfg turns it off for the study's many runs.
    run_config, options = parse_run(
        f"--flagfile={config}", f"--run_dir={tmp_path}/run",
        f"--export_dir={tmp_path}/export", "--export", *QUICK,
        *data_overrides(config, tmp_path))
    name = os.path.basename(config)
    data, _ = config_family(config)
    if data.startswith("mock_cifar"):
        with mock_cifar(100 if data == "mock_cifar100" else 10, per_class=100):
            figures = train.train_and_evaluate(run_config, options)
    else:
        figures = train.train_and_evaluate(run_config, options)
    assert figures["steps_trained"] == 1
    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "test_metrics.json").read_text(),
                      parse_constant=refuse_json_constant) == figures
    assert 0 <= figures["top1"] <= 100
    resolved = (run_dir / "flags.cfg").read_text()
    assert f"--run_dir={tmp_path}/run" in resolved
    assert ("--nbn\n" in resolved) == name.endswith("_nbn.cfg")
    assert (run_dir / "model.keras").exists()
    assert (run_dir / "class_counts.json").exists()
    # One metric vocabulary; the NBN scale is logged with the metrics.
    with open(run_dir / "history.csv", newline="") as f:
        history = list(csv.DictReader(f))
    header = list(history[0])
    # (RIDE models have one scale per expert: nbn_scale_expert{e}.)
    assert any(column.startswith("nbn_scale/nbn_scale") and column.endswith("/alpha")
               for column in header) == name.endswith("_nbn.cfg")
    assert {"top1", "many", "medium", "few", "val_top1", "val_few", "lr"} <= set(header)
    is_ride = run_config.backbone in ride.ARCHITECTURES
    # RIDE's loss reads the experts' logits in validation too.
    assert all(np.isfinite(float(row[key])) for row in history
               for key in ("loss", "val_loss"))
    assert list((run_dir / "tensorboard" / "train").glob("events.out.tfevents.*"))
    state = json.loads((run_dir / "run_state.json").read_text())
    version_dir = tmp_path / "export" / options.served_model_name / "1"
    assert state["phase"] == "done" and state["export_path"] == str(version_dir)
    check_served_without_nbn_keras(serving_process, run_dir, version_dir, tmp_path,
                                   is_ride=is_ride)


def test_float16_training_applies_a_step(tmp_path):
    figures = train.train_and_evaluate(*parse_run(
        f"--flagfile={REPO}/configs/digits_lt_nbn.cfg", f"--run_dir={tmp_path}/run",
        "--noexport", "--mixed_precision=float16", "--epochs=1",
        f"--steps_per_epoch={FLOAT16_STEPS}", "--verbose=0", *SMALL))
    # Dynamic loss scaling skips the steps whose gradients overflow (from a
    # scale of 2**15, halved each time): some steps, at least one applied.
    assert 1 <= figures["steps_trained"] <= FLOAT16_STEPS
    assert keras.mixed_precision.global_policy().name == "mixed_float16"


def test_resolved_flags_reproduce_the_run(tmp_path):
    config = os.path.join(REPO, "configs", "digits_lt_nbn.cfg")
    first = train.train_and_evaluate(*parse_run(
        f"--flagfile={config}", f"--run_dir={tmp_path}/a", "--noexport",
        "--epochs=1", "--steps_per_epoch=2", "--verbose=0", *SMALL))
    again = parse_run(f"--flagfile={tmp_path}/a/flags.cfg", f"--run_dir={tmp_path}/b")
    assert again == parse_run(f"--flagfile={config}", f"--run_dir={tmp_path}/b",
                              "--noexport", "--epochs=1", "--steps_per_epoch=2",
                              "--verbose=0", *SMALL)
    second = train.train_and_evaluate(*again)
    assert first["per_class"] == second["per_class"]
    # A finished run is never trained over.
    before = (tmp_path / "b" / "best.keras").stat().st_mtime_ns
    with pytest.raises(train.RunError, match="holds a finished run"):
        train.train_and_evaluate(*again)
    assert (tmp_path / "b" / "best.keras").stat().st_mtime_ns == before


# The options a resumed run may change (how it runs, not what it trains), and
# values other than their defaults.
RESUME_MAY_CHANGE = {"run_dir": "elsewhere", "allow_foreign_run_dir": True,
                     "allow_foreign_export_dir": True, "verbose": 0,
                     "allow_changed_flags": True, "cluster_timeout": 7,
                     "memory_limit_gb": 3.0}


def test_resume_compares_hyperparameters_and_the_export_place(tmp_path):
    config, options = parse_run(f"--run_dir={tmp_path}", "--model_name=m")
    state = train.open_run(config, options, str(tmp_path))
    for name, value in RESUME_MAY_CHANGE.items():
        assert train.open_run(config, options.replace(**{name: value}),
                              str(tmp_path)) == state, name
    assert ({field.name for field in dataclasses.fields(config_lib.RunOptions)}
            == set(RESUME_MAY_CHANGE) | {"export_dir", "model_name"})
    for flag, value in (("momentum", 0.8), ("epochs", 3), ("xla", "true")):
        changed = parse_run(f"--run_dir={tmp_path}", "--model_name=m", f"--{flag}={value}")
        with pytest.raises(train.RunError, match=rf"--{flag}: \S+ in the run, \S+ now"):
            train.open_run(*changed, str(tmp_path))
    for flag in ("--export_dir=other", "--model_name=other"):
        with pytest.raises(train.RunError, match=flag.split("=")[0]):
            train.open_run(*parse_run(f"--run_dir={tmp_path}", "--model_name=m", flag),
                           str(tmp_path))


# Imports the driver, prints the flags a module of nbn_keras defined (absl
# records the module calling DEFINE_*), then runs the command as
# `python -m nbn_keras.train` does, with the script's arguments.
FLAGS_SCRIPT = """
import json, runpy, sys
from absl import flags
import nbn_keras.training.driver
print("defined:", json.dumps(sorted(flag.name for module, defined in
                        flags.FLAGS.flags_by_module_dict().items()
                        if module.startswith("nbn_keras") for flag in defined)),
      file=sys.stderr)
runpy.run_module("nbn_keras.train", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def command_flags():
    """Flags an import of the driver defines, and `--helpfull` of the command."""
    helped = subprocess.run([sys.executable, "-c", FLAGS_SCRIPT, "--helpfull"],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    printed = next(line for line in helped.stderr.splitlines() if line.startswith("defined:"))
    return json.loads(printed.split(":", 1)[1]), helped


@pytest.mark.slow
def test_importing_the_driver_defines_no_flag(command_flags):
    defined, _ = command_flags
    assert defined == []


@pytest.mark.slow
def test_the_command_lists_every_flag(command_flags):
    _, helped = command_flags
    listed = set(re.findall(r"^  --(?:\[no\])?(\w+):", helped.stdout, re.M))
    fields = {field.name for cls in (config_lib.TrainConfig, config_lib.RunOptions)
              for field in dataclasses.fields(cls)}
    assert fields and fields <= listed, sorted(fields - listed)


def run_command(*argv, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "nbn_keras.train", *argv],
                          capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=timeout)


@pytest.mark.parametrize("argv, messages", [
    (["--data=mnist_lt"], ["--data"]),
    (["--backbone=resnet7"], ["--backbone"]),
    (["--data=imagenet_lt"], ["need an existing --image_root"]),
    # One message names every problem of a command line.
    (["--data=cifar10_lt", "--data_dir=/no/such/dir", "--imbalance_factor=-5",
      "--lr_drop_epochs=160", "--lr_drop_factors=0.1,0.01"],
     ["--data_dir does not exist", "--imbalance_factor must be >= 1",
      "--lr_drop_epochs and --lr_drop_factors need the same number"]),
])
def test_bad_flags_fail_before_any_work(tmp_path, argv, messages):
    result = run_command(f"--run_dir={tmp_path}/run", *argv)
    assert result.returncode != 0
    for message in messages:
        assert message in result.stderr
    assert not (tmp_path / "run").exists()


def test_fashion_mnist_flags_are_checked_together(tmp_path):
    config = parse_config("--data=fashion_mnist_lt", "--fashion_mnist_dir=/no/such/dir",
                          "--fashion_mnist_sha256=/no/such/file", "--image_size=32",
                          "--fashion_mnist_val_per_class=0", f"--run_dir={tmp_path}/run")
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate(config)
    for message in ("--fashion_mnist_dir does not exist: /no/such/dir",
                    "--fashion_mnist_sha256 does not exist: /no/such/file",
                    "--image_size is not supported for --data=fashion_mnist_lt",
                    "--fashion_mnist_val_per_class must be positive"):
        assert message in str(error.value)


def test_list_file_flags_reach_the_loader(tmp_path):
    lists = write_jpeg_list_files(str(tmp_path / "images"))  # labels 0, 1, 2
    result = run_command(f"--run_dir={tmp_path}/run", "--data=imagenet_lt", *lists,
                         "--num_classes=2", "--global_batch_size=2", "--verbose=0")
    assert result.returncode == 1
    assert "list.txt, line 5: label 2 is not in [0, 2) (num_classes=2)" in result.stderr


def test_an_image_that_fails_to_decode_in_training_is_named(tmp_path):
    lists = write_jpeg_list_files(str(tmp_path / "images"))  # 6 images
    path = tmp_path / "images" / class_dir(1) / "0.jpg"
    path.write_bytes(jpeg_cut_after_scan_header(path.read_bytes()))
    result = run_command(f"--run_dir={tmp_path}/run", "--data=imagenet_lt", *lists,
                         "--image_size=32", "--global_batch_size=6", "--epochs=1",
                         "--steps_per_epoch=1", "--verbose=0", "--noexport", "--nopictures")
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"Error: Cannot read or decode image file {path}" in result.stderr
    assert "Traceback" not in result.stderr


def test_allow_duplicate_paths_reaches_the_loader(tmp_path):
    lists = write_jpeg_list_files(str(tmp_path / "images"))
    with open(tmp_path / "images" / "list.txt", "a") as f:
        f.write("class0/0.jpg 0\n")
    config = parse_config("--data=imagenet_lt", *lists, f"--run_dir={tmp_path}/run")
    with pytest.raises(ValueError, match=r"list\.txt, line 7: 'class0/0\.jpg' is listed "
                       r"again \(first on line 1\)"):
        train.load_data(config)
    allowed = parse_config("--data=imagenet_lt", *lists, "--allow_duplicate_paths",
                           f"--run_dir={tmp_path}/run")
    assert train.load_data(allowed).class_counts.tolist() == [3, 2, 2]


def test_image_size_reaches_list_files_and_is_refused_for_cifar(tmp_path):
    lists = write_jpeg_list_files(str(tmp_path / "images"))
    config = parse_config("--data=imagenet_lt", *lists, "--image_size=48",
                          f"--run_dir={tmp_path}/run")
    assert train.load_data(config).image_shape == (48, 48, 3)
    assert train.load_data(config.replace(image_size=None)).image_shape == (224, 224, 3)
    with pytest.raises(config_lib.ConfigError,
                       match="--image_size is not supported for --data=cifar10_lt"):
        config_lib.validate(parse_config("--data=cifar10_lt", "--image_size=16",
                                         f"--run_dir={tmp_path}/run"))


def test_bad_flagfile_fails_cleanly(tmp_path):
    flagfile = tmp_path / "bad.cfg"
    flagfile.write_text("--data=digits_lt\n--epochs=ten\n")
    result = run_command(f"--flagfile={flagfile}", f"--run_dir={tmp_path}/run")
    assert result.returncode != 0
    assert "--epochs" in result.stderr and "ten" in result.stderr
    assert "Traceback" not in result.stderr


def read_history(run_dir):
    with open(os.path.join(run_dir, "history.csv"), newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


DISTRIBUTED_SCRIPT = """
import sys
import tensorflow as tf
if sys.argv[1] == "2":
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from absl import app
from nbn_keras.training import config as config_lib
from nbn_keras import train
from tests.helpers import jpeg_cut_after_scan_header, write_fashion_mnist
app.run(train.main, argv=["train"] + sys.argv[2:])
"""


def test_mirrored_strategy_on_two_devices(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", DISTRIBUTED_SCRIPT, "2",
         f"--flagfile={REPO}/configs/digits_lt_nbn.cfg", f"--run_dir={tmp_path}/run",
         f"--export_dir={tmp_path}/export", "--epochs=1", "--global_batch_size=480",
         "--verbose=0", *SMALL],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # 503 images, padded to 504 for the 2 replicas: a batch of 480 and a
    # partial one of 24 (12 per replica).
    assert "503 training images" in result.stdout
    assert "2 steps per epoch, 2 replica(s)" in result.stdout
    figures = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    assert figures["steps_trained"] == 2
    assert (tmp_path / "export" / "digits_lt_nbn" / "1" / "saved_model.pb").exists()


def test_global_batch_not_divisible_by_replicas(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", DISTRIBUTED_SCRIPT, "2", "--global_batch_size=63",
         f"--run_dir={tmp_path}/run"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "--global_batch_size=63 is not divisible by the 2 replicas" in result.stderr


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_multi_worker_mirrored_strategy_on_localhost(tmp_path):
    workers = [f"localhost:{port}" for port in free_ports(2)]
    processes, logs = [], []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps(
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}))
        # Files, not pipes: a worker blocked on a full pipe stalls the other
        # in a collective.
        logs.append(tmp_path / f"worker{index}.log")
        with open(logs[-1], "w") as log:
            processes.append(subprocess.Popen(
                [sys.executable, "-c", DISTRIBUTED_SCRIPT, "1",
                 f"--flagfile={REPO}/configs/digits_lt_nbn.cfg",
                 f"--run_dir={tmp_path}/run", "--noexport", "--epochs=1",
                 # 504 (padded) images: a batch of 480 and a partial one of 24.
                 "--global_batch_size=480", "--verbose=0", *SMALL],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    for process in processes:
        process.wait(timeout=300)
    outputs = [(None, log.read_text()) for log in logs]
    for process, (_, output) in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
    assert "2 replica(s)" in outputs[0][1]
    figures = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    assert figures["steps_trained"] == 2
    assert (tmp_path / "run" / "workers" / "1" / "flags.cfg").exists()


def test_sigterm_ends_a_worker_waiting_for_its_cluster(tmp_path):
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]  # Nobody at the second.
    env = dict(os.environ, TF_CONFIG=json.dumps(
        {"cluster": {"worker": workers}, "task": {"type": "worker", "index": 0}}))
    process = subprocess.Popen(
        [sys.executable, "-m", "nbn_keras.train", f"--run_dir={tmp_path}/run",
         "--noexport", "--cluster_timeout=600"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    waiting = process.stdout.readline()
    assert waiting == f"Waiting up to 600 s for worker 1 at {workers[1]}.\n"
    start = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143
    assert time.monotonic() - start < 10
    assert stderr.splitlines()[-1] == ("Stopped by SIGTERM: the run's files are kept; run "
                                       "the same command again to resume it.")
    assert "Traceback" not in stderr
    assert not (tmp_path / "run").exists()


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    # A sane first epoch, then a learning rate that makes the loss diverge.
    result = run_command(
        f"--flagfile={REPO}/configs/digits_lt_nbn.cfg", f"--run_dir={run_dir}",
        "--noexport", "--epochs=3", "--steps_per_epoch=2", "--warmup_epochs=0",
        "--lr_drop_epochs=1", "--lr_drop_factors=1e30", "--verbose=0", *SMALL)
    assert result.returncode != 0
    assert "last good checkpoint is kept" in result.stderr
    assert read_history(run_dir) == [0]
    assert os.listdir(run_dir / "backup")
