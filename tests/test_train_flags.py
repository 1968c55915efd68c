"""Bad flags of the training command, refused before the run's first file.

Each case parses the command's flags and runs them through
`train_and_evaluate` in this process, and asserts its error and that the
case's directory (where the run and export directories are) and the user's
files (`user_files`) stay as they were. They are rows of the README's "Bad
input" table; other bad flags are in `test_train.py`.
"""

import json
import shutil
import socket
import types

import pytest
from absl import flags

from nbn_keras.training import config as config_lib
from nbn_keras.training import driver as train
from tests.helpers import bad_input
from tests.helpers import check_bad_input

# Digits-LT (IF 10): int(124 * 0.1 ** (i / 9)) training images in class i
# (124: the smallest class, 174 images, less 30 test and 20 validation ones).
DIGITS_TRAINING_IMAGES = sum(int(124 * 0.1 ** (i / 9)) for i in range(10))

# ResNet-8 classifier at 16x16 for 10 classes, numbers per image of each layer
# output: normalize 16*16*3; stem conv, BN, ReLU 3 * 16*16*16; stage 0 (no
# shortcut) conv, BN, ReLU, conv, BN, add, ReLU 7 * 16*16*16; stage 1 the
# shortcut's subsample 8*8*16, reshape 8*8*16, channel pad 8*8*32, reshape
# 8*8*32, and 7 * 8*8*32; stage 2 likewise at 4x4 with 32 -> 64 channels;
# pooling 64; logits 10. (NBN's shared scale is no per-image output.)
RESNET8_16_ELEMENTS = (16 * 16 * 3 + 10 * 16 * 16 * 16
                       + 2 * 8 * 8 * 16 + 9 * 8 * 8 * 32
                       + 2 * 4 * 4 * 32 + 9 * 4 * 4 * 64 + 64 + 10)


def run_training(ctx, *argv):
    values = flags.FlagValues()
    config_lib.define_flags(values)
    values(["train", "--data=digits_lt", "--backbone=resnet8", "--image_size=16",
            "--global_batch_size=64", "--epochs=1", "--steps_per_epoch=1", "--verbose=0",
            "--nopictures", f"--run_dir={ctx.tmp / 'run'}",
            f"--export_dir={ctx.tmp / 'exports'}", "--model_name=m", *argv])
    return train.train_and_evaluate(config_lib.from_flags(values),
                                    config_lib.options_from_flags(values))


def training_with(*argv):
    """A case: the training command with `argv` added to the defaults."""
    return lambda ctx, monkeypatch: run_training(ctx, *argv)


def users_run_dir(ctx):
    """`<tmp>/run` holding a user's own `model.keras` and `history.csv`."""
    (ctx.tmp / "run").mkdir()
    shutil.copyfile(ctx.user / "run" / "best.keras", ctx.tmp / "run" / "model.keras")
    (ctx.tmp / "run" / "history.csv").write_text("epoch,loss\n0,1.5\n")
    ctx.ready()


def run_dir_of_someone_else(ctx, monkeypatch):
    users_run_dir(ctx)
    run_training(ctx)


def run_dir_of_someone_else_allowed(ctx, monkeypatch):
    users_run_dir(ctx)
    run_training(ctx, "--allow_foreign_run_dir", "--seed=-1")


def run_dir_of_another_version(ctx, monkeypatch):
    # A flag this version does not define (RIDE's head was a flag of its own once).
    (ctx.tmp / "run").mkdir()
    (ctx.tmp / "run" / "flags.cfg").write_text("--data=digits_lt\n--ride_head=linear\n")
    (ctx.tmp / "run" / "run_state.json").write_text('{"phase": "train", "run_id": "x"}')
    ctx.ready()
    run_training(ctx)


def export_dir_of_someone_else(ctx, monkeypatch):
    (ctx.tmp / "exports" / "m" / "notes").mkdir(parents=True)
    (ctx.tmp / "exports" / "m" / "1.txt").write_text("mine")
    (ctx.tmp / "exports" / "m" / "3").mkdir()  # A version: not refused.
    ctx.ready()
    run_training(ctx)


def batch_beyond_the_machines_memory(ctx, monkeypatch):
    # About 7e7 numbers per 512x512 image: 300 GB for the batch. The data
    # set is a stand-in of 1000 images (only its size and shape are read).
    monkeypatch.setattr(train, "load_data", lambda config: types.SimpleNamespace(
        train_split=range(1000), num_classes=2, image_shape=(512, 512, 3),
        mean=None, std=None))
    run_training(ctx, "--global_batch_size=1000", "--image_size=512")


def cluster_address_named_twice(ctx, monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps(
        {"cluster": {"worker": ["localhost:1", "localhost:1"]},
         "task": {"type": "worker", "index": 0}}))
    run_training(ctx)


def cluster_peer_unreachable(ctx, monkeypatch):
    ports = []
    for _ in range(2):  # Two free loopback ports, nobody listening.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    monkeypatch.setenv("TF_CONFIG", json.dumps(
        {"cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
         "task": {"type": "worker", "index": 0}}))
    run_training(ctx, "--cluster_timeout=1")


TRAINING_FLAG_CASES = [
    bad_input("run_dir_of_someone_else", run_dir_of_someone_else, ValueError,
              r"--run_dir=\S+ holds no run of this project but 2 other entries "
              r"\(history\.csv, model\.keras\); a run would overwrite them\. .* pass "
              r"--allow_foreign_run_dir"),
    bad_input("run_dir_of_someone_else_allowed", run_dir_of_someone_else_allowed,
              ValueError, r"^--seed must be in \[0, 2\*\*32\) \(got -1\)\.$"),
    bad_input("run_dir_of_another_version", run_dir_of_another_version, train.RunError,
              r"--run_dir=\S+ holds a run whose flags cannot be read \(\S+flags\.cfg: "
              r"Unknown command line flag 'ride_head'.*\); it was started by another "
              r"version of nbn_keras, or the file was edited\."),
    bad_input("export_dir_of_someone_else", export_dir_of_someone_else, ValueError,
              r"--export_dir=\S+: \S+/exports/m holds 2 entries that are not model "
              r"versions \(1\.txt, notes\); .*pass --allow_foreign_export_dir"),
    bad_input("seeds_out_of_range", training_with("--seed=-1", "--data_seed=4294967296"),
              ValueError, r"--seed must be in \[0, 2\*\*32\) \(got -1\)\. --data_seed must "
              r"be in \[0, 2\*\*32\) \(got 4294967296\)"),
    bad_input("batch_larger_than_the_training_set", training_with(
        "--global_batch_size=100000", "--steps_per_epoch=3"), ValueError,
        rf"--global_batch_size=100000 is larger than the {DIGITS_TRAINING_IMAGES} training "
        r"images of --data=digits_lt"),
    bad_input("batch_beyond_the_memory_limit", training_with("--memory_limit_gb=0.01"),
              ValueError,
              r"--global_batch_size=64 at --image_size=16 with --backbone=resnet8 needs "
              rf"about {64 * RESNET8_16_ELEMENTS * 4 / 1e9:.3g} GB for the activations "
              rf"training keeps \({RESNET8_16_ELEMENTS} numbers of 4 bytes per image, .*\), "
              r"more than the 0\.01 GB --memory_limit_gb"),
    bad_input("batch_beyond_the_machines_memory", batch_beyond_the_machines_memory,
              ValueError,
              r"--global_batch_size=1000 at --image_size=512 with --backbone=resnet8 needs "
              r"about \d+ GB .*, more than the [\d.]+ GB memory of this machine"),
    bad_input("image_smaller_than_the_network", training_with("--image_size=1"), ValueError,
              r"--image_size=1 is smaller than 4, the smallest input of --backbone=resnet8 "
              r"\(its total stride: at 4x4 its last stage is 1x1\)"),
    bad_input("image_smaller_than_resnet50", training_with(
        "--image_size=16", "--backbone=resnet50"), ValueError,
        r"--image_size=16 is smaller than 32, the smallest input of --backbone=resnet50"),
    bad_input("cluster_address_named_twice", cluster_address_named_twice, ValueError,
              r"TF_CONFIG names the address localhost:1 twice \(worker 0 and worker 1\); "
              r"every task needs its own host:port"),
    bad_input("cluster_peer_unreachable", cluster_peer_unreachable, ValueError,
              r"This worker \(127\.0\.0\.1:\d+\) could not reach worker 1 at "
              r"127\.0\.0\.1:\d+ within --cluster_timeout=1 s"),
]


@pytest.mark.parametrize("act, error, message", TRAINING_FLAG_CASES)
def test_bad_training_flag(act, error, message, user_files, monkeypatch):
    check_bad_input(user_files, act, error, message, monkeypatch)
