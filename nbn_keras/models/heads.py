"""The classifier around a backbone: input normalisation, pooling and heads.

The heads are the authors' `fc_type`s (models/LRClassifier.py): `linear`
(nn.Linear), `fcbn` (Linear_fcbn: a linear layer followed by a BatchNorm1d
over the logits) and `fcbn_notaffine` (Linear_fcbn_notaffine: the same BN
without gamma and beta). The logit BN is "logit rectification".
"""

import keras
from keras import layers

from nbn_keras.models.resnet import TORCH_DEFAULT_KERNEL

HEADS = ("linear", "fcbn", "fcbn_notaffine")
TORCH_FC_TYPES = {
    "linear": "Linear",
    "fcbn": "Linear_fcbn",
    "fcbn_notaffine": "Linear_fcbn_notaffine",
}
HEAD_INITIALIZERS = ("auto", "torch", "keras")


def torch_linear_initializers(in_features):
    """PyTorch's default `nn.Linear` init: kernel and bias U(+-1/sqrt(in))."""
    bound = in_features ** -0.5
    return (
        keras.initializers.get(TORCH_DEFAULT_KERNEL),
        keras.initializers.RandomUniform(-bound, bound),
    )


def head_name(head):
    """`head` as one of `HEADS`; the authors' `fc_type` names are accepted.

    Raises:
        ValueError: naming the head types when `head` is none of them.
    """
    by_fc_type = {fc_type: name for name, fc_type in TORCH_FC_TYPES.items()}
    if head in HEADS:
        return head
    if head in by_fc_type:
        return by_fc_type[head]
    raise ValueError(
        f"head must be one of {HEADS} (or their fc_type {tuple(by_fc_type)}), "
        f"got '{head}'."
    )


def apply_head(
    x,
    num_classes,
    head="linear",
    name="logits",
    kernel_initializer="glorot_uniform",
    bias_initializer="zeros",
    bn_momentum=0.9,
    bn_epsilon=1e-5,
    synchronized_bn=False,
):
    """A classifier head on pooled features: a linear layer, maybe a logit BN.

    Everything runs in float32 under mixed precision (a stable softmax; the
    BN over the logits also keeps float32 statistics and outputs).

    Args:
        x: Pooled features, `[batch, features]`.
        num_classes: Number of classes.
        head: One of `HEADS` (or the authors' `fc_type` name).
        name: Name of the linear layer; the BN is `name + "_bn"`, which the
            checkpoint importer maps to their `<fc>.bn`.
        kernel_initializer: Kernel initializer of the linear layer.
        bias_initializer: Bias initializer of the linear layer.
        bn_momentum: Momentum of the logit BN's moving averages.
        bn_epsilon: Epsilon of the logit BN.
        synchronized_bn: Synchronise the logit BN's statistics across replicas.

    Returns:
        The float32 logits, `[batch, num_classes]`.

    Example:

    >>> features = keras.Input((2048,))
    >>> logits = apply_head(features, 1000, head="fcbn")
    """
    head = head_name(head)
    x = layers.Dense(
        num_classes, dtype="float32", kernel_initializer=kernel_initializer,
        bias_initializer=bias_initializer, name=name,
    )(x)
    if head == "linear":
        return x
    affine = head == "fcbn"
    return layers.BatchNormalization(
        momentum=bn_momentum, epsilon=bn_epsilon, center=affine, scale=affine,
        synchronized=synchronized_bn, dtype="float32", name=name + "_bn",
    )(x)


def apply_normalization(inputs, mean=None, std=None):
    """Raw pixels in [0, 255] to normalised inputs, inside the graph.

    Args:
        inputs: Image tensor, pixels in [0, 255].
        mean: Per-channel mean of the pixels scaled to [0, 1], or `None` to
            only scale by 1/255.
        std: Per-channel standard deviation, in the same units as `mean`
            (`None`: 1).

    Returns:
        The output of a layer named `"normalize"`.
    """
    if mean is None:
        return layers.Rescaling(1.0 / 255, name="normalize")(inputs)
    std = [1.0] * len(mean) if std is None else std
    return layers.Normalization(
        mean=[255.0 * m for m in mean],
        variance=[(255.0 * s) ** 2 for s in std],
        name="normalize",
    )(inputs)


def classifier(
    backbone,
    num_classes,
    input_shape,
    mean=None,
    std=None,
    synchronized_bn=False,
    name=None,
    head_initializer="keras",
    head="linear",
):
    """Normalisation, `backbone`, global average pooling, head.

    See `nbn_keras.models.build_classifier`, which builds the backbone by
    name and resolves `head_initializer="auto"` from its family.

    Args:
        backbone: A Keras model from images to a feature map.
        num_classes: Number of classes.
        input_shape: Image shape, channels last.
        mean: See `apply_normalization`.
        std: See `apply_normalization`.
        synchronized_bn: Synchronise the logit BN's statistics across replicas.
        name: Model name; defaults to the backbone's name.
        head_initializer: `"torch"` (PyTorch's `nn.Linear` default) or
            `"keras"` (Glorot uniform kernel, zero bias).
        head: One of `HEADS` (see `apply_head`).

    Returns:
        A functional `keras.Model` from raw pixels (input `"images"`) to
        float32 logits, the backbone nested as one layer.

    Example:

    >>> backbone = nbn_keras.models.build_backbone("resnet8", (16, 16, 3))
    >>> model = classifier(backbone, 10, (16, 16, 3))
    """
    inputs = keras.Input(input_shape, name="images")
    x = backbone(apply_normalization(inputs, mean, std))
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    initializers = {}
    if head_initializer == "torch":
        kernel, bias = torch_linear_initializers(x.shape[-1])
        initializers = dict(kernel_initializer=kernel, bias_initializer=bias)
    outputs = apply_head(
        x, num_classes, head, name="logits", synchronized_bn=synchronized_bn,
        **initializers,
    )
    return keras.Model(inputs, outputs, name=name or backbone.name)
