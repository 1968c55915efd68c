import numpy as np
import pytest
import tensorflow as tf

import nbn_keras.data as nbn_data
from nbn_keras.data import samplers

COUNTS = np.array([400, 200, 100, 50, 20, 10])
LABELS = np.random.RandomState(0).permutation(np.repeat(np.arange(len(COUNTS)), COUNTS))


def _draw(sampler, draws, **kwargs):
    stream = samplers.index_stream(LABELS, sampler, **kwargs).take(draws).batch(draws)
    positions, indices = next(iter(stream))
    np.testing.assert_array_equal(positions, np.arange(draws))
    return indices.numpy()


def _assert_frequencies(indices, target):
    draws = len(indices)
    observed = np.bincount(LABELS[indices], minlength=len(target)) / draws
    sigma = np.sqrt(target * (1 - target) / draws)
    assert np.all(np.abs(observed - target) <= 4.5 * sigma + 1e-9), (observed, target)


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_a_resumed_stream_continues_the_uninterrupted_one(sampler):
    # Exact resume: the stream started at epoch 2 is the tail of the stream
    # started at epoch 0, positions (augmentation seeds) included.
    kwargs = dict(examples_per_epoch=100, epochs=5, seed=3)
    whole = list(samplers.index_stream(LABELS, sampler, **kwargs).as_numpy_iterator())
    resumed = list(samplers.index_stream(LABELS, sampler, initial_epoch=2, **kwargs)
                   .as_numpy_iterator())
    assert len(whole) == 500 and resumed == whole[200:]
    # Epochs differ from each other, and the seed matters.
    assert whole[:100] != whole[100:200]
    other_seed = list(samplers.index_stream(LABELS, sampler, **{**kwargs, "seed": 4})
                      .as_numpy_iterator())
    assert other_seed != whole


def test_instance_sees_every_example_once_per_pass():
    indices = _draw("instance", 2 * len(LABELS))
    for one_pass in np.split(indices, 2):
        assert sorted(one_pass.tolist()) == list(range(len(LABELS)))
    assert not np.array_equal(indices[: len(LABELS)], indices[len(LABELS):])


@pytest.mark.parametrize("sampler", ["class_balanced", "sqrt"])
def test_mixed_sampler_frequencies(sampler):
    if sampler == "class_balanced":
        target = np.full(len(COUNTS), 1.0 / len(COUNTS))
    else:
        target = np.array([c ** 0.5 for c in COUNTS])
        target = target / target.sum()
    indices = _draw(sampler, 12000)
    _assert_frequencies(indices, target)
    # Within a class, every image is used once before any is used twice.
    tail = indices[LABELS[indices] == 5]
    assert len(set(tail[:10].tolist())) == 10


def test_progressive_moves_from_instance_to_class_balanced():
    per_epoch, epochs = 6000, 4
    indices = _draw("progressive", per_epoch * epochs, examples_per_epoch=per_epoch,
                    epochs=epochs)
    first, last = indices[:per_epoch], indices[-per_epoch:]
    _assert_frequencies(first, COUNTS / COUNTS.sum())
    _assert_frequencies(last, np.full(len(COUNTS), 1.0 / len(COUNTS)))
    middle = indices[per_epoch: 2 * per_epoch]
    target = (2 / 3) * (COUNTS / COUNTS.sum()) + (1 / 3) / len(COUNTS)
    _assert_frequencies(middle, target)


def test_progressive_needs_epochs():
    with pytest.raises(ValueError, match="epochs"):
        samplers.index_stream(LABELS, "progressive", examples_per_epoch=10)


def test_unknown_sampler():
    with pytest.raises(ValueError, match="sampler"):
        samplers.index_stream(LABELS, "oversample")


@pytest.fixture(scope="module")
def data():
    return nbn_data.load("synthetic_lt", num_classes=5, n_max=40, imbalance_factor=10,
                         image_size=8, recipe="cifar")


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_train_dataset_epochs_static_shapes_and_determinism(data, sampler):
    batch = 16
    steps = nbn_data.steps_per_epoch(data, batch)
    assert steps == len(data.train_split) // batch
    make = lambda: nbn_data.make_train_dataset(data, batch, sampler=sampler, epochs=2, seed=7)
    ds = make()
    assert ds.element_spec[0].shape == (batch, 8, 8, 3)
    assert ds.element_spec[1].shape == (batch,)
    assert ds.element_spec[1].dtype == tf.int32
    # The same seed gives the same batches in a freshly built pipeline.
    first = list(ds.as_numpy_iterator())
    second = list(make().as_numpy_iterator())
    assert len(first) == 2 * steps
    for (x1, y1), (x2, y2) in zip(first, second):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    assert 0.0 <= first[0][0].min() and first[0][0].max() <= 255.0


def test_batch_size_errors(data):
    with pytest.raises(ValueError, match="global_batch_size"):
        nbn_data.make_train_dataset(data, 0)
    with pytest.raises(ValueError, match="global_batch_size"):
        nbn_data.make_train_dataset(data, 10 ** 6)


def test_steps_per_epoch_and_initial_epoch_reach_the_pipeline(data):
    # Two steps per epoch (not the data set's own epoch length): the
    # progressive sampler's epochs, and a resumed pipeline, follow them.
    make = lambda initial_epoch: nbn_data.make_train_dataset(
        data, 8, sampler="progressive", epochs=3, seed=1, steps_per_epoch=2,
        initial_epoch=initial_epoch)
    whole = list(make(0).as_numpy_iterator())
    resumed = list(make(1).as_numpy_iterator())
    assert len(whole) == 6 and len(resumed) == 4
    for (x1, y1), (x2, y2) in zip(whole[2:], resumed):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    # The last epoch is class-balanced: labels drawn as the sampler says.
    expected = samplers.epoch_indices(data.train_split.labels, "progressive", 2, 16,
                                      epochs=3, seed=1)
    np.testing.assert_array_equal(np.concatenate([y for _, y in whole[4:]]),
                                  data.train_split.labels[expected])


def test_class_aware_gives_turns_of_n_images_of_each_class_in_cycles():
    # The authors' resample: 4 images of one class in a row, the classes in
    # a fresh order each cycle, each class's images used once before twice.
    per_class, classes = 4, len(COUNTS)
    indices = _draw("class_aware", 3 * classes * per_class + 2, examples_per_epoch=1000,
                    samples_per_class=per_class)
    turns = LABELS[indices[:-2]].reshape(-1, per_class)
    assert (turns == turns[:, :1]).all()
    cycles = turns[:, 0].reshape(3, classes)
    assert all(sorted(cycle) == list(range(classes)) for cycle in cycles)
    assert [cycle.tolist() for cycle in cycles] != [cycles[0].tolist()] * 3
    assert LABELS[indices[-2]] == LABELS[indices[-1]]  # a turn cut by the draw
    whole_epoch = _draw("class_aware", 1000, examples_per_epoch=1000)
    for c, count in enumerate(COUNTS):
        used = whole_epoch[LABELS[whole_epoch] == c]
        first = used[:min(count, len(used))]
        assert len(set(first.tolist())) == len(first)
    # Class-balanced frequencies, though the data are long-tailed.
    np.testing.assert_allclose(np.bincount(LABELS[whole_epoch]) / 1000, 1 / classes,
                               atol=per_class / 1000 + 1e-9)
    with pytest.raises(ValueError, match="samples_per_class"):
        samplers.index_stream(LABELS, "class_aware", samples_per_class=0)


@pytest.mark.parametrize("sampler", ["instance", "progressive"])
def test_partial_last_batch_is_kept_padded_to_the_replicas_and_resumes(data, sampler):
    n, batch, replicas = len(data.train_split), 16, 2
    padded = n + n % 2  # N rounded up to a multiple of the 2 replicas.
    steps = nbn_data.steps_per_epoch(data, batch, keep_partial_batch=True, replicas=replicas)
    assert steps == -(-padded // batch)
    make = lambda initial_epoch=0: nbn_data.make_train_dataset(
        data, batch, sampler=sampler, epochs=3, seed=7, augment=False,
        keep_partial_batch=True, replicas=replicas, initial_epoch=initial_epoch)
    batches = list(make().as_numpy_iterator())
    last = padded - (steps - 1) * batch
    assert [len(y) for _, y in batches] == ([batch] * (steps - 1) + [last]) * 3
    epochs = [np.concatenate([y for _, y in batches[e * steps:(e + 1) * steps]])
              for e in range(3)]
    if sampler == "instance":  # Every image once, plus the padding.
        for labels in epochs:
            extra = np.bincount(labels, minlength=5) - np.asarray(data.class_counts)
            assert extra.min() == 0 and extra.sum() == padded - n
    # A run resumed at epoch 1 gets exactly the batches of epochs 1 and 2.
    for (x1, y1), (x2, y2) in zip(batches[steps:], make(initial_epoch=1).as_numpy_iterator(),
                                  strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
