"""The authors' networks: layout, sizes and initialisation, without PyTorch.

Their logits against a PyTorch definition are checked in
`test_import_torch.py`; here the expectations are published figures
(torchvision's parameter counts, which the authors' networks share) and the
initialisation formulas of their code.
"""

import keras
import numpy as np
import pytest

import nbn_keras
from nbn_keras.models.registry import BACKBONES
from nbn_keras.models.registry import build_backbone
from nbn_keras.models.registry import build_classifier
from nbn_keras.conversion import leaf_layers

# torchvision's trainable parameters with a 1000-class head.
TORCHVISION_PARAMETERS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnext50": 25_028_904,  # resnext50_32x4d
}


def trainable_count(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.slow) if name == "resnet101" else name
    for name in sorted(TORCHVISION_PARAMETERS)])
def test_parameter_counts_and_output_are_torchvisions(name):
    model = build_classifier(name, 1000, (224, 224, 3))
    assert trainable_count(model) == TORCHVISION_PARAMETERS[name]
    channels = 512 if name in ("resnet18", "resnet34") else 2048
    assert model.get_layer(name).output.shape == (None, 7, 7, channels)


def test_stride_is_in_the_3x3_conv_and_padding_is_symmetric():
    backbone = build_backbone("resnet50", (64, 64, 3))
    strides = {l.name: l.strides for l in backbone.layers
               if isinstance(l, keras.layers.Conv2D)}
    assert strides["layer2_0_conv1"] == (1, 1)
    assert strides["layer2_0_conv2"] == (2, 2)
    assert strides["layer2_0_downsample_0"] == (2, 2)
    # A strided 3x3 conv pads one pixel on each side, as PyTorch does.
    pad = backbone.get_layer("layer2_0_conv2_pad")
    assert tuple(map(tuple, pad.padding)) == ((1, 1), (1, 1))
    assert backbone.get_layer("conv1_pad").padding == ((3, 3), (3, 3))
    basic = build_backbone("resnet18", (64, 64, 3))
    assert basic.get_layer("layer2_0_conv1").strides == (2, 2)
    assert basic.get_layer("layer1_0_conv1").strides == (1, 1)
    assert "layer1_0_downsample_0" not in [l.name for l in basic.layers]


@pytest.mark.slow
def test_resnext_uses_32_groups_of_4_channels_and_folds_to_stock_layers():
    model = build_classifier("resnext50", 10, (64, 64, 3))
    conv = model.get_layer("resnext50").get_layer("layer1_0_conv2")
    assert (conv.groups, conv.filters, tuple(conv.kernel.shape)) == (32, 128, (3, 3, 4, 128))
    # Exported models hold stock layers only.
    folded = nbn_keras.fold_nbn(model)
    assert not [l for l in leaf_layers(folded) if type(l).__module__.startswith("nbn_keras")]
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(folded.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-5)


def test_bn_layers_use_pytorchs_defaults():
    for name in ("resnet50", "resnext50"):
        bns = [l for l in leaf_layers(build_backbone(name, (64, 64, 3)))
               if isinstance(l, keras.layers.BatchNormalization)]
        assert len(bns) == 53
        assert {(l.momentum, l.epsilon) for l in bns} == {(0.9, 1e-5)}


def test_the_authors_initialisation():
    keras.utils.set_random_seed(0)
    resnet = build_classifier("resnet50", 1000, (64, 64, 3))
    # Their ResNet: N(0, sqrt(2 / (k * k * out))) for every conv.
    for conv_name in ("conv1", "layer3_0_conv2", "layer4_0_conv3"):
        kernel = np.asarray(resnet.get_layer("resnet50").get_layer(conv_name).kernel)
        k, _, _, out = kernel.shape
        assert kernel.std() == pytest.approx(np.sqrt(2 / (k * k * out)), rel=0.05)
        assert abs(kernel.mean()) < 0.05 * kernel.std()
    # Their head is nn.Linear's default: kernel and bias U(-1/sqrt(in), 1/sqrt(in)).
    bound = 1 / np.sqrt(2048)
    for weights in resnet.get_layer("logits").get_weights():
        assert np.abs(weights).max() <= bound
        assert np.abs(weights).max() > 0.95 * bound
    # Their ResNeXt keeps PyTorch's conv default, U(-1/sqrt(fan_in), ...).
    resnext = build_backbone("resnext50", (64, 64, 3))
    kernel = np.asarray(resnext.get_layer("layer3_0_conv2").kernel)
    bound = 1 / np.sqrt(3 * 3 * kernel.shape[2])
    assert bound * 0.95 < np.abs(kernel).max() <= bound
    assert kernel.std() == pytest.approx(bound / np.sqrt(3), rel=0.05)


def test_other_backbones_keep_the_keras_head():
    head = build_classifier("resnet20", 10, (32, 32, 3)).get_layer("logits")
    np.testing.assert_array_equal(head.bias, np.zeros(10))


def test_names():
    assert {"resnet50", "resnext50", "keras_cv_resnet50_v1", "resnet32"} <= set(BACKBONES)
    with pytest.raises(ValueError, match="Unknown backbone 'resnet51'.*resnext50"):
        build_backbone("resnet51", (32, 32, 3))
    with pytest.raises(ValueError, match="head_initializer"):
        build_classifier("resnet20", 10, (32, 32, 3), head_initializer="zeros")


def head_model(head, features=6, classes=4):
    """Pooled features -> `apply_head`, with random weights and BN statistics."""
    inputs = keras.Input((features,))
    model = keras.Model(inputs, nbn_keras.models.heads.apply_head(inputs, classes, head))
    rng = np.random.default_rng(0)
    for weight in model.weights:
        low = 0.5 if "variance" in weight.path or "gamma" in weight.path else -0.5
        weight.assign(rng.uniform(low, 1.5, weight.shape).astype("float32"))
    return model


@pytest.mark.parametrize("fc_type", ["Linear", "Linear_fcbn", "Linear_fcbn_notaffine"])
def test_heads_are_the_authors_fc_types(fc_type):
    import torch

    from tests.torch_nets import make_head

    head = {v: k for k, v in nbn_keras.models.heads.TORCH_FC_TYPES.items()}[fc_type]
    ours = head_model(head)
    theirs = make_head(fc_type, 6, 4)
    dense = ours.get_layer("logits")
    state = {"weight": dense.kernel.numpy().T, "bias": dense.bias.numpy()}
    if head != "linear":
        bn = ours.get_layer("logits_bn")
        state.update({"bn.running_mean": bn.moving_mean.numpy(),
                      "bn.running_var": bn.moving_variance.numpy()})
        if head == "fcbn":
            state.update({"bn.weight": bn.gamma.numpy(), "bn.bias": bn.beta.numpy()})
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    assert {k for k, _ in theirs.named_parameters()} | {
        k for k, _ in theirs.named_buffers() if "num_batches" not in k} == set(state)
    x = np.random.default_rng(1).normal(size=(8, 6)).astype("float32")
    with torch.no_grad():
        eval_logits = theirs.eval()(torch.from_numpy(x)).numpy()
        train_logits = theirs.train()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours(x, training=False), eval_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours(x, training=True), train_logits, rtol=1e-4, atol=1e-4)
    if head != "linear":  # The same update of the moving mean (momentum 0.1).
        np.testing.assert_allclose(ours.get_layer("logits_bn").moving_mean.numpy(),
                                   theirs.bn.running_mean.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head", ["fcbn", "fcbn_notaffine"])
def test_logit_bn_runs_in_float32_under_mixed_precision(head):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_classifier("resnet8", 3, (16, 16, 3), head=head)
        ride_model = nbn_keras.models.ride.build_ride_classifier(
            3, (32, 32, 3), num_experts=1, layer3_output_dim=4, layer4_output_dim=4,
            head=head)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    for model, bn_name in ((model, "logits_bn"), (ride_model, "linears_0_bn")):
        bn = model.get_layer(bn_name)
        assert bn.compute_dtype == "float32" and bn.center == bn.scale == (head == "fcbn")
        assert model.get_layer(bn_name.removesuffix("_bn")).compute_dtype == "float32"
        assert model.output.dtype == "float32"
        x = np.random.default_rng(0).uniform(0, 255, (2, *model.input.shape[1:]))
        assert model(x.astype("float32"), training=True).dtype == "float32"


def test_unknown_head_is_named():
    with pytest.raises(ValueError, match=r"head must be one of \('linear', 'fcbn', "
                                         r"'fcbn_notaffine'\).*got 'bn'"):
        build_classifier("resnet8", 3, (16, 16, 3), head="bn")


@pytest.mark.parametrize("name, stride", [
    # CIFAR ResNets: stages at strides 1, 2, 2. ImageNet ResNets: stem 2,
    # max-pool 2, stages 1, 2, 2, 2.
    ("resnet8", 4), ("resnet110", 4), ("resnet50", 32), ("resnext50", 32),
    ("keras_cv_resnet18_v1", 32), ("resnet50_ride", 32),
])
def test_min_image_size_is_the_total_stride(name, stride):
    assert nbn_keras.models.min_image_size(name) == stride


def test_at_the_min_image_size_the_last_stage_is_one_pixel():
    for size, side in ((4, 1), (8, 2), (16, 4)):
        assert build_backbone("resnet8", (size, size, 3)).output.shape[1:3] == (side, side)


def test_activation_elements_sums_every_batched_layer_output():
    inner = keras.Sequential([keras.Input((8, 8, 4)),
                              keras.layers.Conv2D(2, 3, strides=2, padding="same"),
                              keras.layers.ReLU()])
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 1)(inputs)
    x = inner(x)
    outputs = keras.layers.Dense(5)(keras.layers.Flatten()(x))
    # Conv 8*8*4, nested conv and ReLU 2 * 4*4*2, flatten 32, dense 5; the
    # inputs are not counted.
    assert nbn_keras.graph.activation_elements(keras.Model(inputs, outputs)) == (
        256 + 64 + 32 + 5)
