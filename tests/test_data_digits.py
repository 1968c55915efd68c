import numpy as np
import pytest
from sklearn import datasets

import nbn_keras.data as nbn_data
from nbn_keras.data import digits as digits_lib


@pytest.fixture(scope="module")
def digits():
    return nbn_data.load("digits_lt", imbalance_factor=10)


def test_digits_counts_and_splits(digits):
    n_max = 174 - 30 - 20  # smallest class minus the held-out images
    expected = [int(n_max * 0.1 ** (i / 9)) for i in range(10)]
    assert digits.class_counts.tolist() == expected
    assert np.bincount(digits.val_split.labels).tolist() == [20] * 10
    assert np.bincount(digits.test_split.labels).tolist() == [30] * 10
    assert digits.image_shape == (32, 32, 3) and digits.recipe == "crop"
    assert digits.train_split.records.dtype == np.uint8
    assert len(digits.mean) == 3 and 0 < digits.mean[0] < 1 and 0 < digits.std[0] < 1


def test_digits_held_out_splits_are_disjoint(digits):
    raw = datasets.load_digits()
    pool, val, test = digits_lib.split_indices(raw.target, 20, 30)
    train = digits.subset.flat_indices
    assert set(train.tolist()) <= set(pool.tolist())
    assert not set(val.tolist()) & set(test.tolist())
    np.testing.assert_array_equal(raw.target[train], digits.train_split.labels)
    np.testing.assert_array_equal(raw.target[val], digits.val_split.labels)
    np.testing.assert_array_equal(raw.target[test], digits.test_split.labels)
    # The brightest raw pixel (16) becomes 255 after scaling.
    assert digits.test_split.records.max() == 255


def test_digits_rebuild_from_run_dir(digits, tmp_path):
    digits.write_subset(str(tmp_path))
    again = nbn_data.load("digits_lt", subset=str(tmp_path))
    np.testing.assert_array_equal(again.train_split.records, digits.train_split.records)
    np.testing.assert_array_equal(again.class_counts, digits.class_counts)


def test_digits_step_profile_and_errors():
    step = nbn_data.load("digits_lt", imbalance_factor=4, profile="step", n_max=100)
    assert step.class_counts.tolist() == [100] * 5 + [25] * 5
    with pytest.raises(ValueError, match="n_max"):
        nbn_data.load("digits_lt", n_max=150)
    with pytest.raises(ValueError, match="imbalance_factor"):
        nbn_data.load("digits_lt", imbalance_factor=0)


def test_synthetic_and_unknown_name():
    data = nbn_data.load("synthetic_lt", num_classes=4, n_max=20, image_size=8)
    assert data.class_counts.tolist() == [20, 9, 4, 2]
    assert data.train.element_spec[0].shape == (8, 8, 3)
    with pytest.raises(ValueError, match="name"):
        nbn_data.load("mnist_lt")
