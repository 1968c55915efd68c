"""What the long-tailed losses share: class counts, their margins and weights.

Apart from `nbn_keras.training.losses` so that losses defined elsewhere (a
model family's, RIDE's) build on them without importing the loss table.
"""

import numpy as np
from keras import ops


def as_counts(class_counts):
    """`class_counts` as a float64 vector, checked.

    Raises:
        ValueError: for fewer than 2 classes or a class without examples.
    """
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size < 2:
        raise ValueError(
            "`class_counts` must be a list of per-class training counts with "
            f"at least 2 classes, got {class_counts!r}."
        )
    if np.any(counts <= 0):
        empty = np.flatnonzero(counts <= 0).tolist()
        raise ValueError(
            "Every class needs at least one training example; `class_counts` "
            f"has non-positive entries at indices {empty}."
        )
    return counts


def sparse_labels(y_true):
    """Integer labels of any shape as a flat int32 vector."""
    return ops.cast(ops.reshape(y_true, (-1,)), "int32")


def ldam_margins(class_counts, max_m=0.5):
    """Per-class LDAM margins `m_j ~ n_j^(-1/4)`, the largest equal to `max_m`."""
    margins = as_counts(class_counts) ** -0.25
    return margins * (max_m / margins.max())


def drw_class_weights(class_counts, beta=0.9999):
    """Class-balanced weights `(1 - beta) / (1 - beta^n_j)`, summing to C."""
    counts = as_counts(class_counts)
    weights = (1.0 - beta) / (1.0 - np.power(beta, counts))
    return weights * (counts.size / weights.sum())
