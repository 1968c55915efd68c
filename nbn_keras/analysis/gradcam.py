"""Grad-CAM class-activation maps for the classifiers of `nbn_keras.models`.

A classifier built by `build_classifier` is `images -> normalize -> backbone
(a nested functional model) -> avg_pool -> logits`. Grad-CAM weights each
channel of the backbone's last feature map by the spatial mean of the
gradient of a class logit with respect to it, sums the weighted channels and
keeps the positive part. With a global-average-pooled linear head this is the
class-activation map of Zhou et al. (2016): the head's weights of the class
applied to the feature map.
"""

import keras
import numpy as np
import tensorflow as tf

POOLING_LAYER_NAME = "avg_pool"


def feature_model(classifier, pooling_layer_name=POOLING_LAYER_NAME):
    """A model from the classifier's images to `(feature map, logits)`.

    The feature map is the input of the global pooling layer, i.e. the
    backbone's output as seen from the classifier's own graph.

    Args:
        classifier: A functional classifier with a global pooling layer.
        pooling_layer_name: Name of that layer.

    Returns:
        A `keras.Model` sharing the classifier's layers and weights.
    """
    try:
        pooling = classifier.get_layer(pooling_layer_name)
    except ValueError:
        raise ValueError(
            f"Classifier '{classifier.name}' has no layer named "
            f"'{pooling_layer_name}'; pass the name of the layer that pools "
            "the last feature map."
        ) from None
    return keras.Model(classifier.inputs, [pooling.input, classifier.output])


def grad_cam(classifier, images, class_indices=None,
             pooling_layer_name=POOLING_LAYER_NAME, upsample=True):
    """Grad-CAM maps of `images` for the given classes, in [0, 1].

    Args:
        classifier: A functional classifier (see `feature_model`).
        images: Array `(N, H, W, C)` of the classifier's input pixels.
        class_indices: Classes to explain, one per image; `None` explains the
            predicted class.
        pooling_layer_name: Name of the global pooling layer.
        upsample: If `True`, resize the maps bilinearly to `(H, W)`.

    Returns:
        `(maps, logits)`: float32 arrays `(N, h, w)` (or `(N, H, W)`), each
        map divided by its maximum (an all-zero map stays zero), and the
        logits `(N, num_classes)`.

    Example:

    >>> maps, logits = grad_cam(model, test_images[:4], test_labels[:4])
    >>> maps.shape
    (4, 32, 32)
    """
    model = feature_model(classifier, pooling_layer_name)
    images = tf.convert_to_tensor(np.asarray(images, dtype=np.float32))
    with tf.GradientTape() as tape:
        features, logits = model(images, training=False)
        tape.watch(features)
        if class_indices is None:
            class_indices = tf.argmax(logits, axis=-1)
        chosen = tf.gather(
            logits, tf.cast(tf.reshape(class_indices, [-1]), tf.int32),
            axis=1, batch_dims=1)
    gradients = tape.gradient(chosen, features)
    weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
    maps = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))
    peak = tf.reduce_max(maps, axis=(1, 2), keepdims=True)
    maps = tf.math.divide_no_nan(maps, peak)
    if upsample:
        maps = tf.image.resize(maps[..., None], images.shape[1:3],
                               method="bilinear")[..., 0]
    return maps.numpy().astype(np.float32), np.asarray(logits, np.float32)
