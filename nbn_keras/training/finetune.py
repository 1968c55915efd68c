"""Classifier re-training: start from a `.keras` file, train only the head.

The NBN authors' second mode (`pretrained` weights loaded by name and shape,
`train_all: False`, `resample`): `load_matching_weights` copies into a model
every weight of a saved model that has the same layer name, weight name,
layer class and shape; `train_only_head` freezes everything but the
classifier head(s), their logit BN and the NBN scales.

Frozen BN layers are put in inference mode (Keras: `trainable=False`), so
their moving statistics stay those of the first stage: re-estimating them
under class-aware sampling ("shifted BN") would change the features the
re-trained head sees at test time. The authors' RIDE models do the same
(`_hook_before_iter` sets frozen BN to eval); their ResNet/ResNeXt code only
stops the gradients, so there the statistics move.
"""

import keras

from nbn_keras import saving
from nbn_keras.graph import leaf_layers
from nbn_keras.layers import NBNScale


def _weights_by_key(model):
    """`{"layer/weight": (layer, variable)}` over `model`'s leaf layers."""
    return {
        f"{layer.name}/{variable.name}": (layer, variable)
        for layer in leaf_layers(model)
        for variable in layer.weights
    }


def load_matching_weights(model, path):
    """Copies the weights of the `.keras` file `path` that match into `model`.

    A weight matches when the saved model has a layer of the same name and
    class holding a weight of the same name and shape (so the raw gamma of an
    NBN layer never lands in a plain BN, whose gamma means something else).

    Args:
        model: The model to start.
        path: A `.keras` file: a training run's `model.keras` or `best.keras`,
            or a `python -m nbn_keras.import_torch` output.

    Returns:
        A dict of sorted `"layer/weight"` lists: `matched` (copied),
        `unmatched` (weights of `model` left as they were, with the reason)
        and `unused` (saved weights that went nowhere).

    Example:

    >>> found = load_matching_weights(model, "runs/stage1/model.keras")
    >>> found["unmatched"]
    ['logits/bias: shape (10,) in the file, (100,) here', ...]
    """
    saved = _weights_by_key(saving.load_model(path, compile=False))
    matched, unmatched = [], []
    for key, (layer, variable) in _weights_by_key(model).items():
        if key not in saved:
            unmatched.append(f"{key}: not in the file")
            continue
        saved_layer, saved_variable = saved.pop(key)
        if type(saved_layer) is not type(layer):
            unmatched.append(f"{key}: a {type(saved_layer).__name__} in the file, "
                             f"a {type(layer).__name__} here")
        elif tuple(saved_variable.shape) != tuple(variable.shape):
            unmatched.append(f"{key}: shape {tuple(saved_variable.shape)} in the file, "
                             f"{tuple(variable.shape)} here")
        else:
            variable.assign(saved_variable.numpy())
            matched.append(key)
    return {"matched": sorted(matched), "unmatched": sorted(unmatched),
            "unused": sorted(saved)}


def summary(found, path):
    """One line of counts, then the weights that did not match or went unused."""
    lines = [f"--init_from={path}: {len(found['matched'])} weights matched, "
             f"{len(found['unmatched'])} not, {len(found['unused'])} in the file unused."]
    lines += [f"  not matched: {entry}" for entry in found["unmatched"]]
    lines += [f"  unused: {entry}" for entry in found["unused"]]
    return "\n".join(lines)


def head_layers(model):
    """The classifier heads: every `Dense` layer and the BN over its logits."""
    leaves = list(leaf_layers(model))
    dense = {layer.name for layer in leaves if isinstance(layer, keras.layers.Dense)}
    return [
        layer for layer in leaves
        if layer.name in dense
        or (isinstance(layer, keras.layers.BatchNormalization)
            and layer.name.endswith("_bn") and layer.name[:-3] in dense)
    ]


def train_only_head(model):
    """Freezes every layer of `model` but its heads and NBN scales.

    Frozen BN and NBN layers run in inference mode (moving statistics kept);
    the heads' logit BN keeps training, as theirs (part of `fc`) does.

    Args:
        model: A classifier (nested backbones included).

    Returns:
        The names of the layers left trainable.
    """
    keep = {id(layer) for layer in head_layers(model)}
    if not keep:
        raise ValueError(f"Model '{model.name}' has no Dense head to re-train.")
    trainable = []
    for layer in leaf_layers(model):
        layer.trainable = id(layer) in keep or isinstance(layer, NBNScale)
        if layer.trainable and layer.weights:
            trainable.append(layer.name)
    return trainable
