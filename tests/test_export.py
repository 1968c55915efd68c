import json
import os
import re
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from nbn_keras.serving import decoding
from nbn_keras.serving import export
from nbn_keras.serving import versions
from nbn_keras.models import heads
from nbn_keras.conversion import convert_to_nbn
from tests.helpers import ENV
from tests.helpers import SERVING_CHECK_SCRIPT
from tests.helpers import SIZE
from tests.helpers import bad_input
from tests.helpers import check_bad_input
from tests.helpers import pil_bytes
from tests.helpers import tiny_classifier
from nbn_keras.conversion import fold_nbn


def nbn_classifier():
    model = convert_to_nbn(tiny_classifier(name="tiny_nbn"), selection="all")
    rng = np.random.default_rng(1)
    for layer in model.layers:
        if layer.name == "nbn_scale":
            layer.set_weights([np.asarray(2.5, "float32")])
        elif "bn" in layer.name:
            weights = layer.get_weights()
            weights[1] = rng.normal(size=weights[1].shape).astype("float32")
            layer.set_weights(weights)
    return model


def head_classifier(head):
    """`tiny_classifier` with a logit-rectification head and NBN in the body."""
    body = tiny_classifier(name=f"tiny_{head}")
    features = body.get_layer(index=-2).output
    logits = heads.apply_head(features, 4, head)
    model = convert_to_nbn(keras.Model(body.input, logits),
                           selection=["stack_0_block1_1_bn"])
    bn = model.get_layer("logits_bn")
    rng = np.random.default_rng(2)
    bn.set_weights([rng.uniform(0.5, 2.0, w.shape) if i == len(bn.weights) - 1
                    else rng.normal(size=w.shape) for i, w in enumerate(bn.weights)])
    return model


def pixels(n=3, size=SIZE, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)


def png_bytes(images):
    return [tf.io.encode_png(image).numpy() for image in images]


def predict(model, images):
    return np.asarray(model(np.asarray(images, "float32"), training=False))


def test_saved_model_cli_shows_both_signatures(tmp_path):
    path = export.export_for_serving(tiny_classifier(), str(tmp_path), "tiny")
    assert path == os.path.join(str(tmp_path), "tiny", "1")
    assert os.path.isfile(os.path.join(path, "saved_model.pb"))
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    shown = subprocess.run(
        [cli, "show", "--dir", path, "--all"],
        capture_output=True, text=True, env=ENV, check=True, timeout=120,
    ).stdout
    signatures = {}
    for block in re.split(r"\n(?=signature_def\[)", shown):
        match = re.match(r"signature_def\['(\w+)'\]", block)
        if match:
            signatures[match.group(1)] = block
    assert {"serving_default", "serve", "serve_image_bytes"} <= set(signatures)
    outputs = ["logits", "probabilities", "classes"]
    for name in ("serving_default", "serve"):
        block = signatures[name]
        assert re.search(
            r"inputs\['images'\] tensor_info:\s+dtype: DT_FLOAT\s+"
            rf"shape: \(-1, {SIZE}, {SIZE}, 3\)", block
        ), block
    block = signatures["serve_image_bytes"]
    assert re.search(
        r"inputs\['image_bytes'\] tensor_info:\s+dtype: DT_STRING\s+"
        r"shape: \(-1\)", block
    ), block
    for name in ("serving_default", "serve", "serve_image_bytes"):
        block = signatures[name]
        for output in outputs:
            assert f"outputs['{output}']" in block
        assert re.search(r"outputs\['classes'\] tensor_info:\s+dtype: DT_INT64",
                         block)
        assert re.search(
            r"outputs\['probabilities'\] tensor_info:\s+dtype: DT_FLOAT\s+"
            r"shape: \(-1, 4\)", block
        )


def test_fresh_process_without_nbn_keras_gives_same_predictions(tmp_path):
    cases = []

    def add_case(path, expected, **inputs):
        name = f"case{len(cases)}"
        np.save(tmp_path / f"{name}_expected.npy", expected)
        case = {"dir": path, "expected": str(tmp_path / f"{name}_expected.npy")}
        if "images" in inputs:
            np.save(tmp_path / f"{name}_images.npy", inputs["images"])
            case["images"] = str(tmp_path / f"{name}_images.npy")
        else:
            case["bytes"] = []
            for i, data in enumerate(inputs["encoded"]):
                (tmp_path / f"{name}_{i}.img").write_bytes(data)
                case["bytes"].append(str(tmp_path / f"{name}_{i}.img"))
        cases.append(case)

    images = pixels()
    for model in (tiny_classifier(), nbn_classifier()):
        path = export.export_for_serving(model, str(tmp_path / "models"))
        expected = predict(model, images)
        add_case(path, expected, images=images.astype("float32"))
        add_case(path, expected, encoded=png_bytes(images))
        # Grey PNGs are fed as RGB with the grey value repeated.
        grey = images[..., :1]
        add_case(path, predict(model, np.repeat(grey, 3, axis=-1)),
                 encoded=png_bytes(grey))
        # A larger image is resized to the model's size (small model: "resize").
        big = pixels(n=1, size=3 * SIZE, seed=2)
        resized = tf.image.resize(big.astype("float32"), [SIZE, SIZE],
                                  antialias=True)
        add_case(path, predict(model, resized), encoded=png_bytes(big))
    # Each logit-rectification head (its BN a stock BN in the export).
    for head in ("fcbn", "fcbn_notaffine"):
        model = head_classifier(head)
        add_case(export.export_for_serving(model, str(tmp_path / "models")),
                 predict(model, images), images=images.astype("float32"))

    for path in {case["dir"] for case in cases}:
        saved = open(os.path.join(path, "saved_model.pb"), "rb").read()
        assert b"NormalizedBatchNormalization" not in saved
        assert b"nbn_keras" not in saved

    (tmp_path / "cases.json").write_text(json.dumps(cases))
    (tmp_path / "load.py").write_text(SERVING_CHECK_SCRIPT)
    result = subprocess.run(
        [sys.executable, "-I", str(tmp_path / "load.py"),
         str(tmp_path / "cases.json")],
        capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert f"checked {len(cases)}" in result.stdout


def test_versions(tmp_path):
    model = tiny_classifier()
    base = str(tmp_path)
    assert export.export_for_serving(model, base, "m").endswith(os.sep + "1")
    assert export.export_for_serving(model, base, "m").endswith(os.sep + "2")
    with pytest.raises(FileExistsError, match="Version 2"):
        export.export_for_serving(model, base, "m", version=2)
    # Leftovers of an interrupted export and other non-integer names; a
    # file that is not ours is refused unless allowed.
    os.makedirs(tmp_path / "m" / ".tmp-3-abc")
    (tmp_path / "m" / "README").write_text("notes")
    (tmp_path / "m" / "4").write_text("a file, not a version")
    assert versions.foreign_entries(str(tmp_path / "m")) == ["4", "README"]
    os.remove(tmp_path / "m" / "4")
    assert versions.next_version(str(tmp_path / "m")) == 3
    with pytest.raises(ValueError, match=r"m holds 1 entry that is not a model version "
                       r"\(README\)"):
        export.export_for_serving(model, base, "m")
    assert export.export_for_serving(model, base, "m", version=9,
                                     allow_foreign_files=True).endswith("9")
    assert export.export_for_serving(model, base, "m",
                                     allow_foreign_files=True).endswith(os.sep + "10")
    # Only finished versions (and the leftovers) are in the model directory.
    assert sorted(os.listdir(tmp_path / "m")) == [
        ".tmp-3-abc", "1", "10", "2", "9", "README"
    ]
    assert versions.next_version(str(tmp_path / "absent")) == 1


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    def half_write(archive, filepath, **kwargs):
        with open(os.path.join(filepath, "saved_model.pb"), "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    archive_class = type(keras.export.ExportArchive())
    monkeypatch.setattr(archive_class, "write_out", half_write)
    with pytest.raises(OSError, match="disk full"):
        export.export_for_serving(tiny_classifier(), str(tmp_path), "m")
    assert os.listdir(tmp_path / "m") == []


def test_crop_mode_geometry():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
    data = tf.io.encode_png(image)
    out = decoding.decode_and_resize(data, 16, 16, 3, "crop")
    # torchvision's Resize(round(16 * 256 / 224) = 18): 40x60 to 18x27
    # (antialiased bilinear, whole levels), then CenterCrop(16) at row
    # round(2 / 2) = 1, column round(11 / 2) = 6 (half to even).
    resized = np.round(tf.image.resize(image.astype("float32"), [18, 27], antialias=True))
    np.testing.assert_allclose(out, resized[1:17, 6:22], atol=1e-4)
    grey = decoding.decode_and_resize(data, 16, 16, 1, "resize")
    assert grey.shape == (16, 16, 1)


def test_auto_resize_mode_and_flexible_input(tmp_path):
    inputs = keras.Input((None, None, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(x), name="flex")
    with pytest.raises(ValueError, match="image_size"):
        export.export_for_serving(model, str(tmp_path))
    path = export.export_for_serving(model, str(tmp_path), image_size=160)
    served = tf.saved_model.load(path)
    # 160 >= 128: "crop" mode, so a 160x160 image is zoomed and cropped.
    image = pixels(n=1, size=160)
    encoded = tf.constant(png_bytes(image))
    outputs = served.signatures["serve_image_bytes"](image_bytes=encoded)
    cropped = decoding.decode_and_resize(encoded[0], 160, 160, 3, "crop")
    np.testing.assert_allclose(
        outputs["logits"], predict(model, cropped[None]), atol=1e-4
    )


def test_bad_models_and_arguments(tmp_path):
    inputs = keras.Input((SIZE, SIZE, 3))
    two_outputs = keras.Model(
        inputs, [keras.layers.Flatten()(inputs), keras.layers.Flatten()(inputs)]
    )
    with pytest.raises(ValueError, match="one image input and one logits"):
        export.export_for_serving(two_outputs, str(tmp_path))
    model = tiny_classifier()
    with pytest.raises(ValueError, match="does not match"):
        export.export_for_serving(model, str(tmp_path), image_size=(8, 8))
    with pytest.raises(ValueError, match="resize_mode"):
        export.export_for_serving(model, str(tmp_path), resize_mode="stretch")
    with pytest.raises(ValueError, match="version"):
        export.export_for_serving(model, str(tmp_path), version="3")
    with pytest.raises(ValueError, match="model_name"):
        export.export_for_serving(model, str(tmp_path), model_name="a/b")
    with pytest.raises(FileNotFoundError, match="No model file"):
        export.export_keras_file(str(tmp_path / "missing.keras"), str(tmp_path))
    (tmp_path / "w.weights.h5").write_bytes(b"")
    with pytest.raises(ValueError, match=r"\.keras"):
        export.export_keras_file(str(tmp_path / "w.weights.h5"), str(tmp_path))


class DoubledDense(keras.layers.Dense):
    """Twice a Dense layer's outputs; says it folds into a stock Dense."""

    def call(self, inputs):
        return 2.0 * super().call(inputs)

    def stock_equivalent(self):
        dense = keras.layers.Dense.from_config(self.get_config())
        dense.build_from_config(self.get_build_config())
        dense.set_weights([2.0 * w for w in self.get_weights()])
        return dense


class VanishingIdentity(keras.layers.Layer):
    """Says folding drops it, but its output is the model's."""

    def call(self, inputs):
        return inputs

    def stock_equivalent(self):
        return None


def test_layers_fold_as_they_declare_whatever_their_module(tmp_path):
    inputs = keras.Input((3,), name="images")
    model = keras.Model(inputs, DoubledDense(2, name="head")(inputs))
    x = np.random.default_rng(7).normal(size=(4, 3)).astype("float32")
    kernel, bias = model.get_layer("head").get_weights()
    folded = fold_nbn(model)
    assert type(folded.get_layer("head")) is keras.layers.Dense
    np.testing.assert_allclose(folded(x), 2.0 * (x @ kernel + bias), atol=1e-5)
    images = keras.Input((2, 2, 1), name="images")
    kept = keras.Model(images, keras.layers.GlobalAveragePooling2D()(
        VanishingIdentity(name="kept")(images)))
    with pytest.raises(ValueError, match=r"Layers \['kept'\] could not be folded"):
        export.export_for_serving(kept, str(tmp_path), "kept")
    assert not (tmp_path / "kept").exists()


def test_command_line_exports_a_keras_file(tmp_path):
    model = nbn_classifier()
    model_path = tmp_path / "best_model.keras"
    model.save(model_path)
    base = tmp_path / "served"
    result = subprocess.run(
        [sys.executable, "-m", "nbn_keras.export", f"--model={model_path}",
         f"--base_dir={base}", "--version=4"],
        capture_output=True, text=True, env=ENV, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    path = base / "best_model" / "4"
    assert result.stdout.strip().endswith(str(path))
    served = tf.saved_model.load(str(path))
    images = pixels().astype("float32")
    outputs = served.signatures["serving_default"](images=tf.constant(images))
    np.testing.assert_allclose(outputs["logits"], predict(model, images),
                               atol=1e-5)


def test_crop_mode_matches_the_evaluation_pipeline(tmp_path):
    """Serving bytes get exactly the data pipeline's evaluation transform."""
    from nbn_keras.data import transforms as data_transforms

    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (300, 420, 3), dtype=np.uint8)
    png = tf.io.encode_png(pixels)
    served = decoding.decode_and_resize(png, 224, 224, 3, "crop")
    pipeline = data_transforms.center_crop_resize(png, tf.constant(False), 224)
    np.testing.assert_allclose(served.numpy(), pipeline.numpy(), atol=1e-4)


def modes(root):
    """`{relative path: permission bits}` of everything under `root`."""
    found = {".": stat.S_IMODE(os.stat(root).st_mode)}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            found[os.path.relpath(path, root)] = stat.S_IMODE(os.stat(path).st_mode)
    return found


def test_export_is_world_readable_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        path = export.export_for_serving(
            tiny_classifier(), str(tmp_path / "served"), "m")
    finally:
        os.umask(old)
    found = modes(path)
    assert {"saved_model.pb", "variables", "fingerprint.pb"} <= set(found)
    for name, mode in found.items():
        is_dir = os.path.isdir(os.path.join(path, name))
        assert mode == (0o755 if is_dir else 0o644), (name, oct(mode))
    # The directories the export created on the way are readable too.
    assert modes(str(tmp_path / "served"))["."] == 0o755
    assert modes(str(tmp_path / "served" / "m"))["."] == 0o755


def test_a_taken_version_is_skipped_or_refused(tmp_path):
    model_dir = tmp_path / "m"
    for taken in ("1", "2"):
        (model_dir / taken).mkdir(parents=True)
        (model_dir / taken / "saved_model.pb").write_bytes(b"earlier export")
    staged = model_dir / ".tmp-export-1-ab-host"
    staged.mkdir()
    (staged / "saved_model.pb").write_bytes(b"new")
    # Another exporter took 1 and 2 after this one chose version 1.
    path = versions.claim_version(str(staged), str(model_dir), "m", 1, fixed=False)
    assert path == str(model_dir / "3")
    assert (model_dir / "3" / "saved_model.pb").read_bytes() == b"new"
    for taken in ("1", "2"):
        assert (model_dir / taken / "saved_model.pb").read_bytes() == b"earlier export"
    staged.mkdir()
    with pytest.raises(FileExistsError, match="Version 2 of 'm' already exists"):
        versions.claim_version(str(staged), str(model_dir), "m", 2, fixed=True)
    assert (model_dir / "2" / "saved_model.pb").read_bytes() == b"earlier export"


_CONCURRENT_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import keras
    from nbn_keras.serving import export

    model_path, base, ready, me, count = sys.argv[1:6]
    model = keras.models.load_model(model_path, compile=False)
    open(os.path.join(ready, me), "w").close()
    while len(os.listdir(ready)) < int(count):  # all start together
        time.sleep(0.002)
    print("EXPORTED", export.export_for_serving(model, base, "m"))
    """
)


@pytest.mark.slow
def test_concurrent_exports_take_distinct_versions(tmp_path):
    model_path = tmp_path / "tiny.keras"
    tiny_classifier().save(model_path)
    (tmp_path / "ready").mkdir()
    (tmp_path / "export.py").write_text(_CONCURRENT_SCRIPT)
    base, model_dir = tmp_path / "served", tmp_path / "served" / "m"
    incomplete, stop = [], threading.Event()

    def watch():
        # What a TF Serving poll would see: every integer directory must be
        # a complete SavedModel the moment it appears.
        while not stop.is_set():
            names = os.listdir(model_dir) if model_dir.is_dir() else []
            for name in names:
                version = model_dir / name
                if name.isdigit() and not (
                    (version / "saved_model.pb").is_file()
                    and (version / "variables" / "variables.index").is_file()
                ):
                    incomplete.append(name)
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        processes = [
            subprocess.Popen(
                [sys.executable, str(tmp_path / "export.py"), str(model_path),
                 str(base), str(tmp_path / "ready"), str(i), "3"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
            )
            for i in range(3)
        ]
        outputs = [p.communicate(timeout=600) for p in processes]
    finally:
        stop.set()
        watcher.join()
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    exported = sorted(out.split("EXPORTED", 1)[1].strip() for out, _ in outputs)
    assert exported == [str(model_dir / v) for v in ("1", "2", "3")]
    assert sorted(os.listdir(model_dir)) == ["1", "2", "3"]  # no leftovers
    assert not incomplete, incomplete
    images = pixels().astype("float32")
    expected = predict(keras.models.load_model(model_path), images)
    for version in ("1", "2", "3"):
        served = tf.saved_model.load(str(model_dir / version))
        logits = served.signatures["serving_default"](images=tf.constant(images))
        np.testing.assert_allclose(logits["logits"], expected, atol=1e-5)


def test_stale_temporary_directories_are_removed(tmp_path):
    model_dir = tmp_path / "m"
    host = socket.gethostname()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    dead_pid = int(finished.stdout)
    names = {
        "dead_owner": f".tmp-export-{dead_pid}-0123abcd-{host}",
        "live_owner": f".tmp-export-{os.getpid()}-0123abcd-{host}",
        "other_host_old": f".tmp-export-{os.getpid()}-0123abcd-{host}.elsewhere",
        "other_host_new": f".tmp-export-{os.getpid()}-4567abcd-{host}.elsewhere",
        "older_naming_old": ".tmp-3-k2j4h5",
        "older_naming_new": ".tmp-4-k2j4h5",
    }
    for key, name in names.items():
        (model_dir / name / "variables").mkdir(parents=True)
        if key.endswith("_old"):
            hours_ago = time.time() - 2 * 3600
            os.utime(model_dir / name, (hours_ago, hours_ago))
    (model_dir / "1").mkdir()
    (model_dir / "1" / "saved_model.pb").write_bytes(b"earlier export")
    path = export.export_for_serving(tiny_classifier(), str(tmp_path), "m")
    assert path == str(model_dir / "2")
    left = set(os.listdir(model_dir))
    assert left == {"1", "2", names["live_owner"], names["other_host_new"],
                    names["older_naming_new"]}
    assert (model_dir / "1" / "saved_model.pb").read_bytes() == b"earlier export"


def test_header_sizes_match_the_decoded_sizes():
    from PIL import Image  # Installed with matplotlib.

    rng = np.random.default_rng(5)
    encoded = []
    for height, width in ((7, 300), (260, 9), (33, 33)):
        array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        image = Image.fromarray(array)
        encoded += [
            (pil_bytes(image, "PNG"), (height, width)),
            (pil_bytes(image.convert("L"), "PNG"), (height, width)),
            (pil_bytes(image.convert("RGBA"), "PNG"), (height, width)),
            (pil_bytes(image, "JPEG"), (height, width)),
            (pil_bytes(image, "GIF"), (height, width)),
            (pil_bytes(image, "BMP"), (height, width)),
            (tf.io.encode_jpeg(array, progressive=True).numpy(), (height, width)),
        ]
    for data, expected in encoded:
        size = decoding.encoded_image_size(tf.constant(data)).numpy().tolist()
        decoded = tf.io.decode_image(data, expand_animations=False).shape[:2]
        assert size == list(expected) == list(decoded), data[:4]
    with pytest.raises(tf.errors.InvalidArgumentError, match="not a JPEG"):
        decoding.encoded_image_size(tf.constant(b"RIFF....WEBPVP8 "))


@pytest.mark.slow
def test_saved_model_cli_run_reports_bad_inputs(tmp_path):
    path = export.export_for_serving(tiny_classifier(), str(tmp_path), "m",
                                     max_image_pixels=20 * 20)
    nan = pixels(n=2).astype("float32")
    nan[1, 0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    encoded = png_bytes(pixels(n=1)) + png_bytes(pixels(n=1, size=21))
    np.save(tmp_path / "bytes.npy", np.array(encoded, dtype=object), allow_pickle=True)
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    outputs = {}
    for signature, inputs in (("serving_default", f"images={tmp_path / 'nan.npy'}"),
                              ("serve_image_bytes", f"image_bytes={tmp_path / 'bytes.npy'}")):
        result = subprocess.run(
            [cli, "run", "--dir", path, "--tag_set", "serve", "--signature_def",
             signature, "--inputs", inputs],
            capture_output=True, text=True, env=ENV, timeout=300,
        )
        assert result.returncode != 0
        outputs[signature] = result.stderr
    assert re.search(r"`images` must be finite pixel values \[batch, 12, 12, 3\]",
                     outputs["serving_default"])
    assert re.search(r"image_bytes\[1\] is 21x21 pixels, more than the 400 pixels",
                     outputs["serve_image_bytes"])


# --------------------------------------------------------------------------
# Bad flags of `python -m nbn_keras.export` (the README's "Bad input" table):
# parsed and run in this process, the user's export directory as the target.
# Each case asserts its error and that the user's files (`user_files`) stay
# as they were.


def export_command(argv):
    """A case: the export command with the flags `argv(ctx)`."""
    def act(ctx):
        values = flags.FlagValues()
        export.define_flags(values)
        values(["export", *argv(ctx)])
        return export.run_from_flags(values)

    return act


def users_export(*argv):
    """A case: `export_command` into the user's `saved_models/m/`."""
    return export_command(lambda ctx: [
        f"--base_dir={ctx.user / 'saved_models'}", "--model_name=m",
        *[flag(ctx) if callable(flag) else flag for flag in argv]])


def users_best(ctx):
    return f"--model={ctx.user / 'run' / 'best.keras'}"


def export_of_a_truncated_file(ctx):
    path = ctx.trained_copy()
    path.write_bytes(path.read_bytes()[:100000])
    ctx.ready()
    users_export(f"--model={path}")(ctx)


def export_next_to_someone_elses_file(ctx):
    (ctx.tmp / "served" / "m").mkdir(parents=True)
    (ctx.tmp / "served" / "m" / "notes.txt").write_text("mine")
    ctx.ready()
    export_command(lambda ctx: [f"--base_dir={ctx.tmp / 'served'}", "--model_name=m",
                                users_best(ctx)])(ctx)


EXPORT_FLAG_CASES = [
    bad_input("export_over_an_existing_version", users_export(users_best, "--version=1"),
              SystemExit, r"Version 1 of 'm' already exists"),
    bad_input("export_with_a_negative_version", users_export(users_best, "--version=-1"),
              flags.IllegalFlagValueError, r"--version=-1: -1 is not a non-negative integer"),
    bad_input("export_with_no_pixels_allowed", users_export(
        users_best, "--max_image_pixels=0"), flags.IllegalFlagValueError,
        r"--max_image_pixels=0: 0 is not a positive integer"),
    bad_input("export_with_a_bad_image_size", users_export(users_best, "--image_size=12x"),
              SystemExit, r"--image_size must be H or HxW, got '12x'"),
    bad_input("export_with_a_mismatched_image_size", users_export(
        users_best, "--image_size=8"), SystemExit,
        r"image_size \(8, 8\) does not match the model's input shape"),
    bad_input("export_with_an_unknown_resize_mode", users_export(
        users_best, "--resize_mode=stretch"), flags.IllegalFlagValueError,
        r"--resize_mode=stretch: value should be one of"),
    bad_input("export_without_a_model", users_export(), flags.IllegalFlagValueError,
              r"--model must have a value other than None"),
    bad_input("export_of_a_missing_file", users_export(
        lambda ctx: f"--model={ctx.tmp / 'absent.keras'}"), SystemExit,
        r"No model file at '\S*absent\.keras'"),
    bad_input("export_of_a_weights_file", users_export(
        lambda ctx: f"--model={ctx.user / 'run' / 'backup' / 'latest.weights.h5'}"),
        SystemExit, r"is not a \.keras file\. Only whole-model \.keras files can be exported"),
    bad_input("export_of_a_truncated_file", export_of_a_truncated_file, SystemExit,
              r"nbn_keras\.export: error: '\S*model\.keras' is not a complete \.keras file",
              slow=True),
    bad_input("export_with_a_nested_model_name", export_command(lambda ctx: [
        f"--base_dir={ctx.user / 'saved_models'}", "--model_name=a/b", users_best(ctx)]),
        SystemExit, r"Invalid model_name 'a/b'"),
    bad_input("export_with_a_temporary_model_name", export_command(lambda ctx: [
        f"--base_dir={ctx.user / 'saved_models'}", "--model_name=.tmp-export-1",
        users_best(ctx)]), SystemExit, r"Invalid model_name '\.tmp-export-1'"),
    bad_input("export_next_to_someone_elses_file", export_next_to_someone_elses_file,
              SystemExit,
              r"nbn_keras\.export: error: \S+/m holds 1 entry that is not a model version "
              r"\(notes\.txt\); .*pass allow_foreign_files=True \(--allow_foreign_export_dir\)"),
]


@pytest.mark.parametrize("act, error, message", EXPORT_FLAG_CASES)
def test_bad_export_flag(act, error, message, user_files):
    check_bad_input(user_files, act, error, message)
