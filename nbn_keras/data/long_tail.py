"""Long-tailed class profiles and reproducible subset selection.

The construction is the one used throughout the long-tailed literature
(Cao et al., 2019, LDAM; Cui et al., 2019): class `i` of `C` keeps
`n_i = int(n_max * (1 / IF) ** (i / (C - 1)))` images ("exponential"
profile), or the first `C // 2` classes keep `n_max` and the others
`int(n_max / IF)` ("step" profile). Images of each class are chosen after a
shuffle of that class's indices, the classes taken in order and all
shuffles drawn from one `numpy.random.RandomState(seed)` stream, seed 0 by
default. The chosen indices are written as JSON so that a run's subset can be
rebuilt exactly, whatever the code that later reads it.
"""

import dataclasses
import json
import os

import numpy as np

from nbn_keras import files

PROFILES = ("exp", "step")
SUBSET_FILENAME = "data_subset.json"


def _check_imbalance_factor(imbalance_factor):
    if not isinstance(imbalance_factor, (int, float, np.number)) or not (
        imbalance_factor >= 1
    ):
        raise ValueError(
            "`imbalance_factor` must be a number >= 1 (the ratio of the "
            f"largest to the smallest class). Received: {imbalance_factor!r}"
        )


def class_counts(num_classes, n_max, imbalance_factor, profile="exp"):
    """Number of training images per class of a long-tailed profile.

    Args:
        num_classes: Number of classes `C` (>= 2).
        n_max: Images kept for the most frequent class (class 0).
        imbalance_factor: Ratio `n_max / n_min`, a number >= 1. 1 gives a
            balanced set.
        profile: `"exp"` (exponential decay over the class index) or
            `"step"` (first `C // 2` classes keep `n_max`, the others
            `int(n_max / imbalance_factor)`).

    Returns:
        An int64 numpy array of shape `(num_classes,)`.

    Example:

    >>> class_counts(10, 5000, 100)
    array([5000, 2997, 1796, 1077,  645,  387,  232,  139,   83,   50])
    """
    if int(num_classes) != num_classes or num_classes < 2:
        raise ValueError(f"`num_classes` must be an integer >= 2. Received: {num_classes!r}")
    if int(n_max) != n_max or n_max < 1:
        raise ValueError(f"`n_max` must be a positive integer. Received: {n_max!r}")
    _check_imbalance_factor(imbalance_factor)
    num_classes, n_max = int(num_classes), int(n_max)
    if profile == "exp":
        counts = [
            int(n_max * (1.0 / imbalance_factor) ** (i / (num_classes - 1.0)))
            for i in range(num_classes)
        ]
    elif profile == "step":
        head = num_classes // 2
        tail = int(n_max * (1.0 / imbalance_factor))
        counts = [n_max] * head + [tail] * (num_classes - head)
    else:
        raise ValueError(f"`profile` must be one of {PROFILES}. Received: {profile!r}")
    if min(counts) < 1:
        raise ValueError(
            f"`imbalance_factor`={imbalance_factor} leaves a class with no image "
            f"for n_max={n_max}; use an imbalance factor <= n_max."
        )
    return np.asarray(counts, dtype=np.int64)


def select_indices(labels, counts, seed=0):
    """Chooses `counts[c]` indices of each class `c`, reproducibly.

    Args:
        labels: Integer labels of the full (balanced) pool, shape `(N,)`.
        counts: Images to keep per class, shape `(C,)`.
        seed: Seed of the single `RandomState` whose successive shuffles
            (class 0 first) choose the images.

    Returns:
        A list of `C` int64 arrays: the chosen pool indices of each class,
        in the order they were drawn.
    """
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    chosen = []
    for c, count in enumerate(counts):
        pool = np.flatnonzero(labels == c)
        if count > len(pool):
            raise ValueError(
                f"Class {c} has {len(pool)} images but the profile asks for {count}."
            )
        rng.shuffle(pool)
        chosen.append(pool[: int(count)].astype(np.int64))
    return chosen


@dataclasses.dataclass
class LongTailSubset:
    """A long-tailed subset of a balanced pool, with how it was made.

    Args:
        dataset: Name of the pool (e.g. `"cifar100"`), for the record.
        indices: One int64 array per class: pool indices kept.
        profile: Profile name, or `None` for a subset read from elsewhere.
        imbalance_factor: Imbalance factor used.
        n_max: Images of the head class.
        seed: Selection seed.
        index_space: A sentence saying what the indices index.
    """

    dataset: str
    indices: list
    profile: str = None
    imbalance_factor: float = None
    n_max: int = None
    seed: int = None
    index_space: str = ""

    @property
    def class_counts(self):
        """Images kept per class (int64 array)."""
        return np.asarray([len(i) for i in self.indices], dtype=np.int64)

    @property
    def flat_indices(self):
        """All kept indices, class by class (int64 array)."""
        return np.concatenate(self.indices) if self.indices else np.zeros([0], np.int64)

    def to_dict(self):
        return {
            "dataset": self.dataset,
            "profile": self.profile,
            "imbalance_factor": self.imbalance_factor,
            "n_max": self.n_max,
            "seed": self.seed,
            "index_space": self.index_space,
            "num_images": int(self.class_counts.sum()),
            "class_counts": self.class_counts.tolist(),
            "indices": [i.tolist() for i in self.indices],
        }

    def write(self, run_dir, filename=SUBSET_FILENAME):
        """Writes the subset as JSON into `run_dir`; returns the file path."""
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, filename)
        files.write_text(path, json.dumps(self.to_dict()))
        return path


def make_subset(dataset, labels, num_classes, n_max, imbalance_factor,
                profile="exp", seed=0, index_space=""):
    """Builds a `LongTailSubset` of a balanced pool.

    Args:
        dataset: Pool name, for the record.
        labels: Labels of the pool, shape `(N,)`.
        num_classes: Number of classes.
        n_max: Images of the head class.
        imbalance_factor: Ratio of head to tail class size (>= 1).
        profile: `"exp"` or `"step"`.
        seed: Selection seed.
        index_space: What the indices index, for the record.

    Returns:
        A `LongTailSubset`.

    Example:

    >>> labels = np.repeat(np.arange(10), 50)
    >>> make_subset("toy", labels, 10, 50, 10).class_counts[[0, -1]]
    array([50,  5])
    """
    counts = class_counts(num_classes, n_max, imbalance_factor, profile)
    return LongTailSubset(
        dataset=dataset,
        indices=select_indices(labels, counts, seed),
        profile=profile,
        imbalance_factor=imbalance_factor,
        n_max=int(n_max),
        seed=seed,
        index_space=index_space,
    )


def read_subset(path):
    """Reads a subset written by `LongTailSubset.write`.

    Args:
        path: The JSON file, or the run directory that holds it.

    Returns:
        A `LongTailSubset` with the same indices.
    """
    if os.path.isdir(path):
        path = os.path.join(path, SUBSET_FILENAME)
    with open(path) as f:
        record = json.load(f)
    indices = [np.asarray(i, dtype=np.int64) for i in record["indices"]]
    counts = [len(i) for i in indices]
    if record.get("class_counts") not in (None, counts):
        raise ValueError(f"{path}: `class_counts` disagree with the stored indices.")
    return LongTailSubset(
        dataset=record["dataset"],
        indices=indices,
        profile=record.get("profile"),
        imbalance_factor=record.get("imbalance_factor"),
        n_max=record.get("n_max"),
        seed=record.get("seed"),
        index_space=record.get("index_space", ""),
    )


def check_subset(subset, labels):
    """Raises ValueError unless every index of class `c` has label `c`.

    Args:
        subset: A `LongTailSubset`.
        labels: Labels of the pool its indices refer to.
    """
    labels = np.asarray(labels)
    for c, chosen in enumerate(subset.indices):
        if chosen.size and (chosen.min() < 0 or chosen.max() >= len(labels)):
            raise ValueError(f"`subset` indexes outside the pool of {len(labels)} images.")
        if np.any(labels[chosen] != c):
            raise ValueError(
                f"`subset` does not fit this pool: an index listed for class {c} "
                "has another label."
            )
