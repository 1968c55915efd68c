"""Classifier re-training: weights matched from a `.keras` file, only the head trained."""

import numpy as np
import pytest

import nbn_keras
from nbn_keras.training import config as config_lib
from nbn_keras.training import finetune
from nbn_keras.training import driver as train
from nbn_keras.models.registry import build_classifier
from nbn_keras.conversion import leaf_layers
from tests.helpers import parse_config
from tests.helpers import parse_run


def weights_by_key(model):
    return {f"{layer.name}/{v.name}": v.numpy() for layer in leaf_layers(model)
            for v in layer.weights}


def test_weights_are_matched_by_name_class_and_shape(trained_run):
    source = trained_run["run_dir"] / "model.keras"
    # A plain-BN ResNet-8 with 5 classes: the file's NBN layers and head do not fit.
    model = build_classifier("resnet8", 5, (32, 32, 3), name="resnet8")
    found = finetune.load_matching_weights(model, str(source))
    saved = weights_by_key(nbn_keras.load_model(str(source), compile=False))
    nbn = [layer.name for layer in leaf_layers(nbn_keras.load_model(str(source)))
           if isinstance(layer, nbn_keras.NormalizedBatchNormalization)]
    assert nbn  # the paper's selection: ResNet-8's last-stage block BN
    expected_unmatched = [
        "logits/bias: shape (10,) in the file, (5,) here",
        "logits/kernel: shape (64, 10) in the file, (64, 5) here",
    ] + [f"{name}/{w}: a NormalizedBatchNormalization in the file, a "
         f"BatchNormalization here" for name in nbn
         for w in ("beta", "gamma", "moving_mean", "moving_variance")]
    assert found["unmatched"] == sorted(expected_unmatched)
    assert found["unused"] == ["nbn_scale/alpha"]
    ours = weights_by_key(model)
    assert found["matched"] == sorted(set(ours) - {e.split(":")[0] for e in expected_unmatched})
    for key in found["matched"]:
        np.testing.assert_array_equal(ours[key], saved[key])


def test_retraining_moves_only_the_head_and_the_nbn_scale(trained_run, tmp_path, capsys):
    source = trained_run["run_dir"] / "model.keras"
    train.train_and_evaluate(*parse_run(
        "--flagfile=configs/digits_lt_nbn.cfg", "--backbone=resnet8", f"--init_from={source}",
        "--train_only_head", "--sampler=class_aware", "--samples_per_class=4",
        "--warmup_epochs=0", "--epochs=1", "--steps_per_epoch=2", "--verbose=0",
        "--noexport", "--nopictures", f"--run_dir={tmp_path}/run"))
    printed = capsys.readouterr().out
    assert f"--init_from={source}: " in printed and " matched, 0 not, 0 in the file unused." in printed
    trained = printed.split("--train_only_head: training ", 1)[1].split(";", 1)[0]
    assert sorted(trained.split(", ")) == ["logits", "nbn_scale"]
    before = weights_by_key(nbn_keras.load_model(str(source), compile=False))
    after = weights_by_key(nbn_keras.load_model(str(tmp_path / "run" / "model.keras"),
                                                compile=False))
    assert sorted(before) == sorted(after)
    moved = {key for key in before if not np.array_equal(before[key], after[key])}
    # Every backbone weight, BN moving statistics included ("shifted BN"), is kept.
    assert moved == {"logits/kernel", "logits/bias", "nbn_scale/alpha"}


def test_retraining_flags_are_checked_before_any_work(tmp_path):
    config = parse_config("--flagfile=configs/digits_lt_nbn.cfg", f"--run_dir={tmp_path}/run",
                          f"--init_from={tmp_path}/none.keras", "--train_only_head",
                          "--nbn_scale_sharing=layer", "--samples_per_class=0")
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate(config)
    message = str(error.value)
    assert f"--init_from does not exist: {tmp_path}/none.keras" in message
    assert "--train_only_head needs --nbn_scale_sharing=model" in message
    assert "--samples_per_class must be positive (got 0)" in message
    assert not (tmp_path / "run").exists()
