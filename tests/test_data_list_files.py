import os

import numpy as np
import pytest
import tensorflow as tf

import nbn_keras.data as nbn_data
from nbn_keras.data import list_files
from nbn_keras.data import transforms
from tests.helpers import bad_input
from tests.helpers import check_bad_input
from tests.helpers import jpeg_bytes
from tests.helpers import jpeg_cut_after_scan_header
from tests.helpers import jpeg_with_corrupt_data
from tests.helpers import png_bytes

SIZE = 32


def _write_image(path, height, width, seed, fmt="jpeg"):
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3)).astype(np.uint8)
    encode = tf.io.encode_jpeg if fmt == "jpeg" else tf.io.encode_png
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tf.io.write_file(path, encode(pixels))


@pytest.fixture()
def image_root(tmp_path):
    root = tmp_path / "images"
    shapes = [(48, 64), (80, 40), (60, 60), (50, 70), (70, 50), (40, 90)]
    lines = []
    for i, (h, w) in enumerate(shapes):
        name = f"train/class {i % 3}/img_{i}.jpg"
        _write_image(str(root / name), h, w, seed=i)
        lines.append(f"{name} {i % 3}")
    _write_image(str(root / "val/a.png"), 50, 60, seed=9, fmt="png")
    _write_image(str(root / "val/b.jpg"), 64, 48, seed=10)
    (tmp_path / "train.txt").write_text("# comment\n" + "\n".join(lines) + "\n\n")
    (tmp_path / "val.txt").write_text("val/a.png 0\nval/b.jpg 2\n")
    return tmp_path


def _load(root, **kwargs):
    options = dict(train_list=str(root / "train.txt"), val_list=str(root / "val.txt"),
                   image_root=str(root / "images"), image_size=SIZE)
    return nbn_data.load("imagenet_lt", **{**options, **kwargs})


def test_parse_list_file(image_root):
    paths, labels, lines = list_files.parse_list_file(str(image_root / "train.txt"), "/r")
    assert paths[0] == "/r/train/class 0/img_0.jpg"
    assert labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert lines.tolist() == [2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize("bad_line, reason", [
    ("just_a_path.jpg", "there is no label"),
    ("img.jpg ", "there is no label"),  # Trailing blank, empty label.
    ("img.jpg\u30003", "there is no label"),  # An ideographic space is no separator.
    ("img.jpg cat", "the label 'cat' is not an integer"),
    ("img.jpg 1.5", "the label '1.5' is not an integer"),
    ("img.jpg -1", "the label -1 is negative"),
    ("img.jpg \u0663", r"the label '\u0663' has digits other than ASCII 0-9 "
                      r"\(U\+0663 ARABIC-INDIC DIGIT THREE\)"),
    ("img.jpg \uff11\uff12", r"the label '\uff11\uff12' has digits other than ASCII 0-9 "
                           r"\(U\+FF11 FULLWIDTH DIGIT ONE, U\+FF12 FULLWIDTH DIGIT TWO\)"),
    ("img.jpg \u00b2", r"the label '\u00b2' has digits other than ASCII 0-9 "
                     r"\(U\+00B2 SUPERSCRIPT TWO\)"),  # isdigit(), but int() refuses it.
    ("img.jpg 2147483648", "the label 2147483648 is larger than 2147483647"),
    ("img.jpg 99999999999999999999",  # Beyond int64.
     "the label 99999999999999999999 is larger than 2147483647"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad_line, reason):
    path = tmp_path / "list.txt"
    path.write_text(f"a.jpg 0\nb.jpg 1\n{bad_line}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"list\.txt, line 3: expected 'relative/path "
                       r"label' with an integer label >= 0, got .*: " + reason):
        list_files.parse_list_file(str(path))


def test_largest_label_is_accepted_and_a_stray_one_fails_fast(tmp_path):
    (tmp_path / "t.txt").write_text("a.jpg 0\nb.jpg 2147483647\n")
    _, labels, _ = list_files.parse_list_file(str(tmp_path / "t.txt"))
    assert labels.tolist() == [0, 2**31 - 1]
    # Inferred classes: named without building an array of 2**31 classes.
    with pytest.raises(ValueError, match=r"t\.txt, line 2: label 2147483647 makes "
                       r"2147483648 classes, but 2147483646 of them \(1, 2, 3, 4, 5, "
                       r"\.\.\.\) have no training image"):
        nbn_data.load("imagenet_lt", train_list=str(tmp_path / "t.txt"),
                      val_list=str(tmp_path / "t.txt"), image_root=str(tmp_path),
                      check_files=False)


@pytest.mark.parametrize("data, message", [
    ("a.jpg 0\ncaf\u00e9.jpg 1\n".encode("latin-1"),
     r"l\.txt, line 2: not valid UTF-8 \(byte b'\\xe9' at column 4\); list files "
     r"must be UTF-8"),
    ("a.jpg 0\n".encode("utf-16"), r"l\.txt: the file is UTF-16 or UTF-32 encoded"),
    ("a.jpg 0\n".encode("utf-32"), r"l\.txt: the file is UTF-16 or UTF-32 encoded"),
    (b"a.jpg 0\n\xff\xfeb.jpg 1\n", r"l\.txt, line 2: not valid UTF-8 \(byte b'\\xff' at "
                                    r"column 1\)"),
])
def test_list_file_that_is_not_utf8(tmp_path, data, message):
    (tmp_path / "l.txt").write_bytes(data)
    with pytest.raises(ValueError, match=message):
        list_files.parse_list_file(str(tmp_path / "l.txt"))


def test_comments_separators_and_paths_starting_with_a_hash(tmp_path):
    lines = [
        "# a comment", "   #\tindented comment", "#", "",
        "#1/a.jpg 1",  # `#` not followed by a blank: a path.
        "./# b.jpg 2",  # A path that starts with "# ".
        "dir with spaces/c d.jpg\t 3",
        "\u5199\u771f\u3000\u4e00.jpg 4",  # The ideographic space is in the path.
        "no\u00a0break.jpg 5",
        "e.jpg 006",
    ]
    # Windows and old Mac line ends; a \x0b or \x1c is no line break.
    lines.append("f\x0bg\x1ch.jpg 7")
    for end in ("\r\n", "\r"):
        (tmp_path / "l.txt").write_text(end.join(lines) + end, encoding="utf-8",
                                        newline="")
        paths, labels, numbers = list_files.parse_list_file(str(tmp_path / "l.txt"), "r")
        assert paths.tolist() == [
            "r/#1/a.jpg", "r/./# b.jpg", "r/dir with spaces/c d.jpg",
            "r/\u5199\u771f\u3000\u4e00.jpg", "r/no\u00a0break.jpg", "r/e.jpg",
            "r/f\x0bg\x1ch.jpg"]
        assert labels.tolist() == [1, 2, 3, 4, 5, 6, 7]
        assert numbers.tolist() == [5, 6, 7, 8, 9, 10, 11]


def test_duplicate_paths(tmp_path):
    path = tmp_path / "l.txt"
    path.write_text("a.jpg 0\nb.jpg 1\n./a.jpg 0\nc.jpg 1\nb.jpg 1\n")
    with pytest.raises(ValueError, match=r"l\.txt, line 3: '\./a\.jpg' is listed again "
                       r"\(first on line 1\); 2 duplicate line\(s\) in this list.*"
                       r"allow_duplicate_paths=True"):
        list_files.parse_list_file(str(path))
    _, labels, numbers = list_files.parse_list_file(str(path), allow_duplicate_paths=True)
    assert labels.tolist() == [0, 1, 0, 1, 1] and numbers.tolist() == [1, 2, 3, 4, 5]
    # One path under two labels: an error even when repeats are allowed.
    path.write_text("a.jpg 0\nb.jpg 1\na/../a.jpg 2\n")
    for allow in (False, True):
        with pytest.raises(ValueError, match=r"l\.txt, line 3: 'a/\.\./a\.jpg' has label "
                           r"2, but line 1 lists it with label 0; one image cannot have "
                           r"two labels"):
            list_files.parse_list_file(str(path), allow_duplicate_paths=allow)


@pytest.mark.slow
def test_utf8_paths_train_evaluate_and_find_a_bad_image(tmp_path):
    # Constant grey images: every crop, resize and flip of one keeps its
    # value, so each pipeline output must be that value (no colour jitter in
    # the iNaturalist recipe).
    names = {"\u5199\u771f/caf\u00e9 \u00e0.png": (0, 40), "\u5199\u771f/na\u00efve.png": (1, 80),
             "\u0444\u043e\u0442\u043e/\u00fc\u00df.png": (2, 120)}
    lines = []
    for name, (label, value) in names.items():
        pixels = np.full((30, 40, 3), value, np.uint8)
        os.makedirs(tmp_path / os.path.dirname(name), exist_ok=True)
        tf.io.write_file(str(tmp_path / name), tf.io.encode_png(pixels))
        lines.append(f"{name} {label}")
    (tmp_path / "l.txt").write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode("utf-8"))
    data = nbn_data.load("inaturalist", train_list=str(tmp_path / "l.txt"),
                         val_list=str(tmp_path / "l.txt"), image_root=str(tmp_path),
                         image_size=8)
    assert data.class_counts.tolist() == [1, 1, 1]
    grey = np.asarray([value for _, value in sorted(names.values())], np.float32)
    batches = list(nbn_data.make_train_dataset(data, 3, epochs=1, seed=1).as_numpy_iterator())
    batches += list(nbn_data.make_eval_dataset(data, "val", 3).as_numpy_iterator())
    assert len(batches) == 2
    for images, labels in batches:
        assert images.shape == (3, 8, 8, 3)
        np.testing.assert_allclose(images, np.broadcast_to(
            grey[labels][:, None, None, None], images.shape), atol=0.5)
    assert batches[-1][1].tolist() == [0, 1, 2]
    # A bad image named in training: test_bad_image_file; found up front here.
    broken = tmp_path / "\u5199\u771f" / "na\u00efve.png"
    broken.write_bytes(b"not an image")
    assert list_files.find_undecodable(data.train_split.records) == [str(broken)]


def test_missing_image_names_file(image_root):
    with open(image_root / "train.txt", "a") as f:
        f.write("train/missing.jpg 1\n")
    with pytest.raises(FileNotFoundError, match=r"missing\.jpg.*train\.txt, line 9"):
        _load(image_root)


def test_skip_counts_missing_and_undecodable(image_root):
    (image_root / "images/train/broken.jpg").write_bytes(b"not an image at all")
    with open(image_root / "train.txt", "a") as f:
        f.write("train/missing.jpg 1\ntrain/broken.jpg 2\n")
    data = _load(image_root, on_bad_image="skip")
    assert len(data.train_split) == 6
    assert [os.path.basename(p) for p in data.skipped["train"]] == ["missing.jpg", "broken.jpg"]
    assert data.class_counts.tolist() == [2, 2, 2]


def test_undecodable_image_error_names_file(image_root):
    (image_root / "images/train/broken.jpg").write_bytes(b"not an image at all")
    with open(image_root / "train.txt", "a") as f:
        f.write("train/broken.jpg 2\n")
    data = _load(image_root)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"broken\.jpg") as raised:
        list(nbn_data.make_eval_dataset(data, "train", batch_size=8))
    # The file's line without TensorFlow's wrapping, as the training command prints it.
    error = transforms.unreadable_image_error(raised.value)
    assert isinstance(error, transforms.UnreadableImageError) and isinstance(error, ValueError)
    assert str(error) == (
        f"Cannot read or decode image file {image_root}/images/train/broken.jpg (the "
        "decoder's own message is in the TensorFlow log). nbn_keras.data.list_files."
        "find_undecodable lists every such file; on_bad_image='skip' drops them.")
    other = tf.errors.InvalidArgumentError(None, None, "assertion failed: [x > 0]")
    assert transforms.unreadable_image_error(other) is None


def test_jpeg_train_and_eval_pipelines(image_root, tmp_path):
    data = _load(image_root)
    assert data.num_classes == 3 and data.recipe == "imagenet"
    assert data.test_split is data.val_split
    assert data.mean == (0.485, 0.456, 0.406)
    train = nbn_data.make_train_dataset(data, 4, sampler="class_balanced", epochs=2)
    batches = list(train.as_numpy_iterator())
    assert len(batches) == 2 * (6 // 4)
    images, labels = batches[0]
    assert images.shape == (4, SIZE, SIZE, 3) and images.dtype == np.float32
    assert labels.dtype == np.int32
    assert 0.0 <= images.min() and images.max() <= 255.0
    evaluated = list(nbn_data.make_eval_dataset(data, "val", batch_size=8).as_numpy_iterator())
    assert evaluated[0][0].shape == (2, SIZE, SIZE, 3)
    assert evaluated[0][1].tolist() == [0, 2]
    data.write_subset(str(tmp_path / "run"))
    assert os.path.exists(tmp_path / "run" / "class_counts.json")


def test_eval_transform_takes_the_centre(tmp_path):
    # A 64x128 image, white in columns 32-95 and black elsewhere: the centre
    # crop (56x56 at columns 36-91) sees only white.
    pixels = np.zeros((64, 128, 3), np.uint8)
    pixels[:, 32:96] = 255
    tf.io.write_file(str(tmp_path / "c.png"), tf.io.encode_png(pixels))
    (tmp_path / "l.txt").write_text("c.png 0\n")
    data = nbn_data.load("inaturalist", train_list=str(tmp_path / "l.txt"),
                         val_list=str(tmp_path / "l.txt"), image_root=str(tmp_path),
                         image_size=16)
    image, _ = next(iter(data.val))
    np.testing.assert_allclose(image.numpy(), 255.0)
    assert data.mean == (0.466, 0.471, 0.380)


def test_bad_options(image_root):
    with pytest.raises(ValueError, match="on_bad_image"):
        _load(image_root, on_bad_image="ignore")
    with pytest.raises(ValueError, match="recipe"):
        _load(image_root, recipe="cifar")
    with pytest.raises(ValueError, match="num_classes"):
        _load(image_root, num_classes=2)


def test_find_undecodable_decodes_every_file_in_full(tmp_path):
    good = jpeg_bytes(seed=0)
    files = {
        "good.jpg": good,
        "good.png": tf.io.encode_png(np.zeros((5, 7, 3), np.uint8)).numpy(),
        # Valid header, corrupt data: the training pipeline's cropped decode
        # can succeed on these, a full decode does not.
        "corrupt_data.jpg": jpeg_with_corrupt_data(good, seed=1),
        "truncated.jpg": good[: int(len(good) * 0.6)],
        "no_data.jpg": jpeg_cut_after_scan_header(good),
        "truncated.png": tf.io.encode_png(np.zeros((50, 70, 3), np.uint8)).numpy()[:60],
        "text.jpg": b"hello",
        "empty.png": b"",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    paths = [str(tmp_path / name) for name in files] + [str(tmp_path / "absent.jpg")]
    bad = list_files.find_undecodable(paths)
    assert sorted(os.path.basename(p) for p in bad) == sorted(
        set(files) - {"good.jpg", "good.png"} | {"absent.jpg"})


def test_file_pipelines_keep_order_and_seeds(image_root):
    from nbn_keras.data import samplers, transforms

    data = _load(image_root)
    # tf.data knows the lengths, as for in-memory data (Keras counts steps).
    assert int(data.split_dataset("train").cardinality()) == 6
    assert int(nbn_data.make_eval_dataset(data, "val", 1).cardinality()) == 2
    assert int(nbn_data.make_train_dataset(data, 2, epochs=2).cardinality()) == 6
    assert (nbn_data.make_train_dataset(data, 2).cardinality()
            == tf.data.INFINITE_CARDINALITY)
    # Evaluation: the records in list order, each through the transform.
    decode = transforms.eval_transform(data.recipe, data.image_shape)
    for (image, label), path, expected_label in zip(
            data.split_dataset("train"), data.train_split.records, data.train_split.labels):
        np.testing.assert_array_equal(image, decode(tf.constant(path)))
        assert int(label) == expected_label
    # Training: the sampler's index stream, element k seeded with (seed, k),
    # for a finite (epochs=2) and an endless (epochs=None) stream.
    augment = transforms.train_transform(data.recipe, data.image_shape)
    for epochs in (2, None):
        ds = nbn_data.make_train_dataset(data, 2, sampler="sqrt", epochs=epochs, seed=3)
        indices = list(samplers.index_stream(
            data.train_split.labels, "sqrt", examples_per_epoch=6, epochs=epochs,
            seed=3).take(12).as_numpy_iterator())
        images = np.concatenate([batch for batch, _ in ds.take(6).as_numpy_iterator()])
        assert len(images) == len(indices) == 6 * 2
        for k, (image, (position, index)) in enumerate(zip(images, indices)):
            assert position == k
            expected = augment(tf.constant(data.train_split.records[index]),
                               tf.constant([3, position], tf.int64))
            np.testing.assert_allclose(image, expected, atol=1e-4)


def torchvision_resize_center_crop(path, short_side=256, crop=224):
    """torchvision's Resize(256) + CenterCrop(224) of a PIL image, restated with PIL."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    width, height = image.size
    size = ((short_side, int(short_side * height / width)) if width <= height
            else (int(short_side * width / height), short_side))
    image = image.resize(size, Image.BILINEAR)  # PIL's filter widens when reducing.
    top, left = int(round((size[1] - crop) / 2.0)), int(round((size[0] - crop) / 2.0))
    return np.asarray(image.crop((left, top, left + crop, top + crop)), np.float32)


@pytest.mark.parametrize("name, box", [("china.jpg", None), ("flower.jpg", (0, 0, 300, 427))])
def test_eval_transform_is_torchvisions_on_a_photo(tmp_path, name, box):
    """A landscape photo and a portrait crop of one, saved as JPEG."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    path = str(tmp_path / name)
    image = Image.fromarray(load_sample_image(name))
    (image.crop(box) if box else image).save(path, quality=90)
    ours = transforms.eval_transform("imagenet", (224, 224, 3))(tf.constant(path)).numpy()
    difference = np.abs(ours - torchvision_resize_center_crop(path))
    # Only rounding to whole levels differs (without antialiasing: ~6 levels
    # on average; with TensorFlow's default JPEG IDCT: ~1).
    assert difference.max() <= 1 and difference.mean() < 0.25


# --------------------------------------------------------------------------
# Bad list and image files (the README's "Bad input" table): each case
# asserts its error and that the lists, the images and the user's files
# (`user_files`) stay as they were.


@pytest.fixture()
def lists(tmp_path):
    """6 training JPEGs (3 classes) and 2 validation images with lists."""
    root = tmp_path / "lists"
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


def load_lists(root, **options):
    return nbn_data.load(
        "imagenet_lt", train_list=str(root / "train.txt"),
        val_list=str(root / "val.txt"), image_root=str(root), image_size=16,
        **options)


def append(path, text):
    with open(path, "a") as f:
        f.write(text)


def iterate(ds):
    return sum(int(images.shape[0]) for images, _ in ds)


def appended(name, text):
    return lambda root: append(root / name, text)


def written(name, text, encoding="utf-8"):
    return lambda root: (root / name).write_text(text, encoding=encoding)


def edit_and_load(edit=None, **options):
    """A case: `edit(lists)` writes the bad input, then the lists are loaded."""
    def act(ctx, lists):
        if edit is not None:
            edit(lists)
            ctx.ready()
        load_lists(lists, **options)

    return act


def label_of_the_test_list_beyond_num_classes(ctx, lists):
    (lists / "test.txt").write_text("val/a.png 5\n")
    ctx.ready()
    load_lists(lists, num_classes=4, test_list=str(lists / "test.txt"))


def latin1_list_file(ctx, lists):
    with open(lists / "train.txt", "ab") as f:
        f.write("train/caf\u00e9.jpg 0\n".encode("latin-1"))
    ctx.ready()
    load_lists(lists)


def repeated_line_allowed_when_asked(ctx, lists):
    append(lists / "train.txt", "train/c0/0.jpg 0\n./train/c0/0.jpg 0\n")
    ctx.ready()
    data = load_lists(lists, allow_duplicate_paths=True)
    assert data.class_counts.tolist() == [4, 2, 2]
    assert len(data.train_split) == 8


def _write_utf8_images(lists):
    """Two images under CJK, accented and Cyrillic names, listed after a BOM."""
    names = ["\u5199\u771f/caf\u00e9 \u00e0.jpg", "\u0444\u043e\u0442\u043e/\u753b\u50cf.jpg"]
    for seed, name in enumerate(names):
        (lists / name).parent.mkdir(exist_ok=True)
        (lists / name).write_bytes(jpeg_bytes(seed=seed))
    with open(lists / "train.txt", "r+b") as f:
        lines = f.read()
        f.seek(0)
        f.write(b"\xef\xbb\xbf" + lines + f"{names[0]} 1\n{names[1]} 2\n".encode("utf-8"))
    return names


def utf8_paths(ctx, lists):
    names = _write_utf8_images(lists)
    ctx.ready()
    data = load_lists(lists)
    assert [os.path.relpath(p, lists) for p in data.train_split.records[-2:]] == names
    assert data.class_counts.tolist() == [2, 3, 3]
    # Decoded (training too: test_utf8_paths_train_evaluate_and_find_a_bad_image).
    assert iterate(nbn_data.make_eval_dataset(data, "train", 8)) == 8


def path_starting_with_a_hash(ctx, lists):
    (lists / "#1").mkdir()
    (lists / "#1" / "a.jpg").write_bytes(jpeg_bytes(seed=12))
    append(lists / "train.txt", "# a comment 1\n#1/a.jpg 1\n")
    ctx.ready()
    data = load_lists(lists)
    assert data.train_split.records[-1] == str(lists / "#1" / "a.jpg")
    assert data.class_counts.tolist() == [2, 3, 2]


def outside_path_allowed_when_asked(ctx, lists):
    outside = ctx.tmp / "elsewhere" / "x.jpg"
    outside.parent.mkdir()
    outside.write_bytes(jpeg_bytes(seed=11))
    append(lists / "train.txt", "../elsewhere/x.jpg 1\n")
    ctx.ready()
    data = load_lists(lists, allow_outside_image_root=True)
    assert len(data.train_split) == 7
    assert os.path.samefile(data.train_split.records[-1], outside)


def missing_image_skipped(ctx, lists):
    append(lists / "train.txt", "train/c1/gone.jpg 1\n")
    ctx.ready()
    data = load_lists(lists, on_bad_image="skip")
    assert [os.path.basename(p) for p in data.skipped["train"]] == ["gone.jpg"]
    assert data.class_counts.tolist() == [2, 2, 2]


def missing_list_file(ctx, lists):
    nbn_data.load("imagenet_lt", train_list=str(lists / "nope.txt"),
                  val_list=str(lists / "val.txt"), image_root=str(lists))


LIST_FILE_CASES = [
    bad_input("label_above_num_classes", edit_and_load(
        appended("train.txt", "train/c0/extra.jpg 999\n"), num_classes=3), ValueError,
        r"train\.txt, line 7: label 999 is not in \[0, 3\) \(num_classes=3\)"),
    bad_input("stray_label_with_inferred_classes", edit_and_load(
        appended("train.txt", "train/c0/extra.jpg 999\n")), ValueError,
        r"train\.txt, line 7: label 999 makes 1000 classes, but 996 of them "
        r"\(3, 4, 5, 6, 7, \.\.\.\) have no training image"),
    bad_input("val_label_beyond_training_classes", edit_and_load(
        written("val.txt", "val/a.png 0\nval/b.jpg 7\n")), ValueError,
        r"val\.txt, line 2: label 7 is not in \[0, 3\) \(num_classes=3, inferred from "
        r"the training list"),
    bad_input("label_of_the_test_list_beyond_num_classes",
              label_of_the_test_list_beyond_num_classes, ValueError,
              r"test\.txt, line 1: label 5 is not in \[0, 4\) \(num_classes=4\)"),
    bad_input("negative_label", edit_and_load(
        appended("train.txt", "train/c0/0.jpg -1\n")), ValueError,
        r"train\.txt, line 7: expected 'relative/path label' with an integer label >= 0, "
        r"got 'train/c0/0\.jpg -1': the label -1 is negative\."),
    bad_input("non_integer_label", edit_and_load(
        appended("train.txt", "train/c0/0.jpg cat\n")), ValueError,
        r"train\.txt, line 7: expected 'relative/path label'.*'train/c0/0\.jpg cat'"),
    bad_input("line_without_label", edit_and_load(
        written("val.txt", "val/a.png 0\nval/b.jpg\n")), ValueError,
        r"val\.txt, line 2: expected 'relative/path label'"),
    bad_input("arabic_indic_label", edit_and_load(
        appended("train.txt", "train/c0/0.jpg \u0663\n")), ValueError,
        r"train\.txt, line 7: .*: the label '\u0663' has digits other than ASCII 0-9 "
        r"\(U\+0663 ARABIC-INDIC DIGIT THREE\)\."),
    bad_input("fullwidth_label", edit_and_load(
        appended("train.txt", "train/c0/0.jpg \uff13\n")), ValueError,
        r"train\.txt, line 7: .*: the label '\uff13' has digits other than ASCII 0-9 "
        r"\(U\+FF13 FULLWIDTH DIGIT THREE\)\."),
    bad_input("label_beyond_int32", edit_and_load(
        appended("train.txt", "train/c0/0.jpg 2147483648\n")), ValueError,
        r"train\.txt, line 7: .*: the label 2147483648 is larger than 2147483647\."),
    bad_input("largest_stray_label_with_inferred_classes", edit_and_load(
        appended("train.txt", "train/c0/extra.jpg 2147483647\n")), ValueError,
        r"train\.txt, line 7: label 2147483647 makes 2147483648 classes, but 2147483644 "
        r"of them \(3, 4, 5, 6, 7, \.\.\.\) have no training image"),
    bad_input("latin1_list_file", latin1_list_file, ValueError,
              r"train\.txt, line 7: not valid UTF-8 \(byte b'\\xe9' at column 10\); list "
              r"files must be UTF-8 \(a byte-order mark is accepted\)\."),
    bad_input("utf16_list_file", edit_and_load(
        written("val.txt", "val/a.png 0\nval/b.jpg 2\n", encoding="utf-16")), ValueError,
        r"val\.txt: the file is UTF-16 or UTF-32 encoded \(it starts with that "
        r"byte-order mark\); list files must be UTF-8\."),
    bad_input("repeated_line", edit_and_load(
        appended("train.txt", "train/c0/0.jpg 0\n")), ValueError,
        r"train\.txt, line 7: 'train/c0/0\.jpg' is listed again \(first on line 1\); 1 "
        r"duplicate line\(s\) in this list, which change the class sizes\. Remove them, "
        r"or pass allow_duplicate_paths=True \(--allow_duplicate_paths\)"),
    bad_input("path_under_two_labels", edit_and_load(
        appended("train.txt", "train/c0/0.jpg 2\n")), ValueError,
        r"train\.txt, line 7: 'train/c0/0\.jpg' has label 2, but line 1 lists it with "
        r"label 0; one image cannot have two labels \(1 such line\(s\) in this list\)\."),
    bad_input("path_under_two_labels_with_duplicates_allowed", edit_and_load(
        appended("val.txt", "./val/a.png 1\n"), allow_duplicate_paths=True), ValueError,
        r"val\.txt, line 3: '\./val/a\.png' has label 1, but line 1 lists it with label 0"),
    bad_input("repeated_line_allowed_when_asked", repeated_line_allowed_when_asked, None,
              "accepted"),
    bad_input("utf8_paths", utf8_paths, None, "accepted"),
    bad_input("path_starting_with_a_hash", path_starting_with_a_hash, None, "accepted"),
    bad_input("path_climbing_out_of_the_root", edit_and_load(
        appended("train.txt", "../../../../etc/passwd 0\n")), ValueError,
        r"train\.txt, line 7: the path '\.\./\.\./\.\./\.\./etc/passwd' is outside the "
        r"image root .*allow_outside_image_root=True"),
    bad_input("absolute_path", edit_and_load(
        appended("train.txt", "/etc/passwd 0\n")), ValueError,
        r"train\.txt, line 7: the path '/etc/passwd' is outside the image root"),
    bad_input("path_leaving_the_root_midway", edit_and_load(
        written("val.txt", "train/../../x.jpg 0\nval/b.jpg 2\n")), ValueError,
        r"val\.txt, line 1: the path 'train/\.\./\.\./x\.jpg' is outside the image root"),
    bad_input("outside_path_allowed_when_asked", outside_path_allowed_when_asked, None,
              "accepted"),
    bad_input("missing_image", edit_and_load(
        appended("train.txt", "train/c1/gone.jpg 1\n")), FileNotFoundError,
        r"Image file not found: \S*train/c1/gone\.jpg \(listed in \S*train\.txt, line 7\)"),
    bad_input("missing_image_skipped", missing_image_skipped, None, "skipped"),
    bad_input("empty_list", edit_and_load(written("train.txt", "# nothing here\n\n")),
              ValueError, r"train\.txt: no entries"),
    bad_input("missing_list_file", missing_list_file, FileNotFoundError,
              r"List file not found: \S*nope\.txt"),
    bad_input("zero_num_classes", edit_and_load(num_classes=0), ValueError,
              r"`num_classes` must be a positive integer. Received: 0"),
]


@pytest.mark.parametrize("act, error, message", LIST_FILE_CASES)
def test_bad_list_file(act, error, message, user_files, lists):
    check_bad_input(user_files, act, error, message, lists)


def damage_and_read(name, damage, read):
    """A case: `damage(bytes)` rewrites image `name`, then `read(data)` reads it."""
    def act(ctx, lists):
        path = lists / name
        path.write_bytes(damage(path.read_bytes()))
        ctx.ready()
        iterate(read(load_lists(lists)))

    return act


def evaluation(batch_size):
    return lambda data: nbn_data.make_eval_dataset(data, "val", batch_size=batch_size)


def training(batch_size):
    return lambda data: nbn_data.make_train_dataset(data, batch_size, epochs=1)


def text_file_under_a_cjk_path(ctx, lists):
    names = _write_utf8_images(lists)
    (lists / names[1]).write_text("not an image at all")
    ctx.ready()
    iterate(nbn_data.make_train_dataset(load_lists(lists), 8, epochs=1))


def corrupt_jpeg_skipped(ctx, lists):
    path = lists / "train" / "c2" / "5.jpg"
    path.write_bytes(jpeg_with_corrupt_data(path.read_bytes()))
    ctx.ready()
    data = load_lists(lists, on_bad_image="skip")
    assert [os.path.basename(p) for p in data.skipped["train"]] == ["5.jpg"]
    assert data.class_counts.tolist() == [2, 2, 1]
    assert iterate(nbn_data.make_train_dataset(data, 2, epochs=1)) == 4


def truncated_png_and_missing_skipped(ctx, lists):
    path = lists / "val" / "a.png"
    path.write_bytes(path.read_bytes()[:200])
    (lists / "val.txt").write_text("val/a.png 0\nval/b.jpg 2\nval/gone.jpg 1\n")
    ctx.ready()
    data = load_lists(lists, on_bad_image="skip")
    assert sorted(os.path.basename(p) for p in data.skipped["val"]) == ["a.png", "gone.jpg"]
    assert data.val_split.labels.tolist() == [2]


IMAGE_FILE_CASES = [
    bad_input("text_file_as_image", damage_and_read(
        "val/a.png", lambda _: b"not an image at all", evaluation(8)),
        tf.errors.InvalidArgumentError, r"Cannot read or decode image file \S*val/a\.png"),
    bad_input("empty_image_file", damage_and_read("val/a.png", lambda _: b"", evaluation(8)),
              tf.errors.InvalidArgumentError,
              r"Cannot read or decode image file \S*val/a\.png"),
    bad_input("cut_jpeg_in_training", damage_and_read(
        "train/c1/4.jpg", jpeg_cut_after_scan_header, training(2)),
        tf.errors.InvalidArgumentError,
        r"Cannot read or decode image file \S*train/c1/4\.jpg"),
    bad_input("cut_jpeg_last_in_evaluation", damage_and_read(
        "val/b.jpg", jpeg_cut_after_scan_header, evaluation(8)),
        tf.errors.InvalidArgumentError, r"Cannot read or decode image file \S*val/b\.jpg"),
    bad_input("truncated_png_in_evaluation", damage_and_read(
        "val/a.png", lambda data: data[:200], evaluation(1)),
        tf.errors.InvalidArgumentError, r"Cannot read or decode image file \S*val/a\.png"),
    bad_input("text_file_under_a_cjk_path", text_file_under_a_cjk_path,
              tf.errors.InvalidArgumentError,
              "Cannot read or decode image file \\S*/\u0444\u043e\u0442\u043e/"
              "\u753b\u50cf\\.jpg"),
    bad_input("corrupt_jpeg_skipped", corrupt_jpeg_skipped, None, "skipped"),
    bad_input("truncated_png_and_missing_skipped", truncated_png_and_missing_skipped, None,
              "skipped"),
]


@pytest.mark.parametrize("act, error, message", IMAGE_FILE_CASES)
def test_bad_image_file(act, error, message, user_files, lists):
    check_bad_input(user_files, act, error, message, lists)
