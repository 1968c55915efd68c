"""Pictures, Grad-CAM and the effective BN parameters they read."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import nbn_keras
from nbn_keras.models import registry as backbones
from nbn_keras.models.cifar_resnet import cifar_resnet
from nbn_keras.analysis import gradcam
from nbn_keras.analysis import plots
from nbn_keras.analysis import report
from nbn_keras.training.callbacks import scale_variables
from nbn_keras.data import load_synthetic_lt
from nbn_keras.data import make_eval_dataset
from nbn_keras.layers import NBNScale
from nbn_keras.layers import NormalizedBatchNormalization

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SHAPE = (16, 16, 3)


def assert_png(path):
    assert os.path.getsize(path) > 1000
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE


def leaf_layers(model):
    return model._flatten_layers(include_self=False, recursive=True)


def resnet8_classifier(num_classes=3, shortcut="projection"):
    keras.utils.set_random_seed(0)
    backbone = cifar_resnet(8, input_shape=SHAPE, shortcut=shortcut)
    return backbones.build_classifier(backbone, num_classes, SHAPE)


@pytest.fixture(scope="module")
def models():
    """A plain classifier and its NBN copy with non-trivial parameters."""
    bn = resnet8_classifier()
    rng = np.random.default_rng(1)
    for layer in leaf_layers(bn):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.gamma.assign(rng.uniform(0.2, 2.0, layer.gamma.shape))
            layer.beta.assign(rng.normal(0.0, 0.5, layer.beta.shape))
    nbn = nbn_keras.convert_to_nbn(bn)
    for layer in leaf_layers(nbn):
        if isinstance(layer, NBNScale):
            layer.scales[0].assign(0.7)
    return {"BN": bn, "NBN": nbn}


@pytest.fixture(scope="module")
def data():
    return load_synthetic_lt(num_classes=3, n_max=8, imbalance_factor=4,
                             image_size=16, val_per_class=2, test_per_class=3)


def test_effective_parameters_follow_the_nbn_formula(models):
    nbn_layers = {l.name: l for l in leaf_layers(models["NBN"])
                  if isinstance(l, NormalizedBatchNormalization)}
    read = plots.effective_bn_parameters(models["NBN"])
    assert sorted(read) == sorted(nbn_layers) == [
        "v2_stack_2_block1_0_bn", "v2_stack_2_block1_2_bn"]
    for name, (gamma, beta) in read.items():
        raw_gamma = np.asarray(nbn_layers[name].gamma, np.float64)
        raw_beta = np.asarray(nbn_layers[name].beta, np.float64)
        np.testing.assert_allclose(
            gamma, 0.7 * raw_gamma / (np.linalg.norm(raw_gamma) + 1e-6), rtol=1e-5)
        np.testing.assert_allclose(
            beta, 0.7 * raw_beta / (np.linalg.norm(raw_beta) + 1e-6), rtol=1e-5)


def test_plain_bn_parameters_are_read_unchanged(models):
    layer = models["BN"].get_layer("cifar_resnet8").get_layer("v2_stack_2_block1_2_bn")
    gamma, beta = plots.effective_bn_parameters(models["BN"])[layer.name]
    np.testing.assert_array_equal(gamma, np.asarray(layer.gamma))
    np.testing.assert_array_equal(beta, np.asarray(layer.beta))


def test_magnitude_summary():
    summary = plots.magnitude_summary([3.0, -4.0] + [0.0] * 18)
    assert summary["norm"] == pytest.approx(5.0)
    assert summary["top10_share"] == pytest.approx(1.0)
    assert plots.magnitude_summary(np.ones(8))["cv"] == pytest.approx(0.0)


def gap_head_classifier(num_classes=4):
    """images -> Rescaling -> nested conv backbone -> avg_pool -> Dense."""
    keras.utils.set_random_seed(3)
    inner_input = keras.Input((6, 6, 2))
    features = keras.layers.Conv2D(5, 3, padding="same", activation="relu")(inner_input)
    backbone = keras.Model(inner_input, features, name="backbone")
    images = keras.Input((6, 6, 2), name="images")
    x = backbone(keras.layers.Rescaling(1.0, name="normalize")(images))
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    logits = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(images, logits), backbone


def test_grad_cam_of_a_linear_gap_head_is_the_class_activation_map():
    classifier, backbone = gap_head_classifier()
    images = np.random.default_rng(0).normal(size=(3, 6, 6, 2)).astype(np.float32)
    classes = np.array([0, 3, 1])
    maps, logits = gradcam.grad_cam(classifier, images, classes, upsample=False)

    features = np.asarray(backbone(images), np.float64)
    kernel = np.asarray(classifier.get_layer("logits").kernel, np.float64)
    expected = np.maximum(np.einsum("nhwk,kn->nhw", features, kernel[:, classes]), 0)
    expected /= expected.max(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(maps, expected, atol=1e-5)
    np.testing.assert_allclose(logits, classifier.predict(images, verbose=0), rtol=1e-5)


def test_grad_cam_upsamples_and_defaults_to_the_prediction(models):
    images = np.random.default_rng(0).uniform(0, 255, (2,) + SHAPE)
    maps, logits = gradcam.grad_cam(models["NBN"], images)
    assert maps.shape == (2, 16, 16)
    assert 0.0 <= maps.min() and maps.max() <= 1.0
    explicit, _ = gradcam.grad_cam(models["NBN"], images, logits.argmax(-1))
    np.testing.assert_allclose(maps, explicit)


def test_feature_model_needs_the_pooling_layer(models):
    with pytest.raises(ValueError, match="no layer named 'pool'"):
        gradcam.feature_model(models["BN"], "pool")


def test_picture_functions_write_pngs(models, data, tmp_path):
    figures = {label: report.evaluate(model, data, 6, 3)
               for label, model in models.items()}
    images, labels = plots.tail_test_examples(data, num_images=4)
    assert list(labels[:3]) == [2, 1, 0]  # Rarest class first.
    assert images.shape == (4,) + SHAPE
    paths = [
        plots.plot_bn_magnitudes(models, str(tmp_path / "mag.png")),
        plots.plot_per_class_accuracy(figures, str(tmp_path / "acc.png")),
        plots.plot_per_class_accuracy(
            {k: [v, v] for k, v in figures.items()}, str(tmp_path / "acc_seeds.png")),
        plots.plot_gradcam(models, images, labels, str(tmp_path / "sub" / "cam.png"),
                           class_counts=data.class_counts),
    ]
    for path in paths:
        assert_png(path)


@pytest.fixture
def drawn(monkeypatch):
    """The matplotlib figures the plot functions save, by path."""
    figures = {}
    save = plots._save

    def capture(figure, path):
        figures[path] = figure
        return save(figure, path)

    monkeypatch.setattr(plots, "_save", capture)
    return figures


def test_magnitude_plot_draws_the_effective_parameters(models, drawn, tmp_path):
    path = plots.plot_bn_magnitudes(models, str(tmp_path / "mag.png"))
    gamma_ax, beta_ax = drawn[path].axes[:2]
    for line, model in zip(gamma_ax.get_lines(), models.values()):
        name = plots.last_stage_bn_layers(model)[-1].name
        (layer,) = [l for l in leaf_layers(model) if l.name == name]  # Unfolded.
        gamma = np.asarray(layer.gamma)
        if isinstance(layer, NormalizedBatchNormalization):
            # The NBN formula, with the model's one shared scale.
            (alpha,) = [float(np.asarray(v)) for v in scale_variables(model).values()]
            gamma = alpha * gamma / (np.linalg.norm(gamma) + 1e-6)
        np.testing.assert_allclose(line.get_ydata(), np.sort(np.abs(gamma))[::-1], rtol=1e-5)
    assert len(beta_ax.get_lines()) == len(models)


def test_accuracy_plot_draws_per_class_accuracy_head_to_tail(models, data, drawn, tmp_path):
    figures = {label: report.evaluate(model, data, 6, 3) for label, model in models.items()}
    path = plots.plot_per_class_accuracy(figures, str(tmp_path / "acc.png"))
    accuracy_ax = [ax for ax in drawn[path].axes if ax.get_ylabel() == "test accuracy (%)"][0]
    order = np.argsort(-np.asarray(data.class_counts), kind="stable")
    lines = [line for line in accuracy_ax.get_lines() if len(line.get_ydata()) == len(order)]
    assert len(lines) == len(models)
    labels = data.get_split("test").labels
    for line, model in zip(lines, models.values()):
        predicted = model.predict(make_eval_dataset(data, "test"), verbose=0).argmax(-1)
        expected = [100.0 * np.mean(predicted[labels == c] == c) for c in order]
        np.testing.assert_allclose(line.get_ydata(), expected, rtol=1e-6)


def test_write_run_pictures_for_one_model(models, data, tmp_path):
    figures = report.evaluate(models["NBN"], data, 6, 3)
    logdir = str(tmp_path / "tensorboard")
    paths = plots.write_run_pictures(models["NBN"], data, figures, str(tmp_path),
                                     tensorboard_dir=logdir, step=5)
    assert [os.path.basename(p) for p in paths] == [
        "bn_magnitudes.png", "per_class_accuracy.png", "gradcam_tail.png"]
    for path in paths:
        assert_png(path)
    tags = set()
    for event_file in tf.io.gfile.glob(os.path.join(logdir, "events.*")):
        for event in tf.compat.v1.train.summary_iterator(event_file):
            tags.update(v.tag for v in event.summary.value)
    assert tags == {"bn_magnitudes", "per_class_accuracy", "gradcam_tail"}


@pytest.fixture
def quick_run(tmp_path):
    """Runs the training driver for one step on a tiny synthetic set."""
    from absl import flags
    from nbn_keras.training import config as config_lib
    from nbn_keras.training import driver as train

    def run(*extra, run_dir=tmp_path):
        flag_values = flags.FlagValues()
        config_lib.define_flags(flag_values)
        flag_values(["train", "--data=synthetic_lt", "--n_max=8", "--imbalance_factor=4",
                     "--backbone=resnet8", "--image_size=16",
                     "--epochs=1", "--steps_per_epoch=1", "--global_batch_size=8",
                     "--noexport", "--verbose=0", f"--run_dir={run_dir}", *extra])
        return train.train_and_evaluate(config_lib.from_flags(flag_values),
                                        config_lib.options_from_flags(flag_values))

    return run


@pytest.mark.slow
def test_training_writes_pictures_and_survives_their_failure(quick_run, tmp_path,
                                                             monkeypatch):
    from absl import logging

    quick_run()
    for name in ("bn_magnitudes", "per_class_accuracy", "gradcam_tail"):
        assert_png(str(tmp_path / "pictures" / f"{name}.png"))
    assert tf.io.gfile.glob(str(tmp_path / "tensorboard" / "pictures" / "events.*"))

    def fail(*args, **kwargs):
        raise RuntimeError("no pictures today")

    warnings = []
    monkeypatch.setattr(plots, "write_run_pictures", fail)
    monkeypatch.setattr(logging, "warning", lambda msg, *a: warnings.append(msg % a))
    figures = quick_run(run_dir=tmp_path / "second")
    assert figures["steps_trained"] == 1 and 0 <= figures["top1"] <= 100
    assert not (tmp_path / "second" / "pictures").exists()
    assert warnings == ["Could not write the run's pictures: no pictures today"]
