"""RIDE's declaration to the model registry (`nbn_keras.models.registry`)."""

import keras

from nbn_keras import graph
from nbn_keras.models.family import CheckpointArch
from nbn_keras.models.family import Family
from nbn_keras.models.family import FamilyLoss
from nbn_keras.models.ride import loss
from nbn_keras.models.ride import network
from nbn_keras.models.ride import selection


def build_classifier(arch, num_classes, input_shape, **kwargs):
    """`network.build_ride_classifier` called as the registry calls builders."""
    return network.build_ride_classifier(num_classes, input_shape, arch=arch, **kwargs)


def config_options(config):
    """The classifier options of a `TrainConfig`'s `--ride_*` flags."""
    return dict(
        num_experts=config.ride_experts,
        reduce_dimension=config.ride_reduce_dimension,
        share_layer3=config.ride_share_layer3,
    )


def checkpoint_options(state_dict):
    """The RIDE options of the network an authors' state dict is from.

    Experts are counted from the `layer4s.{e}` keys; `share_layer3` when
    `layer3.` keys exist; the `planes` of `layer3` and `layer4` (256/512, or
    192/384 with `reduce_dimension`) from the first blocks' `conv1` weights.

    Raises:
        ValueError: naming the missing keys of a state dict that is not RIDE's.
    """
    experts = {int(k.split(".")[1]) for k in state_dict if k.startswith("layer4s.")}
    if not experts:
        raise ValueError("The checkpoint has no 'layer4s.' keys: it is not a RIDE model.")
    share_layer3 = any(k.startswith("layer3.") for k in state_dict)
    layer3 = "layer3.0.conv1.weight" if share_layer3 else "layer3s.0.0.conv1.weight"
    for key in (layer3, "layer4s.0.0.conv1.weight"):
        if key not in state_dict:
            raise ValueError(f"The RIDE checkpoint has no '{key}'.")
    return dict(
        num_experts=max(experts) + 1,
        share_layer3=share_layer3,
        layer3_output_dim=int(state_dict[layer3].shape[0]),
        layer4_output_dim=int(state_dict["layer4s.0.0.conv1.weight"].shape[0]),
    )


def scale_factor_length(model):
    """Entries of their `scale_factor`: one per 2D BN (not the logits' BN1d)."""
    return sum(
        isinstance(layer, keras.layers.BatchNormalization) and len(layer.output.shape) == 4
        for layer in graph.leaf_layers(model)
    )


FAMILY = Family(
    name="RIDE",
    architectures=tuple(network.ARCHITECTURES),
    build_classifier=build_classifier,
    selections={selection.NAME: selection.SELECTION},
    nbn_selection=selection.NAME,
    options=config_options,
    losses={
        "ride": FamilyLoss(
            loss.RIDELoss,
            options=lambda config: dict(
                reweight_epoch=config.ride_reweight_epoch,
                diversity_factor=config.ride_diversity_factor,
                reweight_factor=config.ride_reweight_factor),
            callbacks=lambda: [loss.RIDEEpochHook()],
        ),
        "ride_balanced_softmax": FamilyLoss(
            loss.RIDEBalancedSoftmaxLoss,
            options=lambda config: dict(diversity_factor=config.ride_diversity_factor),
        ),
    },
    checkpoints={
        "resnet50_ride": CheckpointArch("resnet50_ride", nbn=False),
        # Their `resnet50_ride_NBN`; it knows Linear and Linear_fcbn_notaffine.
        "resnet50_ride_nbn": CheckpointArch(
            "resnet50_ride", nbn=True, heads=("linear", "fcbn_notaffine")),
    },
    checkpoint_head="linears.0",
    checkpoint_options=checkpoint_options,
    scale_index=selection.scale_index,
    scale_factor_length=scale_factor_length,
)
