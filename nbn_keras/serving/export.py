"""The export command: a trained classifier as a TF Serving SavedModel.

The export is written to `<base_dir>/<model_name>/<version>/`, the layout
TF Serving polls, and contains stock TensorFlow ops only: NBN layers are
folded into plain BatchNormalization first, so serving needs neither Python
nor nbn_keras (every layer that says how it folds, through its
`stock_equivalent` method, is folded: see `nbn_keras.conversion.fold_nbn`;
a RIDE model serves the mean of its experts' logits). The package's parts:

- `nbn_keras.serving.signatures`: the folded model and the signatures
  `serving_default` / `serve` (`images`, float32 raw pixels) and
  `serve_image_bytes` (`image_bytes`, encoded images).
- `nbn_keras.serving.decoding`: in-graph decoding, resizing and header
  sniffing of encoded images.
- `nbn_keras.serving.versions`: version directories, written whole or not
  at all, one version per exporter when several run at once.

From the command line, any `.keras` file (the trainer's checkpoints) can be
exported:

```
python -m nbn_keras.export --model=runs/x/best.keras --base_dir=saved_models \
    --model_name=resnet50_nbn
```
"""

import os

from nbn_keras import interrupts
from nbn_keras import saving
from nbn_keras.serving import decoding
from nbn_keras.serving import signatures
from nbn_keras.serving import versions
from nbn_keras.serving.decoding import DEFAULT_MAX_IMAGE_PIXELS
from nbn_keras.serving.decoding import RESIZE_MODES


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
    `nbn_keras.serving.versions.write_version`).

    Signatures: `serving_default` and `serve` take `images`, float32
    `[batch, H, W, C]` pixels in [0, 255] (what the training pipeline feeds
    the model); another shape and non-finite values fail with an error
    naming the expected shape. `serve_image_bytes` takes `image_bytes`, a
    string vector of encoded images, decoded and resized as in
    `nbn_keras.serving.decoding.decode_and_resize`; an image that cannot be decoded or has more than
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
    decoding.check_resize_mode(resize_mode)
    model_name = model_name or model.name
    versions.check_model_name(model_name)
    versions.check_version(version)
    decoding.check_max_image_pixels(max_image_pixels)
    height, width, channels = signatures.image_spec(model, image_size)
    resize_mode = decoding.resolve_resize_mode(resize_mode, height, width)

    model_dir = os.path.join(base_dir, model_name)
    foreign = None if allow_foreign_files else versions.foreign_model_dir_error(
        model_dir, "allow_foreign_files=True (--allow_foreign_export_dir)")
    if foreign:
        raise ValueError(foreign)
    if run_id is not None:
        exported = versions.find_run_version(model_dir, run_id)
        if exported:
            return exported
    version, fixed = versions.choose_version(model_dir, model_name, version)
    archive = signatures.export_archive(
        model, height, width, channels, resize_mode, max_image_pixels)
    return versions.write_version(
        lambda path: archive.write_out(path, verbose=False),
        model_dir, model_name, version, fixed, run_id)


def export_keras_file(model_path, base_dir="saved_models", model_name=None, **options):
    """Loads a `.keras` file and exports it with `export_for_serving`.

    Args:
        model_path: Path of a `.keras` model file, checked and loaded with
            `nbn_keras.saving.load_model` (training configuration not
            loaded): a missing, truncated or damaged file raises an error
            naming it before anything is written.
        base_dir: See `export_for_serving`.
        model_name: See `export_for_serving`. Defaults to the file name
            without its extension.
        **options: The other arguments of `export_for_serving` (`version`,
            `image_size`, `resize_mode`, `max_image_pixels`,
            `allow_foreign_files`).

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
    return export_for_serving(model, base_dir=base_dir, model_name=model_name, **options)


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
    from absl import flags

    interrupts.start_command(argv, "a version is published whole or not at all; run the "
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
