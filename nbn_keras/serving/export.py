"""Exporting a trained classifier as a TF Serving SavedModel.

The export is written to `<base_dir>/<model_name>/<version>/`, the layout
TF Serving polls, and contains stock TensorFlow ops only: NBN layers are
folded into plain BatchNormalization first, so serving needs neither Python
nor nbn_keras (every layer that says how it folds, through its
`stock_equivalent` method, is folded: see `nbn_keras.conversion.fold_nbn`;
a RIDE model serves the mean of its experts' logits). Two signatures:

- `serving_default` (also `serve`): `images`, float32 `[batch, H, W, C]` raw
  pixels in [0, 255], exactly as the training pipeline yields them (the
  model normalises inside its graph). Another shape or rank, and NaN or
  infinite pixels, are refused by checks inside the graph.
- `serve_image_bytes`: `image_bytes`, a string vector of encoded images
  (JPEG, PNG, GIF's first frame, BMP), decoded and resized in the graph.
  The image size is read from each header before decoding and images of
  more than `max_image_pixels` pixels are refused; errors name the index
  of the offending image.

Both return `logits`, `probabilities` (softmax) and `classes` (argmax,
int64); an empty batch gives empty outputs.

Writing is safe against readers and other writers: the SavedModel is
written to a temporary directory (a name TF Serving ignores, as it loads
integer names only), made world-readable (directories 0755, files 0644),
synced to disk and renamed to its version, so a version never appears
half-written. Concurrent exports to one model name each get their own
version: a rename onto a version another exporter took fails and the next
number is tried. Temporary directories left by exporters that died are
removed by the next export.

From the command line, any `.keras` file (the trainer's checkpoints) can be
exported:

```
python -m nbn_keras.export --model=runs/x/best.keras --base_dir=saved_models \
    --model_name=resnet50_nbn
```
"""

import errno
import json
import os
import re
import secrets
import shutil
import socket
import time

import keras
import tensorflow as tf

from nbn_keras import interrupts
from nbn_keras.training import run_files
from nbn_keras import saving
from nbn_keras.conversion import fold_nbn
from nbn_keras.conversion import has_fold_hook
from nbn_keras.conversion import leaf_layers
from nbn_keras.data import transforms

RESIZE_MODES = ("auto", "crop", "resize")
# Written into each version's `assets.extra/`, which TF Serving ignores.
RUN_ID_FILENAME = "nbn_keras_run.json"
# Models at least this large (in both H and W) get "crop" under "auto".
AUTO_CROP_MIN_SIZE = 128
# `serve_image_bytes` refuses larger images (4096 x 4096: a 16-megapixel
# photo passes; decoding one costs about 0.4 GB).
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
# Temporary export directories: `.tmp-export-<pid>-<token>-<host>`.
TEMP_PREFIX = ".tmp-export-"
_TEMP_NAME = re.compile(r"\.tmp-export-(\d+)-[0-9a-f]+-(.+)")
# A temporary directory of another host (or of an older naming) is taken
# for abandoned after this many seconds without change.
STALE_TEMP_SECONDS = 3600
DIR_MODE = 0o755
FILE_MODE = 0o644


def next_version(model_dir):
    """Returns 1 + the largest integer-named entry of `model_dir` (or 1).

    Entries whose names are not plain integers (temporary directories, a
    README, ...) are ignored, as TF Serving ignores them.
    """
    if not os.path.isdir(model_dir):
        return 1
    versions = [int(n) for n in os.listdir(model_dir) if n.isdigit()]
    return max(versions, default=0) + 1


def foreign_entries(model_dir):
    """Entries of a model directory that are not model versions.

    A model directory (`<base_dir>/<model_name>`) of this project holds
    integer-named version directories and temporary export directories
    (`.tmp-*`) only; anything else is someone else's, and TF Serving would
    serve our versions next to it.

    Args:
        model_dir: The directory, which may not exist.

    Returns:
        The sorted names of the other entries (`[]` when there are none).
    """
    if not os.path.isdir(model_dir):
        return []
    return sorted(
        name for name in os.listdir(model_dir)
        if not ((name.isdigit() or name.startswith(".tmp-"))
                and os.path.isdir(os.path.join(model_dir, name))))


def foreign_model_dir_error(model_dir, flag_name):
    """The message refusing `model_dir`, or `None` when it holds only versions.

    Args:
        model_dir: `<base_dir>/<model_name>`.
        flag_name: How the caller lifts the refusal (a flag or an argument).
    """
    foreign = foreign_entries(model_dir)
    if not foreign:
        return None
    listed = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
    entries = "1 entry that is not a model version" if len(foreign) == 1 else (
        f"{len(foreign)} entries that are not model versions")
    return (f"{model_dir} holds {entries} "
            f"({listed}); an export would put a version next to them. Choose "
            f"another model name or directory, or pass {flag_name} to export there anyway.")


def find_run_version(model_dir, run_id):
    """The version directory of `model_dir` exported by run `run_id`, or `None`."""
    if not os.path.isdir(model_dir):
        return None
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name, "assets.extra", RUN_ID_FILENAME)
        if name.isdigit() and run_files.read_json(path, {}).get("run_id") == run_id:
            return os.path.join(model_dir, name)
    return None


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


def _stock_model(model):
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


def _image_spec(model, image_size):
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
    height, width, channels = input_shape[1:]
    if image_size is not None:
        size = image_size
        if isinstance(size, int):
            size = (size, size)
        if len(size) != 2 or any(
            fixed is not None and fixed != given
            for fixed, given in zip((height, width), size)
        ):
            raise ValueError(
                f"image_size {image_size} does not match the model's input "
                f"shape {input_shape}."
            )
        height, width = (int(s) for s in size)
    return height, width, channels


def _check_images(images, height, width, channels):
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


def _decode_batch(image_bytes, height, width, channels, resize_mode,
                  max_image_pixels):
    """Decodes a string vector to `[batch, height, width, channels]`.

    Each image's size is read from its header first and an image above
    `max_image_pixels` is not decoded. Decoding runs in a tf.data pass with
    `ignore_errors`, the only per-element error handling a graph has, so
    that a failure can be reported with the image's index.
    """
    count = tf.size(image_bytes, out_type=tf.int64)
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
    index, too_big, size, images = decoded.batch(count + 1).get_single_element()
    index, too_big, size, images = (t[:-1] for t in (index, too_big, size, images))

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
    with tf.control_dependencies([undecodable, oversized]):
        return tf.identity(images)


def _temp_owner(name):
    """`(pid, host)` of a temporary export directory's name, or `None`."""
    match = _TEMP_NAME.fullmatch(name)
    return (int(match.group(1)), match.group(2)) if match else None


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # Another user's live process.
    return True


def is_stale_temporary(path, now=None):
    """Whether a temporary export directory was abandoned.

    One of this host's is abandoned when the process named in it is gone;
    one of another host (a shared file system) or of an older naming when
    it has not changed for `STALE_TEMP_SECONDS`.

    Args:
        path: Path of a directory whose name starts with `.tmp-`.
        now: Current time (seconds since the epoch); defaults to now.

    Returns:
        A bool.
    """
    owner = _temp_owner(os.path.basename(path))
    if owner is not None and owner[1] == socket.gethostname():
        return not _pid_alive(owner[0])
    now = time.time() if now is None else now
    try:
        return now - os.lstat(path).st_mtime > STALE_TEMP_SECONDS
    except FileNotFoundError:
        return False


def remove_stale_temporaries(model_dir):
    """Removes abandoned temporary export directories of `model_dir`.

    Args:
        model_dir: A model's directory (`<base_dir>/<model_name>`).

    Returns:
        The names removed.
    """
    removed = []
    if not os.path.isdir(model_dir):
        return removed
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        if name.startswith(".tmp-") and os.path.isdir(path) and is_stale_temporary(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    return removed


def _fsync(path, directory=False):
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError as error:
        # Some file systems cannot sync a directory; nothing more to do.
        if error.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _publish_tree(root):
    """Makes `root` world-readable (0755 / 0644) and syncs it to disk."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(directory, name)
            os.chmod(path, FILE_MODE)
            _fsync(path)
        os.chmod(directory, DIR_MODE)
        _fsync(directory, directory=True)


def _makedirs(path):
    """`os.makedirs` whose new directories get mode 0755 whatever the umask."""
    missing = []
    while path and not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for directory in reversed(missing):
        try:
            os.mkdir(directory)
        except FileExistsError:
            continue
        os.chmod(directory, DIR_MODE)


def _exists_error(model_name, version, target):
    return FileExistsError(
        f"Version {version} of '{model_name}' already exists at {target}; "
        "pick another version or leave version=None for the next one."
    )


def _claim_version(tmp_dir, model_dir, model_name, version, fixed):
    """Renames `tmp_dir` to a free version of `model_dir`; returns the path.

    A rename onto a version that another exporter took meanwhile fails
    (EEXIST/ENOTEMPTY); with `fixed=False` the next number is tried.
    """
    while True:
        target = os.path.join(model_dir, str(version))
        if fixed and os.path.lexists(target):
            raise _exists_error(model_name, version, target)
        try:
            os.rename(tmp_dir, target)
            return target
        except OSError as error:
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                raise
            if fixed:
                raise _exists_error(model_name, version, target) from None
            version = max(version + 1, next_version(model_dir))


def export_for_serving(
    model,
    base_dir="saved_models",
    model_name=None,
    version=None,
    image_size=None,
    resize_mode="auto",
    max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS,
    run_id=None,
    allow_foreign_files=False,
):
    """Exports an image classifier for TF Serving; returns the version dir.

    The model is folded with `nbn_keras.conversion.fold_nbn` when it has
    layers with a fold hook (NBN, `GroupedConv2D`, RIDE's `ExpertAverage`:
    a RIDE model serves the mean of its experts' logits), so the SavedModel
    holds stock ops only. It is written to a
    temporary directory next to the target (ignored by TF Serving, whose
    versions are integer names), made world-readable (directories 0755,
    files 0644, whatever the umask), synced to disk and renamed into place,
    so a server never sees a half-written version. An existing version is
    never overwritten: with `version=None`, an export that finds its
    version taken by a concurrent one takes the next number. Temporary
    directories of exports that died are removed (see
    `remove_stale_temporaries`).

    Signatures: `serving_default` and `serve` take `images`, float32
    `[batch, H, W, C]` pixels in [0, 255] (what the training pipeline feeds
    the model); another shape and non-finite values fail with an error
    naming the expected shape. `serve_image_bytes` takes `image_bytes`, a
    string vector of encoded images, decoded and resized as in
    `decode_and_resize`; an image that cannot be decoded or has more than
    `max_image_pixels` pixels fails the request with an error naming its
    index. All return `logits`, `probabilities` and `classes` (int64), empty
    for an empty batch. The model must take raw pixels and output logits.

    Args:
        model: A Keras image classifier (one input `[batch, H, W, C]`, one
            logits output), NBN layers allowed.
        base_dir: Directory holding all served models.
        model_name: Name of the model under `base_dir`, the name clients
            use. Defaults to `model.name`.
        version: Integer version to write. Defaults to one more than the
            largest existing version (1 for the first export). A version that
            exists raises `FileExistsError`.
        image_size: `(H, W)` or an int, needed when the model's input has no
            fixed spatial size (it then also fixes the `images` signature).
        resize_mode: How `serve_image_bytes` fits images to the model:
            `"crop"` (resize to cover `size / 0.875`, centre crop: the
            ImageNet evaluation transform), `"resize"` (resize to `H x W`,
            for small-image models such as CIFAR ones), or `"auto"` (the
            default): `"crop"` when H and W are at least 128, else
            `"resize"`.
        max_image_pixels: Largest `height * width` of an image that
            `serve_image_bytes` decodes (read from the image's header, so a
            larger one costs nothing). Defaults to `4096 * 4096`.
        run_id: Identifies the export of one training run: it is recorded in
            the version's `assets.extra/`, and when a version of `model_name`
            already records it, that version is returned and nothing is
            written, so a run resumed after a kill exports exactly once.
        allow_foreign_files: Export even when `<base_dir>/<model_name>`
            holds entries other than versions (default: `ValueError` naming
            them, before anything is written).

    Returns:
        The path of the written version directory.

    Example:

    >>> path = export_for_serving(model, "saved_models", "resnet50_nbn")
    >>> served = tf.saved_model.load(path)
    >>> served.signatures["serving_default"](images=pixels)["classes"]
    """
    if resize_mode not in RESIZE_MODES:
        raise ValueError(
            f"Unknown resize_mode '{resize_mode}'; use one of {RESIZE_MODES}."
        )
    model_name = model_name or model.name
    if (not model_name or os.sep in model_name or model_name in (".", "..")
            or model_name.startswith(".tmp-")):
        raise ValueError(f"Invalid model_name {model_name!r}.")
    if version is not None and (
        isinstance(version, bool) or not isinstance(version, int) or version < 0
    ):
        raise ValueError(f"version must be a non-negative int, got {version!r}.")
    if (isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int)
            or max_image_pixels < 1):
        raise ValueError(
            f"max_image_pixels must be a positive int, got {max_image_pixels!r}."
        )

    height, width, channels = _image_spec(model, image_size)
    if height is None or width is None:
        raise ValueError(
            "The model's input has no fixed height and width; pass image_size."
        )
    if channels not in (1, 3):
        raise ValueError(
            f"Only 1- or 3-channel models can decode images, got {channels}."
        )
    if resize_mode == "auto":
        big = min(height, width) >= AUTO_CROP_MIN_SIZE
        resize_mode = "crop" if big else "resize"

    model_dir = os.path.join(base_dir, model_name)
    foreign = None if allow_foreign_files else foreign_model_dir_error(
        model_dir, "allow_foreign_files=True (--allow_foreign_export_dir)")
    if foreign:
        raise ValueError(foreign)
    if run_id is not None:
        exported = find_run_version(model_dir, run_id)
        if exported:
            return exported
    fixed = version is not None
    if version is None:
        version = next_version(model_dir)
    elif os.path.lexists(os.path.join(model_dir, str(version))):
        raise _exists_error(model_name, version,
                            os.path.join(model_dir, str(version)))

    served = _stock_model(model)
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

    def serve(images):
        return predict(_check_images(images, height, width, channels))

    def serve_image_bytes(image_bytes):
        return predict(_decode_batch(
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

    _makedirs(model_dir)
    remove_stale_temporaries(model_dir)
    tmp_dir = os.path.join(
        model_dir,
        f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{socket.gethostname()}",
    )
    os.mkdir(tmp_dir)
    try:
        archive.write_out(tmp_dir, verbose=False)
        if run_id is not None:
            extra = os.path.join(tmp_dir, "assets.extra")
            os.makedirs(extra, exist_ok=True)
            with open(os.path.join(extra, RUN_ID_FILENAME), "w") as f:
                json.dump({"run_id": run_id}, f)
        _publish_tree(tmp_dir)
        run_files.kill_point("export")
        target = _claim_version(tmp_dir, model_dir, model_name, version, fixed)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    _fsync(model_dir, directory=True)
    return target


def export_keras_file(
    model_path,
    base_dir="saved_models",
    model_name=None,
    version=None,
    image_size=None,
    resize_mode="auto",
    max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS,
    allow_foreign_files=False,
):
    """Loads a `.keras` file and exports it with `export_for_serving`.

    Args:
        model_path: Path of a `.keras` model file, checked and loaded with
            `nbn_keras.saving.load_model` (training configuration not
            loaded): a missing, truncated or damaged file raises an error
            naming it before anything is written.
        base_dir: See `export_for_serving`.
        model_name: See `export_for_serving`. Defaults to the file name
            without its extension.
        version: See `export_for_serving`.
        image_size: See `export_for_serving`.
        resize_mode: See `export_for_serving`.
        max_image_pixels: See `export_for_serving`.
        allow_foreign_files: See `export_for_serving`.

    Returns:
        The path of the written version directory.
    """
    model_path = os.fspath(model_path)
    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"No model file at '{model_path}'.")
    if not model_path.endswith(".keras"):
        raise ValueError(
            f"'{model_path}' is not a .keras file. Only whole-model .keras "
            "files can be exported; for a .weights.h5 file, rebuild the model, "
            "load the weights and call export_for_serving."
        )
    model = saving.load_model(model_path, compile=False)
    if model_name is None:
        model_name = os.path.basename(model_path)[: -len(".keras")]
    return export_for_serving(
        model,
        base_dir=base_dir,
        model_name=model_name,
        version=version,
        image_size=image_size,
        resize_mode=resize_mode,
        max_image_pixels=max_image_pixels,
        allow_foreign_files=allow_foreign_files,
    )


def parse_image_size(text):
    """`"H"` or `"HxW"` (the `--image_size` flag) as `(H, W)`, or `None`."""
    if not text:
        return None
    try:
        size = tuple(int(s) for s in text.lower().split("x"))
    except ValueError:
        size = ()
    if len(size) not in (1, 2) or min(size) < 1:
        raise ValueError(f"--image_size must be H or HxW, got '{text}'.")
    return size * 2 if len(size) == 1 else size


def run_from_flags(flag_values):
    """Exports the `.keras` file parsed flags name; returns the version dir.

    Args:
        flag_values: An `absl.flags.FlagValues` holding the flags of
            `define_flags`, parsed.

    Raises:
        SystemExit: With one line naming the problem, for a bad flag value,
            a missing or damaged model file or a taken version; nothing is
            written then.
    """
    f = flag_values
    try:
        return export_keras_file(
            f.model,
            base_dir=f.base_dir,
            model_name=f.model_name,
            version=f.version,
            image_size=parse_image_size(f.image_size),
            resize_mode=f.resize_mode,
            max_image_pixels=f.max_image_pixels,
            allow_foreign_files=f.allow_foreign_export_dir,
        )
    except (FileNotFoundError, FileExistsError, ValueError, TypeError) as error:
        raise SystemExit(f"nbn_keras.export: error: {error}") from None


def main(argv):
    """`python -m nbn_keras.export --model=path.keras [--base_dir=...]
    [--model_name=...] [--version=N] [--image_size=HxW] [--resize_mode=...]
    [--max_image_pixels=N]`.

    Prints the written version directory. The flags are defined only when
    the module runs as a script, so importing it adds no global flags.
    """
    from absl import app
    from absl import flags

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    interrupts.exit_on_signals("a version is published whole or not at all; run the "
                               "command again if none was printed.")
    print(run_from_flags(flags.FLAGS))


def define_flags(flag_values=None):
    """Defines the command's flags on `flag_values` (default: global)."""
    from absl import flags

    fv = flags.FLAGS if flag_values is None else flag_values
    flags.DEFINE_string("model", None, "Path of the .keras model file.",
                        flag_values=fv)
    flags.DEFINE_string("base_dir", "saved_models", "Served models directory.",
                        flag_values=fv)
    flags.DEFINE_string(
        "model_name", None, "Model name; defaults to the file name.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "version", None, "Version; defaults to the next free one.",
        lower_bound=0, flag_values=fv,
    )
    flags.DEFINE_string(
        "image_size", None, "H or HxW, for models without a fixed input size.",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "resize_mode", "auto", list(RESIZE_MODES),
        "How serve_image_bytes fits images to the model.", flag_values=fv,
    )
    flags.DEFINE_integer(
        "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS,
        "Largest height * width serve_image_bytes decodes; larger images are "
        "refused with an error naming their index.",
        lower_bound=1, flag_values=fv,
    )
    flags.DEFINE_boolean(
        "allow_foreign_export_dir", False,
        "Export although <base_dir>/<model_name> holds entries other than "
        "model versions.", flag_values=fv,
    )
    flags.mark_flag_as_required("model", flag_values=fv)
