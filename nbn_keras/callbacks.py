"""Keras callbacks of the training run that Keras itself does not provide."""

import keras
import numpy as np

from nbn_keras.conversion import leaf_layers
from nbn_keras.layers import NBNScale
from nbn_keras.layers import NormalizedBatchNormalization


def scale_variables(model):
    """Returns `{name: variable}` for every NBN scale of `model`."""
    scales = {}
    for layer in leaf_layers(model):
        if isinstance(layer, NBNScale):
            scales.update({v.path: v for v in layer.scales})
        elif isinstance(layer, NormalizedBatchNormalization):
            for v in (layer.alpha, layer.gamma_alpha, layer.beta_alpha):
                if v is not None:
                    scales[v.path] = v
    return scales


class NBNScaleLogger(keras.callbacks.Callback):
    """Adds the NBN scale values to the epoch logs.

    Each scale is added as `nbn_scale/<variable path>`. Place this callback
    before `keras.callbacks.TensorBoard` and `CSVLogger`, which then record
    the values like any metric.
    """

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        for path, variable in scale_variables(self.model).items():
            logs[f"nbn_scale/{path}"] = float(np.asarray(variable.numpy()))
