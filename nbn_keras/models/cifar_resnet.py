"""The CIFAR ResNets of He et al. (2016), with KerasCV-style BN names.

`resnet20`, `resnet32`, `resnet44`, `resnet56`, `resnet110`; `resnet8` and
`resnet14` (one and two blocks per stage) are small models for quick
studies, not from the paper. BN names follow KerasCV's naming contract
(`nbn_keras.models.keras_cv.NAMING`).
"""

import keras
from keras import layers

from nbn_keras.models import keras_cv
from nbn_keras.models.family import Family

DEPTHS = (8, 14, 20, 32, 44, 56, 110)
ARCHITECTURES = tuple(f"resnet{depth}" for depth in DEPTHS)


def zero_pad_shortcut(x, filters, strides, name):
    """The parameter-free shortcut of CIFAR ResNets ("option A").

    Subsamples `x` spatially by `strides` and zero-pads its channels, half on
    each side, up to `filters`. Built from stock layers only (a 1x1 pooling
    picks every `strides`-th pixel; a 3D zero-padding over (H, W, C) pads
    the channels), so folded and exported models need no custom layer.
    """
    x = layers.MaxPooling2D(1, strides=strides, name=name + "_subsample")(x)
    height, width, channels = x.shape[1:]
    if height is None or width is None:
        raise ValueError(
            "Zero-padding shortcuts need a static input size; got "
            f"{x.shape}. Use shortcut='projection'."
        )
    before = (filters - channels) // 2
    x = layers.Reshape((height, width, channels, 1), name=name + "_expand")(x)
    x = layers.ZeroPadding3D(
        ((0, 0), (0, 0), (before, filters - channels - before)), name=name
    )(x)
    return layers.Reshape((height, width, filters), name=name + "_squeeze")(x)


def cifar_resnet(
    depth=32,
    input_shape=(32, 32, 3),
    stackwise_filters=(16, 32, 64),
    shortcut="zero_pad",
    bn_momentum=0.9,
    bn_epsilon=1e-5,
    synchronized_bn=False,
):
    """The CIFAR ResNet of He et al. (2016), as used for CIFAR-LT.

    A 3x3 stem, then three stages of `(depth - 2) / 6` basic blocks with
    16, 32 and 64 channels, strides 1, 2, 2. ResNet-32 is the standard
    backbone of the long-tailed CIFAR literature (0.46M parameters).

    Args:
        depth: Total depth, `6 n + 2` (8, 14, 20, 32, 44, 56, 110; 8 and
            14, with one and two blocks per stage, are small models for
            quick studies, not from the paper).
        input_shape: Input shape, channels last.
        stackwise_filters: Channels of the three stages.
        shortcut: `"zero_pad"` (parameter-free "option A", as in the
            long-tailed CIFAR literature; such shortcuts have no BN) or
            `"projection"` (1x1 convolution + BN, "option B").
        bn_momentum: Momentum of the BN moving averages (0.9 is PyTorch's 0.1).
        bn_epsilon: BN epsilon (PyTorch's default).
        synchronized_bn: Synchronise BN statistics across replicas.

    Returns:
        A functional `keras.Model` from images to the last feature map.

    Reference:
    - [He et al., Deep Residual Learning for Image Recognition, CVPR 2016](
      https://arxiv.org/abs/1512.03385).
    """
    if (depth - 2) % 6 or depth < 8:
        raise ValueError(f"A CIFAR ResNet has depth 6n + 2, got {depth}.")
    if shortcut not in ("zero_pad", "projection"):
        raise ValueError(
            f"shortcut must be 'zero_pad' or 'projection', got '{shortcut}'."
        )
    blocks = (depth - 2) // 6

    def conv(filters, kernel_size, strides, name):
        return layers.Conv2D(
            filters, kernel_size, strides=strides, padding="same",
            use_bias=False, kernel_initializer="he_normal", name=name,
        )

    def bn(name):
        return layers.BatchNormalization(
            momentum=bn_momentum, epsilon=bn_epsilon,
            synchronized=synchronized_bn, name=name,
        )

    inputs = keras.Input(input_shape)
    x = conv(stackwise_filters[0], 3, 1, "conv1_conv")(inputs)
    x = bn("conv1_bn")(x)
    x = layers.ReLU(name="conv1_relu")(x)
    for stage, filters in enumerate(stackwise_filters):
        for block in range(1, blocks + 1):
            prefix = f"v2_stack_{stage}_block{block}_"
            strides = 2 if stage > 0 and block == 1 else 1
            shortcut_x = x
            if strides != 1 or x.shape[-1] != filters:
                if shortcut == "zero_pad":
                    shortcut_x = zero_pad_shortcut(x, filters, strides, prefix + "0_pad")
                else:
                    shortcut_x = conv(filters, 1, strides, prefix + "0_conv")(x)
                    shortcut_x = bn(prefix + "0_bn")(shortcut_x)
            y = conv(filters, 3, strides, prefix + "1_conv")(x)
            y = bn(prefix + "1_bn")(y)
            y = layers.ReLU(name=prefix + "1_relu")(y)
            y = conv(filters, 3, 1, prefix + "2_conv")(y)
            y = bn(prefix + "2_bn")(y)
            x = layers.Add(name=prefix + "add")([shortcut_x, y])
            x = layers.ReLU(name=prefix + "out")(x)
    return keras.Model(inputs, x, name=f"cifar_resnet{depth}")


def build_cifar_resnet(
    name, input_shape, bn_momentum=0.9, bn_epsilon=1e-5, synchronized_bn=False
):
    """`cifar_resnet` by architecture name (`"resnet32"`), for the registry."""
    return cifar_resnet(
        int(name.removeprefix("resnet")), input_shape=input_shape,
        bn_momentum=bn_momentum, bn_epsilon=bn_epsilon,
        synchronized_bn=synchronized_bn,
    )


FAMILY = Family(
    name="CIFAR ResNet",
    architectures=ARCHITECTURES,
    build_backbone=build_cifar_resnet,
    # Strides 1, 2, 2.
    min_image_size=4,
    naming=keras_cv.NAMING,
)
