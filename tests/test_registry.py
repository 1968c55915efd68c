"""The model registry: families, their builders and their NBN selections.

Expectations are counted by hand from the architectures (blocks per stage,
which block has a projection shortcut), not read from the code.
"""

import dataclasses

import keras
import pytest
from absl import flags

import nbn_keras
from nbn_keras.conversion import leaf_layers
from nbn_keras.conversion import resolve_selection
from nbn_keras.models import registry
from nbn_keras.models.family import Family
from nbn_keras.selection import Naming
from nbn_keras.selection import StageGroupSelection
from nbn_keras.training import config as config_lib

# name: (blocks per stage, BN per block, output channels). A torchvision or
# KerasCV ResNet has a stem BN, the blocks' BN and one shortcut BN in every
# stage whose first block changes the shape: stages 2-4, and stage 1 too for
# bottlenecks (64 -> 256 channels). A CIFAR ResNet's zero-padding shortcuts
# have no BN.
IMAGENET_RESNETS = {
    "resnet18": ((2, 2, 2, 2), 2, 512),
    "resnet34": ((3, 4, 6, 3), 2, 512),
    "resnet50": ((3, 4, 6, 3), 3, 2048),
    "resnet101": ((3, 4, 23, 3), 3, 2048),
    "resnet152": ((3, 8, 36, 3), 3, 2048),
    "resnext50": ((3, 4, 6, 3), 3, 2048),
    "keras_cv_resnet18_v1": ((2, 2, 2, 2), 2, 512),
    "keras_cv_resnet34_v1": ((3, 4, 6, 3), 2, 512),
    "keras_cv_resnet50_v1": ((3, 4, 6, 3), 3, 2048),
    "keras_cv_resnet101_v1": ((3, 4, 23, 3), 3, 2048),
    "keras_cv_resnet152_v1": ((3, 8, 36, 3), 3, 2048),
}


def expected_bn_count(blocks, per_block):
    shortcuts = 4 if per_block == 3 else 3
    return 1 + per_block * sum(blocks) + shortcuts


def expected_backbones():
    cifar = {f"resnet{6 * n + 2}": (n,) for n in (1, 2, 3, 5, 7, 9, 18)}
    return set(IMAGENET_RESNETS) | set(cifar) | {"resnet50_ride"}


def bn_layers(model):
    return [l for l in leaf_layers(model) if isinstance(l, keras.layers.BatchNormalization)]


def test_backbones_are_the_families_architectures():
    assert set(registry.BACKBONES) == expected_backbones()
    assert len(registry.BACKBONES) == len(expected_backbones())
    assert registry.family_of("resnet50_ride").name == "RIDE"
    with pytest.raises(ValueError, match="Unknown backbone 'resnet51'"):
        registry.family_of("resnet51")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(IMAGENET_RESNETS))
def test_every_imagenet_architecture_builds_through_its_family(name):
    blocks, per_block, channels = IMAGENET_RESNETS[name]
    backbone = nbn_keras.models.build_backbone(name, (32, 32, 3))
    assert backbone.output.shape == (None, 1, 1, channels)
    assert len(bn_layers(backbone)) == expected_bn_count(blocks, per_block)


@pytest.mark.parametrize("depth", [8, 14, 20, 32, 44, 56, 110])
def test_every_cifar_architecture_builds_through_its_family(depth):
    backbone = nbn_keras.models.build_backbone(f"resnet{depth}", (8, 8, 3))
    # Stem BN + 2 per basic block, (depth - 2) / 6 blocks in each of 3 stages.
    assert len(bn_layers(backbone)) == 1 + 2 * 3 * (depth - 2) // 6
    assert backbone.output.shape == (None, 2, 2, 64)


def test_ride_builds_through_its_family_as_a_whole_classifier():
    model = nbn_keras.models.build_classifier(
        "resnet50_ride", 5, (32, 32, 3),
        ride_options=dict(num_experts=2, layer3_output_dim=8, layer4_output_dim=8))
    # Stem 1, layer1 3 * 3 + 1, layer2 4 * 3 + 1; per expert layer3 6 * 3 + 1
    # and layer4 3 * 3 + 1; linear heads have no BN.
    assert len(bn_layers(model)) == 1 + 10 + 13 + 2 * (19 + 10)
    assert model.output.shape == (None, 5)
    with pytest.raises(ValueError, match="no backbone of its own"):
        nbn_keras.models.build_backbone("resnet50_ride", (32, 32, 3))
    with pytest.raises(ValueError, match="ride_options need a RIDE backbone, not 'resnet8'"):
        nbn_keras.models.build_classifier("resnet8", 5, (8, 8, 3),
                                          ride_options=dict(num_experts=2))


# ----------------------------------------------------- selection objects


def groups_by_name(selection, model, stages=None):
    return {scale: [l.name for l in layers]
            for scale, layers in resolve_selection(selection, stages).groups(model).items()}


def test_selection_groups_of_a_resnet8():
    model = nbn_keras.models.build_classifier("resnet8", 3, (8, 8, 3))
    # One block per stage; stage 2's block1 ends in 2_bn, its shortcut is a
    # zero padding without BN.
    assert groups_by_name("paper", model) == {"nbn_scale": ["v2_stack_2_block1_2_bn"]}
    assert groups_by_name("paper", model, stages=[0]) == {
        "nbn_scale": ["v2_stack_0_block1_2_bn"]}
    every = ["conv1_bn"] + [f"v2_stack_{s}_block1_{i}_bn" for s in range(3) for i in (1, 2)]
    assert groups_by_name("all", model) == {"nbn_scale": every}
    assert groups_by_name(lambda l: l.name.endswith("_1_bn"), model) == {
        "nbn_scale": [f"v2_stack_{s}_block1_1_bn" for s in range(3)]}


def test_selection_groups_of_a_resnet18():
    model = nbn_keras.models.build_backbone("resnet18", (32, 32, 3))
    assert groups_by_name("paper", model) == {
        "nbn_scale": ["layer4_0_bn2", "layer4_0_downsample_1", "layer4_1_bn2"]}
    # layer1 keeps 64 channels at stride 1: no shortcut BN.
    assert groups_by_name("paper", model, stages=[0, -2]) == {
        "nbn_scale": ["layer1_0_bn2", "layer1_1_bn2",
                      "layer3_0_bn2", "layer3_0_downsample_1", "layer3_1_bn2"]}


def test_selection_groups_of_a_two_expert_ride():
    model = nbn_keras.models.build_classifier(
        "resnet50_ride", 5, (32, 32, 3),
        ride_options=dict(num_experts=2, layer3_output_dim=8, layer4_output_dim=8))

    def last_stage(e):
        return sorted([f"layer4s_{e}_{b}_bn{i}" for b in range(3) for i in (1, 2, 3)]
                      + [f"layer4s_{e}_0_downsample_1"])

    groups = groups_by_name("ride", model)
    assert sorted(groups) == ["nbn_scale_expert0", "nbn_scale_expert1"]
    for expert in range(2):
        assert sorted(groups[f"nbn_scale_expert{expert}"]) == last_stage(expert)


# ------------------------------------------------- a family declared here


def tiny_backbone(name, input_shape, bn_momentum=0.9, bn_epsilon=1e-5,
                  synchronized_bn=False):
    """Two stages `t{stage}_0_...` of one residual block with a BN shortcut."""
    del synchronized_bn

    def bn(name):
        return keras.layers.BatchNormalization(
            momentum=bn_momentum, epsilon=bn_epsilon, name=name)

    inputs = keras.Input(input_shape)
    x = inputs
    for stage in (1, 2):
        prefix = f"t{stage}_0_"
        y = keras.layers.Conv2D(4, 3, padding="same", name=prefix + "conv_a")(x)
        y = keras.layers.ReLU(name=prefix + "relu_a")(bn(prefix + "bn_a")(y))
        y = bn(prefix + "bn_b")(keras.layers.Conv2D(4, 3, padding="same",
                                                    name=prefix + "conv_b")(y))
        shortcut = bn(prefix + "short_bn")(keras.layers.Conv2D(4, 1, name=prefix + "short")(x))
        x = keras.layers.ReLU(name=prefix + "out")(
            keras.layers.Add(name=prefix + "add")([y, shortcut]))
    return keras.Model(inputs, x, name=name)


TINY = Family(
    name="Tiny",
    architectures=("tiny_net2",),
    build_backbone=tiny_backbone,
    min_image_size=1,
    naming=Naming("tiny", r"^t(\d+)_(\d+)_"),
    selections={"tiny_stages": StageGroupSelection(
        pattern=r"^t(\d+)_", scale_name="tiny_scale{}", name="tiny_stages",
        refusal="tiny_stages takes only separate_scales.",
        not_found="No tiny stages in '{model}'.")},
    nbn_selection="tiny_stages",
)


@pytest.fixture
def tiny_registered(monkeypatch):
    monkeypatch.setattr(registry, "FAMILIES", registry.FAMILIES + [TINY])


def scale_of(layer):
    scale = layer._inbound_nodes[0].arguments.kwargs["scale"]
    return scale._keras_history.operation.name


def test_a_family_declared_outside_appears_and_converts(tiny_registered):
    assert "tiny_net2" in registry.BACKBONES
    assert "tiny_net2" in nbn_keras.models.BACKBONES
    assert nbn_keras.models.min_image_size("tiny_net2") == 1
    model = nbn_keras.models.build_classifier("tiny_net2", 3, (4, 4, 2))
    # The paper's rule under the family's naming: stage 2's BN feeding the sum.
    paper = nbn_keras.convert_to_nbn(model)
    assert sorted(l.name for l in leaf_layers(paper)
                  if isinstance(l, nbn_keras.NormalizedBatchNormalization)) == [
        "t2_0_bn_b", "t2_0_short_bn"]
    # The family's own selection: every BN, one scale per stage.
    converted = nbn_keras.convert_to_nbn(model, selection="tiny_stages")
    nbn = [l for l in leaf_layers(converted)
           if isinstance(l, nbn_keras.NormalizedBatchNormalization)]
    assert sorted((l.name, scale_of(l)) for l in nbn) == sorted(
        (f"t{s}_0_{bn}", f"tiny_scale{s}") for s in (1, 2)
        for bn in ("bn_a", "bn_b", "short_bn"))
    with pytest.raises(ValueError, match="tiny_stages takes only separate_scales"):
        nbn_keras.convert_to_nbn(model, selection="tiny_stages", scale_sharing="layer")
    inputs = keras.Input((4, 4, 2))
    clashing = keras.Model(inputs, keras.layers.Identity(name="tiny_scale1")(
        tiny_backbone("tiny", (4, 4, 2))(inputs)))
    with pytest.raises(ValueError, match="already has layers \\['tiny_scale1'\\]"):
        nbn_keras.convert_to_nbn(clashing, selection="tiny_stages")
    with pytest.raises(ValueError, match="declares the architecture names \\['tiny_net2'\\]"):
        registry.register(TINY)


def test_a_family_registered_before_the_flags_are_defined_reaches_their_choices(
        tiny_registered, monkeypatch):
    # As a user's own command does: register, then import nbn_keras.train
    # (which defines the flags at import).
    from nbn_keras.models.family import FamilyLoss

    tiny = dataclasses.replace(TINY, losses={"tiny_ce": FamilyLoss(None)})
    monkeypatch.setattr(registry, "FAMILIES", registry.FAMILIES[:-1] + [tiny])
    flag_values = flags.FlagValues()
    config_lib.define_flags(flag_values)
    flag_values(["train", "--backbone=tiny_net2", "--loss=tiny_ce",
                 "--nbn_selection=tiny_stages"])
    config = config_lib.from_flags(flag_values)
    assert (config.backbone, config.loss, config.nbn_selection) == (
        "tiny_net2", "tiny_ce", "tiny_stages")
    assert "'tiny_stages' (Tiny backbones:" in flag_values["nbn_selection"].help
    # Not registered: the choices are as before.
    monkeypatch.setattr(registry, "FAMILIES", registry.FAMILIES[:-1])
    flag_values = flags.FlagValues()
    config_lib.define_flags(flag_values)
    with pytest.raises(flags.IllegalFlagValueError, match="tiny_net2"):
        flag_values(["train", "--backbone=tiny_net2"])
    assert "tiny_stages" not in flag_values["nbn_selection"].help


def test_an_unregistered_family_is_unknown():
    assert "tiny_net2" not in registry.BACKBONES
    model = nbn_keras.models.build_classifier("resnet8", 3, (8, 8, 3))
    with pytest.raises(ValueError, match="Unknown selection 'tiny_stages'. Use 'paper', "
                                         "'all', 'ride'"):
        nbn_keras.convert_to_nbn(model, selection="tiny_stages")


def test_training_and_checkpoint_tables_come_from_the_families():
    from nbn_keras.interop import torch_checkpoint
    from nbn_keras.training import losses

    assert losses.loss_names() == ("cross_entropy", "balanced_softmax", "logit_adjusted",
                                 "ldam", "ldam_drw", "hcm", "ride", "ride_balanced_softmax")
    # The authors' `arch` names (their main.py) and the builders' fc_types.
    assert torch_checkpoint.ARCHS == {
        "resnet50": ("resnet50", False), "resnet50_nbn": ("resnet50", True),
        "resnext50": ("resnext50", False), "resnext50_nbn": ("resnext50", True),
        "resnet50_ride": ("resnet50_ride", False),
        "resnet50_ride_nbn": ("resnet50_ride", True)}
    assert torch_checkpoint.ARCH_HEADS["resnet50_nbn"] == ("linear", "fcbn", "fcbn_notaffine")
    assert torch_checkpoint.ARCH_HEADS["resnet50_ride_nbn"] == ("linear", "fcbn_notaffine")
    assert {torch_checkpoint.ARCH_HEADS[a] for a in
            ("resnet50", "resnext50", "resnext50_nbn", "resnet50_ride")} == {("linear",)}


def test_a_family_loss_is_built_by_name_and_checked_against_the_backbone(
        tiny_registered, monkeypatch, tmp_path):
    from nbn_keras.models.family import FamilyLoss
    from nbn_keras.training import config as config_lib
    from nbn_keras.training import losses

    tiny = dataclasses.replace(TINY, losses={"tiny_ce": FamilyLoss(
        lambda counts, **options: keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, name=f"tiny_ce_{len(counts)}"))})
    monkeypatch.setattr(registry, "FAMILIES", registry.FAMILIES[:-1] + [tiny])
    assert losses.build_loss("tiny_ce", [3, 2, 1]).name == "tiny_ce_3"
    config = config_lib.TrainConfig(export=False)
    with pytest.raises(config_lib.ConfigError,
                       match=r"--loss=tiny_ce needs a Tiny backbone \(tiny_net2\), "
                             "not --backbone=resnet32"):
        config_lib.validate(config.replace(loss="tiny_ce"))
    with pytest.raises(config_lib.ConfigError,
                       match="--nbn_selection=tiny_stages needs a Tiny backbone"):
        config_lib.validate(config.replace(nbn_selection="tiny_stages"))
