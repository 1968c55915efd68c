"""`Family`: what a model family declares to the registry.

Each family module (`resnet`, `cifar_resnet`, `keras_cv`, `ride`) declares
one `Family`; `nbn_keras.models.registry.FAMILIES` lists them. Everything
the rest of the package needs to know about a family (its builders, how its
layer names give stages, its NBN selections, its training pieces, its
checkpoints) is read from here, so nothing outside the family's own module
names it.
"""

import dataclasses
from typing import Callable, Mapping, Optional


@dataclasses.dataclass(frozen=True)
class CheckpointArch:
    """One `arch` of the NBN authors' code, as the importer builds it.

    Args:
        architecture: The family's architecture it is built as.
        nbn: Whether their model has NBN (converted with the family's
            `nbn_selection`).
        heads: The heads their builder can make (`nbn_keras.models.heads.HEADS`).
    """

    architecture: str
    nbn: bool
    heads: tuple = ("linear",)


@dataclasses.dataclass(frozen=True)
class FamilyLoss:
    """A loss a family contributes to `nbn_keras.training.losses.build_loss`.

    Args:
        loss: `loss(class_counts, **options)` builds the `keras.losses.Loss`.
        options: `options(config)`: its keyword arguments from a
            `TrainConfig`.
        callbacks: `callbacks()`: the training callbacks it needs.
    """

    loss: Callable
    options: Callable = lambda config: {}
    callbacks: Callable = lambda: []


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family's declaration to `nbn_keras.models.registry`.

    Args:
        name: The family's display name (in error messages: "needs a RIDE
            backbone").
        architectures: The backbone names it builds (`BACKBONES` entries).
        build_backbone: `build_backbone(name, input_shape, bn_momentum=,
            bn_epsilon=, synchronized_bn=)` -> a functional backbone, or
            `None` when the family builds whole classifiers only.
        build_classifier: `None` for a backbone under the standard pooling
            and head (`nbn_keras.models.heads.classifier`); else
            `build_classifier(name, num_classes, input_shape, mean=, std=,
            name=, synchronized_bn=, head=, **options)`, the whole model.
        min_image_size: The smallest usable input side (the total stride).
        naming: The `nbn_keras.selection.Naming` its layer names follow, or
            `None`.
        selections: `{name: nbn_keras.selection.Selection}`: the named
            selections it contributes (RIDE's one scale per expert).
        nbn_selection: The selection its NBN models use (a name).
        head_initializer: What `head_initializer="auto"` means for it.
        options: `options(config)` -> its builder's keyword arguments from a
            `TrainConfig` (`build_classifier`'s `ride_options`, say); `None`
            when it reads none.
        losses: `{name: FamilyLoss}`: the losses it contributes, which need
            one of its backbones.
        checkpoints: `{their arch: CheckpointArch}` for the importer.
        checkpoint_head: The key prefix of their head in a state dict.
        checkpoint_options: `fn(state_dict)` -> builder options read from an
            authors' checkpoint, or `None`.
        scale_index: `fn(scale layer name)` -> its index into their
            `scale_factor` vector, or `None` when the layer is not one of
            the family's scales (its own selections' scales).
        scale_factor_length: `fn(model)` -> the length of their
            `scale_factor` vector, or `None` for the default (one per BN
            feeding a residual sum).
    """

    name: str
    architectures: tuple
    build_backbone: Optional[Callable] = None
    build_classifier: Optional[Callable] = None
    min_image_size: int = 32
    naming: Optional[object] = None
    selections: Mapping = dataclasses.field(default_factory=dict)
    nbn_selection: str = "paper"
    head_initializer: str = "keras"
    options: Optional[Callable] = None
    losses: Mapping = dataclasses.field(default_factory=dict)
    checkpoints: Mapping = dataclasses.field(default_factory=dict)
    checkpoint_head: str = "fc"
    checkpoint_options: Optional[Callable] = None
    scale_index: Optional[Callable] = None
    scale_factor_length: Optional[Callable] = None
