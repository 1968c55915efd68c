"""Bad serving inputs, through a SavedModel served without nbn_keras.

All cases run once (the `served` fixture), in a process that cannot import
nbn_keras, by the signature (as `tf.saved_model.load` users call it) and by
a TF1 session callable (TF Serving's path: C++ `Session::Run`, with no
Python shape check). Each case then asserts the outcome of both paths, and
that the user's files (`user_files`) stay as they were. They are rows of the
README's "Bad input" table.
"""

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image  # Installed with matplotlib.

from nbn_keras.serving import export
from tests.helpers import ENV
from tests.helpers import SIZE
from tests.helpers import check_bad_input
from tests.helpers import jpeg_bytes
from tests.helpers import jpeg_with_corrupt_data
from tests.helpers import pil_bytes
from tests.helpers import png_bytes
from tests.helpers import png_header_only
from tests.helpers import snapshot
from tests.helpers import users_classifier

MAX_PIXELS = 40 * 40  # The served model's max_image_pixels.

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


def _solid(fmt, height, width):
    return lambda: pil_bytes(Image.new("RGB", (width, height), (200, 30, 60)), fmt)


def refused(message):
    """Both serving paths fail with an error matching `message`."""
    def expect(outcomes):
        for path, outcome in outcomes.items():
            assert "error" in outcome, f"{path}: accepted, returned {outcome}"
            assert re.search(message, outcome["error"]), f"{path}: {outcome['error'][:600]}"

    return expect


def empty(classes=4):
    """Both serving paths return empty outputs for the empty batch."""
    def expect(outcomes):
        for path, outcome in outcomes.items():
            assert outcome == {"classes": [0], "logits": [0, classes],
                               "probabilities": [0, classes]}, (path, outcome)

    return expect


def serving_input(id, signature, make_input, expect):
    """A row: `make_input()` gives the array fed to `signature`."""
    return pytest.param(id, signature, make_input, expect, id=id, marks=pytest.mark.slow)


SERVING_INPUT_CASES = [
    serving_input("images_with_one_channel", "serving_default", _images([1, SIZE, SIZE, 1]),
                  refused(r"\[1,12,12,1\] is not compatible with expected shape "
                          r"\[\?,12,12,3\]")),
    serving_input("images_of_rank_3", "serving_default", _images([SIZE, SIZE, 3]),
                  refused(r"\[12,12,3\] is not compatible with expected shape "
                          r"\[\?,12,12,3\]")),
    serving_input("images_of_rank_5", "serving_default", _images([1, 1, SIZE, SIZE, 3]),
                  refused(r"\[1,1,12,12,3\] is not compatible with expected shape "
                          r"\[\?,12,12,3\]")),
    serving_input("images_of_another_size", "serving_default", _images([2, 10, SIZE, 3]),
                  refused(r"\[2,10,12,3\] is not compatible with expected shape "
                          r"\[\?,12,12,3\]")),
    serving_input("images_with_nan", "serving_default",
                  _images([2, SIZE, SIZE, 3], 10.0, (1, 3, 4, 0), np.nan),
                  refused(r"`images` must be finite pixel values \[batch, 12, 12, 3\] in "
                          r"\[0, 255\].*NaN")),
    serving_input("images_with_inf", "serving_default",
                  _images([2, SIZE, SIZE, 3], 10.0, (0, 0, 0, 2), np.inf),
                  refused(r"`images` must be finite pixel values.*Inf")),
    serving_input("bytes_not_an_image", "serve_image_bytes",
                  _bytes(lambda: png_bytes(SIZE, SIZE), lambda: png_bytes(SIZE, SIZE),
                         b"hello"),
                  refused(r"image_bytes\[2\] cannot be decoded: it is not a complete JPEG, "
                          r"PNG, GIF or BMP")),
    serving_input("bytes_truncated_png", "serve_image_bytes",
                  _bytes(lambda: png_bytes(SIZE, SIZE), lambda: png_bytes(SIZE, SIZE)[:60]),
                  refused(r"image_bytes\[1\] cannot be decoded")),
    serving_input("bytes_corrupt_jpeg", "serve_image_bytes",
                  _bytes(lambda: jpeg_with_corrupt_data(jpeg_bytes(40, 40)),
                         lambda: png_bytes(SIZE, SIZE)),
                  refused(r"image_bytes\[0\] cannot be decoded")),
    serving_input("bytes_empty_string", "serve_image_bytes",
                  _bytes(lambda: png_bytes(SIZE, SIZE), b""),
                  refused(r"image_bytes\[1\] cannot be decoded")),
    serving_input("bytes_png_claiming_10000x10000", "serve_image_bytes",
                  _bytes(lambda: png_bytes(SIZE, SIZE), lambda: png_header_only(10000, 10000)),
                  refused(r"image_bytes\[1\] is 10000x10000 pixels, more than the 1600 pixels "
                          r"\(max_image_pixels\)")),
    serving_input("bytes_jpeg_over_the_cap", "serve_image_bytes",
                  _bytes(lambda: jpeg_bytes(50, 50)),
                  refused(r"image_bytes\[0\] is 50x50 pixels, more than the 1600")),
    serving_input("bytes_gif_over_the_cap", "serve_image_bytes",
                  _bytes(lambda: png_bytes(SIZE, SIZE), _solid("GIF", 41, 40)),
                  refused(r"image_bytes\[1\] is 41x40 pixels")),
    serving_input("bytes_bmp_over_the_cap", "serve_image_bytes",
                  _bytes(lambda: png_bytes(SIZE, SIZE), lambda: png_bytes(SIZE, SIZE),
                         _solid("BMP", 30, 60)),
                  refused(r"image_bytes\[2\] is 30x60 pixels")),
    serving_input("images_empty_batch", "serving_default", _images([0, SIZE, SIZE, 3]),
                  empty()),
    serving_input("bytes_empty_batch", "serve_image_bytes",
                  lambda: np.array([], dtype=object), empty()),
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Runs every serving case once; `{case: {path: outcome}}`."""
    root = tmp_path_factory.mktemp("serving")
    path = export.export_for_serving(
        users_classifier("served"), str(root / "models"), "tiny",
        max_image_pixels=MAX_PIXELS)
    cases = []
    for case in SERVING_INPUT_CASES:
        case_id, signature, make_input, _ = case.values
        np.save(root / f"{case_id}.npy", make_input(), allow_pickle=True)
        name = "images" if signature == "serving_default" else "image_bytes"
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


def check_served(ctx, case_id, expect, served):
    outcomes = served[case_id]
    assert set(outcomes) == {"signature", "session"}
    expect(outcomes)


@pytest.mark.parametrize("case_id, signature, make_input, expect", SERVING_INPUT_CASES)
def test_bad_serving_input(case_id, signature, make_input, expect, served, user_files):
    check_bad_input(user_files, check_served, None, "served", case_id, expect, served)
