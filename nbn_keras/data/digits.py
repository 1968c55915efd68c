"""Long-tailed digits: a real image set that works offline.

scikit-learn ships the UCI optical digits (`sklearn.datasets.load_digits`:
1,797 grey 8x8 images of 10 classes, 174 to 183 per class). The split:

1. Per class, after a shuffle with `split_seed`, the first
   `test_per_class` images (default 30) form the balanced test split and
   the next `val_per_class` (default 20) the balanced validation split, used
   for model selection. The rest is the training pool.
2. The long-tailed training set is cut from the pool with the standard
   profiles (`nbn_keras.data.long_tail`). `n_max` defaults to the largest
   value every class can supply: the smallest pool, 174 - 30 - 20 = 124.

Pixels (0-16) are scaled to 0-255, upsampled bilinearly to `image_size` and
repeated over `channels`. Mean and standard deviation are computed on the
training set. The training augmentation is a 4-pixel pad and random crop
without flip.
"""

import numpy as np
import tensorflow as tf
from sklearn import datasets

from nbn_keras.data import base
from nbn_keras.data import long_tail

NUM_CLASSES = 10


def _to_images(raw, image_size, channels):
    images = raw.reshape(-1, 8, 8, 1).astype(np.float32) * (255.0 / 16.0)
    images = tf.image.resize(images, [image_size, image_size], method="bilinear").numpy()
    images = np.clip(np.rint(images), 0, 255).astype(np.uint8)
    return np.repeat(images, channels, axis=-1)


def split_indices(labels, val_per_class, test_per_class, split_seed=0):
    """Balanced held-out test and validation indices, and the rest.

    Args:
        labels: Labels of the whole set.
        val_per_class: Validation images per class.
        test_per_class: Test images per class.
        split_seed: Seed of the per-class shuffles.

    Returns:
        `(train_pool, val, test)` index arrays into `labels`.
    """
    rng = np.random.RandomState(split_seed)
    pool, val, test = [], [], []
    for c in range(int(labels.max()) + 1):
        members = np.flatnonzero(labels == c)
        rng.shuffle(members)
        test.append(members[:test_per_class])
        val.append(members[test_per_class:test_per_class + val_per_class])
        pool.append(members[test_per_class + val_per_class:])
    return tuple(np.sort(np.concatenate(part)) for part in (pool, val, test))


def load_digits_lt(imbalance_factor=10.0, profile="exp", n_max=None, val_per_class=20,
                   test_per_class=30, image_size=32, channels=3, seed=0, split_seed=0,
                   subset=None):
    """Long-tailed scikit-learn digits with balanced validation and test splits.

    Args:
        imbalance_factor: Ratio of head to tail class size (>= 1).
        profile: `"exp"` or `"step"`.
        n_max: Training images of the head class; `None` takes the largest
            value every class can supply (124 with the default splits).
        val_per_class: Held-out validation images per class.
        test_per_class: Held-out test images per class.
        image_size: Output height and width.
        channels: Output channels (the grey value repeated).
        seed: Seed of the long-tailed selection.
        split_seed: Seed of the held-out splits.
        subset: A `LongTailSubset`, or a path to one written by
            `LongTailedData.write_subset`, to rebuild instead of selecting.

    Returns:
        A `LongTailedData`.

    Example:

    >>> data = load_digits_lt(imbalance_factor=10)
    >>> int(data.class_counts.sum()), len(data.test_split)
    (503, 300)
    """
    digits = datasets.load_digits()
    labels = digits.target.astype(np.int64)
    pool, val, test = split_indices(labels, val_per_class, test_per_class, split_seed)
    largest = int(np.bincount(labels[pool], minlength=NUM_CLASSES).min())
    if n_max is None:
        n_max = largest
    elif n_max > largest:
        raise ValueError(f"`n_max`={n_max} exceeds the smallest training pool ({largest}).")
    if subset is None:
        chosen = long_tail.make_subset("digits", labels[pool], NUM_CLASSES, n_max,
                                       imbalance_factor, profile, seed)
        subset = long_tail.LongTailSubset(
            dataset="digits", indices=[pool[i] for i in chosen.indices], profile=profile,
            imbalance_factor=imbalance_factor, n_max=int(n_max), seed=seed,
            index_space="rows of sklearn.datasets.load_digits()",
        )
    else:
        if not isinstance(subset, long_tail.LongTailSubset):
            subset = long_tail.read_subset(subset)
        long_tail.check_subset(subset, labels)
        if np.intersect1d(subset.flat_indices, np.concatenate([val, test])).size:
            raise ValueError("`subset` overlaps the held-out validation or test split.")
    train = subset.flat_indices
    images = _to_images(digits.data, image_size, channels)
    pixels = images[train].reshape(-1, channels) / 255.0
    return base.LongTailedData(
        name="digits_lt",
        train_split=base.Split(images[train], labels[train]),
        val_split=base.Split(images[val], labels[val]),
        test_split=base.Split(images[test], labels[test]),
        num_classes=NUM_CLASSES,
        image_shape=(image_size, image_size, channels),
        mean=pixels.mean(axis=0),
        std=pixels.std(axis=0),
        recipe="crop",
        class_names=[str(c) for c in range(NUM_CLASSES)],
        subset=subset,
        info={"profile": subset.profile, "imbalance_factor": subset.imbalance_factor,
              "n_max": subset.n_max, "seed": subset.seed, "split_seed": split_seed,
              "val_per_class": val_per_class, "test_per_class": test_per_class},
    )
