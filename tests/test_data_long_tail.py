import json
import os

import numpy as np
import pytest

from nbn_keras.data import long_tail


def _expected_total(num_classes, n_max, imbalance_factor, profile):
    total = 0
    for i in range(num_classes):
        if profile == "exp":
            total += int(n_max * (1.0 / imbalance_factor) ** (i / (num_classes - 1.0)))
        elif i < num_classes // 2:
            total += n_max
        else:
            total += int(n_max / imbalance_factor)
    return total


@pytest.mark.parametrize("profile", ["exp", "step"])
@pytest.mark.parametrize("imbalance_factor", [10, 50, 100, 200])
@pytest.mark.parametrize("num_classes,n_max", [(10, 5000), (100, 500)])
def test_subset_sizes(num_classes, n_max, imbalance_factor, profile):
    counts = long_tail.class_counts(num_classes, n_max, imbalance_factor, profile)
    assert counts.shape == (num_classes,)
    assert counts.sum() == _expected_total(num_classes, n_max, imbalance_factor, profile)
    assert counts[0] == n_max
    assert counts[-1] == int(n_max / imbalance_factor)
    assert np.all(np.diff(counts) <= 0)


@pytest.mark.parametrize(
    "num_classes,n_max,imbalance_factor,total",
    [(100, 500, 100, 10847), (100, 500, 50, 12608), (100, 500, 10, 19573),
     (10, 5000, 100, 12406), (10, 5000, 10, 20431)],
)
def test_literature_sizes(num_classes, n_max, imbalance_factor, total):
    assert long_tail.class_counts(num_classes, n_max, imbalance_factor).sum() == total


def test_step_profile_halves():
    counts = long_tail.class_counts(10, 5000, 100, "step")
    assert counts.tolist() == [5000] * 5 + [50] * 5


@pytest.mark.parametrize(
    "kwargs,word",
    [({"imbalance_factor": 0}, "imbalance_factor"),
     ({"imbalance_factor": -5}, "imbalance_factor"),
     ({"imbalance_factor": 0.5}, "imbalance_factor"),
     ({"imbalance_factor": 1000}, "imbalance_factor"),
     ({"profile": "linear"}, "profile"),
     ({"n_max": 0}, "n_max")],
)
def test_bad_arguments(kwargs, word):
    args = {"num_classes": 10, "n_max": 500, "imbalance_factor": 10, **kwargs}
    with pytest.raises(ValueError, match=word):
        long_tail.class_counts(**args)


def _pool(num_classes=10, per_class=60, seed=3):
    labels = np.repeat(np.arange(num_classes), per_class)
    np.random.RandomState(seed).shuffle(labels)
    return labels


def test_same_seed_same_indices_and_labels_match():
    labels = _pool()
    a = long_tail.make_subset("toy", labels, 10, 60, 10, seed=0)
    b = long_tail.make_subset("toy", labels, 10, 60, 10, seed=0)
    c = long_tail.make_subset("toy", labels, 10, 60, 10, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a.indices, b.indices))
    assert not all(np.array_equal(x, y) for x, y in zip(a.indices, c.indices))
    for cls, chosen in enumerate(a.indices):
        assert np.all(labels[chosen] == cls)
        assert len(np.unique(chosen)) == len(chosen)
    assert a.class_counts.tolist() == long_tail.class_counts(10, 60, 10).tolist()


def test_selection_is_a_per_class_shuffle_of_one_stream():
    labels = _pool()
    subset = long_tail.make_subset("toy", labels, 10, 60, 10, seed=0)
    rng = np.random.RandomState(0)
    for cls, chosen in enumerate(subset.indices):
        members = np.where(labels == cls)[0]
        rng.shuffle(members)
        np.testing.assert_array_equal(chosen, members[: len(chosen)])


def test_json_round_trip(tmp_path):
    labels = _pool()
    subset = long_tail.make_subset("toy", labels, 10, 60, 20, profile="step", seed=0)
    path = subset.write(str(tmp_path))
    assert os.path.basename(path) == long_tail.SUBSET_FILENAME
    with open(path) as f:
        record = json.load(f)
    assert record["class_counts"] == subset.class_counts.tolist()
    assert record["num_images"] == int(subset.class_counts.sum())
    for source in (path, str(tmp_path)):
        again = long_tail.read_subset(source)
        np.testing.assert_array_equal(again.flat_indices, subset.flat_indices)
        assert again.profile == "step" and again.imbalance_factor == 20
    long_tail.check_subset(again, labels)
    with pytest.raises(ValueError, match="another label"):
        long_tail.check_subset(again, np.roll(labels, 1))
