"""ResNet and ResNeXt in the torchvision (v1.5) layout of the NBN authors' code.

These are the networks of the authors' `models/ResNet_NBN.py` and
`models/ResNext_NBN.py` (github.com/yuxiangbao/NBN), layer for layer: a 7x7/2
stem with padding 3 and a 3x3/2 max-pool with padding 1, residual stages
whose downsampling block puts its stride in the 3x3 convolution ("v1.5";
KerasCV's `ResNetBackbone` is v1 and puts it in the first 1x1), projection
shortcuts (1x1 convolution + BN) where the shape changes, BN epsilon 1e-5 and
PyTorch momentum 0.1 (Keras 0.9), and the authors' initialisation.

They are built from Keras layers (stock ones, and for ResNeXt's grouped
convolutions `nbn_keras.layers.GroupedConv2D`, a `Conv2D` that trains fast on
CPU too and is exported as a stock `Conv2D`) rather than keras-hub's
`ResNetBackbone`: keras-hub is not a dependency (it pulls in full TensorFlow,
tensorflow-text and a Kaggle client), its ResNet has no grouped convolutions
for ResNeXt, and its layer names would not follow the authors' module paths,
which is what makes their checkpoints import by name.

Layer names are the PyTorch module paths with `_` for `.`: `conv1`, `bn1`,
`layer4_0_conv2`, `layer4_0_bn3`, `layer4_0_downsample_1`, ... (padding layers
add `_pad`). The family's naming contract (`NAMING`, `layer{stage}_{block}_`)
gives the NBN selection its stages, and `nbn_keras.import_torch` maps
checkpoint keys to layers with these names.

The block and stage functions take the layer factory `ResNetLayers`, so other
networks (a multi-expert model sharing a stem, say) can be assembled from the
same pieces.
"""

import dataclasses

import keras
from keras import layers

from nbn_keras.layers import GroupedConv2D
from nbn_keras.models.family import CheckpointArch
from nbn_keras.models.family import Family
from nbn_keras.selection import Naming

# The authors' ResNet init: N(0, sqrt(2 / (k * k * out_channels))).
# (Keras' fan_out of a conv kernel is k * k * out_channels, also for grouped
# convolutions, as in their code.)
HE_NORMAL_FAN_OUT = {
    "class_name": "VarianceScaling",
    "config": {"scale": 2.0, "mode": "fan_out", "distribution": "untruncated_normal"},
}
# PyTorch's default for Conv2d and Linear kernels (kaiming_uniform with
# a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)). The authors' ResNeXt never
# re-initialises its convolutions, so it keeps this one.
TORCH_DEFAULT_KERNEL = {
    "class_name": "VarianceScaling",
    "config": {"scale": 1.0 / 3.0, "mode": "fan_in", "distribution": "uniform"},
}

# name: (block, blocks per stage, groups, width per group, conv initializer)
ARCHITECTURES = {
    "resnet18": ("basic", (2, 2, 2, 2), 1, 64, HE_NORMAL_FAN_OUT),
    "resnet34": ("basic", (3, 4, 6, 3), 1, 64, HE_NORMAL_FAN_OUT),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 1, 64, HE_NORMAL_FAN_OUT),
    "resnet101": ("bottleneck", (3, 4, 23, 3), 1, 64, HE_NORMAL_FAN_OUT),
    "resnet152": ("bottleneck", (3, 8, 36, 3), 1, 64, HE_NORMAL_FAN_OUT),
    # ResNeXt-50 32x4d.
    "resnext50": ("bottleneck", (3, 4, 6, 3), 32, 4, TORCH_DEFAULT_KERNEL),
}
EXPANSION = {"basic": 1, "bottleneck": 4}


@dataclasses.dataclass(frozen=True)
class ResNetLayers:
    """Makes the convolutions and BN layers of a torchvision-layout ResNet.

    Args:
        conv_initializer: Initializer of every convolution kernel.
        bn_momentum: Momentum of the BN moving averages (Keras convention:
            0.9 is PyTorch's 0.1).
        bn_epsilon: BN epsilon.
        synchronized_bn: Synchronise BN batch statistics across replicas.

    Example:

    >>> make = ResNetLayers()
    >>> x = keras.Input((64, 64, 3))
    >>> y = apply_stem(x, make)
    """

    conv_initializer: object = dataclasses.field(
        default_factory=lambda: HE_NORMAL_FAN_OUT
    )
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    synchronized_bn: bool = False

    def conv(self, x, filters, kernel_size, name, strides=1, groups=1):
        """A bias-free convolution with PyTorch's padding `kernel_size // 2`.

        PyTorch pads symmetrically; Keras' `"same"` pads the same way for
        stride 1 and odd kernels, but for stride 2 it pads only at the end.
        A strided convolution therefore gets an explicit `ZeroPadding2D`
        (named `name + "_pad"`) and `"valid"` padding.
        """
        padding = "same"
        if strides > 1 and kernel_size > 1:
            x = layers.ZeroPadding2D(kernel_size // 2, name=name + "_pad")(x)
            padding = "valid"
        # A grouped convolution (ResNeXt) is a Conv2D that also trains at a
        # usable speed on CPU; see `nbn_keras.layers.GroupedConv2D`.
        conv_class = GroupedConv2D if groups > 1 else layers.Conv2D
        return conv_class(
            filters, kernel_size, strides=strides, padding=padding,
            groups=groups, use_bias=False,
            kernel_initializer=keras.initializers.get(self.conv_initializer),
            name=name,
        )(x)

    def bn(self, x, name):
        """A BN layer with gamma 1 and beta 0, as the authors initialise it."""
        return layers.BatchNormalization(
            momentum=self.bn_momentum, epsilon=self.bn_epsilon,
            synchronized=self.synchronized_bn, name=name,
        )(x)


def apply_stem(x, make, prefix=""):
    """conv1 7x7/2 (padding 3), bn1, ReLU, max-pool 3x3/2 (padding 1).

    The max-pool pads with zeros (`ZeroPadding2D`) where PyTorch pads with
    -inf; after the ReLU every value is >= 0, so the maxima are the same.
    """
    x = make.conv(x, 64, 7, prefix + "conv1", strides=2)
    x = make.bn(x, prefix + "bn1")
    x = layers.ReLU(name=prefix + "relu")(x)
    x = layers.ZeroPadding2D(1, name=prefix + "maxpool_pad")(x)
    return layers.MaxPooling2D(3, strides=2, name=prefix + "maxpool")(x)


def apply_basic_block(x, filters, strides, make, name, downsample=False):
    """The basic block: 3x3 (stride) + BN + ReLU, 3x3 + BN, add, ReLU.

    Args:
        x: Input tensor.
        filters: Channels of both convolutions (`planes`).
        strides: Stride of the first convolution.
        make: A `ResNetLayers`.
        name: Layer name prefix, e.g. `"layer1_0"`.
        downsample: Whether the shortcut is a 1x1 convolution + BN.

    Returns:
        The output tensor, with `filters` channels.
    """
    shortcut = x
    if downsample:
        shortcut = make.conv(x, filters, 1, name + "_downsample_0", strides)
        shortcut = make.bn(shortcut, name + "_downsample_1")
    y = make.conv(x, filters, 3, name + "_conv1", strides)
    y = make.bn(y, name + "_bn1")
    y = layers.ReLU(name=name + "_relu1")(y)
    y = make.conv(y, filters, 3, name + "_conv2")
    y = make.bn(y, name + "_bn2")
    y = layers.Add(name=name + "_add")([y, shortcut])
    return layers.ReLU(name=name + "_relu")(y)


def apply_bottleneck_block(
    x, filters, strides, make, name, downsample=False, groups=1,
    width_per_group=64,
):
    """The v1.5 bottleneck: 1x1, 3x3 (stride, groups), 1x1 (4x), add, ReLU.

    Args:
        x: Input tensor.
        filters: `planes`; the block outputs `4 * filters` channels.
        strides: Stride of the 3x3 convolution (v1.5).
        make: A `ResNetLayers`.
        name: Layer name prefix, e.g. `"layer1_0"`.
        downsample: Whether the shortcut is a 1x1 convolution + BN.
        groups: Groups of the 3x3 convolution (32 for ResNeXt-50 32x4d).
        width_per_group: Channels per group at `filters = 64` (4 for
            ResNeXt-50 32x4d); the inner width is
            `int(filters * width_per_group / 64) * groups`.

    Returns:
        The output tensor, with `4 * filters` channels.
    """
    width = int(filters * (width_per_group / 64.0)) * groups
    shortcut = x
    if downsample:
        shortcut = make.conv(x, 4 * filters, 1, name + "_downsample_0", strides)
        shortcut = make.bn(shortcut, name + "_downsample_1")
    y = make.conv(x, width, 1, name + "_conv1")
    y = make.bn(y, name + "_bn1")
    y = layers.ReLU(name=name + "_relu1")(y)
    y = make.conv(y, width, 3, name + "_conv2", strides, groups=groups)
    y = make.bn(y, name + "_bn2")
    y = layers.ReLU(name=name + "_relu2")(y)
    y = make.conv(y, 4 * filters, 1, name + "_conv3")
    y = make.bn(y, name + "_bn3")
    y = layers.Add(name=name + "_add")([y, shortcut])
    return layers.ReLU(name=name + "_relu")(y)


def apply_stage(x, block, filters, blocks, strides, make, name, **block_kwargs):
    """One residual stage (`layer1` ... `layer4`).

    The first block has stride `strides` and a projection shortcut when the
    stride or the channel count changes, as in torchvision's `_make_layer`.

    Args:
        x: Input tensor.
        block: `"basic"` or `"bottleneck"`.
        filters: `planes` of the stage (64, 128, 256, 512).
        blocks: Number of blocks.
        strides: Stride of the first block.
        make: A `ResNetLayers`.
        name: Stage name, e.g. `"layer4"`; blocks are `name_0`, `name_1`, ...
        **block_kwargs: `groups`, `width_per_group` for bottlenecks.

    Returns:
        The output tensor.
    """
    apply_block = {"basic": apply_basic_block,
                   "bottleneck": apply_bottleneck_block}[block]
    out_channels = EXPANSION[block] * filters
    for index in range(blocks):
        stride = strides if index == 0 else 1
        downsample = index == 0 and (stride != 1 or x.shape[-1] != out_channels)
        x = apply_block(
            x, filters, stride, make, f"{name}_{index}",
            downsample=downsample, **block_kwargs,
        )
    return x


def resnet(
    name="resnet50",
    input_shape=(224, 224, 3),
    bn_momentum=0.9,
    bn_epsilon=1e-5,
    synchronized_bn=False,
    conv_initializer=None,
):
    """The authors' ResNet or ResNeXt, from images to the `layer4` features.

    Args:
        name: One of `ARCHITECTURES`: `"resnet18"`, `"resnet34"`,
            `"resnet50"`, `"resnet101"`, `"resnet152"`, `"resnext50"`
            (ResNeXt-50 32x4d).
        input_shape: Input shape, channels last (the stem's input, i.e.
            already normalised images).
        bn_momentum: Momentum of the BN moving averages (Keras convention).
        bn_epsilon: BN epsilon.
        synchronized_bn: Synchronise BN statistics across replicas.
        conv_initializer: Kernel initializer of the convolutions; `None` for
            the authors' choice: N(0, sqrt(2 / (k * k * out))) for ResNets,
            PyTorch's default for ResNeXt (their ResNeXt does not
            re-initialise).

    Returns:
        A functional `keras.Model` named `name`.

    Example:

    >>> backbone = nbn_keras.models.resnet.resnet("resnext50", input_shape=(64, 64, 3))
    >>> backbone.output.shape
    (None, 2, 2, 2048)

    Reference:
    - [He et al., Deep Residual Learning for Image Recognition, CVPR 2016](
      https://arxiv.org/abs/1512.03385).
    - [Xie et al., Aggregated Residual Transformations for Deep Neural
      Networks, CVPR 2017](https://arxiv.org/abs/1611.05431).
    """
    if name not in ARCHITECTURES:
        raise ValueError(
            f"Unknown architecture '{name}'. Choose one of "
            f"{tuple(ARCHITECTURES)}."
        )
    block, stage_blocks, groups, width_per_group, default_init = ARCHITECTURES[name]
    make = ResNetLayers(
        conv_initializer=conv_initializer or default_init,
        bn_momentum=bn_momentum,
        bn_epsilon=bn_epsilon,
        synchronized_bn=synchronized_bn,
    )
    block_kwargs = {}
    if block == "bottleneck":
        block_kwargs = dict(groups=groups, width_per_group=width_per_group)
    inputs = keras.Input(input_shape)
    x = apply_stem(inputs, make)
    for stage, (filters, blocks) in enumerate(zip((64, 128, 256, 512), stage_blocks)):
        x = apply_stage(
            x, block, filters, blocks, 1 if stage == 0 else 2, make,
            f"layer{stage + 1}", **block_kwargs,
        )
    return keras.Model(inputs, x, name=name)


# `layer{stage}_{block}_...`, stages from 1, blocks from 0: the torchvision
# layout, whose layer names are the PyTorch module paths with "_" for ".".
NAMING = Naming("torchvision", r"(?:^|_)layer(\d+)_(\d+)_")

FAMILY = Family(
    name="ResNet",
    architectures=tuple(ARCHITECTURES),
    build_backbone=resnet,
    naming=NAMING,
    head_initializer="torch",
    # Their `resnet50_nbn` passes `arch_args.fc_type` on; the others always
    # build `nn.Linear`.
    checkpoints={
        "resnet50": CheckpointArch("resnet50", nbn=False),
        "resnet50_nbn": CheckpointArch(
            "resnet50", nbn=True, heads=("linear", "fcbn", "fcbn_notaffine")),
        "resnext50": CheckpointArch("resnext50", nbn=False),
        "resnext50_nbn": CheckpointArch("resnext50", nbn=True),
    },
)
