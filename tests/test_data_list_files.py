import os

import numpy as np
import pytest
import tensorflow as tf

import nbn_keras.data as nbn_data
from nbn_keras.data import list_files
from nbn_keras.data import transforms

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


@pytest.mark.parametrize("bad_line", ["just_a_path.jpg", "img.jpg cat", "img.jpg -1"])
def test_malformed_line_names_file_and_line(tmp_path, bad_line):
    path = tmp_path / "list.txt"
    path.write_text(f"a.jpg 0\nb.jpg 1\n{bad_line}\n")
    with pytest.raises(ValueError, match=r"list\.txt, line 3"):
        list_files.parse_list_file(str(path))


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
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"broken\.jpg"):
        list(nbn_data.make_eval_dataset(data, "train", batch_size=8))


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


def _jpeg(seed, height=40, width=48):
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (1, 5, 6, 3)).astype("float32")
    image = tf.image.resize(coarse, [height, width])[0]
    return tf.io.encode_jpeg(tf.cast(image, tf.uint8), quality=90).numpy()


def test_find_undecodable_decodes_every_file_in_full(tmp_path):
    good = _jpeg(0)
    scan = good.find(b"\xff\xda") + 20
    noise = np.random.default_rng(1).integers(0, 256, len(good) - scan - 20, np.uint8)
    files = {
        "good.jpg": good,
        "good.png": tf.io.encode_png(np.zeros((5, 7, 3), np.uint8)).numpy(),
        # Valid header, corrupt data: the training pipeline's cropped decode
        # can succeed on these, a full decode does not.
        "corrupt_data.jpg": good[:scan] + noise.tobytes() + good[-20:],
        "truncated.jpg": good[: int(len(good) * 0.6)],
        "no_data.jpg": good[:scan],
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
