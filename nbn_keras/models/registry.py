"""Backbones and the classifier around them, named by strings.

- `resnet18`, `resnet34`, `resnet50`, `resnet101`, `resnet152`, `resnext50`:
  the NBN authors' networks (torchvision v1.5 layout, ResNeXt-50 32x4d), see
  `nbn_keras.models.resnet`. Layer names follow the PyTorch module paths
  (`layer4_0_bn3`, `layer4_0_downsample_1`, ...).
- `keras_cv_resnet{18,34,50,101,152}_v1`: KerasCV's `ResNetBackbone` (v1:
  the stride of a downsampling bottleneck is in its first 1x1 conv), BN
  names `v2_stack_{stage}_block{block}_{i}_bn`.
- `resnet20`, `resnet32`, `resnet44`, `resnet56`, `resnet110`: the CIFAR
  ResNets of He et al. (2016), with KerasCV-style BN names; `resnet8` and
  `resnet14` (one and two blocks per stage) are small models for quick
  studies, not from the paper.

`nbn_keras.convert_to_nbn` reads each backbone's stages from these names
(`nbn_keras.conversion.RESNET_NAMING`).
"""

import math

import keras
from keras import layers

from nbn_keras import keras_internals
from nbn_keras.models import resnet
from nbn_keras.models.ride import network as ride

_KERAS_CV_RESNETS = {
    # name: (blocks per stage, block type)
    "keras_cv_resnet18_v1": ([2, 2, 2, 2], "basic_block"),
    "keras_cv_resnet34_v1": ([3, 4, 6, 3], "basic_block"),
    "keras_cv_resnet50_v1": ([3, 4, 6, 3], "block"),
    "keras_cv_resnet101_v1": ([3, 4, 23, 3], "block"),
    "keras_cv_resnet152_v1": ([3, 8, 36, 3], "block"),
}
_CIFAR_RESNET_DEPTHS = (8, 14, 20, 32, 44, 56, 110)
BACKBONES = (
    tuple(resnet.ARCHITECTURES)
    + tuple(_KERAS_CV_RESNETS)
    + tuple(f"resnet{depth}" for depth in _CIFAR_RESNET_DEPTHS)
    + tuple(ride.ARCHITECTURES)
)


def min_image_size(name):
    """The smallest usable input side of backbone `name`: its total stride.

    At this size the last stage's feature map is 1x1; below it, the map is
    1x1 before the last downsampling, and the strided layers after that see
    one pixel and their padding.

    Args:
        name: One of `BACKBONES`.

    Returns:
        4 for the CIFAR ResNets (strides 1, 2, 2), 32 for the ImageNet ones
        (stem and max-pool 2 each, stages 1, 2, 2, 2).
    """
    depth = name.removeprefix("resnet")
    return 4 if depth.isdigit() and int(depth) in _CIFAR_RESNET_DEPTHS else 32


def activation_elements(model):
    """Numbers per example of every layer output of `model`, nested models included.

    Training keeps these outputs for the backward pass, so `batch *
    activation_elements(model) * bytes per number` estimates its memory.

    Args:
        model: A built functional `keras.Model` with static shapes.

    Returns:
        An int: the sum over layers (inputs excluded) of the sizes of their
        batched outputs without the batch axis (a layer's unbatched output,
        such as NBN's shared scale, is no per-example memory).

    Example:

    >>> activation_elements(build_classifier("resnet8", 10, (16, 16, 3)))
    """
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += activation_elements(layer)
        elif not isinstance(layer, keras.layers.InputLayer):
            for node in keras_internals.inbound_nodes(layer):
                for tensor in keras.tree.flatten(node.outputs):
                    if tensor.shape and tensor.shape[0] is None:
                        total += math.prod(tensor.shape[1:])
    return total


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
            `cifar_resnet`).
        input_shape: Input shape, channels last.
        bn_momentum: Momentum of the BN moving averages.
        bn_epsilon: BN epsilon.
        synchronized_bn: Synchronise BN statistics across replicas.

    Returns:
        A functional `keras.Model` from images to the last feature map.
    """
    if name in resnet.ARCHITECTURES:
        return resnet.resnet(
            name, input_shape=input_shape, bn_momentum=bn_momentum,
            bn_epsilon=bn_epsilon, synchronized_bn=synchronized_bn,
        )
    if name in _KERAS_CV_RESNETS:
        blocks, block_type = _KERAS_CV_RESNETS[name]
        import keras_cv  # TensorFlow only: imported when asked for.

        backbone = keras_cv.models.ResNetBackbone(
            stackwise_filters=[64, 128, 256, 512],
            stackwise_blocks=blocks,
            stackwise_strides=[1, 2, 2, 2],
            block_type=block_type,
            include_rescaling=False,
            input_shape=input_shape,
        )
        # KerasCV exposes no BN arguments; these attributes are read at call
        # time and serialised by `get_config`.
        for layer in backbone.layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.momentum = bn_momentum
                layer.epsilon = bn_epsilon
                layer.synchronized = synchronized_bn
        return backbone
    depth = name.removeprefix("resnet")
    if depth.isdigit() and int(depth) in _CIFAR_RESNET_DEPTHS:
        return cifar_resnet(
            int(depth), input_shape=input_shape, bn_momentum=bn_momentum,
            bn_epsilon=bn_epsilon, synchronized_bn=synchronized_bn,
        )
    raise ValueError(f"Unknown backbone '{name}'. Choose one of {BACKBONES}.")


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
            `"torch"` for the authors' networks, `"keras"` otherwise.
        ride_options: For a RIDE backbone (`"resnet50_ride"`), keyword
            arguments of `nbn_keras.models.ride.build_ride_classifier`
            (`num_experts`, `reduce_dimension`, `share_layer3`).
            A RIDE classifier has one head per expert and outputs their
            mean logits.
        head: The head, one of `nbn_keras.models.resnet.HEADS`: `"linear"`,
            `"fcbn"` (a BN over the logits, the authors' `Linear_fcbn`) or
            `"fcbn_notaffine"` (that BN without gamma and beta); see
            `nbn_keras.models.resnet.apply_head`. For RIDE, every expert's head.

    Returns:
        A functional `keras.Model` with the backbone nested as one layer.

    Example:

    >>> model = nbn_keras.models.build_classifier(
    ...     "resnet32", num_classes=100, input_shape=(32, 32, 3),
    ...     mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010))
    >>> nbn_model = nbn_keras.convert_to_nbn(model)
    """
    if head_initializer not in ("auto", "torch", "keras"):
        raise ValueError(
            "head_initializer must be 'auto', 'torch' or 'keras', got "
            f"'{head_initializer}'."
        )
    if isinstance(backbone, str) and backbone in ride.ARCHITECTURES:
        return ride.build_ride_classifier(
            num_classes, input_shape, mean=mean, std=std, arch=backbone,
            name=name, synchronized_bn=synchronized_bn,
            **{"head": head, **(ride_options or {})},
        )
    if ride_options:
        raise ValueError(f"ride_options need a RIDE backbone, not '{backbone}'.")
    if head_initializer == "auto":
        authors = isinstance(backbone, str) and backbone in resnet.ARCHITECTURES
        head_initializer = "torch" if authors else "keras"
    if isinstance(backbone, str):
        backbone = build_backbone(
            backbone, input_shape, synchronized_bn=synchronized_bn
        )
    inputs = keras.Input(input_shape, name="images")
    if mean is None:
        x = layers.Rescaling(1.0 / 255, name="normalize")(inputs)
    else:
        std = [1.0] * len(mean) if std is None else std
        x = layers.Normalization(
            mean=[255.0 * m for m in mean],
            variance=[(255.0 * s) ** 2 for s in std],
            name="normalize",
        )(inputs)
    x = backbone(x)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    initializers = {}
    if head_initializer == "torch":
        kernel, bias = resnet.torch_linear_initializers(x.shape[-1])
        initializers = dict(kernel_initializer=kernel, bias_initializer=bias)
    outputs = resnet.apply_head(
        x, num_classes, head, name="logits", synchronized_bn=synchronized_bn,
        **initializers,
    )
    return keras.Model(inputs, outputs, name=name or backbone.name)
