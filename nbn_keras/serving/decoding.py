"""In-graph decoding of encoded images for the `serve_image_bytes` signature.

Every function here builds TensorFlow ops that run inside the exported
SavedModel: `encoded_image_size` reads an image's size from its header
without decoding it, `decode_and_resize` decodes one image and fits it to
the model (the training pipeline's evaluation transform, or a plain
resize), and `decode_batch` decodes a string vector and fails with an error
naming the first image that cannot be decoded or is too large.
"""

import tensorflow as tf

from nbn_keras.data import transforms

RESIZE_MODES = ("auto", "crop", "resize")
# Models at least this large (in both H and W) get "crop" under "auto".
AUTO_CROP_MIN_SIZE = 128
# `serve_image_bytes` refuses larger images (4096 x 4096: a 16-megapixel
# photo passes; decoding one costs about 0.4 GB).
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096


def check_resize_mode(resize_mode):
    """Raises `ValueError` unless `resize_mode` is one of `RESIZE_MODES`."""
    if resize_mode not in RESIZE_MODES:
        raise ValueError(
            f"Unknown resize_mode '{resize_mode}'; use one of {RESIZE_MODES}."
        )


def check_max_image_pixels(max_image_pixels):
    """Raises `ValueError` unless `max_image_pixels` is a positive int."""
    if (isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int)
            or max_image_pixels < 1):
        raise ValueError(
            f"max_image_pixels must be a positive int, got {max_image_pixels!r}."
        )


def resolve_resize_mode(resize_mode, height, width):
    """`resize_mode` with `"auto"` resolved for a `height x width` model.

    Returns:
        `"crop"` for `"auto"` when both sides are at least
        `AUTO_CROP_MIN_SIZE`, `"resize"` for a smaller `"auto"`, else
        `resize_mode` itself.
    """
    if resize_mode != "auto":
        return resize_mode
    big = min(height, width) >= AUTO_CROP_MIN_SIZE
    return "crop" if big else "resize"


def decode_and_resize(image_bytes, height, width, channels, resize_mode):
    """Decodes one encoded image to float32 `[height, width, channels]`.

    The image is decoded to `channels` channels (grey is repeated to RGB,
    RGB converted to grey, alpha dropped) with pixel values in [0, 255].
    With `resize_mode="resize"` it is resized to `height x width`, its
    aspect ratio not kept; an image already of that size is left unchanged.
    Resizing there is bilinear with antialiasing. With `"crop"` the
    training pipeline's evaluation transform is applied exactly (see
    `nbn_keras.data.transforms.resize_and_center_crop`): torchvision's
    "Resize(256), CenterCrop(224)", the resize antialiased.

    Args:
        image_bytes: A scalar string tensor.
        height: Output height.
        width: Output width.
        channels: Output channels, 1 or 3.
        resize_mode: `"resize"` or `"crop"`.

    Returns:
        A float32 tensor of shape `[height, width, channels]`.
    """
    image = transforms.decode_image(image_bytes, channels)
    image.set_shape([None, None, channels])
    image = tf.cast(image, tf.float32)
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    if resize_mode == "resize":
        return tf.cond(
            tf.logical_and(tf.equal(h, height), tf.equal(w, width)),
            lambda: image,
            lambda: tf.image.resize(image, [height, width], antialias=True),
        )
    if resize_mode != "crop":
        raise ValueError(f"Unknown resize_mode '{resize_mode}'.")
    # The evaluation transform of the data pipeline, exactly.
    image = transforms.resize_and_center_crop(image, height, width)
    image.set_shape([height, width, channels])
    return image


def encoded_image_size(image_bytes):
    """`[height, width]` (int64) of an encoded image, read from its header.

    Nothing is decoded: JPEG sizes come from `tf.io.extract_jpeg_shape`, PNG
    sizes from the IHDR chunk (big-endian at bytes 16-23), GIF sizes from
    the logical screen (little-endian at bytes 6-9) and BMP sizes from the
    info header (little-endian at bytes 18-25; a negative height means a
    top-down bitmap). TensorFlow decodes GIF and BMP to exactly these
    sizes.

    Args:
        image_bytes: A scalar string tensor.

    Returns:
        An int64 tensor `[height, width]`. Fails (`InvalidArgumentError`) for
        data that is not JPEG, PNG, GIF or BMP, or too short for its header.
    """
    def raw(offset, length, dtype, little_endian):
        part = tf.strings.substr(image_bytes, offset, length)
        check = tf.debugging.assert_equal(
            tf.strings.length(part), length, message="image header too short")
        with tf.control_dependencies([check]):
            values = tf.io.decode_raw(part, dtype, little_endian=little_endian)
        return tf.cast(values, tf.int64)

    def jpeg():
        return tf.io.extract_jpeg_shape(image_bytes, output_type=tf.int64)[:2]

    def png():
        width_height = raw(16, 8, tf.int32, little_endian=False)
        return tf.reverse(width_height, [0])

    def gif():
        width_height = raw(6, 4, tf.uint16, little_endian=True)
        return tf.reverse(width_height, [0])

    def bmp():
        width_height = raw(18, 8, tf.int32, little_endian=True)
        return tf.abs(tf.reverse(width_height, [0]))

    def unknown():
        check = tf.debugging.Assert(
            False, ["not a JPEG, PNG, GIF or BMP image"])
        with tf.control_dependencies([check]):
            return tf.zeros([2], tf.int64)

    signatures = tf.stack([
        tf.equal(tf.strings.substr(image_bytes, 0, len(sig)), sig)
        for sig in (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF8", b"BM")
    ])
    # The first matching format, or 4 (unknown) when none matches.
    kind = tf.argmax(tf.concat([tf.cast(signatures, tf.int32), [1]], 0))
    return tf.switch_case(tf.cast(kind, tf.int32), [jpeg, png, gif, bmp, unknown])


def decode_batch(image_bytes, height, width, channels, resize_mode,
                 max_image_pixels):
    """Decodes a string vector to `[batch, height, width, channels]`.

    Each image's size is read from its header first and an image above
    `max_image_pixels` is not decoded. A batch with an image that cannot be
    decoded, or one that is too large, fails with an error naming the first
    such image's index.

    Args:
        image_bytes: A string vector of encoded images.
        height: Output height.
        width: Output width.
        channels: Output channels, 1 or 3.
        resize_mode: `"resize"` or `"crop"` (see `decode_and_resize`).
        max_image_pixels: An int64 scalar tensor, the largest
            `height * width` decoded.

    Returns:
        A float32 tensor `[batch, height, width, channels]`.
    """
    count = tf.size(image_bytes, out_type=tf.int64)
    index, too_big, size, images = _decode_each(
        image_bytes, count, height, width, channels, resize_mode, max_image_pixels)
    checks = _failure_checks(index, too_big, size, count, max_image_pixels)
    with tf.control_dependencies(checks):
        return tf.identity(images)


def _decode_each(image_bytes, count, height, width, channels, resize_mode,
                 max_image_pixels):
    """`(index, too_big, size, image)` of every image that decoded, stacked.

    Decoding runs in a tf.data pass with `ignore_errors`, the only
    per-element error handling a graph has: an image that fails is missing
    from `index`, so that `_failure_checks` can name it.
    """
    empty = tf.zeros([height, width, channels], tf.float32)

    def decode(index, data):
        size = encoded_image_size(data)
        too_big = size[0] * size[1] > max_image_pixels
        image = tf.cond(
            too_big,
            lambda: empty,
            lambda: decode_and_resize(data, height, width, channels, resize_mode),
        )
        image = tf.ensure_shape(image, [height, width, channels])
        return index, too_big, size, image

    decoded = tf.data.Dataset.from_tensor_slices((tf.range(count), image_bytes))
    # One image at a time: memory is bounded by the largest image allowed.
    decoded = decoded.map(decode).ignore_errors(log_warning=False)
    # A last element that always exists, so that the single batch below
    # exists even when every image failed.
    sentinel = (tf.constant(-1, tf.int64), tf.constant(False),
                tf.zeros([2], tf.int64), empty)
    decoded = decoded.concatenate(tf.data.Dataset.from_tensors(sentinel))
    stacked = decoded.batch(count + 1).get_single_element()
    return tuple(t[:-1] for t in stacked)


def _failure_checks(index, too_big, size, count, max_image_pixels):
    """The asserts naming the first undecodable and the first oversized image."""
    present = tf.scatter_nd(index[:, None], tf.ones_like(index), tf.reshape(count, [1]))
    first_missing = tf.argmin(tf.concat([present, [0]], 0))
    undecodable = tf.debugging.Assert(
        tf.equal(tf.size(index, out_type=tf.int64), count),
        [tf.strings.format(
            "image_bytes[{}] cannot be decoded: it is not a complete JPEG, "
            "PNG, GIF or BMP image", first_missing)],
    )
    # Row of the first oversized image (the sentinel row when none is).
    first_big = tf.argmax(tf.concat([tf.cast(too_big, tf.int32), [1]], 0))
    big_index = tf.concat([index, [-1]], 0)[first_big]
    big_size = tf.concat([size, [[0, 0]]], 0)[first_big]
    oversized = tf.debugging.Assert(
        tf.logical_not(tf.reduce_any(too_big)),
        [tf.strings.format(
            "image_bytes[{}] is {}x{} pixels, more than the {} pixels "
            "(max_image_pixels) this model was exported to accept",
            (big_index, big_size[0], big_size[1], max_image_pixels))],
    )
    return [undecodable, oversized]
