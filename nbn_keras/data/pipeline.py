"""Batched, augmented, prefetched tf.data pipelines for training and evaluation.

Both functions return plain datasets batched with the GLOBAL batch size, to
be passed to `model.fit` / `model.evaluate` (which split each batch across
replicas under a `tf.distribute` strategy) or to
`strategy.experimental_distribute_dataset`. Elements are
`(images, labels)`: float32 `(batch, H, W, C)` in [0, 255] and int32
`(batch,)`.

Epoch length: every sampler gives an epoch of the same number of examples,
so that runs with different samplers do the same amount of work. By default
(`keep_partial_batch=False`) that is `floor(N / global_batch_size)` complete
batches, N the number of training images; the instance sampler's left-over
images are not used in that epoch. With `keep_partial_batch=True` (the
training command's default, as the NBN authors' PyTorch `DataLoader`, which
does not drop its last batch) an epoch holds `M` examples, N rounded up to a
multiple of the number of replicas (as PyTorch's `DistributedSampler` pads
it), in `ceil(M / global_batch_size)` steps, the last one partial; the
padding repeats images of the epoch's draw.
"""

import tensorflow as tf

from nbn_keras.data import samplers as samplers_lib
from nbn_keras.data import transforms


def _check_batch(global_batch_size):
    if int(global_batch_size) != global_batch_size or global_batch_size < 1:
        raise ValueError(
            f"`global_batch_size` must be a positive integer. Received: {global_batch_size!r}"
        )
    return int(global_batch_size)


def _with_options(ds):
    options = tf.data.Options()
    # Index streams are seeded, so every worker builds the same stream and
    # keeps its share of the batches.
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    return ds.with_options(options)


def steps_per_epoch(data, global_batch_size, keep_partial_batch=False, replicas=1):
    """Training steps in one epoch (see the module's "Epoch length").

    Args:
        data: A `LongTailedData`.
        global_batch_size: Batch size summed over all replicas.
        keep_partial_batch: Count the epoch's last, partial batch.
        replicas: Replicas in sync (with `keep_partial_batch`, the epoch is
            padded to a multiple of them).

    Returns:
        A positive int: `floor(N / global_batch_size)`, or with
        `keep_partial_batch` `ceil(M / global_batch_size)`.
    """
    if keep_partial_batch:
        return -(-epoch_examples(data, replicas) // _check_batch(global_batch_size))
    return _full_batches(data, global_batch_size)


def epoch_examples(data, replicas=1):
    """`M`: the training images rounded up to a multiple of `replicas`."""
    return -(-len(data.train_split) // int(replicas)) * int(replicas)


def _full_batches(data, global_batch_size):
    # `make_train_dataset` has an argument named `steps_per_epoch`.
    global_batch_size = _check_batch(global_batch_size)
    num_train = len(data.train_split)
    if num_train < global_batch_size:
        raise ValueError(
            f"`global_batch_size`={global_batch_size} exceeds the {num_train} "
            "training images: an epoch would have no complete batch."
        )
    return num_train // global_batch_size


def make_train_dataset(data, global_batch_size, sampler="instance", epochs=None,
                       seed=0, augment=True, steps_per_epoch=None, initial_epoch=0,
                       samples_per_class=4, keep_partial_batch=False, replicas=1):
    """The training pipeline: sample, decode, augment, batch, prefetch.

    Args:
        data: A `LongTailedData`.
        global_batch_size: Batch size summed over all replicas.
        sampler: One of `samplers.SAMPLERS`: `"instance"`,
            `"class_balanced"`, `"sqrt"`, `"progressive"` or `"class_aware"`.
        epochs: If given, the dataset holds exactly
            `epochs * steps_per_epoch(data, global_batch_size)` batches;
            otherwise it repeats forever. Required by `"progressive"`, whose
            class weights change every `steps_per_epoch` batches.
        seed: Seed of sampling and augmentation. Batch `i` of epoch `e` is
            a function of `(seed, e, i)` only: a pipeline built again with the
            same arguments yields the same batches.
        augment: Apply the data set's training augmentation; `False` applies
            the evaluation transform instead.
        steps_per_epoch: Batches per epoch; defaults to
            `steps_per_epoch(data, global_batch_size)`. Pass the same number
            to `model.fit`.
        initial_epoch: Start at this epoch (a resumed run): the batches are
            those the uninterrupted pipeline yields from this epoch on.
        samples_per_class: With `"class_aware"`, images of one class in a
            row (the authors' `resample`: 4).
        keep_partial_batch: End each epoch with its partial batch (see the
            module's "Epoch length"). Ignored when `steps_per_epoch` is
            given: the epoch is then `steps_per_epoch` complete batches.
        replicas: Replicas in sync; with `keep_partial_batch`, every batch
            (the partial one too) is a multiple of them.

    Returns:
        A `tf.data.Dataset` of `(float32 images, int32 labels)` batches of
        `global_batch_size` examples (static shapes), or with
        `keep_partial_batch` of at most that many (the batch dimension
        unknown). Call `model.fit(ds, epochs=epochs,
        steps_per_epoch=steps_per_epoch(data, global_batch_size),
        initial_epoch=initial_epoch)`.

    Example:

    >>> data = nbn_keras.data.load("synthetic_lt")
    >>> ds = make_train_dataset(data, 32, sampler="sqrt", epochs=2)
    >>> images, labels = next(iter(ds))
    >>> images.shape, labels.dtype
    (TensorShape([32, 32, 32, 3]), tf.int32)
    """
    global_batch_size = _check_batch(global_batch_size)
    samplers_lib.check_sampler(sampler)
    partial = keep_partial_batch and not steps_per_epoch
    if partial:
        examples = epoch_examples(data, replicas)
    else:
        examples = (steps_per_epoch or _full_batches(data, global_batch_size)) * global_batch_size
    split = data.train_split
    indices = samplers_lib.index_stream(
        split.labels, sampler, examples_per_epoch=examples, epochs=epochs, seed=seed,
        initial_epoch=initial_epoch, samples_per_class=samples_per_class,
        fill_to_multiple_of=global_batch_size if partial else None,
    )
    records = tf.constant(split.records)
    labels = tf.constant(split.labels)
    if augment:
        transform = transforms.train_transform(data.recipe, data.image_shape)
    else:
        decode = transforms.eval_transform(data.recipe, data.image_shape)
        transform = lambda record, example_seed: decode(record)

    def load_example(position, index):
        example_seed = tf.stack([tf.constant(seed, tf.int64), position])
        # Fillers (position -1) load example `index` = 0, dropped below.
        return transform(records[index], example_seed), labels[index], position >= 0

    if transforms.is_file_recipe(data.recipe):
        # A file that fails to decode is named in the error.
        ds = transforms.map_image_files(indices, split.records, load_example)
    else:
        ds = indices.map(load_example, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(global_batch_size, drop_remainder=True)
    ds = ds.map(_drop_fillers if partial else lambda images, labels, real: (images, labels))
    return _with_options(ds.prefetch(tf.data.AUTOTUNE))


def _drop_fillers(images, labels, real):
    return tf.boolean_mask(images, real), tf.boolean_mask(labels, real)


def make_eval_dataset(data, split="val", batch_size=256):
    """An evaluation pipeline over one split, in order, without augmentation.

    Args:
        data: A `LongTailedData`.
        split: `"val"` (model selection), `"test"` (final report) or
            `"train"`.
        batch_size: Global batch size. The last batch may be smaller.

    Returns:
        A `tf.data.Dataset` of `(float32 images, int32 labels)` batches.
    """
    batch_size = _check_batch(batch_size)
    ds = data.split_dataset(split).batch(batch_size)
    return _with_options(ds.prefetch(tf.data.AUTOTUNE))
