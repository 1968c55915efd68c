"""CIFAR-LT through the real TFDS code path, on mocked data (no network)."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import nbn_keras.data as nbn_data

NO_DATA_DIR = "/nonexistent/tfds"


def _mock_split(num_classes, per_class, seed):
    """A CIFAR-like split in shuffled storage order, position coded in pixels."""

    def as_dataset(self, split, **kwargs):
        size = num_classes * per_class if str(split) == "train" else 2 * num_classes
        storage = np.random.RandomState(seed).permutation(size)
        positions = tf.constant(storage, tf.int64)

        def example(position):
            pixel = tf.stack([position % 256, position // 256, 0])
            image = tf.broadcast_to(tf.cast(pixel, tf.uint8), [32, 32, 3])
            return {
                "image": image,
                "label": position % num_classes,
                "id": tf.strings.join(
                    [f"{split}_", tf.strings.as_string(position, width=5, fill="0")]
                ),
            }

        return tf.data.Dataset.from_tensor_slices(positions).map(example)

    return as_dataset


def _positions(images):
    return images[:, 0, 0, 0].astype(np.int64) + 256 * images[:, 0, 0, 1].astype(np.int64)


def test_cifar100_lt_standard_size():
    with tfds.testing.mock_data(as_dataset_fn=_mock_split(100, 500, seed=1)):
        data = nbn_data.load("cifar100_lt", imbalance_factor=100, data_dir=NO_DATA_DIR)
    assert len(data.train_split) == 10847
    assert data.class_counts[0] == 500 and data.class_counts[-1] == 5
    assert data.num_classes == 100 and len(data.class_names) == 100
    # Indices refer to the original order, whatever the storage order.
    positions = _positions(data.train_split.records)
    np.testing.assert_array_equal(positions, data.subset.flat_indices)
    np.testing.assert_array_equal(data.train_split.labels, positions % 100)


def test_cifar10_lt_end_to_end_and_rebuild(tmp_path):
    as_dataset = _mock_split(10, 40, seed=2)
    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        data = nbn_data.load("cifar10_lt", imbalance_factor=10, profile="step", n_max=40,
                             data_dir=NO_DATA_DIR)
    assert data.class_counts.tolist() == [40] * 5 + [4] * 5
    assert data.image_shape == (32, 32, 3) and data.recipe == "cifar"
    assert data.mean == (0.4914, 0.4822, 0.4465)
    assert data.val_split is data.test_split and len(data.test_split) == 20
    paths = data.write_subset(str(tmp_path))
    assert len(paths) == 2

    # The same seed picks the same images; the saved file rebuilds them.
    with tfds.testing.mock_data(as_dataset_fn=_mock_split(10, 40, seed=5)):
        again = nbn_data.load("cifar10_lt", imbalance_factor=10, profile="step", n_max=40,
                              data_dir=NO_DATA_DIR)
        rebuilt = nbn_data.load("cifar10_lt", subset=str(tmp_path), data_dir=NO_DATA_DIR)
    for other in (again, rebuilt):
        np.testing.assert_array_equal(other.train_split.records, data.train_split.records)
        np.testing.assert_array_equal(other.train_split.labels, data.train_split.labels)

    images, labels = next(iter(nbn_data.make_train_dataset(data, 16, epochs=1)))
    assert images.dtype == tf.float32 and labels.dtype == tf.int32
    assert images.shape == (16, 32, 32, 3)
    test_images, _ = next(iter(nbn_data.make_eval_dataset(data, "test", 8)))
    assert float(tf.reduce_max(test_images)) <= 255.0


def test_plain_mock_data_falls_back_to_read_order():
    with tfds.testing.mock_data(num_examples=60):
        data = nbn_data.load("cifar10_lt", imbalance_factor=1, n_max=1, data_dir=NO_DATA_DIR)
    assert data.class_counts.tolist() == [1] * 10
    assert "read order" in data.subset.index_space


def test_bad_arguments():
    with pytest.raises(ValueError, match="name"):
        nbn_data.load("cifar1000_lt")
    with pytest.raises(ValueError, match="imbalance_factor"):
        with tfds.testing.mock_data(as_dataset_fn=_mock_split(10, 5, seed=0)):
            nbn_data.load("cifar10_lt", imbalance_factor=-1, n_max=5, data_dir=NO_DATA_DIR)
