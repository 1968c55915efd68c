import subprocess
import sys

import keras
import numpy as np
import pytest

import nbn_keras
from nbn_keras import NBNScale
from nbn_keras import NormalizedBatchNormalization
from nbn_keras.models.registry import build_backbone
from nbn_keras.models.registry import build_classifier
from nbn_keras.models.cifar_resnet import cifar_resnet
from nbn_keras.conversion import leaf_layers

RNG = np.random.default_rng(0)

# The layers the paper converts, read off each architecture by hand: in the
# last stage, the last BN of every block and the shortcut BN.
EXPECTED_PAPER_LAYERS = {
    # The authors' layout: torchvision module paths (layer4.0.bn3, ...).
    "resnet18": ["layer4_0_bn2", "layer4_0_downsample_1", "layer4_1_bn2"],
    "resnet50": ["layer4_0_bn3", "layer4_0_downsample_1", "layer4_1_bn3",
                 "layer4_2_bn3"],
    "resnext50": ["layer4_0_bn3", "layer4_0_downsample_1", "layer4_1_bn3",
                  "layer4_2_bn3"],
    "keras_cv_resnet18_v1": ["v2_stack_3_block1_0_bn", "v2_stack_3_block1_2_bn",
                             "v2_stack_3_block2_2_bn"],
    "keras_cv_resnet50_v1": ["v2_stack_3_block1_0_bn", "v2_stack_3_block1_3_bn",
                             "v2_stack_3_block2_3_bn", "v2_stack_3_block3_3_bn"],
    # Zero-padding shortcuts have no BN.
    "resnet32": [f"v2_stack_2_block{b}_2_bn" for b in range(1, 6)],
    # One block per stage: the last stage has a single BN to convert.
    "resnet8": ["v2_stack_2_block1_2_bn"],
}


def nbn_names(model):
    return sorted(l.name for l in leaf_layers(model)
                  if isinstance(l, NormalizedBatchNormalization))


def scale_variables(model):
    return [w for w in model.weights if "alpha" in w.name]


def randomize_bn(model):
    """Gives every BN non-trivial parameters and statistics, as if trained."""
    for layer in leaf_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            channels = layer.gamma.shape[0]
            layer.gamma.assign(RNG.normal(1.0, 0.3, channels))
            layer.beta.assign(RNG.normal(0.0, 0.3, channels))
            layer.moving_mean.assign(RNG.normal(0.0, 0.2, channels))
            layer.moving_variance.assign(RNG.uniform(0.5, 1.5, channels))
    return model


def small_classifier(depth=8, **kwargs):
    return build_classifier(cifar_resnet(depth, input_shape=(16, 16, 3), **kwargs),
                            num_classes=4, input_shape=(16, 16, 3))


def images(n=8, size=16):
    return RNG.uniform(0, 255, (n, size, size, 3)).astype("float32")


@pytest.mark.parametrize("name", sorted(EXPECTED_PAPER_LAYERS))
def test_paper_selection_converts_exactly_the_expected_layers(name):
    model = build_classifier(name, num_classes=10, input_shape=(32, 32, 3))
    converted = nbn_keras.convert_to_nbn(model)
    assert nbn_names(converted) == sorted(EXPECTED_PAPER_LAYERS[name])
    assert len(scale_variables(converted)) == 1
    bn_count = sum(isinstance(l, keras.layers.BatchNormalization)
                   for l in leaf_layers(model))
    assert sum(isinstance(l, keras.layers.BatchNormalization)
               for l in leaf_layers(converted)) == bn_count
    assert converted.count_params() == model.count_params() + 1


def test_projection_shortcut_bn_is_selected():
    backbone = cifar_resnet(8, input_shape=(16, 16, 3), shortcut="projection")
    assert nbn_names(nbn_keras.convert_to_nbn(backbone)) == [
        "v2_stack_2_block1_0_bn", "v2_stack_2_block1_2_bn"]


def test_selection_by_stages():
    model = build_backbone("resnet18", (32, 32, 3))
    converted = nbn_keras.convert_to_nbn(model, stages=[1, -1])
    assert nbn_names(converted) == sorted(
        ["layer2_0_bn2", "layer2_0_downsample_1", "layer2_1_bn2"]
        + EXPECTED_PAPER_LAYERS["resnet18"])
    with pytest.raises(ValueError, match="Stage 4 does not exist"):
        nbn_keras.convert_to_nbn(model, stages=[4])


def test_paper_selection_survives_clone_and_save(tmp_path):
    # Stages come from layer names, roles from the graph: both must survive.
    model = build_classifier("resnet18", num_classes=3, input_shape=(32, 32, 3))
    model.save(tmp_path / "plain.keras")
    for copy in (keras.models.clone_model(model),
                 keras.models.load_model(tmp_path / "plain.keras")):
        assert nbn_names(nbn_keras.convert_to_nbn(copy)) == sorted(
            EXPECTED_PAPER_LAYERS["resnet18"])


def keras_cv_resnet_v2(block_type):
    import keras_cv

    return keras_cv.models.ResNetV2Backbone(
        stackwise_filters=[64, 128], stackwise_blocks=[2, 2],
        stackwise_strides=[1, 2], block_type=block_type,
        include_rescaling=False, input_shape=(32, 32, 3))


@pytest.mark.parametrize("block_type", ["basic_block", "block"])
@pytest.mark.parametrize("stages", [None, [0, 1]])
def test_pre_activation_resnet_is_refused(block_type, stages):
    # KerasCV's ResNetV2 uses the v1 names (`v2_stack_1_block1_2_bn`, ...)
    # for BNs that precede a ReLU and a conv: the paper's rule has no
    # counterpart there, so the conversion must refuse, not guess.
    backbone = keras_cv_resnet_v2(block_type)
    with pytest.raises(ValueError, match="pre-activation.*selection='all'"):
        nbn_keras.convert_to_nbn(backbone, stages=stages)
    assert nbn_names(nbn_keras.convert_to_nbn(backbone, ["post_bn"])) == ["post_bn"]


def test_resnet_names_without_residual_structure_are_refused():
    inputs = keras.Input((8, 8, 4))
    x = keras.layers.Conv2D(4, 3, name="layer4_0_conv3")(inputs)
    x = keras.layers.BatchNormalization(name="layer4_0_bn3")(x)
    with pytest.raises(ValueError, match="feeds a residual sum"):
        nbn_keras.convert_to_nbn(keras.Model(inputs, x))


def test_converting_twice_is_refused():
    converted = nbn_keras.convert_to_nbn(build_backbone("resnet18", (32, 32, 3)))
    with pytest.raises(ValueError, match="already NBN layers"):
        nbn_keras.convert_to_nbn(converted)


def test_selection_all_predicate_and_names():
    model = small_classifier()
    all_bn = sorted(l.name for l in leaf_layers(model)
                    if isinstance(l, keras.layers.BatchNormalization))
    assert len(all_bn) == 7
    assert nbn_names(nbn_keras.convert_to_nbn(model, "all")) == all_bn
    by_predicate = nbn_keras.convert_to_nbn(model, lambda l: "_1_bn" in l.name)
    assert nbn_names(by_predicate) == [n for n in all_bn if "_1_bn" in n]
    by_name = nbn_keras.convert_to_nbn(model, ["conv1_bn"])
    assert nbn_names(by_name) == ["conv1_bn"]
    with pytest.raises(ValueError, match="no_such_bn"):
        nbn_keras.convert_to_nbn(model, ["no_such_bn"])
    with pytest.raises(ValueError, match="Unknown selection 'last'"):
        nbn_keras.convert_to_nbn(model, "last")


def test_paper_selection_needs_resnet_names():
    inputs = keras.Input((4,))
    outputs = keras.layers.BatchNormalization(name="bn")(keras.layers.Dense(4)(inputs))
    with pytest.raises(ValueError, match="selection='all'"):
        nbn_keras.convert_to_nbn(keras.Model(inputs, outputs))


def test_weights_are_carried_over_and_scales_start_at_one():
    model = randomize_bn(small_classifier())
    converted = nbn_keras.convert_to_nbn(model)
    old_layers = {l.name: l for l in leaf_layers(model)}
    for new in leaf_layers(converted):
        if isinstance(new, keras.layers.InputLayer):
            continue
        old = old_layers.get(new.name)
        if isinstance(new, NormalizedBatchNormalization):
            for attr in ("gamma", "beta", "moving_mean", "moving_variance"):
                np.testing.assert_array_equal(getattr(new, attr), getattr(old, attr))
        elif isinstance(new, NBNScale):
            assert float(new.scales[0].numpy()) == 1.0
        else:
            for a, b in zip(new.get_weights(), old.get_weights(), strict=True):
                np.testing.assert_array_equal(a, b)


def test_fresh_model_converts_to_the_reference_initial_state():
    converted = nbn_keras.convert_to_nbn(small_classifier())
    for layer in leaf_layers(converted):
        if isinstance(layer, NormalizedBatchNormalization):
            gamma, beta = layer.effective_parameters(keras.ops.ones(()))
            channels = gamma.shape[0]
            np.testing.assert_allclose(gamma, np.full(channels, 1 / (np.sqrt(channels) + 1e-6)), rtol=1e-6)
            np.testing.assert_array_equal(beta, np.zeros(channels))


def test_beta_initializer_draws_a_different_start_per_layer():
    model = small_classifier(depth=14)
    converted = nbn_keras.convert_to_nbn(
        model, beta_initializer=keras.initializers.RandomNormal(stddev=0.1, seed=3))
    betas = [np.asarray(l.beta) for l in leaf_layers(converted)
             if isinstance(l, NormalizedBatchNormalization)]
    assert len(betas) == 2
    assert not np.array_equal(betas[0], betas[1])
    pooled = np.concatenate(betas)
    assert 0.05 < pooled.std() < 0.2 and abs(pooled.mean()) < 0.05
    # Everything else is still copied from the BN model.
    old = {l.name: l for l in leaf_layers(model)}
    for new in leaf_layers(converted):
        if isinstance(new, NormalizedBatchNormalization):
            np.testing.assert_array_equal(new.gamma, old[new.name].gamma)
        elif new.weights and not isinstance(new, NBNScale):
            for a, b in zip(new.get_weights(), old[new.name].get_weights(), strict=True):
                np.testing.assert_array_equal(a, b)
    # The default keeps the reference's zero start.
    default = nbn_keras.convert_to_nbn(model)
    for layer in leaf_layers(default):
        if isinstance(layer, NormalizedBatchNormalization):
            np.testing.assert_array_equal(layer.beta, np.zeros(layer.beta.shape))


def test_unseeded_beta_initializer_differs_per_layer_and_follows_the_global_seed():
    model = small_classifier(depth=14)

    def betas():
        keras.utils.set_random_seed(7)
        converted = nbn_keras.convert_to_nbn(
            model, beta_initializer=keras.initializers.RandomNormal(stddev=0.1))
        return [np.asarray(l.beta) for l in leaf_layers(converted)
                if isinstance(l, NormalizedBatchNormalization)]

    first, second = betas(), betas()
    assert not np.array_equal(first[0], first[1])
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_beta_initializer_and_preserve_outputs_exclude_each_other():
    with pytest.raises(ValueError, match="beta_initializer.*preserve_outputs"):
        nbn_keras.convert_to_nbn(small_classifier(), scale_sharing="layer",
                                 separate_scales=True, preserve_outputs=True,
                                 beta_initializer="ones")


@pytest.mark.parametrize("scale_sharing, separate_scales, expected", [
    ("model", False, 1), ("model", True, 2), ("layer", False, 5), ("layer", True, 10),
])
def test_scale_variable_count_survives_clone_and_save(
        tmp_path, scale_sharing, separate_scales, expected):
    model = build_classifier("resnet32", num_classes=10, input_shape=(32, 32, 3))
    converted = nbn_keras.convert_to_nbn(
        model, scale_sharing=scale_sharing, separate_scales=separate_scales)
    assert len(scale_variables(converted)) == expected
    cloned = keras.models.clone_model(converted)
    assert len(scale_variables(cloned)) == expected
    path = tmp_path / "converted.keras"
    converted.save(path)
    restored = keras.models.load_model(path)
    assert len(scale_variables(restored)) == expected
    x = images(2, 32)
    np.testing.assert_allclose(restored(x), converted(x), atol=1e-5)


def test_preserve_outputs_keeps_a_trained_model_exact():
    model = randomize_bn(small_classifier(shortcut="projection"))
    converted = nbn_keras.convert_to_nbn(
        model, "all", scale_sharing="layer", separate_scales=True,
        preserve_outputs=True)
    x = images()
    np.testing.assert_allclose(converted(x), model(x), atol=1e-5)


def test_preserve_outputs_needs_per_layer_separate_scales():
    with pytest.raises(ValueError, match="preserve_outputs"):
        nbn_keras.convert_to_nbn(small_classifier(), preserve_outputs=True)


def train_briefly(model, steps=12):
    x = images(32)
    # A learnable rule: the class is the brightest quarter of the image.
    quarters = x.reshape(32, 2, 8, 2, 8, 3).mean(axis=(2, 4, 5)).reshape(32, 4)
    y = quarters.argmax(1)
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, batch_size=16, epochs=steps // 2, verbose=0,
                        shuffle=False)
    return history.history["loss"], x


@pytest.mark.parametrize("scale_sharing, separate_scales", [
    ("model", False), ("layer", False), ("model", True)])
def test_converted_model_trains_and_folds(scale_sharing, separate_scales):
    converted = nbn_keras.convert_to_nbn(
        small_classifier(), "all", scale_sharing=scale_sharing,
        separate_scales=separate_scales)
    losses, x = train_briefly(converted)
    assert losses[-1] < losses[0]
    scales = scale_variables(converted)
    assert all(np.all(s.numpy() != 1.0) for s in scales)
    folded = nbn_keras.fold_nbn(converted)
    assert not [l for l in leaf_layers(folded)
                if type(l).__module__.startswith("nbn_keras")]
    np.testing.assert_allclose(folded.predict(x, verbose=0),
                               converted.predict(x, verbose=0), atol=1e-5)


def test_sequential_and_subclassed_models():
    sequential = keras.Sequential([
        keras.Input((4,)), keras.layers.Dense(4),
        keras.layers.BatchNormalization(name="bn")])
    converted = nbn_keras.convert_to_nbn(sequential, "all")
    assert nbn_names(converted) == ["bn"]

    class Subclassed(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match="subclassed"):
        nbn_keras.convert_to_nbn(Subclassed(), "all")


def test_shared_scale_across_sub_models_is_refused():
    inputs = keras.Input((4,))
    # The nested model has its parent's name, as a backbone inside a classifier can.
    inner = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization(name="inner_bn")],
                             name="net")
    outputs = keras.layers.BatchNormalization(name="outer_bn")(inner(inputs))
    model = keras.Model(inputs, outputs, name="net")
    with pytest.raises(ValueError, match="scale_sharing='layer'") as error:
        nbn_keras.convert_to_nbn(model, "all")
    assert "'net/net': 1 (inner_bn)" in str(error.value)
    assert "'net': 1 (outer_bn)" in str(error.value)
    converted = nbn_keras.convert_to_nbn(model, "all", scale_sharing="layer")
    assert nbn_names(converted) == ["inner_bn", "outer_bn"]


LOAD_SCRIPT = """
import sys
import keras
import numpy as np
import nbn_keras
model = keras.models.load_model(sys.argv[1])
np.testing.assert_allclose(model.predict(np.load(sys.argv[2]), verbose=0),
                           np.load(sys.argv[3]), atol=1e-5)
print(sum("alpha" in w.name for w in model.weights))
"""


def test_load_model_in_a_fresh_process(tmp_path):
    converted = nbn_keras.convert_to_nbn(small_classifier())
    train_briefly(converted, steps=2)
    x = images(4)
    converted.save(tmp_path / "model.keras")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", converted.predict(x, verbose=0))
    result = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(tmp_path / "model.keras"),
         str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "1"


MIRRORED_SCRIPT = """
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import nbn_keras

# Synchronised statistics: two replicas see different halves of the batch,
# and the moving mean must follow the mean of the whole batch.
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
x[4:] += 5.0
with strategy.scope():
    layer = nbn_keras.NormalizedBatchNormalization(synchronized=True, momentum=0.0)
    layer.build((None, 3))
dataset = strategy.experimental_distribute_dataset(
    tf.data.Dataset.from_tensor_slices(x).batch(8))
for batch in dataset:
    strategy.run(lambda b: layer(b, training=True), args=(batch,))
np.testing.assert_allclose(layer.moving_mean.numpy(), x.mean(0), rtol=1e-5)
np.testing.assert_allclose(layer.moving_variance.numpy(), x.var(0), rtol=1e-4)

# A converted classifier built and converted in scope trains with one scale.
with strategy.scope():
    model = nbn_keras.convert_to_nbn(nbn_keras.models.build_classifier(
        nbn_keras.models.cifar_resnet.cifar_resnet(8, (16, 16, 3), synchronized_bn=True),
        num_classes=3, input_shape=(16, 16, 3)))
    model.compile(keras.optimizers.SGD(0.1),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
images = np.random.default_rng(1).uniform(0, 255, (16, 16, 16, 3)).astype("float32")
labels = np.arange(16) % 3
history = model.fit(images, labels, batch_size=8, epochs=2, verbose=0)
(alpha,) = [w for w in model.weights if "alpha" in w.name]
assert np.isfinite(history.history["loss"]).all()
assert abs(float(alpha.numpy()) - 1.0) > 1e-6
print("ok")
"""


def test_synchronized_nbn_under_mirrored_strategy():
    result = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
