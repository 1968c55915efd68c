"""Bad input: each case asserts its specific error and that nothing was lost.

The cases are grouped by what is bad: list files, image files, serving
inputs, `.keras` files and export flags (the README's "Bad input" table lists
them). Every case runs next to a user's files (a checkpoint, a backup, an
earlier export), and its own input files, all hashed before and after: a bad
input may stop the work but must never change, remove or add to them.
"""

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import types
import warnings
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags

import nbn_keras
import nbn_keras.data as nbn_data
from nbn_keras.training import config as config_lib
from nbn_keras.serving import export
from nbn_keras.training import driver as train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
SIZE = 12  # Side of the served test model's input.
MAX_PIXELS = 40 * 40  # Its max_image_pixels.


# --------------------------------------------------------------------------
# The user's files and the snapshots that prove nothing was lost.


def snapshot(*roots):
    """`{path: sha256 or "dir"}` of everything under `roots`."""
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


def tiny_classifier(name="tiny"):
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(4)(x), name=name)
    return nbn_keras.convert_to_nbn(model, selection="all")


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """A user's files: a checkpoint, a backup and export version 1 of `m`."""
    root = tmp_path_factory.mktemp("user")
    model = tiny_classifier()
    model.compile(optimizer=nbn_keras.training.optimizers.CoupledSGD(0.1, momentum=0.9),
                  loss=nbn_keras.training.losses.cross_entropy())
    (root / "run" / "backup").mkdir(parents=True)
    model.save(root / "run" / "best.keras")
    model.save_weights(root / "run" / "backup" / "latest.weights.h5")
    export.export_for_serving(model, str(root / "saved_models"), "m")
    return root


# --------------------------------------------------------------------------
# Inputs.


def jpeg_bytes(height=40, width=48, seed=0):
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (1, 5, 6, 3)).astype("float32")
    image = tf.image.resize(coarse, [height, width])[0]
    return tf.io.encode_jpeg(tf.cast(image, tf.uint8), quality=90).numpy()


def png_bytes(height=40, width=48, seed=0):
    rng = np.random.default_rng(seed)
    return tf.io.encode_png(rng.integers(0, 256, (height, width, 3), np.uint8)).numpy()


def pil_bytes(fmt, height, width):
    from PIL import Image  # Installed with matplotlib.

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 60)).save(buffer, format=fmt)
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


def write_list_root(root):
    """6 training JPEGs (3 classes) and 2 validation images with lists."""
    lines = []
    for i in range(6):
        name = f"train/c{i % 3}/{i}.jpg"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(jpeg_bytes(seed=i))
        lines.append(f"{name} {i % 3}")
    (root / "val").mkdir()
    (root / "val" / "a.png").write_bytes(png_bytes(seed=7))
    (root / "val" / "b.jpg").write_bytes(jpeg_bytes(seed=8))
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    (root / "val.txt").write_text("val/a.png 0\nval/b.jpg 2\n")
    return root


def load(root, **options):
    return nbn_data.load(
        "imagenet_lt", train_list=str(root / "train.txt"),
        val_list=str(root / "val.txt"), image_root=str(root), image_size=16,
        **options)


def append(path, text):
    with open(path, "a") as f:
        f.write(text)


def iterate(ds):
    return sum(int(images.shape[0]) for images, _ in ds)


# --------------------------------------------------------------------------
# The cases.


@dataclasses.dataclass
class Case:
    group: str
    id: str
    what: str  # The bad input, for the README table.
    error: type  # None: `act` checks the outcome itself.
    message: str  # Regular expression the error (or outcome) must match.
    act: object  # act(ctx) -> None; raises the error.
    slow: bool = False


CASES = []


def case(group, what, error, message, slow=False):
    def register(act):
        CASES.append(Case(group, act.__name__, what, error, message, act, slow))
        return act

    return register


# List files.


@case("list file", "label 999 with num_classes=3", ValueError,
      r"train\.txt, line 7: label 999 is not in \[0, 3\) \(num_classes=3\)")
def label_above_num_classes(ctx):
    append(ctx.lists / "train.txt", "train/c0/extra.jpg 999\n")
    ctx.ready()
    load(ctx.lists, num_classes=3)


@case("list file", "stray label 999 in the training list, classes inferred", ValueError,
      r"train\.txt, line 7: label 999 makes 1000 classes, but 996 of them "
      r"\(3, 4, 5, 6, 7, \.\.\.\) have no training image")
def stray_label_with_inferred_classes(ctx):
    append(ctx.lists / "train.txt", "train/c0/extra.jpg 999\n")
    ctx.ready()
    load(ctx.lists)


@case("list file", "validation label beyond the training classes", ValueError,
      r"val\.txt, line 2: label 7 is not in \[0, 3\) \(num_classes=3, inferred from "
      r"the training list")
def val_label_beyond_training_classes(ctx):
    (ctx.lists / "val.txt").write_text("val/a.png 0\nval/b.jpg 7\n")
    ctx.ready()
    load(ctx.lists)


@case("list file", "test label beyond num_classes", ValueError,
      r"test\.txt, line 1: label 5 is not in \[0, 4\) \(num_classes=4\)")
def label_of_the_test_list_beyond_num_classes(ctx):
    (ctx.lists / "test.txt").write_text("val/a.png 5\n")
    ctx.ready()
    load(ctx.lists, num_classes=4, test_list=str(ctx.lists / "test.txt"))


@case("list file", "negative label", ValueError,
      r"train\.txt, line 7: expected 'relative/path label' with an integer label >= 0, "
      r"got 'train/c0/0\.jpg -1': the label -1 is negative\.")
def negative_label(ctx):
    append(ctx.lists / "train.txt", "train/c0/0.jpg -1\n")
    ctx.ready()
    load(ctx.lists)


@case("list file", "label that is not a number", ValueError,
      r"train\.txt, line 7: expected 'relative/path label'.*'train/c0/0\.jpg cat'")
def non_integer_label(ctx):
    append(ctx.lists / "train.txt", "train/c0/0.jpg cat\n")
    ctx.ready()
    load(ctx.lists)


@case("list file", "line without a label", ValueError,
      r"val\.txt, line 2: expected 'relative/path label'")
def line_without_label(ctx):
    (ctx.lists / "val.txt").write_text("val/a.png 0\nval/b.jpg\n")
    ctx.ready()
    load(ctx.lists)


@case("list file", "label in Arabic-Indic digits", ValueError,
      r"train\.txt, line 7: .*: the label '\u0663' has digits other than ASCII 0-9 "
      r"\(U\+0663 ARABIC-INDIC DIGIT THREE\)\.")
def arabic_indic_label(ctx):
    append(ctx.lists / "train.txt", "train/c0/0.jpg \u0663\n")
    ctx.ready()
    load(ctx.lists)


@case("list file", "label in fullwidth digits", ValueError,
      r"train\.txt, line 7: .*: the label '\uff13' has digits other than ASCII 0-9 "
      r"\(U\+FF13 FULLWIDTH DIGIT THREE\)\.")
def fullwidth_label(ctx):
    append(ctx.lists / "train.txt", "train/c0/0.jpg \uff13\n")
    ctx.ready()
    load(ctx.lists)


@case("list file", "label 2147483648 (beyond int32)", ValueError,
      r"train\.txt, line 7: .*: the label 2147483648 is larger than 2147483647\.")
def label_beyond_int32(ctx):
    append(ctx.lists / "train.txt", "train/c0/0.jpg 2147483648\n")
    ctx.ready()
    load(ctx.lists)


@case("list file", "stray label 2147483647, classes inferred", ValueError,
      r"train\.txt, line 7: label 2147483647 makes 2147483648 classes, but 2147483644 "
      r"of them \(3, 4, 5, 6, 7, \.\.\.\) have no training image")
def largest_stray_label_with_inferred_classes(ctx):
    append(ctx.lists / "train.txt", "train/c0/extra.jpg 2147483647\n")
    ctx.ready()
    load(ctx.lists)


@case("list file", "list file in Latin-1", ValueError,
      r"train\.txt, line 7: not valid UTF-8 \(byte b'\\xe9' at column 10\); list files "
      r"must be UTF-8 \(a byte-order mark is accepted\)\.")
def latin1_list_file(ctx):
    with open(ctx.lists / "train.txt", "ab") as f:
        f.write("train/caf\u00e9.jpg 0\n".encode("latin-1"))
    ctx.ready()
    load(ctx.lists)


@case("list file", "list file in UTF-16", ValueError,
      r"val\.txt: the file is UTF-16 or UTF-32 encoded \(it starts with that "
      r"byte-order mark\); list files must be UTF-8\.")
def utf16_list_file(ctx):
    (ctx.lists / "val.txt").write_text("val/a.png 0\nval/b.jpg 2\n", encoding="utf-16")
    ctx.ready()
    load(ctx.lists)


@case("list file", "a line repeated", ValueError,
      r"train\.txt, line 7: 'train/c0/0\.jpg' is listed again \(first on line 1\); 1 "
      r"duplicate line\(s\) in this list, which change the class sizes\. Remove them, "
      r"or pass allow_duplicate_paths=True \(--allow_duplicate_paths\)")
def repeated_line(ctx):
    append(ctx.lists / "train.txt", "train/c0/0.jpg 0\n")
    ctx.ready()
    load(ctx.lists)


@case("list file", "one path under two labels", ValueError,
      r"train\.txt, line 7: 'train/c0/0\.jpg' has label 2, but line 1 lists it with "
      r"label 0; one image cannot have two labels \(1 such line\(s\) in this list\)\.")
def path_under_two_labels(ctx):
    append(ctx.lists / "train.txt", "train/c0/0.jpg 2\n")
    ctx.ready()
    load(ctx.lists)


@case("list file", "one path under two labels, allow_duplicate_paths=True", ValueError,
      r"val\.txt, line 3: '\./val/a\.png' has label 1, but line 1 lists it with label 0")
def path_under_two_labels_with_duplicates_allowed(ctx):
    append(ctx.lists / "val.txt", "./val/a.png 1\n")
    ctx.ready()
    load(ctx.lists, allow_duplicate_paths=True)


@case("list file", "a line repeated, allow_duplicate_paths=True", None, "accepted")
def repeated_line_allowed_when_asked(ctx):
    append(ctx.lists / "train.txt", "train/c0/0.jpg 0\n./train/c0/0.jpg 0\n")
    ctx.ready()
    data = load(ctx.lists, allow_duplicate_paths=True)
    assert data.class_counts.tolist() == [4, 2, 2]
    assert len(data.train_split) == 8


def _write_utf8_images(ctx):
    """Two images under CJK, accented and Cyrillic names, listed after a BOM."""
    names = ["\u5199\u771f/caf\u00e9 \u00e0.jpg", "\u0444\u043e\u0442\u043e/\u753b\u50cf.jpg"]
    for seed, name in enumerate(names):
        (ctx.lists / name).parent.mkdir(exist_ok=True)
        (ctx.lists / name).write_bytes(jpeg_bytes(seed=seed))
    with open(ctx.lists / "train.txt", "r+b") as f:
        lines = f.read()
        f.seek(0)
        f.write(b"\xef\xbb\xbf" + lines + f"{names[0]} 1\n{names[1]} 2\n".encode("utf-8"))
    return names


@case("list file", "CJK and accented paths, a byte-order mark", None, "accepted")
def utf8_paths(ctx):
    names = _write_utf8_images(ctx)
    ctx.ready()
    data = load(ctx.lists)
    assert [os.path.relpath(p, ctx.lists) for p in data.train_split.records[-2:]] == names
    assert data.class_counts.tolist() == [2, 3, 3]
    # Decoded (training too: test_data_list_files.py).
    assert iterate(nbn_data.make_eval_dataset(data, "train", 8)) == 8


@case("list file", "`#1/a.jpg 1` (a path starting with `#`) and `# a comment`", None,
      "accepted")
def path_starting_with_a_hash(ctx):
    (ctx.lists / "#1").mkdir()
    (ctx.lists / "#1" / "a.jpg").write_bytes(jpeg_bytes(seed=12))
    append(ctx.lists / "train.txt", "# a comment 1\n#1/a.jpg 1\n")
    ctx.ready()
    data = load(ctx.lists)
    assert data.train_split.records[-1] == str(ctx.lists / "#1" / "a.jpg")
    assert data.class_counts.tolist() == [2, 3, 2]


@case("list file", "`../../../../etc/passwd`", ValueError,
      r"train\.txt, line 7: the path '\.\./\.\./\.\./\.\./etc/passwd' is outside the "
      r"image root .*allow_outside_image_root=True")
def path_climbing_out_of_the_root(ctx):
    append(ctx.lists / "train.txt", "../../../../etc/passwd 0\n")
    ctx.ready()
    load(ctx.lists)


@case("list file", "absolute path `/etc/passwd`", ValueError,
      r"train\.txt, line 7: the path '/etc/passwd' is outside the image root")
def absolute_path(ctx):
    append(ctx.lists / "train.txt", "/etc/passwd 0\n")
    ctx.ready()
    load(ctx.lists)


@case("list file", "`train/../../x.jpg` (leaves the root after normalisation)", ValueError,
      r"val\.txt, line 1: the path 'train/\.\./\.\./x\.jpg' is outside the image root")
def path_leaving_the_root_midway(ctx):
    (ctx.lists / "val.txt").write_text("train/../../x.jpg 0\nval/b.jpg 2\n")
    ctx.ready()
    load(ctx.lists)


@case("list file", "path outside the root with allow_outside_image_root=True", None,
      "accepted")
def outside_path_allowed_when_asked(ctx):
    outside = ctx.tmp / "elsewhere" / "x.jpg"
    outside.parent.mkdir()
    outside.write_bytes(jpeg_bytes(seed=11))
    append(ctx.lists / "train.txt", "../elsewhere/x.jpg 1\n")
    ctx.ready()
    data = load(ctx.lists, allow_outside_image_root=True)
    assert len(data.train_split) == 7
    assert os.path.samefile(data.train_split.records[-1], outside)


@case("list file", "listed image missing", FileNotFoundError,
      r"Image file not found: \S*train/c1/gone\.jpg \(listed in \S*train\.txt, line 7\)")
def missing_image(ctx):
    append(ctx.lists / "train.txt", "train/c1/gone.jpg 1\n")
    ctx.ready()
    load(ctx.lists)


@case("list file", "listed image missing, on_bad_image=\"skip\"", None, "skipped")
def missing_image_skipped(ctx):
    append(ctx.lists / "train.txt", "train/c1/gone.jpg 1\n")
    ctx.ready()
    data = load(ctx.lists, on_bad_image="skip")
    assert [os.path.basename(p) for p in data.skipped["train"]] == ["gone.jpg"]
    assert data.class_counts.tolist() == [2, 2, 2]


@case("list file", "list with no entries", ValueError, r"train\.txt: no entries")
def empty_list(ctx):
    (ctx.lists / "train.txt").write_text("# nothing here\n\n")
    ctx.ready()
    load(ctx.lists)


@case("list file", "list file missing", FileNotFoundError,
      r"List file not found: \S*nope\.txt")
def missing_list_file(ctx):
    nbn_data.load("imagenet_lt", train_list=str(ctx.lists / "nope.txt"),
                  val_list=str(ctx.lists / "val.txt"), image_root=str(ctx.lists))


@case("list file", "num_classes=0", ValueError,
      r"`num_classes` must be a positive integer. Received: 0")
def zero_num_classes(ctx):
    load(ctx.lists, num_classes=0)


# Image files.


@case("image file", "text file named `.png`, first validation image",
      tf.errors.InvalidArgumentError, r"Cannot read or decode image file \S*val/a\.png")
def text_file_as_image(ctx):
    (ctx.lists / "val" / "a.png").write_text("not an image at all")
    ctx.ready()
    iterate(nbn_data.make_eval_dataset(load(ctx.lists), "val", batch_size=8))


@case("image file", "empty (0-byte) image file", tf.errors.InvalidArgumentError,
      r"Cannot read or decode image file \S*val/a\.png")
def empty_image_file(ctx):
    (ctx.lists / "val" / "a.png").write_bytes(b"")
    ctx.ready()
    iterate(nbn_data.make_eval_dataset(load(ctx.lists), "val", batch_size=8))


@case("image file", "JPEG with a valid header and no image data, in training",
      tf.errors.InvalidArgumentError, r"Cannot read or decode image file \S*train/c1/4\.jpg")
def cut_jpeg_in_training(ctx):
    path = ctx.lists / "train" / "c1" / "4.jpg"
    path.write_bytes(jpeg_cut_after_scan_header(path.read_bytes()))
    ctx.ready()
    iterate(nbn_data.make_train_dataset(load(ctx.lists), 2, epochs=1))


@case("image file", "JPEG with a valid header and no image data, last validation image",
      tf.errors.InvalidArgumentError, r"Cannot read or decode image file \S*val/b\.jpg")
def cut_jpeg_last_in_evaluation(ctx):
    path = ctx.lists / "val" / "b.jpg"
    path.write_bytes(jpeg_cut_after_scan_header(path.read_bytes()))
    ctx.ready()
    iterate(nbn_data.make_eval_dataset(load(ctx.lists), "val", batch_size=8))


@case("image file", "truncated PNG in evaluation", tf.errors.InvalidArgumentError,
      r"Cannot read or decode image file \S*val/a\.png")
def truncated_png_in_evaluation(ctx):
    path = ctx.lists / "val" / "a.png"
    path.write_bytes(path.read_bytes()[:200])
    ctx.ready()
    iterate(nbn_data.make_eval_dataset(load(ctx.lists), "val", batch_size=1))


@case("image file", "text file named `.jpg` under a CJK path, in training",
      tf.errors.InvalidArgumentError,
      "Cannot read or decode image file \\S*/\u0444\u043e\u0442\u043e/\u753b\u50cf\\.jpg")
def text_file_under_a_cjk_path(ctx):
    names = _write_utf8_images(ctx)
    (ctx.lists / names[1]).write_text("not an image at all")
    ctx.ready()
    iterate(nbn_data.make_train_dataset(load(ctx.lists), 8, epochs=1))


@case("image file", "JPEG with a valid header and corrupt data, on_bad_image=\"skip\"",
      None, "skipped")
def corrupt_jpeg_skipped(ctx):
    path = ctx.lists / "train" / "c2" / "5.jpg"
    path.write_bytes(jpeg_with_corrupt_data(path.read_bytes()))
    ctx.ready()
    data = load(ctx.lists, on_bad_image="skip")
    assert [os.path.basename(p) for p in data.skipped["train"]] == ["5.jpg"]
    assert data.class_counts.tolist() == [2, 2, 1]
    assert iterate(nbn_data.make_train_dataset(data, 2, epochs=1)) == 4


@case("image file", "truncated PNG and a missing file, on_bad_image=\"skip\"", None,
      "skipped")
def truncated_png_and_missing_skipped(ctx):
    path = ctx.lists / "val" / "a.png"
    path.write_bytes(path.read_bytes()[:200])
    (ctx.lists / "val.txt").write_text("val/a.png 0\nval/b.jpg 2\nval/gone.jpg 1\n")
    ctx.ready()
    data = load(ctx.lists, on_bad_image="skip")
    assert sorted(os.path.basename(p) for p in data.skipped["val"]) == ["a.png", "gone.jpg"]
    assert data.val_split.labels.tolist() == [2]


# Serving inputs: run once, through a SavedModel loaded in a process that
# cannot import nbn_keras, by the signature (as `tf.saved_model.load` users
# call it) and by a TF1 session callable (TF Serving's path: C++
# `Session::Run`, with no Python shape check).

_SERVE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["nbn_keras"] = None  # importing nbn_keras must fail
    import numpy as np
    import tensorflow as tf
    from tensorflow.core.protobuf import config_pb2

    path, cases_file = sys.argv[1], sys.argv[2]
    cases = json.load(open(cases_file))
    results = {}
    served = tf.saved_model.load(path)
    for case in cases:
        value = np.load(case["input"], allow_pickle=True)
        signature = served.signatures[case["signature"]]
        try:
            outputs = signature(**{case["name"]: tf.constant(value)})
            outcome = {k: list(v.shape) for k, v in outputs.items()}
        except Exception as error:
            outcome = {"error": str(error)}
        results[case["id"]] = {"signature": outcome}

    with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as sess:
        meta = tf.compat.v1.saved_model.load(sess, ["serve"], path)
        for case in cases:
            value = np.load(case["input"], allow_pickle=True)
            signature = meta.signature_def[case["signature"]]
            fetch = sorted(signature.outputs)
            options = config_pb2.CallableOptions(
                feed=[signature.inputs[case["name"]].name],
                fetch=[signature.outputs[k].name for k in fetch])
            run = sess._make_callable_from_options(options)
            try:
                outcome = {k: list(v.shape) for k, v in zip(fetch, run(value))}
            except Exception as error:
                outcome = {"error": str(error)}
            results[case["id"]]["session"] = outcome
    print("RESULTS" + json.dumps(results))
    """
)

SERVING_INPUTS = {}


def serving_case(what, signature, message, make_input):
    """A serving case: `make_input()` gives the input array."""
    name = "images" if signature == "serving_default" else "image_bytes"

    def register(act):
        SERVING_INPUTS[act.__name__] = (signature, name, make_input)
        # Checked inside `act`, in both serving paths.
        CASES.append(Case("serving input", act.__name__, what, None, message, act, True))
        return act

    return register


def _served_outcome(ctx, case_id):
    return ctx.served()[case_id]


def _expect_refused(ctx, case_id, message):
    outcomes = _served_outcome(ctx, case_id)
    assert set(outcomes) == {"signature", "session"}
    for path, outcome in outcomes.items():
        assert "error" in outcome, f"{path}: accepted, returned {outcome}"
        assert re.search(message, outcome["error"]), f"{path}: {outcome['error'][:600]}"


def _images(shape, fill=0.0, at=None, value=None):
    def make():
        array = np.full(shape, fill, np.float32)
        if at is not None:
            array[at] = value
        return array

    return make


def _bytes(*items):
    return lambda: np.array([item() if callable(item) else item for item in items],
                            dtype=object)


def _serving_refusal(case_id, message):
    def act(ctx):
        _expect_refused(ctx, case_id, message)

    act.__name__ = case_id
    return act


for _id, _what, _signature, _message, _make in [
    ("images_with_one_channel", "`images` [1, 12, 12, 1] for an RGB model",
     "serving_default",
     r"\[1,12,12,1\] is not compatible with expected shape \[\?,12,12,3\]",
     _images([1, SIZE, SIZE, 1])),
    ("images_of_rank_3", "`images` [12, 12, 3] (no batch axis)", "serving_default",
     r"\[12,12,3\] is not compatible with expected shape \[\?,12,12,3\]",
     _images([SIZE, SIZE, 3])),
    ("images_of_rank_5", "`images` [1, 1, 12, 12, 3]", "serving_default",
     r"\[1,1,12,12,3\] is not compatible with expected shape \[\?,12,12,3\]",
     _images([1, 1, SIZE, SIZE, 3])),
    ("images_of_another_size", "`images` [2, 10, 12, 3]", "serving_default",
     r"\[2,10,12,3\] is not compatible with expected shape \[\?,12,12,3\]",
     _images([2, 10, SIZE, 3])),
    ("images_with_nan", "one NaN pixel", "serving_default",
     r"`images` must be finite pixel values \[batch, 12, 12, 3\] in \[0, 255\].*NaN",
     _images([2, SIZE, SIZE, 3], 10.0, (1, 3, 4, 0), np.nan)),
    ("images_with_inf", "one infinite pixel", "serving_default",
     r"`images` must be finite pixel values.*Inf",
     _images([2, SIZE, SIZE, 3], 10.0, (0, 0, 0, 2), np.inf)),
    ("bytes_not_an_image", "`image_bytes[2]` is text", "serve_image_bytes",
     r"image_bytes\[2\] cannot be decoded: it is not a complete JPEG, PNG, GIF or BMP",
     _bytes(lambda: png_bytes(SIZE, SIZE), lambda: png_bytes(SIZE, SIZE), b"hello")),
    ("bytes_truncated_png", "`image_bytes[1]` is a truncated PNG", "serve_image_bytes",
     r"image_bytes\[1\] cannot be decoded",
     _bytes(lambda: png_bytes(SIZE, SIZE), lambda: png_bytes(SIZE, SIZE)[:60])),
    ("bytes_corrupt_jpeg", "`image_bytes[0]` has a valid JPEG header, corrupt data",
     "serve_image_bytes", r"image_bytes\[0\] cannot be decoded",
     _bytes(lambda: jpeg_with_corrupt_data(jpeg_bytes(40, 40)),
            lambda: png_bytes(SIZE, SIZE))),
    ("bytes_empty_string", "`image_bytes[1]` is an empty string", "serve_image_bytes",
     r"image_bytes\[1\] cannot be decoded", _bytes(lambda: png_bytes(SIZE, SIZE), b"")),
    ("bytes_png_claiming_10000x10000", "a 33-byte PNG header claiming 10000x10000",
     "serve_image_bytes",
     r"image_bytes\[1\] is 10000x10000 pixels, more than the 1600 pixels "
     r"\(max_image_pixels\)",
     _bytes(lambda: png_bytes(SIZE, SIZE), lambda: png_header_only(10000, 10000))),
    ("bytes_jpeg_over_the_cap", "a 50x50 JPEG with max_image_pixels=1600",
     "serve_image_bytes", r"image_bytes\[0\] is 50x50 pixels, more than the 1600",
     _bytes(lambda: jpeg_bytes(50, 50))),
    ("bytes_gif_over_the_cap", "a 41x40 GIF", "serve_image_bytes",
     r"image_bytes\[1\] is 41x40 pixels",
     _bytes(lambda: png_bytes(SIZE, SIZE), lambda: pil_bytes("GIF", 41, 40))),
    ("bytes_bmp_over_the_cap", "a 30x60 BMP", "serve_image_bytes",
     r"image_bytes\[2\] is 30x60 pixels",
     _bytes(lambda: png_bytes(SIZE, SIZE), lambda: png_bytes(SIZE, SIZE),
            lambda: pil_bytes("BMP", 30, 60))),
]:
    serving_case(_what, _signature, _message, _make)(_serving_refusal(_id, _message))


def _serving_empty(case_id, classes=4):
    def act(ctx):
        outcomes = _served_outcome(ctx, case_id)
        assert set(outcomes) == {"signature", "session"}
        for path, outcome in outcomes.items():
            assert outcome == {"classes": [0], "logits": [0, classes],
                               "probabilities": [0, classes]}, (path, outcome)

    act.__name__ = case_id
    return act


serving_case("empty `images` batch [0, 12, 12, 3]", "serving_default", "empty outputs",
             _images([0, SIZE, SIZE, 3]))(_serving_empty("images_empty_batch"))
serving_case("empty `image_bytes` batch", "serve_image_bytes", "empty outputs",
             lambda: np.array([], dtype=object))(_serving_empty("bytes_empty_batch"))


@pytest.fixture(scope="module")
def served(user, tmp_path_factory):
    """Runs every serving case once; `{case: {path: outcome}}`."""
    root = tmp_path_factory.mktemp("serving")
    path = export.export_for_serving(
        tiny_classifier("served"), str(root / "models"), "tiny",
        max_image_pixels=MAX_PIXELS)
    cases = []
    for case_id, (signature, name, make_input) in SERVING_INPUTS.items():
        np.save(root / f"{case_id}.npy", make_input(), allow_pickle=True)
        cases.append({"id": case_id, "signature": signature, "name": name,
                      "input": str(root / f"{case_id}.npy")})
    (root / "cases.json").write_text(json.dumps(cases))
    (root / "serve.py").write_text(_SERVE_SCRIPT)
    before = snapshot(path)
    result = subprocess.run(
        [sys.executable, str(root / "serve.py"), path, str(root / "cases.json")],
        capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert snapshot(path) == before
    return json.loads(result.stdout.split("RESULTS", 1)[1])


# .keras files: copies of the trained best.keras, tampered with.


def _trained_copy(ctx, name="model.keras"):
    target = ctx.tmp / name
    shutil.copyfile(ctx.trained_best(), target)
    return target


def _rezip(source, target, replace=None, drop=()):
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for name in zin.namelist():
            if name in drop:
                continue
            data = zin.read(name)
            if replace and name in replace:
                data = replace[name](data)
            zout.writestr(name, data)


@case(".keras file", "trained file cut in half", ValueError,
      r"not a complete \.keras file \(truncated, or not a Keras zip archive\)", slow=True)
def keras_file_cut_in_half(ctx):
    path = _trained_copy(ctx)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    ctx.ready()
    nbn_keras.load_model(path)


@case(".keras file", "trained file missing its last 10 bytes", ValueError,
      r"not a complete \.keras file", slow=True)
def keras_file_missing_its_end(ctx):
    path = _trained_copy(ctx)
    path.write_bytes(path.read_bytes()[:-10])
    ctx.ready()
    nbn_keras.load_model(path)


@case(".keras file", "one byte of the weights flipped", ValueError,
      r"is damaged: its member 'model\.weights\.h5' does not match its checksum", slow=True)
def keras_file_with_a_flipped_byte(ctx):
    path = _trained_copy(ctx)
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("model.weights.h5")
    data = bytearray(path.read_bytes())
    data[info.header_offset + 30 + len(info.filename) + info.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    ctx.ready()
    nbn_keras.load_model(path)


@case(".keras file", "config.json that is not JSON", ValueError,
      r"is damaged: its config\.json is not JSON", slow=True)
def keras_file_with_broken_config(ctx):
    _rezip(ctx.trained_best(), ctx.tmp / "model.keras",
           replace={"config.json": lambda data: data[: len(data) // 2]})
    ctx.ready()
    nbn_keras.load_model(ctx.tmp / "model.keras")


@case(".keras file", "archive without model.weights.h5", ValueError,
      r"is not a complete \.keras file: it has no model\.weights\.h5", slow=True)
def keras_file_without_weights(ctx):
    _rezip(ctx.trained_best(), ctx.tmp / "model.keras", drop=("model.weights.h5",))
    ctx.ready()
    nbn_keras.load_model(ctx.tmp / "model.keras")


@case(".keras file", "class no package provides (`nbn_keras>NoSuchLayer`)", TypeError,
      r"it needs nbn_keras>NoSuchLayer \(module nbn_keras\.layers\), which no imported "
      r"package has registered\. Import nbn_keras", slow=True)
def keras_file_with_an_unknown_class(ctx):
    rename = lambda data: data.replace(b'"NBNScale"', b'"NoSuchLayer"').replace(
        b"nbn_keras>NBNScale", b"nbn_keras>NoSuchLayer")
    _rezip(ctx.trained_best(), ctx.tmp / "model.keras", replace={"config.json": rename})
    ctx.ready()
    nbn_keras.load_model(ctx.tmp / "model.keras")


@case(".keras file", "weights of another model inside", ValueError,
      r"Could not load '\S*model\.keras': A total of \d+ objects could not be loaded",
      slow=True)
def keras_file_with_other_weights(ctx):
    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    other.save_weights(ctx.tmp / "other.weights.h5")
    weights = (ctx.tmp / "other.weights.h5").read_bytes()
    _rezip(ctx.trained_best(), ctx.tmp / "model.keras",
           replace={"model.weights.h5": lambda data: weights})
    ctx.ready()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras warns per layer first.
        nbn_keras.load_model(ctx.tmp / "model.keras")


@case(".keras file", "a Lambda layer (arbitrary code)", ValueError,
      r"Could not load .*safe_mode=False")
def keras_file_with_a_lambda(ctx):
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))
    model.save(ctx.tmp / "lambda.keras")
    ctx.ready()
    nbn_keras.load_model(ctx.tmp / "lambda.keras")


@case(".keras file", "unknown key `foo` in a layer's saved config", TypeError,
      r"\ACould not load '[^']*model\.keras': unknown config key\(s\) 'foo' in layer "
      r"'batch_normalization' \(NormalizedBatchNormalization\): this version of "
      r"NormalizedBatchNormalization does not take them \(a file from another "
      r"version, or edited\)\.\Z")
def keras_file_with_an_unknown_config_key(ctx):
    def add_key(data):
        config = json.loads(data)
        for layer in config["config"]["layers"]:
            if layer["class_name"] == "NormalizedBatchNormalization":
                layer["config"]["foo"] = 1
        return json.dumps(config).encode()

    _rezip(ctx.user / "run" / "best.keras", ctx.tmp / "model.keras",
           replace={"config.json": add_key})
    ctx.ready()
    nbn_keras.load_model(ctx.tmp / "model.keras")


@case(".keras file", "a 0-byte file", ValueError,
      r"'\S*model\.keras' is empty \(0 bytes\): not a \.keras file\.")
def empty_keras_file(ctx):
    (ctx.tmp / "model.keras").write_bytes(b"")
    ctx.ready()
    nbn_keras.load_model(ctx.tmp / "model.keras")


@case(".keras file", "a `.weights.h5` file", ValueError,
      r"is not a \.keras model file\. A \.weights\.h5 file holds weights only")
def weights_file_as_model(ctx):
    nbn_keras.load_model(ctx.user / "run" / "backup" / "latest.weights.h5")


@case(".keras file", "a SavedModel directory", ValueError,
      r"is not a \.keras model file\. A directory may be a TF Serving export")
def saved_model_as_model(ctx):
    nbn_keras.load_model(ctx.user / "saved_models" / "m" / "1")


@case(".keras file", "no file at the path", FileNotFoundError,
      r"No model file at '\S*absent\.keras'")
def missing_keras_file(ctx):
    nbn_keras.load_model(ctx.tmp / "absent.keras")


# Export flags: the command's flags parsed and run in this process; the
# user's export directory is the target.


def run_export(ctx, *argv):
    values = flags.FlagValues()
    export.define_flags(values)
    values(["export", f"--base_dir={ctx.user / 'saved_models'}", "--model_name=m",
            *argv])
    return export.run_from_flags(values)


@case("export flag", "`--version=1`, which exists", SystemExit,
      r"Version 1 of 'm' already exists")
def export_over_an_existing_version(ctx):
    run_export(ctx, f"--model={ctx.user / 'run' / 'best.keras'}", "--version=1")


@case("export flag", "`--version=-1`", flags.IllegalFlagValueError,
      r"--version=-1: -1 is not a non-negative integer")
def export_with_a_negative_version(ctx):
    run_export(ctx, f"--model={ctx.user / 'run' / 'best.keras'}", "--version=-1")


@case("export flag", "`--max_image_pixels=0`", flags.IllegalFlagValueError,
      r"--max_image_pixels=0: 0 is not a positive integer")
def export_with_no_pixels_allowed(ctx):
    run_export(ctx, f"--model={ctx.user / 'run' / 'best.keras'}", "--max_image_pixels=0")


@case("export flag", "`--image_size=12x`", SystemExit,
      r"--image_size must be H or HxW, got '12x'")
def export_with_a_bad_image_size(ctx):
    run_export(ctx, f"--model={ctx.user / 'run' / 'best.keras'}", "--image_size=12x")


@case("export flag", "`--image_size=8` for a 12x12 model", SystemExit,
      r"image_size \(8, 8\) does not match the model's input shape")
def export_with_a_mismatched_image_size(ctx):
    run_export(ctx, f"--model={ctx.user / 'run' / 'best.keras'}", "--image_size=8")


@case("export flag", "`--resize_mode=stretch`", flags.IllegalFlagValueError,
      r"--resize_mode=stretch: value should be one of")
def export_with_an_unknown_resize_mode(ctx):
    run_export(ctx, f"--model={ctx.user / 'run' / 'best.keras'}", "--resize_mode=stretch")


@case("export flag", "`--model` not given", flags.IllegalFlagValueError,
      r"--model must have a value other than None")
def export_without_a_model(ctx):
    run_export(ctx)


@case("export flag", "`--model` names no file", SystemExit,
      r"No model file at '\S*absent\.keras'")
def export_of_a_missing_file(ctx):
    run_export(ctx, f"--model={ctx.tmp / 'absent.keras'}")


@case("export flag", "`--model` is a `.weights.h5` file", SystemExit,
      r"is not a \.keras file\. Only whole-model \.keras files can be exported")
def export_of_a_weights_file(ctx):
    run_export(ctx, f"--model={ctx.user / 'run' / 'backup' / 'latest.weights.h5'}")


@case("export flag", "`--model` is a truncated trained file", SystemExit,
      r"nbn_keras\.export: error: '\S*model\.keras' is not a complete \.keras file",
      slow=True)
def export_of_a_truncated_file(ctx):
    path = _trained_copy(ctx)
    path.write_bytes(path.read_bytes()[:100000])
    ctx.ready()
    run_export(ctx, f"--model={path}")


@case("export flag", "`--model_name=a/b`", SystemExit, r"Invalid model_name 'a/b'")
def export_with_a_nested_model_name(ctx):
    values = flags.FlagValues()
    export.define_flags(values)
    values(["export", f"--base_dir={ctx.user / 'saved_models'}", "--model_name=a/b",
            f"--model={ctx.user / 'run' / 'best.keras'}"])
    export.run_from_flags(values)


@case("export flag", "`--model_name=.tmp-export-1` (a temporary name)", SystemExit,
      r"Invalid model_name '\.tmp-export-1'")
def export_with_a_temporary_model_name(ctx):
    values = flags.FlagValues()
    export.define_flags(values)
    values(["export", f"--base_dir={ctx.user / 'saved_models'}",
            "--model_name=.tmp-export-1", f"--model={ctx.user / 'run' / 'best.keras'}"])
    export.run_from_flags(values)


# Training flags: the command's flags parsed and run in this process; each is
# refused before the run's first file (the case's directory is snapshotted).
# Digits-LT (IF 10): int(124 * 0.1 ** (i / 9)) training images in class i
# (124: the smallest class, 174 images, less 30 test and 20 validation ones).
DIGITS_TRAINING_IMAGES = sum(int(124 * 0.1 ** (i / 9)) for i in range(10))


def run_training(ctx, *argv):
    values = flags.FlagValues()
    config_lib.define_flags(values)
    values(["train", "--data=digits_lt", "--backbone=resnet8", "--image_size=16",
            "--global_batch_size=64", "--epochs=1", "--steps_per_epoch=1", "--verbose=0",
            "--nopictures", f"--run_dir={ctx.tmp / 'run'}",
            f"--export_dir={ctx.tmp / 'exports'}", "--model_name=m", *argv])
    return train.train_and_evaluate(config_lib.from_flags(values),
                                    config_lib.options_from_flags(values))


def users_run_dir(ctx):
    """`<tmp>/run` holding a user's own `model.keras` and `history.csv`."""
    (ctx.tmp / "run").mkdir()
    shutil.copyfile(ctx.user / "run" / "best.keras", ctx.tmp / "run" / "model.keras")
    (ctx.tmp / "run" / "history.csv").write_text("epoch,loss\n0,1.5\n")
    ctx.ready()


@case("training flag", "`--run_dir` holding a user's `model.keras` and `history.csv`",
      ValueError, r"--run_dir=\S+ holds no run of this project but 2 other entries "
      r"\(history\.csv, model\.keras\); a run would overwrite them\. .* pass "
      r"--allow_foreign_run_dir")
def run_dir_of_someone_else(ctx):
    users_run_dir(ctx)
    run_training(ctx)


@case("training flag", "the same with `--allow_foreign_run_dir` (and a bad seed)",
      ValueError, r"^--seed must be in \[0, 2\*\*32\) \(got -1\)\.$")
def run_dir_of_someone_else_allowed(ctx):
    users_run_dir(ctx)
    run_training(ctx, "--allow_foreign_run_dir", "--seed=-1")


@case("training flag", "`<export_dir>/<model_name>/` holding a file and a non-version "
      "directory", ValueError, r"--export_dir=\S+: \S+/exports/m holds 2 entries that "
      r"are not model versions \(1\.txt, notes\); .*pass --allow_foreign_export_dir")
def export_dir_of_someone_else(ctx):
    (ctx.tmp / "exports" / "m" / "notes").mkdir(parents=True)
    (ctx.tmp / "exports" / "m" / "1.txt").write_text("mine")
    (ctx.tmp / "exports" / "m" / "3").mkdir()  # A version: not refused.
    ctx.ready()
    run_training(ctx)


@case("training flag", "`--seed=-1`, `--data_seed=2**32`", ValueError,
      r"--seed must be in \[0, 2\*\*32\) \(got -1\)\. --data_seed must be in "
      r"\[0, 2\*\*32\) \(got 4294967296\)")
def seeds_out_of_range(ctx):
    run_training(ctx, "--seed=-1", "--data_seed=4294967296")


@case("training flag", "`--global_batch_size=100000 --steps_per_epoch=3`", ValueError,
      rf"--global_batch_size=100000 is larger than the {DIGITS_TRAINING_IMAGES} training "
      r"images of --data=digits_lt")
def batch_larger_than_the_training_set(ctx):
    run_training(ctx, "--global_batch_size=100000", "--steps_per_epoch=3")


# ResNet-8 classifier at 16x16 for 10 classes, numbers per image of each layer
# output: normalize 16*16*3; stem conv, BN, ReLU 3 * 16*16*16; stage 0 (no
# shortcut) conv, BN, ReLU, conv, BN, add, ReLU 7 * 16*16*16; stage 1 the
# shortcut's subsample 8*8*16, reshape 8*8*16, channel pad 8*8*32, reshape
# 8*8*32, and 7 * 8*8*32; stage 2 likewise at 4x4 with 32 -> 64 channels;
# pooling 64; logits 10. (NBN's shared scale is no per-image output.)
RESNET8_16_ELEMENTS = (16 * 16 * 3 + 10 * 16 * 16 * 16
                       + 2 * 8 * 8 * 16 + 9 * 8 * 8 * 32
                       + 2 * 4 * 4 * 32 + 9 * 4 * 4 * 64 + 64 + 10)


@case("training flag", "`--memory_limit_gb=0.01` for a batch needing more", ValueError,
      r"--global_batch_size=64 at --image_size=16 with --backbone=resnet8 needs about "
      rf"{64 * RESNET8_16_ELEMENTS * 4 / 1e9:.3g} GB for the activations training keeps "
      rf"\({RESNET8_16_ELEMENTS} numbers of 4 bytes per image, .*\), more than the "
      r"0\.01 GB --memory_limit_gb")
def batch_beyond_the_memory_limit(ctx):
    run_training(ctx, "--memory_limit_gb=0.01")


@case("training flag", "`--global_batch_size=1000` at 512x512 (ResNet-8, this machine's "
      "memory)", ValueError,
      r"--global_batch_size=1000 at --image_size=512 with --backbone=resnet8 needs about "
      r"\d+ GB .*, more than the [\d.]+ GB memory of this machine")
def batch_beyond_the_machines_memory(ctx):
    # About 7e7 numbers per 512x512 image: 300 GB for the batch. The data
    # set is a stand-in of 1000 images (only its size and shape are read).
    ctx.request.getfixturevalue("monkeypatch").setattr(
        train, "load_data", lambda config: types.SimpleNamespace(
            train_split=range(1000), num_classes=2, image_shape=(512, 512, 3),
            mean=None, std=None))
    run_training(ctx, "--global_batch_size=1000", "--image_size=512")


@case("training flag", "`--image_size=1`", ValueError,
      r"--image_size=1 is smaller than 4, the smallest input of --backbone=resnet8 "
      r"\(its total stride: at 4x4 its last stage is 1x1\)")
def image_smaller_than_the_network(ctx):
    run_training(ctx, "--image_size=1")


@case("training flag", "`--image_size=16` for ResNet-50", ValueError,
      r"--image_size=16 is smaller than 32, the smallest input of --backbone=resnet50")
def image_smaller_than_resnet50(ctx):
    run_training(ctx, "--image_size=16", "--backbone=resnet50")


@case("training flag", "`TF_CONFIG` naming one address for two workers", ValueError,
      r"TF_CONFIG names the address localhost:1 twice \(worker 0 and worker 1\); every "
      r"task needs its own host:port")
def cluster_address_named_twice(ctx):
    ctx.request.getfixturevalue("monkeypatch").setenv("TF_CONFIG", json.dumps(
        {"cluster": {"worker": ["localhost:1", "localhost:1"]},
         "task": {"type": "worker", "index": 0}}))
    run_training(ctx)


@case("training flag", "`TF_CONFIG` naming a worker nobody runs, `--cluster_timeout=1`",
      ValueError, r"This worker \(127\.0\.0\.1:\d+\) could not reach worker 1 at "
      r"127\.0\.0\.1:\d+ within --cluster_timeout=1 s")
def cluster_peer_unreachable(ctx):
    ports = []
    for _ in range(2):  # Two free loopback ports, nobody listening.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    ctx.request.getfixturevalue("monkeypatch").setenv("TF_CONFIG", json.dumps(
        {"cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
         "task": {"type": "worker", "index": 0}}))
    run_training(ctx, "--cluster_timeout=1")


@case("export flag", "`<base_dir>/<model_name>/` holding a user's file", SystemExit,
      r"nbn_keras\.export: error: \S+/m holds 1 entry that is not a model version "
      r"\(notes\.txt\); .*pass allow_foreign_files=True \(--allow_foreign_export_dir\)")
def export_next_to_someone_elses_file(ctx):
    (ctx.tmp / "served" / "m").mkdir(parents=True)
    (ctx.tmp / "served" / "m" / "notes.txt").write_text("mine")
    ctx.ready()
    values = flags.FlagValues()
    export.define_flags(values)
    values(["export", f"--base_dir={ctx.tmp / 'served'}", "--model_name=m",
            f"--model={ctx.user / 'run' / 'best.keras'}"])
    export.run_from_flags(values)


# --------------------------------------------------------------------------
# The test.


class Context:
    """What a case works with: its inputs, the user's files, the fixtures."""

    def __init__(self, request, tmp_path, user):
        self.request, self.tmp, self.user = request, tmp_path, user
        self.lists = write_list_root(tmp_path / "lists")
        self.protected = [user, tmp_path]
        self.before = None

    def ready(self):
        """Marks the case's inputs written: they too must stay as they are."""
        self.before = snapshot(*self.protected)

    def served(self):
        return self.request.getfixturevalue("served")

    def trained_best(self):
        best = self.request.getfixturevalue("trained_run")["run_dir"] / "best.keras"
        if best not in self.protected:
            self.protected.append(best)
        return best


def _params():
    for c in CASES:
        marks = [pytest.mark.slow] if c.slow else []
        yield pytest.param(c, id=f"{c.group.replace(' ', '_')}-{c.id}", marks=marks)


@pytest.mark.parametrize("case", _params())
def test_bad_input(case, request, tmp_path, user):
    ctx = Context(request, tmp_path, user)
    ctx.ready()
    if case.error is None:
        case.act(ctx)
    else:
        with pytest.raises(case.error, match=case.message):
            case.act(ctx)
    # Nothing the user had (checkpoint, backup, earlier export, the case's
    # own list and image files) was changed, removed or added to.
    assert snapshot(*ctx.protected) == ctx.before


def test_at_least_thirty_cases_in_every_group():
    groups = {}
    for c in CASES:
        groups.setdefault(c.group, []).append(c.id)
    assert len(CASES) >= 30
    assert set(groups) == {"list file", "image file", "serving input", ".keras file",
                           "export flag", "training flag"}
    assert len({c.id for c in CASES}) == len(CASES)
