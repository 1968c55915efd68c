"""The model registry: every family, and the builders that read it.

Each family module declares a `nbn_keras.models.family.Family` (its
architecture names, builders, minimum image size, naming contract, NBN
selections, training pieces and checkpoint mapping); `FAMILIES` lists them.
Adding a family is its own module and one line here (or `register` for a
family defined outside the package).

- `resnet18`, `resnet34`, `resnet50`, `resnet101`, `resnet152`, `resnext50`:
  the NBN authors' networks (torchvision v1.5 layout, ResNeXt-50 32x4d),
  `nbn_keras.models.resnet`.
- `keras_cv_resnet{18,34,50,101,152}_v1`: KerasCV's `ResNetBackbone` v1,
  `nbn_keras.models.keras_cv`.
- `resnet8`, `resnet14`, `resnet20`, `resnet32`, `resnet44`, `resnet56`,
  `resnet110`: CIFAR ResNets, `nbn_keras.models.cifar_resnet`.
- `resnet50_ride`: the authors' multi-expert RIDE, `nbn_keras.models.ride`.
"""

import collections.abc

from nbn_keras.models import cifar_resnet
from nbn_keras.models import heads
from nbn_keras.models import keras_cv
from nbn_keras.models import resnet
from nbn_keras.models.ride import family as ride_family

FAMILIES = [
    resnet.FAMILY,
    keras_cv.FAMILY,
    cifar_resnet.FAMILY,
    ride_family.FAMILY,
]


class _Names(collections.abc.Sequence):
    """The architecture names of `FAMILIES`, read when used."""

    def _names(self):
        return tuple(name for family in FAMILIES for name in family.architectures)

    def __getitem__(self, index):
        return self._names()[index]

    def __len__(self):
        return len(self._names())

    def __repr__(self):
        return repr(self._names())

    def __eq__(self, other):
        return tuple(self) == tuple(other)

    def __hash__(self):
        return hash(self._names())


BACKBONES = _Names()


def register(family):
    """Adds `family` to `FAMILIES`.

    Args:
        family: A `nbn_keras.models.family.Family`.

    Returns:
        `family`.

    Raises:
        ValueError: when one of its architectures, selections, losses or
            checkpoint archs is another family's already.

    Example:

    >>> registry.register(Family("Tiny", ("tiny1",), build_backbone=tiny))
    """
    taken = {
        "architecture": set(BACKBONES),
        "selection": set(family_selections()),
        "loss": set(family_losses()),
        "checkpoint arch": set(checkpoint_archs()),
    }
    declared = {
        "architecture": family.architectures,
        "selection": family.selections,
        "loss": family.losses,
        "checkpoint arch": family.checkpoints,
    }
    for kind, names in declared.items():
        clashing = sorted(set(names) & taken[kind])
        if clashing:
            raise ValueError(
                f"Family '{family.name}' declares the {kind} names {clashing}, "
                "which another family has.")
    FAMILIES.append(family)
    return family


def family_of(name):
    """The `Family` that builds backbone `name`.

    Raises:
        ValueError: naming the backbones when `name` is none of them.
    """
    for family in FAMILIES:
        if name in family.architectures:
            return family
    raise ValueError(f"Unknown backbone '{name}'. Choose one of {BACKBONES}.")


def namings():
    """The distinct naming contracts of all families, in registry order."""
    found = []
    for family in FAMILIES:
        if family.naming is not None and family.naming not in found:
            found.append(family.naming)
    return tuple(found)


def _merged(attribute):
    merged = {}
    for family in FAMILIES:
        for key, value in getattr(family, attribute).items():
            merged.setdefault(key, (family, value))
    return merged


def family_selections():
    """`{selection name: (family, Selection)}` the families contribute."""
    return _merged("selections")


def family_losses():
    """`{loss name: FamilyLoss}` the families contribute, in registry order."""
    return {name: loss for name, (_, loss) in _merged("losses").items()}


def loss_family(loss_name):
    """The family contributing loss `loss_name`, or `None` for a generic loss."""
    entry = _merged("losses").get(loss_name)
    return None if entry is None else entry[0]


def selection_family(selection_name):
    """The family contributing selection `selection_name`, or `None`."""
    entry = family_selections().get(selection_name)
    return None if entry is None else entry[0]


def checkpoint_archs():
    """`{their arch: (family, CheckpointArch)}` of the authors' checkpoints."""
    return _merged("checkpoints")


def scale_family(scale_name):
    """`(family, index)` of a family whose scale layers include `scale_name`, or `None`."""
    for family in FAMILIES:
        index = family.scale_index(scale_name) if family.scale_index else None
        if index is not None:
            return family, index
    return None


def config_options(config):
    """The builder options `config.backbone`'s family reads from a `TrainConfig`."""
    family = family_of(config.backbone)
    return family.options(config) if family.options else None


def min_image_size(name):
    """The smallest usable input side of backbone `name`: its total stride.

    At this size the last stage's feature map is 1x1; below it, the map is
    1x1 before the last downsampling, and the strided layers after that see
    one pixel and their padding.

    Args:
        name: One of `BACKBONES`.

    Returns:
        The family's `min_image_size`: 4 for the CIFAR ResNets (strides 1,
        2, 2), 32 for the ImageNet ones (stem and max-pool 2 each, stages 1,
        2, 2, 2).
    """
    for family in FAMILIES:
        if name in family.architectures:
            return family.min_image_size
    return 32


def build_backbone(
    name, input_shape, bn_momentum=0.9, bn_epsilon=1e-5, synchronized_bn=False
):
    """Builds a backbone from its name, without pretrained weights.

    BN layers get PyTorch's defaults (momentum 0.1, i.e. Keras 0.9, and
    epsilon 1e-5), those of the reference code, unless told otherwise.

    Args:
        name: One of `nbn_keras.models.BACKBONES`: `"resnet18"`,
            `"resnet34"`, `"resnet50"`, `"resnet101"`, `"resnet152"`,
            `"resnext50"` (the authors' networks, `nbn_keras.models.resnet`),
            `"keras_cv_resnet18_v1"` ... `"keras_cv_resnet152_v1"` (KerasCV
            v1 ResNets, built from arguments so nothing is downloaded) or
            `"resnet8"`, `"resnet14"`, `"resnet20"`, `"resnet32"`,
            `"resnet44"`, `"resnet56"`, `"resnet110"` (CIFAR ResNets, see
            `nbn_keras.models.cifar_resnet`).
        input_shape: Input shape, channels last.
        bn_momentum: Momentum of the BN moving averages.
        bn_epsilon: BN epsilon.
        synchronized_bn: Synchronise BN statistics across replicas.

    Returns:
        A functional `keras.Model` from images to the last feature map.
    """
    family = family_of(name)
    if family.build_backbone is None:
        raise ValueError(
            f"'{name}' has no backbone of its own: its family builds whole "
            "classifiers. Use `build_classifier`.")
    return family.build_backbone(
        name, input_shape=input_shape, bn_momentum=bn_momentum,
        bn_epsilon=bn_epsilon, synchronized_bn=synchronized_bn,
    )


def build_classifier(
    backbone,
    num_classes,
    input_shape,
    mean=None,
    std=None,
    synchronized_bn=False,
    name=None,
    head_initializer="auto",
    ride_options=None,
    head="linear",
):
    """An image classifier: normalisation, backbone, pooling, head.

    The model takes raw pixels in [0, 255] (input named `"images"`),
    normalises them with `mean` and `std` inside the graph, and returns
    float32 logits, so an exported model needs no preprocessing outside.
    The pooling is global, which for the authors' networks at 224x224 is
    their 7x7 average pooling.

    Args:
        backbone: A backbone name (see `build_backbone`) or a Keras model.
        num_classes: Number of classes.
        input_shape: Image shape, channels last.
        mean: Per-channel mean of the pixels scaled to [0, 1], or `None` to
            only scale by 1/255.
        std: Per-channel standard deviation, in the same units as `mean`.
        synchronized_bn: Synchronise BN statistics across replicas.
        name: Model name; defaults to the backbone's name.
        head_initializer: Initialisation of the linear head: `"torch"`
            (PyTorch's `nn.Linear` default: kernel and bias
            U(-1/sqrt(in), 1/sqrt(in)), as the authors' networks have),
            `"keras"` (Glorot uniform kernel, zero bias), or `"auto"`:
            the family's choice, `"torch"` for the authors' networks,
            `"keras"` otherwise.
        ride_options: For a family that builds whole classifiers (RIDE,
            `"resnet50_ride"`), keyword arguments of its builder
            (`nbn_keras.models.ride.build_ride_classifier`: `num_experts`,
            `reduce_dimension`, `share_layer3`). A RIDE classifier has one
            head per expert and outputs their mean logits.
        head: The head, one of `nbn_keras.models.heads.HEADS`: `"linear"`,
            `"fcbn"` (a BN over the logits, the authors' `Linear_fcbn`) or
            `"fcbn_notaffine"` (that BN without gamma and beta); see
            `nbn_keras.models.heads.apply_head`. For RIDE, every expert's head.

    Returns:
        A functional `keras.Model` with the backbone nested as one layer.

    Example:

    >>> model = nbn_keras.models.build_classifier(
    ...     "resnet32", num_classes=100, input_shape=(32, 32, 3),
    ...     mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010))
    >>> nbn_model = nbn_keras.convert_to_nbn(model)
    """
    if head_initializer not in heads.HEAD_INITIALIZERS:
        raise ValueError(
            "head_initializer must be 'auto', 'torch' or 'keras', got "
            f"'{head_initializer}'."
        )
    family = family_of(backbone) if isinstance(backbone, str) else None
    if family is not None and family.build_classifier is not None:
        return family.build_classifier(
            backbone, num_classes, input_shape, mean=mean, std=std, name=name,
            synchronized_bn=synchronized_bn, **{"head": head, **(ride_options or {})},
        )
    if ride_options:
        whole = " or ".join(f.name for f in FAMILIES if f.build_classifier is not None)
        raise ValueError(f"ride_options need a {whole} backbone, not '{backbone}'.")
    if head_initializer == "auto":
        head_initializer = family.head_initializer if family else "keras"
    if family is not None:
        backbone = build_backbone(backbone, input_shape, synchronized_bn=synchronized_bn)
    return heads.classifier(
        backbone, num_classes, input_shape, mean=mean, std=std,
        synchronized_bn=synchronized_bn, name=name,
        head_initializer=head_initializer, head=head,
    )
