"""A grouped convolution that also trains at a usable speed on CPU."""

import functools

import keras
from keras import ops


@functools.lru_cache(maxsize=None)
def _tensorflow_cpu_only():
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return all(d.device_type == "CPU" for d in tf.config.list_logical_devices())


@keras.saving.register_keras_serializable(package="nbn_keras")
class GroupedConv2D(keras.layers.Conv2D):
    """`keras.layers.Conv2D` with `groups > 1` that trains fast on CPU too.

    Same arguments, weights and outputs as `keras.layers.Conv2D`. Keras'
    TensorFlow backend computes every grouped convolution through XLA,
    whose gradient on CPU is about 80x slower than one convolution per group
    (TensorFlow's own CPU kernel has no grouped filter gradient). When
    TensorFlow sees only CPUs, this layer runs one convolution per group and
    concatenates the results; otherwise (GPU, other backends) it is exactly
    `keras.layers.Conv2D`. `nbn_keras.fold_nbn` (and so the exporter)
    replaces it with a stock `Conv2D` (`stock_equivalent`).

    Args:
        **kwargs: The arguments of `keras.layers.Conv2D`.

    Example:

    >>> conv = nbn_keras.layers.GroupedConv2D(128, 3, groups=32, padding="same")
    >>> conv(np.zeros((2, 8, 8, 128), "float32")).shape
    TensorShape([2, 8, 8, 128])
    """

    def convolution_op(self, inputs, kernel):
        if self.groups == 1 or not _tensorflow_cpu_only():
            return super().convolution_op(inputs, kernel)
        axis = -1 if self.data_format == "channels_last" else 1
        outputs = [
            ops.conv(
                x, k, strides=list(self.strides), padding=self.padding,
                dilation_rate=self.dilation_rate, data_format=self.data_format,
            )
            for x, k in zip(
                ops.split(inputs, self.groups, axis=axis),
                ops.split(kernel, self.groups, axis=-1),
            )
        ]
        return ops.concatenate(outputs, axis=axis)

    def stock_equivalent(self):
        """The fold hook: `to_conv2d`."""
        return self.to_conv2d()

    def to_conv2d(self):
        """Returns the stock `keras.layers.Conv2D` with this layer's weights."""
        conv = keras.layers.Conv2D.from_config(self.get_config())
        if self.built:
            conv.build_from_config(self.get_build_config())
            conv.set_weights(self.get_weights())
        return conv
