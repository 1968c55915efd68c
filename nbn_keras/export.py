"""Exporting a trained classifier as a TF Serving SavedModel.

The export is written to `<base_dir>/<model_name>/<version>/`, the layout
TF Serving polls, and contains stock TensorFlow ops only: NBN layers are
folded into plain BatchNormalization first, so serving needs neither Python
nor nbn_keras. Two signatures:

- `serving_default` (also `serve`): `images`, float32 `[batch, H, W, C]` raw
  pixels in [0, 255], exactly as the training pipeline yields them (the
  model normalises inside its graph).
- `serve_image_bytes`: `image_bytes`, a string vector of encoded images
  (JPEG, PNG, GIF's first frame, BMP), decoded and resized in the graph.

Both return `logits`, `probabilities` (softmax) and `classes` (argmax,
int64).

From the command line, any `.keras` file (the trainer's checkpoints) can be
exported:

```
python -m nbn_keras.export --model=runs/x/best.keras --base_dir=saved_models \
    --model_name=resnet50_nbn
```
"""

import os
import shutil
import tempfile

import keras
import tensorflow as tf

from nbn_keras import run_files
from nbn_keras.conversion import fold_nbn
from nbn_keras.conversion import leaf_layers
from nbn_keras.data import transforms

RESIZE_MODES = ("auto", "crop", "resize")
# Written into each version's `assets.extra/`, which TF Serving ignores.
RUN_ID_FILENAME = "nbn_keras_run.json"
# Models at least this large (in both H and W) get "crop" under "auto".
AUTO_CROP_MIN_SIZE = 128


def next_version(model_dir):
    """Returns 1 + the largest integer-named entry of `model_dir` (or 1).

    Entries whose names are not plain integers (temporary directories, a
    README, ...) are ignored, as TF Serving ignores them.
    """
    if not os.path.isdir(model_dir):
        return 1
    versions = [int(n) for n in os.listdir(model_dir) if n.isdigit()]
    return max(versions, default=0) + 1


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
    `nbn_keras.data.transforms.center_crop_resize`): the central square of
    side `short side * 224 / 256` is cut out and resized, bilinear, to
    `height x width` ("resize 256, centre crop 224").

    Args:
        image_bytes: A scalar string tensor.
        height: Output height.
        width: Output width.
        channels: Output channels, 1 or 3.
        resize_mode: `"resize"` or `"crop"`.

    Returns:
        A float32 tensor of shape `[height, width, channels]`.
    """
    image = tf.io.decode_image(
        image_bytes, channels=channels, dtype=tf.uint8, expand_animations=False
    )
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
    # The evaluation transform of the data pipeline, exactly: crop the
    # central square first, then resize (bilinear, no antialiasing).
    y, x, side, _ = tf.unstack(transforms.center_crop_window(h, w))
    image = tf.image.crop_to_bounding_box(image, y, x, side, side)
    image = tf.image.resize(image, [height, width], method="bilinear")
    image.set_shape([height, width, channels])
    return image


def _is_nbn_layer(layer):
    return type(layer).__module__.startswith("nbn_keras")


def _stock_model(model):
    """`model` with NBN folded away; raises if a custom layer would remain."""
    if any(_is_nbn_layer(layer) for layer in leaf_layers(model)):
        model = fold_nbn(model)
    left = sorted(l.name for l in leaf_layers(model) if _is_nbn_layer(l))
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


def export_for_serving(
    model,
    base_dir="saved_models",
    model_name=None,
    version=None,
    image_size=None,
    resize_mode="auto",
    run_id=None,
):
    """Exports an image classifier for TF Serving; returns the version dir.

    The model is folded with `nbn_keras.conversion.fold_nbn` when it has NBN
    layers, so the SavedModel holds stock ops only. It is written to a
    temporary directory next to the target (ignored by TF Serving, whose
    versions are integer names) and renamed into place, so a server never
    sees a half-written version. An existing version is never overwritten.

    Signatures: `serving_default` and `serve` take `images`, float32
    `[batch, H, W, C]` pixels in [0, 255] (what the training pipeline feeds
    the model); `serve_image_bytes` takes `image_bytes`, a string vector of
    encoded images, decoded and resized as in `decode_and_resize`. All
    return `logits`, `probabilities` and `classes` (int64). The model must
    take raw pixels and output logits.

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
        run_id: Identifies the export of one training run: it is recorded in
            the version's `assets.extra/`, and when a version of `model_name`
            already records it, that version is returned and nothing is
            written, so a run resumed after a kill exports exactly once.

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
    if not model_name or os.sep in model_name or model_name in (".", ".."):
        raise ValueError(f"Invalid model_name {model_name!r}.")
    if version is not None and (
        isinstance(version, bool) or not isinstance(version, int) or version < 0
    ):
        raise ValueError(f"version must be a non-negative int, got {version!r}.")

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
    if run_id is not None:
        exported = find_run_version(model_dir, run_id)
        if exported:
            return exported
    if version is None:
        version = next_version(model_dir)
    target = os.path.join(model_dir, str(version))
    if os.path.exists(target):
        raise FileExistsError(
            f"Version {version} of '{model_name}' already exists at {target}; "
            "pick another version or leave version=None for the next one."
        )

    served = _stock_model(model)
    input_dtype = served.inputs[0].dtype

    def predict(images):
        logits = served(tf.cast(images, input_dtype), training=False)
        logits = tf.cast(logits, tf.float32)
        return {
            "logits": logits,
            "probabilities": tf.nn.softmax(logits),
            "classes": tf.argmax(logits, axis=-1, output_type=tf.int64),
        }

    def serve(images):
        return predict(images)

    def serve_image_bytes(image_bytes):
        images = tf.map_fn(
            lambda b: decode_and_resize(b, height, width, channels, resize_mode),
            image_bytes,
            fn_output_signature=tf.TensorSpec(
                [height, width, channels], tf.float32
            ),
        )
        return predict(images)

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

    os.makedirs(model_dir, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=model_dir)
    try:
        archive.write_out(tmp_dir, verbose=False)
        if run_id is not None:
            extra = os.path.join(tmp_dir, "assets.extra")
            os.makedirs(extra, exist_ok=True)
            run_files.write_json(os.path.join(extra, RUN_ID_FILENAME), {"run_id": run_id})
        run_files.kill_point("export")
        os.rename(tmp_dir, target)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return target


def export_keras_file(
    model_path,
    base_dir="saved_models",
    model_name=None,
    version=None,
    image_size=None,
    resize_mode="auto",
):
    """Loads a `.keras` file and exports it with `export_for_serving`.

    Args:
        model_path: Path of a `.keras` model file (nbn_keras layers are
            resolved; training configuration is not loaded).
        base_dir: See `export_for_serving`.
        model_name: See `export_for_serving`. Defaults to the file name
            without its extension.
        version: See `export_for_serving`.
        image_size: See `export_for_serving`.
        resize_mode: See `export_for_serving`.

    Returns:
        The path of the written version directory.
    """
    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"No model file at '{model_path}'.")
    if not model_path.endswith(".keras"):
        raise ValueError(
            f"'{model_path}' is not a .keras file. Only whole-model .keras "
            "files can be exported; for a .weights.h5 file, rebuild the model, "
            "load the weights and call export_for_serving."
        )
    model = keras.models.load_model(model_path, compile=False)
    if model_name is None:
        model_name = os.path.basename(model_path)[: -len(".keras")]
    return export_for_serving(
        model,
        base_dir=base_dir,
        model_name=model_name,
        version=version,
        image_size=image_size,
        resize_mode=resize_mode,
    )


def main(argv):
    """`python -m nbn_keras.export --model=path.keras [--base_dir=...]
    [--model_name=...] [--version=N] [--image_size=HxW] [--resize_mode=...]`.

    Prints the written version directory. The flags are defined only when
    the module runs as a script, so importing it adds no global flags.
    """
    from absl import app
    from absl import flags

    del argv
    f = flags.FLAGS
    image_size = None
    if f.image_size:
        try:
            image_size = tuple(int(s) for s in f.image_size.lower().split("x"))
        except ValueError:
            raise app.UsageError(
                f"--image_size must be H or HxW, got '{f.image_size}'."
            )
        image_size = image_size * 2 if len(image_size) == 1 else image_size
    try:
        path = export_keras_file(
            f.model,
            base_dir=f.base_dir,
            model_name=f.model_name,
            version=f.version,
            image_size=image_size,
            resize_mode=f.resize_mode,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        raise SystemExit(f"nbn_keras.export: error: {error}")
    print(path)


def _define_flags():
    from absl import flags

    flags.DEFINE_string("model", None, "Path of the .keras model file.")
    flags.DEFINE_string("base_dir", "saved_models", "Served models directory.")
    flags.DEFINE_string(
        "model_name", None, "Model name; defaults to the file name."
    )
    flags.DEFINE_integer(
        "version", None, "Version; defaults to the next free one.", lower_bound=0
    )
    flags.DEFINE_string(
        "image_size", None, "H or HxW, for models without a fixed input size."
    )
    flags.DEFINE_enum(
        "resize_mode", "auto", list(RESIZE_MODES),
        "How serve_image_bytes fits images to the model.",
    )
    flags.mark_flag_as_required("model")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
