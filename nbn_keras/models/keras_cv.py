"""KerasCV's `ResNetBackbone` v1, built from arguments (nothing downloaded).

v1 puts the stride of a downsampling bottleneck in its first 1x1 conv (the
authors' networks, `nbn_keras.models.resnet`, are v1.5). BN names are
`v2_stack_{stage}_block{block}_{i}_bn` (prefix `v2_` for v1 nets too),
stages from 0, blocks from 1: the naming contract `NAMING`.
"""

from keras import layers

from nbn_keras.models.family import Family
from nbn_keras.selection import Naming

ARCHITECTURES = {
    # name: (blocks per stage, block type)
    "keras_cv_resnet18_v1": ([2, 2, 2, 2], "basic_block"),
    "keras_cv_resnet34_v1": ([3, 4, 6, 3], "basic_block"),
    "keras_cv_resnet50_v1": ([3, 4, 6, 3], "block"),
    "keras_cv_resnet101_v1": ([3, 4, 23, 3], "block"),
    "keras_cv_resnet152_v1": ([3, 8, 36, 3], "block"),
}
# `..._stack_{stage}_block{block}_...`, stages from 0, blocks from 1: KerasCV
# ResNet v1 and v2 (prefix `v2_stack_` for both) and
# `nbn_keras.models.cifar_resnet`.
NAMING = Naming("keras_cv", r"(?:^|_)stack_?(\d+)_block(\d+)_")


def keras_cv_resnet(
    name, input_shape, bn_momentum=0.9, bn_epsilon=1e-5, synchronized_bn=False
):
    """KerasCV's v1 ResNet `name` with the given BN settings.

    Args:
        name: One of `ARCHITECTURES`.
        input_shape: Input shape, channels last.
        bn_momentum: Momentum of the BN moving averages.
        bn_epsilon: BN epsilon.
        synchronized_bn: Synchronise BN statistics across replicas.

    Returns:
        A `keras_cv.models.ResNetBackbone` (a flat functional model).

    Example:

    >>> backbone = keras_cv_resnet("keras_cv_resnet18_v1", (64, 64, 3))
    """
    blocks, block_type = ARCHITECTURES[name]
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


FAMILY = Family(
    name="KerasCV ResNet",
    architectures=tuple(ARCHITECTURES),
    build_backbone=keras_cv_resnet,
    naming=NAMING,
)
