"""Training samplers as tf.data index streams.

A sampler turns the training labels into a stream of example indices, one
epoch after another:

- `"instance"`: every example once per epoch, in a fresh shuffle each epoch
  (an epoch shorter than N leaves the rest of its shuffle unused, as
  PyTorch's `drop_last=True` does; the NBN authors' `DataLoader` keeps the
  partial batch: `nbn_keras.data.pipeline`'s `keep_partial_batch`).
- `"class_balanced"`: each class with probability 1/C.
- `"sqrt"`: class `c` with probability proportional to `sqrt(n_c)`.
- `"progressive"`: from instance-balanced at the first epoch to
  class-balanced at the last, linearly in the epoch index
  (`p(e) = (1 - t) n_c / N + t / C`, `t = e / (epochs - 1)`; Kang et al.,
  2020, use `t = e / epochs`, which never reaches class-balanced).
- `"class_aware"`: the NBN authors' `resample` (their `ClassAwareSampler`
  with `num_samples_cls=4`, after Shen et al., 2016): the classes come in
  turn, in a fresh shuffle of all classes each cycle, and each turn yields
  `samples_per_class` images of that class in a row; so a batch of `B`
  holds `B / samples_per_class` classes. Their cycles run on across epochs;
  here each epoch starts new cycles, drawn from `(seed, epoch)`.

The indices of an epoch are a function of `(seed, epoch)` only, so a resumed
run starts its input exactly where the interrupted one stood
(`initial_epoch`), whatever the sampler. The non-instance samplers draw the
classes of an epoch, then take each class's images in a fresh shuffle of
that class, cycling through it, so within an epoch every image of a class is
used once before any is used twice. The draw is computed per epoch in NumPy
(milliseconds for ImageNet-LT); no Python runs per example.
"""

import numpy as np
import tensorflow as tf

SAMPLERS = ("instance", "class_balanced", "sqrt", "progressive", "class_aware")


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


def _take_cycling(rng, labels, classes, indices, slots_of_class):
    """Fills `indices[slots_of_class[c]]` with class `c`'s images, cycling."""
    for c in classes:
        slots = slots_of_class(c)
        members = rng.permutation(np.flatnonzero(labels == c))
        indices[slots] = np.resize(members, len(slots))
    return indices


def class_aware_indices(labels, examples, samples_per_class, rng):
    """`examples` indices in turns of `samples_per_class` images of one class.

    The turns go through every class present in a fresh random order per
    cycle; within a class, its images in a shuffle, cycling.
    """
    present = np.flatnonzero(np.bincount(labels))
    turns = -(-int(examples) // int(samples_per_class))
    cycles = -(-turns // len(present))
    turn_classes = np.concatenate([rng.permutation(present) for _ in range(cycles)])[:turns]
    slot_classes = np.repeat(turn_classes, samples_per_class)[:examples]
    indices = np.empty(int(examples), np.int64)
    return _take_cycling(rng, labels, present, indices,
                         lambda c: np.flatnonzero(slot_classes == c))


def epoch_indices(labels, sampler, epoch, examples_per_epoch, epochs=None, seed=0,
                  samples_per_class=4):
    """The training example indices of one epoch, as a NumPy array.

    Args:
        labels: Integer training labels, shape `(N,)`.
        sampler: A name in `SAMPLERS`.
        epoch: Index of the epoch, from 0.
        examples_per_epoch: Number of indices to return.
        epochs: Number of epochs of the run (needed by `"progressive"`).
        seed: Seed of the run; the result depends on `(seed, epoch)` only.
        samples_per_class: Images of one class in a row (`"class_aware"`).

    Returns:
        An int64 array of shape `(examples_per_epoch,)`.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng([int(seed), int(epoch)])
    if sampler == "instance":
        passes = -(-int(examples_per_epoch) // len(labels))
        order = np.concatenate([rng.permutation(len(labels)) for _ in range(passes)])
        return order[:examples_per_epoch].astype(np.int64)
    if sampler == "class_aware":
        return class_aware_indices(labels, examples_per_epoch, samples_per_class, rng)
    counts = np.bincount(labels)
    if sampler == "progressive":
        weights = progressive_schedule(counts, epochs)[int(epoch)]
    else:
        weights = class_weights(counts, sampler)
    classes = rng.choice(len(counts), size=int(examples_per_epoch), p=weights)
    indices = np.empty(int(examples_per_epoch), np.int64)
    drawn = np.flatnonzero(np.bincount(classes, minlength=len(counts)))
    return _take_cycling(rng, labels, drawn, indices,
                         lambda c: np.flatnonzero(classes == c))


def index_stream(labels, sampler="instance", examples_per_epoch=None, epochs=None, seed=0,
                 initial_epoch=0, samples_per_class=4, fill_to_multiple_of=None):
    """A dataset of `(position, index)` pairs drawn by a sampler, epoch by epoch.

    Args:
        labels: Integer training labels, shape `(N,)`.
        sampler: A name in `SAMPLERS`.
        examples_per_epoch: Indices per epoch (steps per epoch times the
            global batch size); defaults to `N`.
        epochs: If given, the stream ends after epoch `epochs - 1`;
            otherwise it is infinite (not allowed for `"progressive"`).
        seed: Seed of all shuffles and draws.
        initial_epoch: The first epoch of the stream (to resume a run).
        samples_per_class: Images of one class in a row (`"class_aware"`).
        fill_to_multiple_of: If given, each epoch is followed by filler pairs
            `(-1, 0)` up to a multiple of this number of pairs, so that
            batches of this size never mix two epochs; dropping the fillers
            (position -1) after batching leaves each epoch's last batch
            partial, as a PyTorch `DataLoader` without `drop_last` has it.

    Returns:
        A `tf.data.Dataset` of int64 scalar pairs: the position of the draw in
        the whole run (`epoch * examples_per_epoch + i`, a per-example seed
        for augmentation) and the example index.

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
    if int(samples_per_class) < 1:
        raise ValueError(
            f"`samples_per_class` must be >= 1. Received: {samples_per_class!r}")
    if sampler == "progressive" and (epochs is None or int(epochs) < 1):
        raise ValueError(
            f"The progressive sampler needs `epochs` >= 1. Received: {epochs!r}")
    examples = int(examples_per_epoch or len(labels))

    def draw(epoch):
        return epoch_indices(labels, sampler, epoch, examples, epochs, seed,
                             samples_per_class)

    fillers = -examples % int(fill_to_multiple_of or 1)

    def one_epoch(epoch):
        indices = tf.numpy_function(draw, [epoch], tf.int64, stateful=False)
        positions = epoch * examples + tf.range(examples, dtype=tf.int64)
        pairs = tf.data.Dataset.from_tensor_slices((positions, tf.reshape(indices, [examples])))
        if not fillers:
            return pairs
        filler = tf.constant([-1] * fillers, tf.int64), tf.zeros([fillers], tf.int64)
        return pairs.concatenate(tf.data.Dataset.from_tensor_slices(filler))

    # flat_map hides the length, which Keras and tf.data use to count steps.
    if epochs is None:
        stream = tf.data.Dataset.counter(int(initial_epoch)).flat_map(one_epoch)
        length = tf.data.INFINITE_CARDINALITY
    else:
        stream = tf.data.Dataset.range(int(initial_epoch), int(epochs)).flat_map(one_epoch)
        length = max(int(epochs) - int(initial_epoch), 0) * (examples + fillers)
    return stream.apply(tf.data.experimental.assert_cardinality(length))
