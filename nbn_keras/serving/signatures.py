"""The serving signatures of an exported classifier, and the model they serve.

`export_archive` builds a `keras.export.ExportArchive` of a model folded to
stock layers (`stock_model`) with two endpoints:

- `serve` (exported also as `serving_default`): `images`, float32
  `[batch, H, W, C]` raw pixels in [0, 255], exactly as the training
  pipeline yields them (the model normalises inside its graph). Another
  shape or rank, and NaN or infinite pixels, are refused by checks inside
  the graph (`check_images`).
- `serve_image_bytes`: `image_bytes`, a string vector of encoded images
  (JPEG, PNG, GIF's first frame, BMP), decoded and resized in the graph
  (`nbn_keras.serving.decoding`).

Both return `logits`, `probabilities` (softmax) and `classes` (argmax,
int64); an empty batch gives empty outputs.
"""

import keras
import tensorflow as tf

from nbn_keras.conversion import fold_nbn
from nbn_keras.conversion import has_fold_hook
from nbn_keras.graph import leaf_layers
from nbn_keras.serving import decoding


def stock_model(model):
    """`model` folded (`fold_nbn`); raises if a layer that should fold remains.

    What folds is what the layers say (`has_fold_hook`), not where their
    class comes from.
    """
    if any(has_fold_hook(layer) for layer in leaf_layers(model)):
        model = fold_nbn(model)
    left = sorted(l.name for l in leaf_layers(model) if has_fold_hook(l))
    if left:
        raise ValueError(f"Layers {left} could not be folded into stock layers.")
    return model


def image_spec(model, image_size=None):
    """`(height, width, channels)` of the images `model` is exported for.

    Args:
        model: A Keras model, which must have one input `[batch, H, W, C]`
            with 1 or 3 channels and one output `[batch, classes]`.
        image_size: `(H, W)` or an int; needed when the input has no fixed
            height and width, and must agree with the fixed ones.

    Returns:
        A tuple of three ints.

    Raises:
        ValueError: Naming what does not fit.
    """
    _check_classifier_shapes(model)
    input_shape = tuple(model.inputs[0].shape)
    height, width, channels = input_shape[1:]
    if image_size is not None:
        height, width = _given_size(image_size, height, width, input_shape)
    if height is None or width is None:
        raise ValueError(
            "The model's input has no fixed height and width; pass image_size."
        )
    if channels not in (1, 3):
        raise ValueError(
            f"Only 1- or 3-channel models can decode images, got {channels}."
        )
    return height, width, channels


def _check_classifier_shapes(model):
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(
            "Only models with one image input and one logits output can be "
            f"exported; '{model.name}' has {len(model.inputs)} inputs and "
            f"{len(model.outputs)} outputs."
        )
    input_shape = tuple(model.inputs[0].shape)
    if len(input_shape) != 4 or input_shape[-1] is None:
        raise ValueError(
            f"The model's input must be [batch, H, W, C] with a known C, got "
            f"{input_shape}."
        )
    if len(model.outputs[0].shape) != 2:
        raise ValueError(
            "The model must output logits [batch, classes], got shape "
            f"{tuple(model.outputs[0].shape)}."
        )


def _given_size(image_size, height, width, input_shape):
    """`image_size` as `(H, W)` ints, checked against the fixed sides."""
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    if len(size) != 2 or any(
        fixed is not None and fixed != given
        for fixed, given in zip((height, width), size)
    ):
        raise ValueError(
            f"image_size {image_size} does not match the model's input "
            f"shape {input_shape}."
        )
    return tuple(int(s) for s in size)


def check_images(images, height, width, channels):
    """`images` after in-graph checks of its shape and values.

    `tf.ensure_shape` runs as an op (`EnsureShape`) at serving time: the
    signature's declared shape is not enforced by TF Serving, and a static
    rank or shape check would be folded away against that declaration.
    """
    expected = f"[batch, {height}, {width}, {channels}]"
    images = tf.ensure_shape(
        images, [None, height, width, channels],
        name=f"images_must_be_batch_{height}x{width}x{channels}",
    )
    return tf.debugging.assert_all_finite(
        images,
        f"`images` must be finite pixel values {expected} in [0, 255]; got "
        "NaN or infinite values",
    )


def export_archive(model, height, width, channels, resize_mode, max_image_pixels):
    """An `ExportArchive` of `model`, folded, with the two serving endpoints.

    Args:
        model: A classifier that `image_spec` accepts, NBN layers allowed.
        height: Height of the `images` signature (see `image_spec`).
        width: Its width.
        channels: Its channels.
        resize_mode: `"crop"` or `"resize"`, how `serve_image_bytes` fits
            images (see `nbn_keras.serving.decoding.decode_and_resize`).
        max_image_pixels: Largest `height * width` that `serve_image_bytes`
            decodes.

    Returns:
        A `keras.export.ExportArchive`, to `write_out`.

    Raises:
        ValueError: A layer that should fold could not be folded.
    """
    served = stock_model(model)
    predict = _predict_function(served)

    def serve(images):
        return predict(check_images(images, height, width, channels))

    def serve_image_bytes(image_bytes):
        return predict(decoding.decode_batch(
            image_bytes, height, width, channels, resize_mode,
            tf.constant(max_image_pixels, tf.int64)))

    archive = keras.export.ExportArchive()
    archive.track(served)
    # The first endpoint is also exported as `serving_default`.
    archive.add_endpoint(
        "serve",
        serve,
        [tf.TensorSpec([None, height, width, channels], tf.float32, "images")],
    )
    archive.add_endpoint(
        "serve_image_bytes",
        serve_image_bytes,
        [tf.TensorSpec([None], tf.string, "image_bytes")],
    )
    return archive


def _predict_function(served):
    """`fn(images) -> {"logits", "probabilities", "classes"}` of `served`."""
    input_dtype = served.inputs[0].dtype
    num_classes = served.outputs[0].shape[-1]

    def predict(images):
        # An empty batch never reaches the model: with oneDNN (Intel CPUs) a
        # convolution of an empty batch returns a wrongly shaped tensor and
        # the next BatchNormalization fails.
        logits = tf.cond(
            tf.shape(images)[0] > 0,
            lambda: tf.cast(
                served(tf.cast(images, input_dtype), training=False), tf.float32
            ),
            lambda: tf.zeros([0, num_classes], tf.float32),
        )
        return {
            "logits": logits,
            "probabilities": tf.nn.softmax(logits),
            "classes": tf.argmax(logits, axis=-1, output_type=tf.int64),
        }

    return predict
