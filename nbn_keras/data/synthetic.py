"""A synthetic long-tailed image set for fast tests.

Each class has a random coarse 4x4 colour pattern, upsampled to the image
size; an example is its class pattern plus Gaussian pixel noise. A small
network separates the classes within a few epochs, so the set is enough to
check that training actually learns.
"""

import numpy as np

from nbn_keras.data import base
from nbn_keras.data import long_tail

PATTERN_SIZE = 4


def _images(labels, patterns, image_size, noise, rng):
    scale = image_size // PATTERN_SIZE
    upsampled = patterns.repeat(scale, axis=1).repeat(scale, axis=2)
    images = upsampled[labels] + rng.normal(0.0, noise, size=(len(labels),) + upsampled.shape[1:])
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


def load_synthetic_lt(num_classes=10, n_max=100, imbalance_factor=10.0, profile="exp",
                      image_size=32, val_per_class=10, test_per_class=20, noise=40.0,
                      seed=0, recipe="none"):
    """A synthetic long-tailed set with balanced validation and test splits.

    Args:
        num_classes: Number of classes.
        n_max: Training images of the head class.
        imbalance_factor: Ratio of head to tail class size (>= 1).
        profile: `"exp"` or `"step"`.
        image_size: Image height and width, a multiple of 4.
        val_per_class: Validation images per class.
        test_per_class: Test images per class.
        noise: Standard deviation of the pixel noise, in [0, 255] units.
        seed: Seed of the patterns, the noise and the subset selection.
        recipe: Augmentation recipe (`"none"`, `"crop"` or `"cifar"`).

    Returns:
        A `LongTailedData` with RGB images `(image_size, image_size, 3)`.

    Example:

    >>> data = load_synthetic_lt(num_classes=4, n_max=20)
    >>> data.class_counts
    array([20,  9,  4,  2])
    """
    if image_size % PATTERN_SIZE or image_size < PATTERN_SIZE:
        raise ValueError(f"`image_size` must be a positive multiple of 4. Received: {image_size!r}")
    rng = np.random.RandomState(seed)
    patterns = rng.uniform(0.0, 255.0, size=(num_classes, PATTERN_SIZE, PATTERN_SIZE, 3))
    pool_labels = np.repeat(np.arange(num_classes), n_max)
    subset = long_tail.make_subset(
        "synthetic", pool_labels, num_classes, n_max, imbalance_factor, profile, seed,
        index_space="pool of n_max generated images per class, class-major",
    )
    train_labels = pool_labels[subset.flat_indices]
    val_labels = np.repeat(np.arange(num_classes), val_per_class)
    test_labels = np.repeat(np.arange(num_classes), test_per_class)
    train = _images(train_labels, patterns, image_size, noise, rng)
    val = _images(val_labels, patterns, image_size, noise, rng)
    test = _images(test_labels, patterns, image_size, noise, rng)
    pixels = train.reshape(-1, 3) / 255.0
    return base.LongTailedData(
        name="synthetic_lt",
        train_split=base.Split(train, train_labels),
        val_split=base.Split(val, val_labels),
        test_split=base.Split(test, test_labels),
        num_classes=num_classes,
        image_shape=(image_size, image_size, 3),
        mean=pixels.mean(axis=0),
        std=pixels.std(axis=0),
        recipe=recipe,
        class_names=[f"class_{c}" for c in range(num_classes)],
        subset=subset,
        info={"profile": profile, "imbalance_factor": imbalance_factor, "n_max": n_max,
              "seed": seed, "noise": noise},
    )
