"""RIDE: the multi-expert classifier, its NBN selection, folding and loss."""

import math
import threading

import numpy as np
import pytest

import keras
import tensorflow as tf
import torch

import nbn_keras
from nbn_keras.models.ride import loss as ride_loss_module
from nbn_keras.models.ride import network as ride
from nbn_keras.models.ride import trainer as ride_trainer
from nbn_keras.training.callbacks import RunCheckpoint
from nbn_keras.training.losses import build_loss
from nbn_keras.models.ride.loss import RIDEEpochHook
from nbn_keras.models.ride.loss import RIDELoss
from nbn_keras.training.schedules import EpochCosineAnnealing
from tests.torch_nets import torch_ride_balanced_softmax


# ---------------------------------------------------------------- the loss


def _log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def ride_loss_numpy(experts, labels, counts, epoch, reweight_epoch,
                    max_m=0.5, s=30.0, factor=-0.2, base_t=1.0, reweight_factor=0.05,
                    beta=0.9999):
    """The authors' RIDELoss.forward, written out in NumPy (float64)."""
    counts = np.asarray(counts, np.float64)
    batch, num_experts, num_classes = experts.shape
    m = 1.0 / np.sqrt(np.sqrt(counts))
    m = m * (max_m / m.max())
    effective = 1.0 - beta ** counts
    cb = (1.0 - beta) / effective
    cb = cb / cb.sum() * num_classes
    freq = counts / counts.sum()
    div = num_classes * freq * reweight_factor + 1 - reweight_factor
    div = div / div.max()
    reweight = epoch > reweight_epoch
    mean = experts.mean(axis=1)
    loss = 0.0
    for e in range(num_experts):
        z = experts[:, e].copy()
        z[np.arange(batch), labels] -= s * m[labels]
        nll = -_log_softmax(z)[np.arange(batch), labels]
        if reweight:
            w = cb[labels]
            loss += (w * nll).sum() / w.sum()
        else:
            loss += nll.mean()
        t = base_t * div[None, :] if reweight else base_t
        t_mean = np.mean(t)
        log_q = _log_softmax(experts[:, e] / t)
        p = np.exp(_log_softmax(mean / t))
        kl = (p * (np.log(p) - log_q)).sum() / batch
        loss += factor * t_mean * t_mean * kl
    return loss


@pytest.mark.parametrize("epoch", [3, 4, 5])
def test_ride_loss_matches_numpy_statement(epoch):
    rng = np.random.default_rng(0)
    counts = [400, 120, 40, 9, 3]
    experts = rng.normal(size=(6, 3, 5)) * 3
    labels = np.array([0, 1, 2, 3, 4, 4])
    loss = RIDELoss(counts, reweight_epoch=4)
    loss.set_epoch(epoch)
    got = float(loss(labels, experts.astype("float32")))
    want = ride_loss_numpy(experts, labels, counts, epoch, reweight_epoch=4)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_ride_loss_never_reweights_without_reweight_epoch():
    rng = np.random.default_rng(1)
    experts = rng.normal(size=(4, 2, 3)).astype("float32")
    labels = np.array([0, 1, 2, 2])
    loss = RIDELoss([50, 10, 2])
    loss.set_epoch(1000)
    want = ride_loss_numpy(experts.astype(np.float64), labels, [50, 10, 2], 0, 10**9)
    np.testing.assert_allclose(float(loss(labels, experts)), want, rtol=1e-5)


def test_ride_loss_refuses_logits_not_from_a_ride_model():
    loss = RIDELoss([5, 3])
    with pytest.raises(ValueError, match="not the output of a RIDE model"):
        loss(np.array([0]), np.zeros((1, 2), "float32"))


def test_ride_loss_reads_expert_logits_of_the_model_in_fit():
    """Mean-logits output, per-expert loss: fit matches the loss on the experts.

    Under a (one-device) MirroredStrategy, as the training command runs.
    """
    strategy = tf.distribute.MirroredStrategy(["CPU:0"])
    with strategy.scope():
        inputs = keras.Input((4,), name="images")
        heads = [keras.layers.Dense(3, name=f"h{e}")(inputs) for e in range(2)]
        stacked = keras.layers.Concatenate(axis=1)(
            [keras.layers.Reshape((1, 3))(h) for h in heads])
        model = keras.Model(inputs, ride.ExpertAverage(name="logits")(stacked))
        experts = keras.Model(inputs, stacked)
        loss = RIDELoss([30, 10, 2], reweight_epoch=0)
        trainer = loss.training_model(model)
        trainer.compile(keras.optimizers.SGD(0.0), loss=loss)
    x = np.random.default_rng(2).normal(size=(8, 4)).astype("float32")
    y = np.array([0, 1, 2, 0, 1, 2, 0, 0])
    history = trainer.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(8), epochs=2,
                        verbose=0, callbacks=[RIDEEpochHook()])
    per_epoch = [ride_loss_numpy(np.asarray(experts(x), np.float64), y, [30, 10, 2],
                                 epoch, 0) for epoch in (0, 1)]
    np.testing.assert_allclose(history.history["loss"], per_epoch, rtol=1e-4)
    assert per_epoch[0] != pytest.approx(per_epoch[1])


def test_ride_balanced_softmax_reads_expert_logits_of_the_model_in_fit():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,), name="images")
    stacked = keras.layers.Concatenate(axis=1)(
        [keras.layers.Reshape((1, 3))(keras.layers.Dense(3)(inputs)) for _ in range(2)])
    model = keras.Model(inputs, ride.ExpertAverage(name="logits")(stacked))
    experts = keras.Model(inputs, stacked)
    loss = build_loss("ride_balanced_softmax", [30, 10, 2])
    trainer = loss.training_model(model)
    trainer.compile(keras.optimizers.SGD(0.0), loss=loss)
    x = np.random.default_rng(2).normal(size=(8, 4)).astype("float32")
    y = np.array([0, 1, 2, 0, 1, 2, 0, 0])
    history = trainer.fit(x, y, batch_size=8, epochs=1, verbose=0)
    freq = torch.tensor(np.array([30, 10, 2]) / 42)
    expected = torch_ride_balanced_softmax(
        torch.tensor(np.asarray(experts(x), np.float64)).transpose(0, 1), torch.tensor(y), freq)
    assert history.history["loss"][0] == pytest.approx(expected.item(), rel=1e-4)


def toy_ride(seed, experts=2, classes=3):
    """Dense experts on 4 features, stacked and averaged as in a RIDE classifier."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,), name="images")
    stacked = keras.layers.Concatenate(axis=1, name="expert_logits")(
        [keras.layers.Reshape((1, classes))(keras.layers.Dense(classes)(inputs))
         for _ in range(experts)])
    return keras.Model(inputs, ride.ExpertAverage(name="logits")(stacked))


def module_state():
    modules = (ride, ride_loss_module, ride_trainer)
    assert not any(isinstance(value, threading.local)
                   for module in modules for value in vars(module).values())
    return [{name: id(value) for name, value in vars(module).items()} for module in modules]


def test_a_training_step_of_a_ride_classifier_gets_the_ride_loss_of_its_experts():
    """The step's loss is the NumPy RIDE loss of the experts' logits, its metrics the mean's."""
    classifier = toy_ride(seed=3)
    loss = RIDELoss([30, 10, 2], reweight_epoch=0)
    trainer = loss.training_model(classifier)
    trainer.compile(keras.optimizers.SGD(0.1), loss=loss,
                    metrics=[keras.metrics.SparseCategoricalAccuracy(name="top1"),
                             keras.metrics.SparseCategoricalCrossentropy(
                                 name="ce", from_logits=True)])
    loss.set_epoch(1)  # Re-weighting and per-class temperatures on.
    x = np.random.default_rng(6).normal(size=(6, 4)).astype("float32")
    y = np.array([0, 1, 2, 0, 0, 1])
    experts = np.asarray(keras.Model(classifier.inputs, classifier.get_layer(
        "expert_logits").output)(x), np.float64)
    before = module_state()
    weights = classifier.get_weights()
    logs = trainer.train_on_batch(x, y, return_dict=True)
    assert sorted(logs) == ["ce", "loss", "top1"]
    np.testing.assert_allclose(logs["loss"], ride_loss_numpy(experts, y, [30, 10, 2], 1, 0),
                               rtol=1e-4)
    mean = experts.mean(axis=1)
    assert logs["top1"] == pytest.approx(np.mean(mean.argmax(-1) == y))
    assert logs["ce"] == pytest.approx(-np.mean(_log_softmax(mean)[np.arange(6), y]), rel=1e-5)
    assert any(not np.allclose(a, b) for a, b in zip(weights, classifier.get_weights()))
    # Nothing outside the model carries the step's tensors.
    assert module_state() == before and not hasattr(ride, "_recorded")
    assert [v.path for v in trainer.trainable_variables] == [
        v.path for v in classifier.trainable_variables]
    # The loggers, given the trainer, read the classifier's layers.
    assert list(nbn_keras.conversion.leaf_layers(trainer)) == list(
        nbn_keras.conversion.leaf_layers(classifier))


def test_expert_logits_trainer_refuses_a_model_without_expert_average():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)], name="plain")
    with pytest.raises(ValueError, match="'plain' has 0"):
        RIDELoss([5, 3, 1]).training_model(model)


@pytest.mark.slow
def test_a_ride_run_resumes_from_the_classifiers_backup(tmp_path):
    """Backups hold the classifier and the trainer's optimizer; resuming is exact.

    The momentum carried over counts: resumed weights equal the
    uninterrupted run's only with the optimizer state restored.
    """
    x = np.random.default_rng(7).normal(size=(8, 4)).astype("float32")
    y = np.array([0, 1, 2, 0, 1, 2, 0, 0])

    def fit(classifier, run_dir, epochs):
        run_dir.mkdir(exist_ok=True)
        loss = RIDELoss([30, 10, 2], reweight_epoch=0)
        trainer = loss.training_model(classifier)
        trainer.compile(keras.optimizers.SGD(0.5, momentum=0.9), loss=loss)
        checkpoint = RunCheckpoint(str(run_dir), saved_model=classifier)  # No best.keras.
        initial_epoch = checkpoint.restore(trainer)
        trainer.fit(x, y, batch_size=4, epochs=epochs, initial_epoch=initial_epoch,
                    shuffle=False, verbose=0, callbacks=[RIDEEpochHook(), checkpoint])
        return initial_epoch

    whole = toy_ride(seed=0)
    fit(whole, tmp_path / "whole", epochs=2)
    assert fit(toy_ride(seed=0), tmp_path / "killed", epochs=1) == 0
    resumed = toy_ride(seed=1)
    assert fit(resumed, tmp_path / "killed", epochs=2) == 1
    for got, want in zip(resumed.get_weights(), whole.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    backup = keras.models.load_model(tmp_path / "killed" / "backup" / "epoch-0002.keras",
                                     compile=False)
    assert backup.output.shape == (None, 3) and backup.output_names == ["logits"]


# ------------------------------------------------------ model and NBN


@pytest.fixture(scope="module")
def small_ride():
    # layer3/4 narrowed to keep the test fast; the structure is unchanged.
    return ride.build_ride_classifier(
        5, (32, 32, 3), num_experts=2, layer3_output_dim=8, layer4_output_dim=8,
        head="fcbn_notaffine")


def test_ride_structure(small_ride):
    names = {layer.name for layer in small_ride.layers}
    assert {"layer3s_0_5_bn3", "layer3s_1_5_bn3", "layer4s_1_2_bn3",
            "layer4s_0_0_downsample_1", "linears_0", "linears_1_bn"} <= names
    assert "layer3_0_bn1" not in names
    assert small_ride.output.shape == (None, 5)
    head_bn = small_ride.get_layer("linears_1_bn")
    assert head_bn.gamma is None and head_bn.beta is None
    shared = ride.build_ride_classifier(
        5, (32, 32, 3), num_experts=2, share_layer3=True, layer3_output_dim=8,
        layer4_output_dim=8)
    shared_names = {layer.name for layer in shared.layers}
    assert "layer3_5_bn3" in shared_names and "layer3s_0_0_bn1" not in shared_names


def test_ride_output_is_the_mean_of_the_experts(small_ride):
    x = np.random.default_rng(3).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    heads = [small_ride.get_layer(f"linears_{e}_bn").output for e in range(2)]
    experts = keras.Model(small_ride.inputs, heads)(x)
    np.testing.assert_allclose(
        small_ride(x), (np.asarray(experts[0]) + np.asarray(experts[1])) / 2, atol=1e-6)


@pytest.mark.slow
def test_ride_selection_converts_every_bn_of_each_experts_last_stage(small_ride, tmp_path):
    converted = nbn_keras.convert_to_nbn(small_ride, selection="ride")
    nbn = [l for l in converted.layers
           if isinstance(l, nbn_keras.NormalizedBatchNormalization)]
    # Per expert: 3 bottlenecks x (bn1, bn2, bn3) + the shortcut BN.
    assert len(nbn) == 2 * 10
    assert all(l.name.startswith("layer4s_") and l.shared_scale for l in nbn)
    trainer = ride_trainer.ExpertLogitsTrainer(converted)
    assert [v.path for v in trainer.trainable_variables] == [
        v.path for v in converted.trainable_variables]
    path = str(tmp_path / "ride_nbn.keras")
    converted.save(path)
    loaded = keras.models.load_model(path)
    scales = [l for l in loaded.layers if isinstance(l, nbn_keras.NBNScale)]
    assert sorted(l.name for l in scales) == ["nbn_scale_expert0", "nbn_scale_expert1"]
    for layer in scales:
        assert [tuple(w.shape) for w in layer.weights] == [()]
    # Each expert's BN layers are fed by that expert's scale only.
    scales[0].scales[0].assign(2.0)
    x = np.random.default_rng(4).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    for expert in range(2):
        for layer in loaded.layers:
            if isinstance(layer, nbn_keras.NormalizedBatchNormalization) and \
                    layer.name.startswith(f"layer4s_{expert}_"):
                scale = layer._inbound_nodes[0].arguments.kwargs["scale"]
                assert scale._keras_history.operation.name == f"nbn_scale_expert{expert}"
    folded = nbn_keras.fold_nbn(loaded)
    assert not any(isinstance(l, (nbn_keras.NormalizedBatchNormalization,
                                  nbn_keras.NBNScale)) for l in folded.layers)
    np.testing.assert_allclose(folded(x), loaded(x), atol=1e-5)
    assert not np.allclose(loaded(x), converted(x))  # the changed scale counts


def test_ride_selection_refuses_plain_models():
    model = keras.Sequential([keras.Input((4, 4, 2)), keras.layers.BatchNormalization()])
    with pytest.raises(ValueError, match="RIDE model"):
        nbn_keras.convert_to_nbn(model, selection="ride")
    with pytest.raises(ValueError, match="separate_scales"):
        nbn_keras.convert_to_nbn(model, selection="ride", scale_sharing="layer")



def torch_cosine_annealing_lrs(base, t_max, epochs, eta_min=0.0):
    """PyTorch's `CosineAnnealingLR.get_lr` recursion, stepped once per epoch.

    (torch.optim is not imported: it crashes in a process with TensorFlow.)
    """
    lrs = [base]
    for epoch in range(1, epochs):
        last = lrs[-1]
        if (epoch - 1 - t_max) % (2 * t_max) == 0:
            lr = last + (base - eta_min) * (1 - math.cos(math.pi / t_max)) / 2
        else:
            lr = ((1 + math.cos(math.pi * epoch / t_max))
                  / (1 + math.cos(math.pi * (epoch - 1) / t_max))
                  * (last - eta_min) + eta_min)
        lrs.append(lr)
    return np.asarray(lrs)


def test_epoch_cosine_annealing_is_pytorchs_over_200_epochs():
    schedule = EpochCosineAnnealing(0.1, steps_per_epoch=3, t_max_epochs=90)
    got = np.asarray([float(schedule(k)) for k in range(200 * 3)])
    want = np.repeat(torch_cosine_annealing_lrs(0.1, 90, 200), 3)
    np.testing.assert_allclose(got, want, atol=1e-7)
    assert got[90 * 3] < 1e-9 and got[180 * 3] == pytest.approx(0.1)
    assert got[-1] > 0.08  # their 200-epoch run ends at a high rate


@pytest.mark.parametrize("changes, message", [
    (dict(loss="ride"), "--loss=ride needs a RIDE backbone"),
    (dict(nbn_selection="ride"), "--nbn_selection=ride needs a RIDE backbone"),
    (dict(backbone="resnet50_ride", schedule="cosine_annealing", warmup_epochs=5),
     "cosine_annealing has no warmup"),
    (dict(backbone="resnet50_ride", ride_experts=0), "--ride_experts must be positive"),
])
def test_ride_flags_are_checked(changes, message, tmp_path):
    from nbn_keras.training import config as config_lib

    config = config_lib.TrainConfig(export=False)
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(config.replace(**changes))
    config_lib.validate(config.replace(backbone="resnet50_ride", loss="ride",
                                       nbn_selection="ride"))
