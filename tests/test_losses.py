import keras
import numpy as np
import pytest
import tensorflow as tf
import torch
import torch.nn.functional as F

from nbn_keras.training import losses
from tests.torch_nets import torch_ride_balanced_softmax

COUNTS = [500, 120, 30, 7]


def np_cross_entropy(logits, labels):
    """Per-example softmax cross-entropy, in float64."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=1))
    return log_z - shifted[np.arange(len(labels)), labels]


def np_ldam(logits, labels, counts, max_m=0.5, s=30.0, beta=None):
    counts = np.asarray(counts, np.float64)
    margins = 1.0 / counts**0.25
    margins *= max_m / margins.max()
    adjusted = np.array(logits, np.float64)
    adjusted[np.arange(len(labels)), labels] -= margins[labels]
    per_example = np_cross_entropy(s * adjusted, labels)
    if beta is None:
        return per_example.mean()
    weights = (1 - beta) / (1 - beta**counts)
    weights *= len(counts) / weights.sum()
    w = weights[labels]
    return (w * per_example).sum() / w.sum()


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 4)).astype("float32")
    labels = np.array([0, 1, 2, 3, 0, 0])
    return logits, labels


def test_cross_entropy_is_keras_sparse_ce(batch):
    logits, labels = batch
    loss = losses.build_loss("cross_entropy")
    assert isinstance(loss, keras.losses.SparseCategoricalCrossentropy)
    np.testing.assert_allclose(
        float(loss(labels, logits)), np_cross_entropy(logits, labels).mean(),
        rtol=1e-5,
    )


@pytest.mark.parametrize("tau", [1.0, 0.5, 2.0])
def test_logit_adjusted(batch, tau):
    logits, labels = batch
    prior = np.array(COUNTS) / sum(COUNTS)
    expected = np_cross_entropy(logits + tau * np.log(prior), labels).mean()
    loss = losses.build_loss("logit_adjusted", COUNTS, tau=tau)
    np.testing.assert_allclose(float(loss(labels, logits)), expected, rtol=1e-5)


def test_balanced_softmax_adds_log_counts(batch):
    logits, labels = batch
    # log(prior) and log(counts) differ by a constant: same softmax.
    expected = np_cross_entropy(logits + np.log(COUNTS), labels).mean()
    loss = losses.build_loss("balanced_softmax", COUNTS)
    np.testing.assert_allclose(float(loss(labels, logits)), expected, rtol=1e-5)


def test_labels_of_shape_batch_by_one(batch):
    logits, labels = batch
    loss = losses.build_loss("ldam_drw", COUNTS)
    np.testing.assert_allclose(
        float(loss(labels[:, None], logits)), float(loss(labels, logits)),
        rtol=1e-6,
    )


def test_ldam_margins_and_drw_weights():
    margins = losses.ldam_margins(COUNTS, max_m=0.5)
    assert margins.max() == pytest.approx(0.5)
    assert margins.argmax() == 3
    np.testing.assert_allclose(margins[0] / margins[3], (7 / 500) ** 0.25)
    weights = losses.drw_class_weights(COUNTS, beta=0.9999)
    assert weights.sum() == pytest.approx(len(COUNTS))
    assert np.all(np.diff(weights) > 0)


def test_ldam_before_and_after_drw(batch):
    logits, labels = batch
    loss = losses.build_loss("ldam_drw", COUNTS, drw_start_epoch=3)
    plain = np_ldam(logits, labels, COUNTS)
    weighted = np_ldam(logits, labels, COUNTS, beta=0.9999)
    assert abs(plain - weighted) > 1e-3
    for epoch, expected in [(0, plain), (2, plain), (3, weighted), (9, weighted)]:
        loss.set_epoch(epoch)
        np.testing.assert_allclose(
            float(loss(labels, logits)), expected, rtol=1e-5
        )


def test_ldam_options(batch):
    logits, labels = batch
    loss = losses.LDAMLoss(COUNTS, max_m=0.3, s=10.0)
    np.testing.assert_allclose(
        float(loss(labels, logits)),
        np_ldam(logits, labels, COUNTS, max_m=0.3, s=10.0),
        rtol=1e-5,
    )
    # Logits already scaled by the classifier: only the margin is scaled.
    unscaled = losses.LDAMLoss(COUNTS, s=10.0, scale_logits=False)
    np.testing.assert_allclose(
        float(unscaled(labels, 10.0 * logits)),
        np_ldam(logits, labels, COUNTS, s=10.0),
        rtol=1e-5,
    )
    never = losses.LDAMLoss(COUNTS)
    never.set_epoch(1000)
    assert float(never.drw_active) == 0.0


def test_drw_switch_inside_compiled_functions(batch):
    logits, labels = batch
    # A model whose output is the fixed logits, so losses are known exactly.
    inputs = keras.Input((4,))
    dense = keras.layers.Dense(4, use_bias=False, kernel_initializer="identity")
    outputs = dense(inputs)
    model = keras.Model(inputs, outputs)
    loss = losses.build_loss("ldam_drw", COUNTS, drw_start_epoch=1)
    model.compile(loss=loss, optimizer=keras.optimizers.SGD(0.0))
    plain = np_ldam(logits, labels, COUNTS)
    weighted = np_ldam(logits, labels, COUNTS, beta=0.9999)

    history = model.fit(
        logits, labels, batch_size=6, epochs=3, verbose=0,
        callbacks=[losses.DeferredReweighting()], shuffle=False,
    )
    np.testing.assert_allclose(
        history.history["loss"], [plain, weighted, weighted], rtol=1e-4
    )
    # The traced evaluation function follows the variable too.
    loss.set_epoch(0)
    np.testing.assert_allclose(
        model.evaluate(logits, labels, verbose=0), plain, rtol=1e-4
    )
    loss.set_epoch(1)
    np.testing.assert_allclose(
        model.evaluate(logits, labels, verbose=0), weighted, rtol=1e-4
    )


def test_callback_needs_a_drw_loss():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    model.compile(loss=losses.build_loss("cross_entropy"), optimizer="sgd")
    with pytest.raises(ValueError, match="set_epoch"):
        model.fit(
            np.zeros((2, 2)), np.zeros(2), verbose=0,
            callbacks=[losses.DeferredReweighting()],
        )


@pytest.mark.parametrize(
    "name, options",
    [
        ("balanced_softmax", {}),
        ("logit_adjusted", {"tau": 0.7}),
        ("ldam_drw", {"max_m": 0.4, "s": 20.0, "drw_start_epoch": 160,
                      "beta": 0.999, "scale_logits": False}),
        ("hcm", {"hcm_n": 2}),
    ],
)
def test_serialization_round_trip(batch, name, options):
    logits, labels = batch
    loss = losses.build_loss(name, COUNTS, **options)
    config = keras.saving.serialize_keras_object(loss)
    assert config["registered_name"].startswith("nbn_keras>")
    restored = keras.saving.deserialize_keras_object(config)
    assert type(restored) is type(loss)
    assert restored.get_config() == loss.get_config()
    for key, value in options.items():
        assert restored.get_config()[key] == value
    np.testing.assert_allclose(
        float(restored(labels, logits)), float(loss(labels, logits)), rtol=1e-6
    )


def test_build_loss_errors():
    with pytest.raises(ValueError, match="'focal'.*cross_entropy.*ldam_drw"):
        losses.build_loss("focal", COUNTS)
    with pytest.raises(ValueError, match="class_counts"):
        losses.build_loss("balanced_softmax")
    with pytest.raises(ValueError, match="non-positive"):
        losses.build_loss("balanced_softmax", [10, 0, 3])


# ---------------------------------------------- the NBN authors' losses, in PyTorch
# Restated from their loss/*.py: `freq` is the class frequency their main.py
# passes (`freq = counts / counts.sum()`, `cls_num_list = freq * N`).

TORCH_COUNTS = np.array([300, 120, 60, 20, 8, 3])


def torch_hcm(logits, labels, freq, hcm_n):
    adjusted = logits + torch.log(freq)
    ranked = logits.scatter(1, labels[:, None], float("inf"))
    hardest = ranked.argsort(dim=1, descending=True)[:, :hcm_n]
    mask = torch.zeros_like(logits).scatter(1, hardest, 1.0)
    return F.cross_entropy(adjusted, labels) + F.cross_entropy(adjusted * mask, labels)


def torch_ldam(logits, labels, counts, max_m=0.5, s=30.0):
    margins = 1.0 / counts.double() ** 0.25
    margins = margins * (max_m / margins.max())
    one_hot = F.one_hot(labels, logits.shape[1]).bool()
    shifted = logits - s * margins[labels][:, None]
    return F.cross_entropy(torch.where(one_hot, shifted, logits), labels)


def torch_value_and_gradient(fn, logits, *args):
    x = torch.tensor(np.asarray(logits, np.float64), requires_grad=True)
    value = fn(x, *args)
    value.backward()
    return value.item(), x.grad.numpy()


def keras_value_and_gradient(loss, labels, logits):
    x = tf.constant(logits)
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = loss(labels, x)
    return float(value), tape.gradient(value, x).numpy()


@pytest.fixture
def torch_batch():
    rng = np.random.default_rng(3)
    logits = (3 * rng.normal(size=(12, 6))).astype("float32")
    labels = rng.integers(0, 6, 12)
    freq = torch.tensor(TORCH_COUNTS / TORCH_COUNTS.sum())
    return logits, labels, torch.tensor(labels), freq


@pytest.mark.parametrize("hcm_n", [1, 3, 300])
def test_hcm_is_the_authors_loss(torch_batch, hcm_n):
    logits, labels, torch_labels, freq = torch_batch
    expected = torch_value_and_gradient(torch_hcm, logits, torch_labels, freq, hcm_n)
    loss = losses.build_loss("hcm", TORCH_COUNTS, hcm_n=hcm_n)
    value, gradient = keras_value_and_gradient(loss, labels, logits)
    np.testing.assert_allclose(value, expected[0], rtol=1e-5)
    np.testing.assert_allclose(gradient, expected[1], rtol=1e-4, atol=1e-7)


def test_hcm_mask_keeps_the_label_and_the_hardest():
    logits = np.array([[5.0, 4.0, -1.0, 3.0], [0.0, 1.0, 2.0, 3.0]], "float32")
    mask = losses.hardest_classes_mask(np.array([2, 3]), logits, 2)
    np.testing.assert_array_equal(np.asarray(mask), [[1, 0, 1, 0], [0, 0, 1, 1]])


def test_ldam_is_the_authors_loss_without_drw(torch_batch):
    logits, labels, torch_labels, _ = torch_batch
    expected = torch_value_and_gradient(
        torch_ldam, logits, torch_labels, torch.tensor(TORCH_COUNTS))
    loss = losses.build_loss("ldam", TORCH_COUNTS)
    loss.set_epoch(500)  # Never re-weights.
    value, gradient = keras_value_and_gradient(loss, labels, logits)
    np.testing.assert_allclose(value, expected[0], rtol=1e-5)
    np.testing.assert_allclose(gradient, expected[1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("factor", [-0.2, 0.0])
def test_ride_balanced_softmax_is_the_authors_loss(torch_batch, factor):
    _, labels, torch_labels, freq = torch_batch
    experts = (3 * np.random.default_rng(4).normal(size=(12, 3, 6))).astype("float32")
    expected = torch_value_and_gradient(
        lambda x: torch_ride_balanced_softmax(x.transpose(0, 1), torch_labels, freq, factor),
        experts)
    loss = losses.build_loss("ride_balanced_softmax", TORCH_COUNTS, diversity_factor=factor)
    value, gradient = keras_value_and_gradient(loss, labels, experts)
    np.testing.assert_allclose(value, expected[0], rtol=1e-5)
    np.testing.assert_allclose(gradient, expected[1], rtol=1e-4, atol=1e-7)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert type(restored) is type(loss) and restored.get_config() == loss.get_config()
    assert float(restored(labels, experts)) == pytest.approx(value, rel=1e-6)
