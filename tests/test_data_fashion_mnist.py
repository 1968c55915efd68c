"""Fashion-MNIST-LT on small generated idx files (no package or download needed)."""

import hashlib
import json
import os
import struct

import numpy as np
import pytest

import nbn_keras.data as nbn_data
from nbn_keras.data import fashion_mnist
from tests.helpers import idx_bytes
from tests.helpers import write_fashion_mnist

DEBIAN_FILES = os.path.isdir(fashion_mnist.DEBIAN_DIR)


def image_positions(records):
    return records[:, 0, 0, 0].astype(int) * 256 + records[:, 0, 1, 0]


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("fashion_mnist"))
    return directory, write_fashion_mnist(directory)[0]


def load(idx_dir, tmp_path, **options):
    directory, checksums = idx_dir
    options = {"val_per_class": 10, "checksums": checksums, **options}
    # An empty TFDS data directory: no prepared copy may take precedence.
    return nbn_data.load("fashion_mnist_lt", idx_dir=directory,
                         data_dir=str(tmp_path / "no_tfds"), **options)


def test_counts_splits_and_grey_images(idx_dir, tmp_path):
    data = load(idx_dir, tmp_path, imbalance_factor=10, val_per_class=10)
    # n_max: the smallest pool, 60 - 10 (below the default 5000).
    assert data.class_counts.tolist() == [int(np.floor(50 * 10 ** (-i / 9)))
                                          for i in range(10)]
    assert np.bincount(data.val_split.labels).tolist() == [10] * 10
    assert np.bincount(data.test_split.labels).tolist() == [5] * 10
    assert data.image_shape == (28, 28, 1) and data.train.element_spec[0].shape == (28, 28, 1)
    train, val = image_positions(data.train_split.records), image_positions(data.val_split.records)
    assert not set(train) & set(val)
    np.testing.assert_array_equal(train, data.subset.flat_indices)
    # Each image keeps its own label (stored in its third pixel).
    for split in (data.train_split, data.val_split, data.test_split):
        np.testing.assert_array_equal(split.records[:, 0, 2, 0], split.labels)
    assert sorted(image_positions(data.test_split.records)) == list(range(50))
    step = load(idx_dir, tmp_path, imbalance_factor=5, profile="step", n_max=40)
    assert step.class_counts.tolist() == [40] * 5 + [8] * 5


def test_padded_images_are_32x32x3(idx_dir, tmp_path):
    grey = load(idx_dir, tmp_path, imbalance_factor=10)
    padded = load(idx_dir, tmp_path, imbalance_factor=10, padded=True)
    assert padded.image_shape == (32, 32, 3)
    assert padded.test.element_spec[0].shape == (32, 32, 3)
    for a, b in zip((grey.train_split, grey.test_split), (padded.train_split, padded.test_split)):
        assert b.records.shape == (len(a), 32, 32, 3)
        for channel in range(3):
            np.testing.assert_array_equal(b.records[:, 2:30, 2:30, channel], a.records[..., 0])
        border = np.ones((32, 32), bool)
        border[2:30, 2:30] = False
        assert not b.records[:, border].any()
    assert len(padded.mean) == 3 and len(grey.mean) == 1


def test_seed_chooses_the_subset_and_is_recorded(idx_dir, tmp_path):
    a = load(idx_dir, tmp_path, imbalance_factor=10, seed=0)
    again = load(idx_dir, tmp_path, imbalance_factor=10, seed=0)
    other = load(idx_dir, tmp_path, imbalance_factor=10, seed=1)
    np.testing.assert_array_equal(a.subset.flat_indices, again.subset.flat_indices)
    assert not np.array_equal(np.sort(a.subset.flat_indices), np.sort(other.subset.flat_indices))
    np.testing.assert_array_equal(a.class_counts, other.class_counts)
    run_dir = tmp_path / "run"
    a.write_subset(str(run_dir))
    record = json.loads((run_dir / "class_counts.json").read_text())
    assert record["class_counts"] == a.class_counts.tolist()
    assert record["info"]["seed"] == 0 and record["num_val"] == 10 * 10
    stored = json.loads((run_dir / "data_subset.json").read_text())
    assert sum(stored["indices"], []) == image_positions(a.train_split.records).tolist()
    rebuilt = load(idx_dir, tmp_path, subset=str(run_dir))
    np.testing.assert_array_equal(rebuilt.train_split.records, a.train_split.records)


def test_checksum_mismatch_names_the_file(idx_dir, tmp_path):
    directory, checksums = idx_dir
    wrong = dict(checksums, **{"train-labels-idx1-ubyte.gz": ("0" * 64,)})
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte\.gz: SHA-256"):
        load(idx_dir, tmp_path, checksums=wrong)
    # The code's own list (upstream and Debian) rejects the generated files.
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: SHA-256 .* not a known"):
        nbn_data.load("fashion_mnist_lt", idx_dir=directory, data_dir=str(tmp_path))


def test_checksum_file_is_read_and_bad_lines_are_named(tmp_path):
    checksums, path = write_fashion_mnist(str(tmp_path / "idx"), 30, 2)
    assert fashion_mnist.read_checksum_file(path) == checksums
    data = nbn_data.load("fashion_mnist_lt", idx_dir=str(tmp_path / "idx"), checksums=path,
                         data_dir=str(tmp_path), val_per_class=5, imbalance_factor=2)
    assert int(data.class_counts[0]) == 25
    bad = tmp_path / "bad.sha256"
    bad.write_text(f"{'a' * 64}  x.gz\nnot-a-digest  y.gz\n")
    with pytest.raises(ValueError, match=rf"{bad}:2: expected"):
        fashion_mnist.read_checksum_file(str(bad))


def test_missing_files_and_no_source(tmp_path, monkeypatch):
    directory = str(tmp_path / "idx")
    checksums, _ = write_fashion_mnist(directory, 30, 2)
    os.remove(os.path.join(directory, "t10k-images-idx3-ubyte.gz"))
    with pytest.raises(FileNotFoundError, match="lacks the Fashion-MNIST file.*t10k-images"):
        load((directory, checksums), tmp_path)
    # A folder given but absent is an error, not a silent fall-back to Debian's.
    with pytest.raises(FileNotFoundError, match="idx folder .*/absent does not exist"):
        load((str(tmp_path / "absent"), checksums), tmp_path)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", str(tmp_path / "no_debian"))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist.*"
                                                "--download_fashion_mnist"):
        load((None, checksums), tmp_path)


def test_parse_idx_rejects_bad_files():
    np.testing.assert_array_equal(fashion_mnist.parse_idx(idx_bytes(np.eye(2))), np.eye(2))
    with pytest.raises(ValueError, match="x.gz: not an idx file"):
        fashion_mnist.parse_idx(b"\x00\x00\x0d\x01", "x.gz")
    with pytest.raises(ValueError, match=r"says \(3,\) .* holds 2"):
        fashion_mnist.parse_idx(bytes([0, 0, 8, 1, 0, 0, 0, 3, 1, 2]))


@pytest.mark.skipif(not DEBIAN_FILES, reason="dataset-fashion-mnist is not installed")
def test_debian_files_match_the_listed_and_upstream_checksums():
    for name, digest in fashion_mnist.DEBIAN_SHA256.items():
        with open(os.path.join(fashion_mnist.DEBIAN_DIR, name), "rb") as f:
            raw = f.read()
        assert hashlib.sha256(raw).hexdigest() == digest
        # Restoring the upstream gzip header (file name flag, name, time
        # stamp) gives the upstream bytes.
        mtime = 1504176606 if name.startswith("train") else 1504176627
        header = bytearray(raw[:10])
        header[3] |= 0x08
        header[4:8] = struct.pack("<I", mtime)
        upstream = bytes(header) + name.removesuffix(".gz").encode() + b"\0" + raw[10:]
        assert hashlib.sha256(upstream).hexdigest() == fashion_mnist.UPSTREAM_SHA256[name]


class FakeTFDSBuilder:
    """Stands for `tfds.builder("fashion_mnist")`: a prepared (or downloadable) copy."""

    data_dir = "/fake/tfds/fashion_mnist/3.0.1"

    def __init__(self, prepared, per_class=12):
        self.prepared, self.per_class, self.downloads = prepared, per_class, 0

    def is_prepared(self):
        return self.prepared

    def download_and_prepare(self):
        self.downloads += 1
        self.prepared = True

    def as_dataset(self, split, shuffle_files):
        import tensorflow as tf

        assert not shuffle_files
        labels = np.arange(10 * (self.per_class if split == "train" else 1)) % 10
        images = np.zeros((len(labels), 28, 28, 1), np.uint8)
        images[:, 5, 5, 0] = labels + 1
        return tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})


def test_a_prepared_tfds_copy_comes_first_and_download_needs_the_flag(idx_dir, monkeypatch):
    directory, checksums = idx_dir
    builder = FakeTFDSBuilder(prepared=True)
    monkeypatch.setattr(fashion_mnist, "_tfds_builder", lambda data_dir: builder)
    data = nbn_data.load("fashion_mnist_lt", idx_dir=directory, checksums=checksums,
                         val_per_class=2, imbalance_factor=10)
    assert data.info["source"].startswith("TFDS") and "read order" in data.subset.index_space
    assert data.image_shape == (28, 28, 1) and len(data.test_split) == 10
    np.testing.assert_array_equal(data.train_split.records[:, 5, 5, 0],
                                  data.train_split.labels + 1)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", "/nonexistent/fashion-mnist")
    builder.prepared = False
    with pytest.raises(FileNotFoundError, match="not found"):
        nbn_data.load("fashion_mnist_lt", val_per_class=2)
    assert builder.downloads == 0
    data = nbn_data.load("fashion_mnist_lt", val_per_class=2, download=True,
                         imbalance_factor=10)
    assert builder.downloads == 1 and int(data.class_counts[0]) == 10
