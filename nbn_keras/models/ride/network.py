"""RIDE: the NBN authors' multi-expert ResNet-50, with and without NBN.

The network of their `models/ensemble.py` (`resnet50_ride`) and
`models/ensemble_NBN.py` (`resnet50_ride_NBN`), github.com/yuxiangbao/NBN,
after RIDE (Wang et al., ICLR 2021): the torchvision-layout stem, `layer1`
and `layer2` are shared; each of `num_experts` experts has its own `layer3`
(unless `share_layer3`) and `layer4`, global average pooling and head; the
model's output is the mean of the experts' logits.

Layer names are the PyTorch module paths with `_` for `.` (`layer3s_0_1_bn2`,
`layer4s_2_0_downsample_1`, `linears_1`, `linears_1_bn`, ...), which is what
`nbn_keras.import_torch` maps checkpoints with. Stage names carry an `s`
(`layer4s_`), so the plain ResNets' paper selection does not see the
experts; NBN in RIDE is the family's own selection
(`nbn_keras.models.ride.selection`): every BN of each expert's last stage
(bn1, bn2, bn3 and the shortcut BN), one `NBNScale` per expert, as in their
`ResNet_NBN.scale_modules`.

The classifier has one output, the mean logits (layer `"logits"`, an
`ExpertAverage`), so training metrics, evaluation, folding and the TF Serving
export treat it as any classifier; folding makes the layer a stock
`GlobalAveragePooling1D`, so the export serves the mean of the experts'
logits. Training fits `nbn_keras.models.ride.ExpertLogitsTrainer`, which
gives `nbn_keras.models.ride.RIDELoss` the input of that layer, the
per-expert logits.

Reference:
- [Wang et al., Long-tailed Recognition by Routing Diverse
  Distribution-Aware Experts, ICLR 2021](https://arxiv.org/abs/2010.01809).
"""

import keras
from keras import layers
from keras import ops

from nbn_keras.models import heads
from nbn_keras.models import resnet

# name: (block, blocks per stage)
ARCHITECTURES = {"resnet50_ride": ("bottleneck", (3, 4, 6, 3))}


@keras.saving.register_keras_serializable(package="nbn_keras")
class ExpertAverage(keras.layers.Layer):
    """The mean over experts of stacked logits `[batch, experts, classes]`.

    Its output is the classifier's, the one training metrics, evaluation and
    the serving export use; its input, the per-expert logits, is what
    `nbn_keras.models.ride.ExpertLogitsTrainer` gives the RIDE losses.

    Call arguments:
        inputs: The stacked expert logits, `[batch, experts, classes]`.

    Returns:
        The mean logits, `[batch, classes]`.
    """

    def call(self, inputs):
        return ops.mean(inputs, axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])

    def stock_equivalent(self):
        """The fold hook: a `GlobalAveragePooling1D`, the mean over axis 1.

        The served RIDE model so outputs the mean of the experts' logits.
        """
        return layers.GlobalAveragePooling1D(dtype=self.dtype_policy, name=self.name)




def build_ride_classifier(
    num_classes,
    input_shape,
    mean=None,
    std=None,
    arch="resnet50_ride",
    name=None,
    num_experts=3,
    reduce_dimension=False,
    share_layer3=False,
    head="linear",
    layer3_output_dim=None,
    layer4_output_dim=None,
    synchronized_bn=False,
    bn_momentum=0.9,
    bn_epsilon=1e-5,
):
    """The authors' RIDE ResNet-50 classifier, from raw pixels to mean logits.

    Like `nbn_keras.models.build_classifier`, the model takes raw pixels
    in [0, 255] (input `"images"`), normalises them with `mean` and `std`
    inside the graph and returns float32 logits: the mean of the experts'.
    The pooling is global, which at 224x224 is their 7x7 average pooling.

    Args:
        num_classes: Number of classes.
        input_shape: Image shape, channels last.
        mean: Per-channel mean of the pixels scaled to [0, 1], or `None`.
        std: Per-channel standard deviation, in the same units as `mean`.
        arch: One of `ARCHITECTURES`.
        name: Model name; defaults to `arch`.
        num_experts: Number of experts (3 in their configs).
        reduce_dimension: Experts' `planes` 192 and 384 instead of 256 and
            512 in `layer3` and `layer4`.
        share_layer3: One `layer3` shared by all experts (named `layer3`).
        head: Every expert's head, one of `nbn_keras.models.heads.HEADS`
            (`nbn_keras.models.heads.apply_head`; their `fc_type` names are
            accepted): their RIDE NBN config uses `"fcbn_notaffine"`
            (`Linear_fcbn_notaffine`: a linear layer followed by a BN over the
            logits with neither gamma nor beta).
        layer3_output_dim: `planes` of the experts' `layer3`, overriding
            `reduce_dimension`.
        layer4_output_dim: `planes` of the experts' `layer4`, likewise.
        synchronized_bn: Synchronise BN statistics across replicas.
        bn_momentum: Momentum of the BN moving averages (Keras convention).
        bn_epsilon: BN epsilon.

    Returns:
        A functional `keras.Model` with one output, the mean logits.

    Example:

    >>> model = build_ride_classifier(1000, (224, 224, 3), num_experts=3)
    >>> nbn_model = nbn_keras.convert_to_nbn(model, selection="ride")
    """
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"Unknown RIDE architecture '{arch}'. Choose one of "
            f"{tuple(ARCHITECTURES)}."
        )
    head = heads.head_name(head)
    if int(num_experts) < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}.")
    block, stage_blocks = ARCHITECTURES[arch]
    dim3 = layer3_output_dim or (192 if reduce_dimension else 256)
    dim4 = layer4_output_dim or (384 if reduce_dimension else 512)
    make = resnet.ResNetLayers(
        bn_momentum=bn_momentum, bn_epsilon=bn_epsilon,
        synchronized_bn=synchronized_bn,
    )
    inputs = keras.Input(input_shape, name="images")
    x = resnet.apply_stem(heads.apply_normalization(inputs, mean, std), make)
    x = resnet.apply_stage(x, block, 64, stage_blocks[0], 1, make, "layer1")
    x = resnet.apply_stage(x, block, 128, stage_blocks[1], 2, make, "layer2")
    if share_layer3:
        x = resnet.apply_stage(x, block, dim3, stage_blocks[2], 2, make, "layer3")
    expert_logits = []
    for e in range(int(num_experts)):
        y = x
        if not share_layer3:
            y = resnet.apply_stage(
                y, block, dim3, stage_blocks[2], 2, make, f"layer3s_{e}")
        y = resnet.apply_stage(y, block, dim4, stage_blocks[3], 2, make, f"layer4s_{e}")
        y = layers.GlobalAveragePooling2D(name=f"avg_pool_{e}")(y)
        kernel, bias = heads.torch_linear_initializers(y.shape[-1])
        y = heads.apply_head(
            y, num_classes, head, name=f"linears_{e}", kernel_initializer=kernel,
            bias_initializer=bias, bn_momentum=bn_momentum, bn_epsilon=bn_epsilon,
            synchronized_bn=synchronized_bn,
        )
        expert_logits.append(
            layers.Reshape((1, num_classes), dtype="float32", name=f"expert_{e}")(y))
    stacked = (
        expert_logits[0] if len(expert_logits) == 1
        else layers.Concatenate(axis=1, dtype="float32", name="expert_logits")(expert_logits)
    )
    outputs = ExpertAverage(dtype="float32", name="logits")(stacked)
    return keras.Model(inputs, outputs, name=name or arch)
