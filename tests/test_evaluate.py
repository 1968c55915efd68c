"""`python -m nbn_keras.evaluate`: a `.keras` file scored on a data set's split."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from nbn_keras.training import driver as train
from nbn_keras.data import make_eval_dataset
from nbn_keras.evaluate import evaluate_file
from tests.helpers import REPO
from tests.helpers import parse_config
from tests.helpers import write_jpeg_list_files
DIGITS = [f"--flagfile={REPO}/configs/digits_lt_nbn.cfg", "--image_size=16"]


def random_model(path, classes=10, size=16):
    """A random linear classifier on the pixels: predictions vary per image."""
    inputs = keras.Input((size, size, 3), name="images")
    x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs))
    logits = keras.layers.Dense(classes, name="logits", kernel_initializer=(
        keras.initializers.RandomNormal(stddev=1.0, seed=0)))(x)
    model = keras.Model(inputs, logits, name="linear")
    model.save(path)
    return model


def numpy_figures(predictions, labels, counts, many=60, few=20):
    """Top-1, per-class, group and balanced accuracy in percent, from scratch."""
    per_class = np.array([np.mean(predictions[labels == c] == c) for c in range(len(counts))])
    groups = {"many": counts > many, "few": counts < few}
    groups["medium"] = ~groups["many"] & ~groups["few"]
    figures = {g: 100 * per_class[mask].mean() for g, mask in groups.items()}
    figures.update(top1=100 * np.mean(predictions == labels), balanced=100 * per_class.mean(),
                   per_class=100 * per_class)
    return figures


def test_command_scores_the_test_split_as_numpy_does(tmp_path):
    # A linear classifier fitted briefly, so its predictions vary and differ
    # between splits.
    data = train.load_data(parse_config(*DIGITS))
    model = random_model(str(tmp_path / "m.keras"))
    # The model gives logits: a loss that read them as probabilities drove the
    # fit towards 2-5 classes, on the edge of the check below.
    model.compile(keras.optimizers.Adam(0.01),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(make_eval_dataset(data, "train", batch_size=64), epochs=5, verbose=0,
              shuffle=False)
    model.save(tmp_path / "m.keras")
    output = tmp_path / "m.json"
    result = subprocess.run(
        [sys.executable, "-m", "nbn_keras.evaluate", f"--model={tmp_path / 'm.keras'}",
         *DIGITS, f"--output={output}"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(output.read_text())
    labels = data.get_split("test").labels
    predictions = model.predict(make_eval_dataset(data, "test"), verbose=0).argmax(-1)
    assert len(set(predictions.tolist())) > 5  # not a constant classifier
    expected = numpy_figures(predictions, labels, np.asarray(data.class_counts))
    assert figures["split"] == "test"
    for key in ("top1", "many", "medium", "few", "balanced"):
        assert figures[key] == pytest.approx(expected[key], abs=1e-9), key
    np.testing.assert_allclose(figures["per_class"], expected["per_class"], atol=1e-9)
    # The printed table: the header and the group figures.
    header, row = result.stdout.splitlines()[:2]
    assert header.split() == ["split", "top1", "many", "medium", "few", "balanced"]
    assert row.split() == ["test"] + [f"{expected[k]:.2f}" for k in
                                      ("top1", "many", "medium", "few", "balanced")]
    # The validation split gives other figures for this model.
    val_predictions = model.predict(make_eval_dataset(data, "val"), verbose=0).argmax(-1)
    val = numpy_figures(val_predictions, data.get_split("val").labels,
                        np.asarray(data.class_counts))
    assert val["top1"] != expected["top1"]


def test_list_files_bad_shapes_and_existing_outputs(tmp_path):
    # iNaturalist's and Places-LT's configs with tiny lists.
    lists = write_jpeg_list_files(str(tmp_path / "images"))
    random_model(str(tmp_path / "m.keras"), classes=3, size=32)
    for name in ("inaturalist", "places_lt"):
        config = parse_config(f"--flagfile={REPO}/configs/{name}_resnet50_nbn.cfg", *lists,
                              "--num_classes=3", "--image_size=32")
        figures, path = evaluate_file(str(tmp_path / "m.keras"), config, split="val",
                                      output=str(tmp_path / f"{name}.json"))
        assert figures["split"] == "val" and len(figures["per_class"]) == 3
        assert json.dumps(json.loads(open(path).read())) == json.dumps(figures)  # NaN: no many
    evaluate_file(str(tmp_path / "m.keras"), config, split="val")
    with pytest.raises(FileExistsError, match=r"--output=.*m\.val_metrics\.json exists; "
                                              r"pass --overwrite"):
        evaluate_file(str(tmp_path / "m.keras"), config, split="val")
    with pytest.raises(ValueError, match=r"takes images of shape \(32, 32, 3\), but "
                                         r"places_lt gives \(48, 48, 3\)"):
        evaluate_file(str(tmp_path / "m.keras"), config.replace(image_size=48),
                      output=str(tmp_path / "other.json"))
    with pytest.raises(ValueError, match=r"has 3 classes, but places_lt has 4"):
        evaluate_file(str(tmp_path / "m.keras"), config.replace(num_classes=4),
                      output=str(tmp_path / "other.json"))
    assert not os.path.exists(tmp_path / "other.json")
