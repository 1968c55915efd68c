"""Training samplers as tf.data index streams.

A sampler turns the training labels into an endless (or `epochs`-long)
stream of example indices:

- `"instance"`: every example once per pass, in a fresh shuffle each pass.
- `"class_balanced"`: each class with probability 1/C.
- `"sqrt"`: class `c` with probability proportional to `sqrt(n_c)`.
- `"progressive"`: from instance-balanced at the first epoch to
  class-balanced at the last, linearly in the epoch index
  (`p(e) = (1 - t) n_c / N + t / C`, `t = e / (epochs - 1)`; Kang et al.,
  2020, use `t = e / epochs`, which never reaches class-balanced).

The non-instance samplers mix one stream per class (each class's indices,
reshuffled on every pass and repeated forever) with
`tf.data.Dataset.sample_from_datasets`, so within a class every image is
seen once before any is seen twice. No Python runs per example.
"""

import numpy as np
import tensorflow as tf

SAMPLERS = ("instance", "class_balanced", "sqrt", "progressive")


def check_sampler(sampler):
    if sampler not in SAMPLERS:
        raise ValueError(f"`sampler` must be one of {SAMPLERS}. Received: {sampler!r}")


def class_weights(class_counts, sampler, progress=0.0):
    """Probability of drawing each class under a sampler.

    Args:
        class_counts: Training images per class.
        sampler: A name in `SAMPLERS`.
        progress: For `"progressive"`: 0 (start, instance-balanced) to 1
            (end, class-balanced).

    Returns:
        A float64 array summing to 1; classes without images get 0.

    Example:

    >>> class_weights([90, 10], "class_balanced")
    array([0.5, 0.5])
    """
    check_sampler(sampler)
    counts = np.asarray(class_counts, dtype=np.float64)
    present = (counts > 0).astype(np.float64)
    instance = counts / counts.sum()
    balanced = present / present.sum()
    if sampler == "instance":
        return instance
    if sampler == "class_balanced":
        return balanced
    if sampler == "sqrt":
        root = np.sqrt(counts)
        return root / root.sum()
    progress = float(np.clip(progress, 0.0, 1.0))
    return (1.0 - progress) * instance + progress * balanced


def progressive_schedule(class_counts, epochs):
    """Per-epoch class probabilities of the progressive sampler.

    Args:
        class_counts: Training images per class.
        epochs: Number of epochs.

    Returns:
        A float64 array of shape `(epochs, num_classes)`.
    """
    if epochs is None or int(epochs) < 1:
        raise ValueError(
            f"The progressive sampler needs `epochs` >= 1. Received: {epochs!r}"
        )
    denominator = max(int(epochs) - 1, 1)
    return np.stack(
        [class_weights(class_counts, "progressive", e / denominator) for e in range(int(epochs))]
    )


def index_stream(labels, sampler="instance", examples_per_epoch=None, epochs=None, seed=0):
    """A dataset of training example indices drawn by a sampler.

    Args:
        labels: Integer training labels, shape `(N,)`.
        sampler: A name in `SAMPLERS`.
        examples_per_epoch: Indices per epoch (steps per epoch times the
            global batch size). Needed by `"progressive"`, and with `epochs`.
        epochs: If given, the stream stops after `epochs * examples_per_epoch`
            indices; otherwise it is infinite (not allowed for
            `"progressive"`).
        seed: Seed of all shuffles and draws.

    Returns:
        A `tf.data.Dataset` of int64 scalars.

    Example:

    >>> labels = np.array([0, 0, 0, 1])
    >>> ds = index_stream(labels, "class_balanced", examples_per_epoch=4, epochs=1)
    >>> len(list(ds))
    4
    """
    check_sampler(sampler)
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise ValueError("`labels` must be a non-empty 1D array.")
    if epochs is not None and examples_per_epoch is None:
        raise ValueError("`examples_per_epoch` is needed when `epochs` is given.")
    if sampler == "instance":
        stream = (
            tf.data.Dataset.range(len(labels))
            .shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
            .repeat()
        )
    else:
        num_classes = int(labels.max()) + 1
        counts = np.bincount(labels, minlength=num_classes)
        present = np.flatnonzero(counts)
        streams = [
            tf.data.Dataset.from_tensor_slices(np.flatnonzero(labels == c).astype(np.int64))
            .shuffle(int(counts[c]), seed=seed + 1 + int(c), reshuffle_each_iteration=True)
            .repeat()
            for c in present
        ]
        if sampler == "progressive":
            schedule = progressive_schedule(counts, epochs)[:, present].astype(np.float32)
            weights = tf.data.Dataset.from_tensor_slices(schedule).flat_map(
                lambda w: tf.data.Dataset.from_tensors(w).repeat(int(examples_per_epoch))
            )
        else:
            weights = class_weights(counts, sampler)[present].astype(np.float32).tolist()
        stream = tf.data.Dataset.sample_from_datasets(streams, weights=weights, seed=seed)
    if epochs is not None:
        stream = stream.take(int(epochs) * int(examples_per_epoch))
    return stream
