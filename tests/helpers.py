"""Helpers the test modules share: image bytes, tiny models, the user's files.

The bad-input cases of every module are `pytest.param` rows made with
`bad_input` and run with `check_bad_input`: each asserts its specific error
and that nothing the user had (a checkpoint, a backup, an earlier export,
the case's own input files) was changed, removed or added to.
"""

import hashlib
import io
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

import nbn_keras

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
SIZE = 12  # Side of the tiny classifiers' input.


# --------------------------------------------------------------------------
# Image bytes.


def jpeg_bytes(height=40, width=48, seed=0):
    """A smooth random RGB image as JPEG bytes (decodes without surprises).

    Args:
        height: image height.
        width: image width.
        seed: seed of the random colours.

    Returns:
        The encoded bytes.

    Example:
        >>> tf.io.decode_jpeg(jpeg_bytes(8, 9)).shape
        TensorShape([8, 9, 3])
    """
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (1, 5, 6, 3)).astype("float32")
    image = tf.image.resize(coarse, [height, width])[0]
    return tf.io.encode_jpeg(tf.cast(image, tf.uint8), quality=90).numpy()


def png_bytes(height=40, width=48, seed=0):
    """Random RGB noise as PNG bytes.

    Args:
        height: image height.
        width: image width.
        seed: seed of the pixels.

    Returns:
        The encoded bytes.

    Example:
        >>> tf.io.decode_png(png_bytes(8, 9)).shape
        TensorShape([8, 9, 3])
    """
    rng = np.random.default_rng(seed)
    return tf.io.encode_png(rng.integers(0, 256, (height, width, 3), np.uint8)).numpy()


def pil_bytes(image, fmt):
    """A PIL image saved in `fmt` ("PNG", "JPEG", "GIF", "BMP"), as bytes.

    Args:
        image: a `PIL.Image.Image`.
        fmt: PIL's format name.

    Returns:
        The encoded bytes.

    Example:
        >>> from PIL import Image
        >>> pil_bytes(Image.new("RGB", (4, 3)), "GIF")[:3]
        b'GIF'
    """
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def jpeg_cut_after_scan_header(data):
    """A JPEG whose header is valid and whose image data stops at once."""
    return data[: data.find(b"\xff\xda") + 20]


def jpeg_with_corrupt_data(data, seed=0):
    """A JPEG with a valid header and its image data replaced by noise."""
    start, rng = data.find(b"\xff\xda") + 20, np.random.default_rng(seed)
    noise = rng.integers(0, 256, len(data) - start - 20, np.uint8).tobytes()
    return data[:start] + noise + data[-20:]


def png_header_only(height, width):
    """The first 33 bytes of a PNG: signature and IHDR chunk, no data."""
    ihdr = height.to_bytes(4, "big")
    return (b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\x0dIHDR" + width.to_bytes(4, "big")
            + ihdr + b"\x08\x02\x00\x00\x00" + b"\x00" * 4)


# --------------------------------------------------------------------------
# Tiny models.


def tiny_classifier(size=SIZE, channels=3, name="tiny"):
    """A plain-BN classifier of 4 classes with non-trivial BN statistics.

    Its BN is named like a ResNet block's (`stack_0_block1_1_bn`) and its input
    `pixels`; the export tests fold and serve it.

    Args:
        size: side of the input.
        channels: input channels.
        name: the model's name.

    Returns:
        A `keras.Model` taking pixels in [0, 255].

    Example:
        >>> tiny_classifier().output_shape
        (None, 4)
    """
    inputs = keras.Input((size, size, channels), name="pixels")
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Normalization(
        mean=[0.5] * channels, variance=[0.06] * channels
    )(x)
    x = keras.layers.Conv2D(6, 3, padding="same")(x)
    x = keras.layers.BatchNormalization(name="stack_0_block1_1_bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(4)(x)
    model = keras.Model(inputs, outputs, name=name)
    rng = np.random.default_rng(0)
    bn = model.get_layer("stack_0_block1_1_bn")
    bn.set_weights([
        rng.uniform(0.5, 2.0, 6), rng.normal(size=6),
        rng.normal(size=6) * 0.1, rng.uniform(0.5, 2.0, 6),
    ])
    return model


def users_classifier(name="tiny"):
    """The user's model in the bad-input cases: 12x12 RGB, one NBN, 4 classes.

    Its NBN layer is named `batch_normalization` (Keras' default name for a
    first BN, given here so that it does not depend on what the process
    built before), which the `.keras` cases' messages name.

    Args:
        name: the model's name.

    Returns:
        A `keras.Model` with every BN converted to NBN.

    Example:
        >>> users_classifier().output_shape
        (None, 4)
    """
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same")(x)
    x = keras.layers.BatchNormalization(name="batch_normalization")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(4)(x), name=name)
    return nbn_keras.convert_to_nbn(model, selection="all")


# --------------------------------------------------------------------------
# The user's files, and the check that a bad input left them as they were.


def snapshot(*roots):
    """`{path: sha256 or "dir"}` of everything under `roots`.

    Args:
        *roots: files or directories.

    Returns:
        A dict comparable before and after an action.

    Example:
        >>> before = snapshot(tmp_path)
        >>> assert snapshot(tmp_path) == before
    """
    found = {}
    for root in roots:
        root = str(root)
        if os.path.isfile(root):
            found[root] = hashlib.sha256(open(root, "rb").read()).hexdigest()
            continue
        for directory, dirs, files in os.walk(root):
            for name in dirs:
                found[os.path.join(directory, name)] = "dir"
            for name in files:
                path = os.path.join(directory, name)
                found[path] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return found


class UserFiles:
    """What a bad-input case works next to, and the proof it changed nothing.

    Args:
        request: the test's pytest request (for the shared training run).
        tmp: the case's own directory; its inputs are written there.
        user: the user's files (`user` fixture): `run/best.keras`,
            `run/backup/latest.weights.h5`, `saved_models/m/1/`.

    Example:
        >>> ctx = UserFiles(request, tmp_path, user)
        >>> (ctx.tmp / "in.txt").write_text("bad")
        >>> ctx.ready()  # The inputs are written: they too must stay.
        >>> ...  # The bad input is refused.
        >>> ctx.assert_unchanged()
    """

    def __init__(self, request, tmp, user):
        self.request, self.tmp, self.user = request, tmp, user
        self.protected = [user, tmp]
        self.before = None

    def ready(self):
        """Marks the case's inputs written: they too must stay as they are."""
        self.before = snapshot(*self.protected)

    def trained_best(self):
        """The shared training run's `best.keras`, protected from now on."""
        best = self.request.getfixturevalue("trained_run")["run_dir"] / "best.keras"
        if best not in self.protected:
            self.protected.append(best)
        return best

    def trained_copy(self, name="model.keras"):
        """A copy of the trained `best.keras` in the case's directory."""
        target = self.tmp / name
        shutil.copyfile(self.trained_best(), target)
        return target

    def assert_unchanged(self):
        """Nothing protected was changed, removed or added to since `ready`."""
        assert snapshot(*self.protected) == self.before


def bad_input(id, act, error, message, slow=False):
    """One row of a module's bad-input table (a `pytest.param`).

    Args:
        id: the case's id (its node id, and its name in the README's table).
        act: `act(ctx, *args)` gives the bad input; `ctx` is a `UserFiles`.
        error: the exception type it must raise, or None when `act` checks
            the outcome itself (input accepted or skipped).
        message: regular expression the error must match (with `error=None`,
            the outcome in words).
        slow: marks the case `slow`.

    Returns:
        `pytest.param(act, error, message)`.

    Example:
        >>> CASES = [bad_input("empty_list", empty_list, ValueError, r"no entries")]
        >>> @pytest.mark.parametrize("act, error, message", CASES)
        ... def test_bad_list(act, error, message, user_files): ...
    """
    return pytest.param(act, error, message, id=id,
                        marks=[pytest.mark.slow] if slow else [])


def check_bad_input(ctx, act, error, message, *args):
    """Runs `act(ctx, *args)`: its error, then nothing the user had changed.

    Args:
        ctx: the case's `UserFiles`.
        act, error, message: a row made by `bad_input`.
        *args: more arguments for `act` (the module's own fixtures).

    Example:
        >>> check_bad_input(ctx, empty_list, ValueError, r"no entries", lists)
    """
    ctx.ready()
    if error is None:
        act(ctx, *args)
    else:
        with pytest.raises(error, match=message):
            act(ctx, *args)
    # Nothing the user had (checkpoint, backup, earlier export, the case's
    # own list and image files) was changed, removed or added to.
    ctx.assert_unchanged()
