"""Keras layers: NBN, its shared scale, and a CPU-friendly grouped convolution."""

from nbn_keras.layers.grouped_conv2d import GroupedConv2D
from nbn_keras.layers.normalization import NBNScale
from nbn_keras.layers.normalization import NormalizedBatchNormalization
from nbn_keras.layers.normalization import unit_direction
