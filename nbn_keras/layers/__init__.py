"""Keras layers: NBN, its shared scale, and a CPU-friendly grouped convolution."""

from nbn_keras.layers.grouped_conv2d import GroupedConv2D
from nbn_keras.layers.normalization import NBNScale
from nbn_keras.layers.normalization import NormalizedBatchNormalization
from nbn_keras.layers.normalization import unit_direction

# `.keras` files record a layer's module: the public one, as Keras' own
# layers record `keras.layers`, so files do not depend on where it lives.
for _layer in (GroupedConv2D, NBNScale, NormalizedBatchNormalization):
    _layer.__module__ = __name__
del _layer
