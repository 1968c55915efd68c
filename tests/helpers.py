"""Helpers the test modules share: image bytes, tiny models, the user's files,
command lines and generated data files.

The bad-input cases of every module are `pytest.param` rows made with
`bad_input` and run with `check_bad_input`: each asserts its specific error
and that nothing the user had (a checkpoint, a backup, an earlier export,
the case's own input files) was changed, removed or added to.
"""

import fcntl
import gzip
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags

import nbn_keras
from nbn_keras.data import fashion_mnist
from nbn_keras.training import config as config_lib

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


# --------------------------------------------------------------------------
# Commands and their flags.


def parse_run(*argv):
    """`(TrainConfig, RunOptions)` of a command line, parsed apart from the global flags."""
    flag_values = flags.FlagValues()
    config_lib.define_flags(flag_values)
    flag_values(["train", *argv])
    return config_lib.from_flags(flag_values), config_lib.options_from_flags(flag_values)


def parse_config(*argv):
    """The `TrainConfig` of a command line, parsed apart from the global flags."""
    return parse_run(*argv)[0]


def shared_training_run(tmp_path_factory, name, *flags):
    """Runs `python -m nbn_keras.train *flags` once per test session.

    pytest-xdist workers share the run through a lock on a directory of the
    session's base temporary directory. The command gets `--run_dir=<root>/run`
    and `--export_dir=<root>/exports`; returns `<root>`. Tests must not modify
    these files (copy them first).
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # The directory all workers of this session share.
    root = root / name
    with open(f"{root}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = root / "done.json"
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            result = subprocess.run(
                [sys.executable, "-m", "nbn_keras.train", *flags,
                 f"--run_dir={root / 'run'}", f"--export_dir={root / 'exports'}"],
                cwd=REPO, capture_output=True, text=True, timeout=900,
            )
            assert result.returncode == 0, result.stderr[-4000:]
            done.write_text(json.dumps({"returncode": result.returncode}))
    return root


# Checks exports in a process that cannot import nbn_keras: `load.py
# cases.json` checks one file of cases; `load.py -` checks each cases file
# named on a line of stdin, answering a line each (TensorFlow loads once).
SERVING_CHECK_SCRIPT = textwrap.dedent(
    """
    import json, sys, traceback
    sys.modules["nbn_keras"] = None  # importing nbn_keras must fail
    try:
        import nbn_keras
    except ImportError:
        pass
    else:
        raise SystemExit("nbn_keras was importable")
    import numpy as np
    import tensorflow as tf

    def check(cases_file):
        cases = json.load(open(cases_file))
        for case in cases:
            served = tf.saved_model.load(case["dir"])
            expected = np.load(case["expected"])
            if "images" in case:
                images = tf.constant(np.load(case["images"]))
                calls = [served.signatures[name](images=images)
                         for name in ("serving_default", "serve")]
            else:
                data = [open(f, "rb").read() for f in case["bytes"]]
                calls = [served.signatures["serve_image_bytes"](
                    image_bytes=tf.constant(data))]
            for outputs in calls:
                logits = outputs["logits"].numpy()
                # Folded BN rounds differently, by about 1e-7 of the largest
                # logit (up to 3e-7 measured with oneDNN), so a small logit
                # next to large ones differs by more than 1e-5 of itself.
                scale = float(np.abs(expected).max())
                np.testing.assert_allclose(logits, expected, rtol=1e-5,
                                           atol=1e-5 + 1e-6 * scale,
                                           equal_nan=False, err_msg=str(case))
                probs = np.exp(expected - expected.max(1, keepdims=True))
                probs /= probs.sum(1, keepdims=True)
                np.testing.assert_allclose(outputs["probabilities"].numpy(), probs,
                                           atol=1e-5)
                assert outputs["classes"].dtype == tf.int64
                np.testing.assert_array_equal(outputs["classes"].numpy(),
                                              expected.argmax(1))
        return f"checked {len(cases)}"

    if sys.argv[1] != "-":
        print(check(sys.argv[1]))
    else:
        for line in sys.stdin:
            try:
                answer = check(line.strip())
            except Exception:
                answer = "failed: " + traceback.format_exc().replace("\\n", " | ")
            print(answer, flush=True)
    """
)


# --------------------------------------------------------------------------
# Data files.


def class_dir(c):
    """Class 1 has a CJK and accented name: UTF-8 paths go through every run."""
    return "\u5199\u771f caf\u00e9" if c == 1 else f"class{c}"


def write_jpeg_list_files(root, num_classes=3, per_class=2):
    """A tiny ImageNet-LT-style image tree and its list files."""
    rng = np.random.default_rng(0)
    lines = []
    for c in range(num_classes):
        os.makedirs(os.path.join(root, class_dir(c)), exist_ok=True)
        for i in range(per_class):
            path = f"{class_dir(c)}/{i}.jpg"
            pixels = rng.integers(0, 256, (40, 48, 3), np.uint8)
            tf.io.write_file(os.path.join(root, path), tf.io.encode_jpeg(pixels))
            lines.append(f"{path} {c}")
    list_file = os.path.join(root, "list.txt")
    with open(list_file, "w") as f:
        f.write("\n".join(lines) + "\n")
    return [f"--image_root={root}", f"--train_list={list_file}",
            f"--val_list={list_file}", f"--test_list={list_file}"]


def idx_bytes(array):
    # The idx layout written from its definition (LeCun's MNIST page):
    # 0, 0, type 0x08 (unsigned byte), number of dimensions, big-endian sizes.
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fashion_mnist(directory, train_per_class=60, test_per_class=5):
    """Writes four small idx `.gz` files and their `sha256sum` file.

    Image `i` of a split stores `i // 256`, `i % 256` and its label in its
    first three pixels, so a test can tell which image ended where.

    Returns:
        `(checksums, sha256sum file path)`.
    """
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    checksums = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = rng.permutation(np.arange(10 * per_class) % 10).astype(np.uint8)
        images = rng.integers(0, 256, (len(labels), 28, 28), np.uint8)
        index = np.arange(len(labels))
        images[:, 0, 0], images[:, 0, 1], images[:, 0, 2] = index // 256, index % 256, labels
        for name, array in zip(fashion_mnist.FILES[split], (images, labels)):
            raw = gzip.compress(idx_bytes(array))
            with open(os.path.join(directory, name), "wb") as f:
                f.write(raw)
            checksums[name] = (hashlib.sha256(raw).hexdigest(),)
    path = os.path.join(directory, "SHA256SUMS")
    with open(path, "w") as f:
        f.writelines(f"{digest}  {name}\n" for name, (digest,) in checksums.items())
    return checksums, path
