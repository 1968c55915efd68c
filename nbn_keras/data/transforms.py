"""Per-example image transforms, run inside tf.data.

Every transform returns float32 pixels in [0, 255] with a static shape; the
model does the mean/std normalisation in its own graph. Training transforms
are stateless: they take a `[2]` integer seed, so a pipeline with a fixed
seed yields the same augmented images on every run and on every worker.

Recipes:

- `"cifar"`: zero-pad 4 pixels, random crop back to size, horizontal flip.
- `"crop"`: the same without the flip (digits: a flipped digit is a
  different symbol).
- `"none"`: no augmentation.
- `"imagenet"`: from encoded image files. Training: random-resized crop
  (scale 0.08-1, aspect ratio 3/4-4/3, ten attempts, whole image as
  fallback), horizontal flip, colour jitter (brightness, contrast,
  saturation 0.4, hue 0). Evaluation: torchvision's `Resize(256)`,
  `CenterCrop(224)` (for other sizes, the short side to
  `round(size * 256 / 224)`): antialiased bilinear resize of the whole image,
  rounded to whole pixel values as PIL's 8-bit output is, then the central
  crop. JPEGs are decoded as PIL decodes them (`decode_image`).
- `"inaturalist"`: `"imagenet"` without the colour jitter.

Colour jitter follows torchvision's definitions (multiply for brightness,
blend with the grey mean for contrast, blend with the grey image for
saturation), applied in that fixed order.

Files are checked for a JPEG, PNG, GIF or BMP signature before decoding, so
a file that is not an image fails with an error that names it. A file with a
valid signature but corrupt content fails inside the decoder, whose message
does not name the file; pipelines over files map with `map_image_files`,
which turns any such failure into an error naming the file, and
`nbn_keras.data.list_files.find_undecodable` finds all such files up front.
"""

import re

import tensorflow as tf

ARRAY_RECIPES = ("cifar", "crop", "none")
FILE_RECIPES = ("imagenet", "inaturalist")
RECIPES = ARRAY_RECIPES + FILE_RECIPES

CIFAR_PAD = 4
EVAL_RESIZE_RATIO = 256 / 224
JITTER_STRENGTH = 0.4
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM")


def _split_seed(seed, num):
    return tf.unstack(tf.random.experimental.stateless_split(seed, num))


def is_file_recipe(recipe):
    return recipe in FILE_RECIPES


def pad_and_crop(image, seed, pad=CIFAR_PAD):
    """Zero-pads `pad` pixels on each side and crops back at random."""
    padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    return tf.image.stateless_random_crop(padded, tf.shape(image), seed)


def read_image_file(path):
    """Reads an encoded image, failing with the path if it is not an image.

    Args:
        path: Scalar string tensor.

    Returns:
        `(data, is_jpeg)`: the file bytes and whether they are a JPEG.
    """
    data = tf.io.read_file(path)
    matches = [tf.equal(tf.strings.substr(data, 0, len(s)), s) for s in _SIGNATURES]
    check = tf.debugging.Assert(
        tf.reduce_any(tf.stack(matches)),
        ["Cannot decode image file (not a JPEG, PNG, GIF or BMP):", path],
    )
    with tf.control_dependencies([check]):
        data = tf.identity(data)
    return data, matches[0]


def _filler(spec):
    """A zero value of an element spec (unknown dimensions taken as 0)."""
    def zeros(tensor_spec):
        shape = [0 if d is None else d for d in tensor_spec.shape]
        if tensor_spec.dtype == tf.string:
            return tf.fill(shape, "")
        return tf.zeros(shape, tensor_spec.dtype)

    return tf.nest.map_structure(zeros, spec)


UNREADABLE_IMAGE = "Cannot read or decode image file "


class UnreadableImageError(ValueError):
    """An image file that cannot be read or decoded; the message names it."""


def unreadable_image_error(error):
    """The file `map_image_files` failed on, from the error TensorFlow raised.

    Args:
        error: A `tf.errors.InvalidArgumentError` from iterating a dataset.

    Returns:
        An `UnreadableImageError` whose message names the file (without
        TensorFlow's wrapping), or `None` for any other error.

    Example:

    >>> try:
    ...     model.fit(train_dataset)
    ... except tf.errors.InvalidArgumentError as error:
    ...     raise unreadable_image_error(error) or error
    """
    # The assertion's message reaches the error inside TensorFlow's text:
    # "assertion failed: [<message>]", quotes escaped.
    found = re.search(rf"({re.escape(UNREADABLE_IMAGE)}.*?)\]?$", error.message, re.M)
    if found is None:
        return None
    return UnreadableImageError(found.group(1).replace("\\'", "'"))


def map_image_files(indices, paths, fn, num_parallel_calls=tf.data.AUTOTUNE):
    """`indices.map(fn)` over image files; a failure names the file.

    A decoder's error does not say which file it was decoding, and tf.data
    has no per-element error handling but `ignore_errors`. So every element
    also carries the index of the element before it; an element whose map
    fails (unreadable file, corrupt image data, ...) is dropped by
    `ignore_errors`, which logs the original error, and the next element
    sees the gap in positions and fails with an `InvalidArgumentError`
    naming the file of the element before it. A finite stream gets a marker
    element after its last one, so that a failure at the very end is caught
    too. Elements keep their order and positions, so `fn`'s seeds are the
    same as without this wrapper; the bookkeeping costs well under a
    millisecond per element.

    Args:
        indices: A dataset of `(position, index)` int64 pairs (as
            `nbn_keras.data.samplers.index_stream` yields), `index` into
            `paths`.
        paths: 1-D array of file paths (what `fn` reads for each index).
        fn: `(position, index) -> element`.
        num_parallel_calls: Parallelism of the map (order is kept).

    Returns:
        A `tf.data.Dataset` of `fn`'s elements, in the order of `indices`.
    """
    paths = tf.constant([tf.compat.as_bytes(path) for path in paths], tf.string)
    count = int(indices.cardinality())
    finite = count != int(tf.data.INFINITE_CARDINALITY)
    if finite:
        marker = tf.data.Dataset.from_tensors(
            (tf.constant(-1, tf.int64), tf.constant(-1, tf.int64)))
        indices = indices.concatenate(marker)
    marked = indices.scan(
        tf.constant(-1, tf.int64),
        lambda previous, pair: (pair[1], (pair[0], pair[1], previous)))

    # `counter` numbers the elements that reach the map, to find the gaps
    # left by failed ones; `position` is the caller's (the augmentation seed).
    if finite:
        spec = tf.data.Dataset.range(1).map(lambda i: fn(i, i)).element_spec

        def apply(counter, item):
            position, index, previous = item
            element = tf.cond(index >= 0, lambda: fn(position, index),
                              lambda: _filler(spec))
            return counter, index, previous, element
    else:
        def apply(counter, item):
            position, index, previous = item
            return counter, index, previous, fn(position, index)

    mapped = marked.enumerate().map(
        apply, num_parallel_calls=num_parallel_calls, deterministic=True
    ).ignore_errors(log_warning=True)

    def check(expected, item):
        position, index, previous, element = item
        message = tf.strings.join([
            UNREADABLE_IMAGE, paths[tf.maximum(previous, 0)],
            " (the decoder's own message is in the TensorFlow log). "
            "nbn_keras.data.list_files.find_undecodable lists every such file; "
            "on_bad_image='skip' drops them.",
        ])
        checked = tf.debugging.Assert(tf.equal(position, expected), [message])
        with tf.control_dependencies([checked]):
            position = tf.identity(position)
        if count >= 0:
            return position + 1, element
        return position + 1, (index, element)

    checked = mapped.scan(tf.constant(0, tf.int64), check)
    # `ignore_errors` makes the length unknown to tf.data; it is restored
    # (Keras counts steps from it) and checked.
    if count >= 0:
        checked = checked.take(count)  # Drops the end marker.
        return checked.apply(tf.data.experimental.assert_cardinality(count))
    if finite:  # A finite stream of unknown length.
        checked = checked.filter(lambda index, element: index >= 0)
    checked = checked.map(lambda index, element: element)
    if not finite:
        checked = checked.apply(
            tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY))
    return checked


def decode_image(data, channels=3):
    """Decodes an encoded image to uint8 `[height, width, channels]`.

    JPEGs are decoded with libjpeg's accurate integer IDCT, as PIL (and so
    torchvision) decodes them; TensorFlow's default, the fast one, differs
    by about one pixel level on average.
    """
    is_jpeg = tf.equal(tf.strings.substr(data, 0, len(_SIGNATURES[0])), _SIGNATURES[0])
    return tf.cond(
        is_jpeg,
        lambda: tf.io.decode_jpeg(data, channels=channels, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(data, channels=channels, expand_animations=False),
    )


def _decode_full(data):
    return decode_image(data)


def encoded_shape(data, is_jpeg):
    """`[height, width, channels]` of an encoded image (JPEG: header only)."""
    return tf.cond(
        is_jpeg,
        lambda: tf.io.extract_jpeg_shape(data),
        lambda: tf.shape(_decode_full(data)),
    )


def decode_crop(data, is_jpeg, window):
    """Decodes the `[y, x, height, width]` window of an encoded image."""
    return tf.cond(
        is_jpeg,
        lambda: tf.io.decode_and_crop_jpeg(data, window, channels=3,
                                           dct_method="INTEGER_ACCURATE"),
        lambda: tf.image.crop_to_bounding_box(
            _decode_full(data), window[0], window[1], window[2], window[3]
        ),
    )


def random_resized_crop(data, is_jpeg, seed, size,
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Random-resized crop of an encoded image to `size` x `size` float32."""
    shape = encoded_shape(data, is_jpeg)
    begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=ratio,
        area_range=scale,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    window = tf.stack([begin[0], begin[1], extent[0], extent[1]])
    image = decode_crop(data, is_jpeg, window)
    return tf.image.resize(image, [size, size], method="bilinear")


def resize_short_side(image, short_side):
    """torchvision's `Resize(short_side)` of a PIL image, in TensorFlow.

    The short side becomes `short_side`, the long side
    `floor(short_side * long / short)`; the resize is bilinear with
    antialiasing (PIL's, which torchvision uses, widens the filter when it
    reduces) and the result is rounded to whole pixel values, as PIL's
    8-bit output is.

    Args:
        image: `[height, width, channels]` image, pixel values in [0, 255].
        short_side: Length of the short side after resizing.

    Returns:
        A float32 image.
    """
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    short, long = tf.minimum(height, width), tf.maximum(height, width)
    new_long = (short_side * long) // short
    size = tf.cond(height <= width, lambda: tf.stack([short_side, new_long]),
                   lambda: tf.stack([new_long, short_side]))
    resized = tf.image.resize(tf.cast(image, tf.float32), size, method="bilinear",
                              antialias=True)
    return tf.clip_by_value(tf.round(resized), 0.0, 255.0)


def center_crop(image, height, width):
    """torchvision's `CenterCrop((height, width))` (offsets rounded half to even)."""
    shape = tf.shape(image)
    top = tf.cast(tf.round((shape[0] - height) / 2), tf.int32)
    left = tf.cast(tf.round((shape[1] - width) / 2), tf.int32)
    return tf.image.crop_to_bounding_box(image, top, left, height, width)


def resize_and_center_crop(image, height, width=None, resize_ratio=EVAL_RESIZE_RATIO):
    """torchvision's `Resize(s)` then `CenterCrop((height, width))`.

    `s = round(min(height, width) * resize_ratio)`: 256 for a 224 crop.

    Args:
        image: `[h, w, channels]` decoded image, pixel values in [0, 255].
        height: Output height.
        width: Output width; defaults to `height`.
        resize_ratio: Short side over crop side. Defaults to 256 / 224.

    Returns:
        A float32 `[height, width, channels]` image.
    """
    width = height if width is None else width
    short_side = int(round(min(height, width) * resize_ratio))
    return center_crop(resize_short_side(image, short_side), height, width)


def center_crop_resize(data, is_jpeg, size, resize_ratio=EVAL_RESIZE_RATIO):
    """The evaluation transform of an encoded image: "Resize(256), CenterCrop(224)".

    Decodes the whole image and applies `resize_and_center_crop`.
    """
    del is_jpeg  # The whole image is decoded either way.
    return resize_and_center_crop(_decode_full(data), size, resize_ratio=resize_ratio)


def color_jitter(image, seed, brightness=JITTER_STRENGTH,
                 contrast=JITTER_STRENGTH, saturation=JITTER_STRENGTH):
    """torchvision-style colour jitter of float pixels in [0, 255]."""
    low = tf.constant([1 - brightness, 1 - contrast, 1 - saturation])
    high = tf.constant([1 + brightness, 1 + contrast, 1 + saturation])
    factor = low + (high - low) * tf.random.stateless_uniform([3], seed)
    image = tf.clip_by_value(image * factor[0], 0.0, 255.0)
    grey_mean = tf.reduce_mean(tf.image.rgb_to_grayscale(image))
    image = tf.clip_by_value(grey_mean + factor[1] * (image - grey_mean), 0.0, 255.0)
    grey = tf.image.rgb_to_grayscale(image)
    return tf.clip_by_value(grey + factor[2] * (image - grey), 0.0, 255.0)


def _check_recipe(recipe):
    if recipe not in RECIPES:
        raise ValueError(f"`recipe` must be one of {RECIPES}. Received: {recipe!r}")


def train_transform(recipe, image_shape):
    """The training transform of a recipe.

    Args:
        recipe: A name in `RECIPES`.
        image_shape: Output `(height, width, channels)`.

    Returns:
        A function `(record, seed) -> float32 image` where `record` is a
        uint8 image (array recipes) or a file path (file recipes) and
        `seed` a `[2]` integer tensor.

    Example:

    >>> augment = train_transform("cifar", (32, 32, 3))
    >>> augment(tf.zeros([32, 32, 3], tf.uint8), tf.constant([0, 1])).shape
    TensorShape([32, 32, 3])
    """
    _check_recipe(recipe)
    image_shape = tuple(image_shape)

    def array_fn(record, seed):
        crop_seed, flip_seed = _split_seed(seed, 2)
        image = record
        if recipe in ("cifar", "crop"):
            image = pad_and_crop(image, crop_seed)
        if recipe == "cifar":
            image = tf.image.stateless_random_flip_left_right(image, flip_seed)
        return tf.ensure_shape(tf.cast(image, tf.float32), image_shape)

    def file_fn(record, seed):
        crop_seed, flip_seed, jitter_seed = _split_seed(seed, 3)
        data, is_jpeg = read_image_file(record)
        image = random_resized_crop(data, is_jpeg, crop_seed, image_shape[0])
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
        if recipe == "imagenet":
            image = color_jitter(image, jitter_seed)
        return tf.ensure_shape(image, image_shape)

    return file_fn if is_file_recipe(recipe) else array_fn


def eval_transform(recipe, image_shape):
    """The evaluation transform of a recipe: `record -> float32 image`.

    Args:
        recipe: A name in `RECIPES`.
        image_shape: Output `(height, width, channels)`.

    Returns:
        A function of one record (uint8 image or file path).
    """
    _check_recipe(recipe)
    image_shape = tuple(image_shape)
    if is_file_recipe(recipe):

        def file_fn(record):
            data, is_jpeg = read_image_file(record)
            image = center_crop_resize(data, is_jpeg, image_shape[0])
            return tf.ensure_shape(image, image_shape)

        return file_fn
    return lambda record: tf.ensure_shape(tf.cast(record, tf.float32), image_shape)

