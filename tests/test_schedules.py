import json
import math
import subprocess
import sys

import keras
import numpy as np
import pytest

from nbn_keras.training import optimizers
from nbn_keras.training import schedules
from tests.helpers import REPO
from tests.helpers import parse_config


def values(schedule, steps):
    return [float(schedule(step)) for step in steps]


def test_scaled_learning_rate():
    assert schedules.scaled_learning_rate(0.1, 512) == pytest.approx(0.2)
    assert schedules.scaled_learning_rate(0.2, 128) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        schedules.scaled_learning_rate(0.1, 0)


def test_cosine_without_warmup():
    schedule = schedules.WarmupCosineDecay(0.2, total_steps=100)
    # 0.2 * 0.5 * (1 + cos(pi * t / 100))
    expected = [0.2, 0.2 * 0.5 * (1 + math.cos(math.pi * 0.25)), 0.1,
                0.2 * 0.5 * (1 + math.cos(math.pi * 0.99)), 0.0, 0.0]
    np.testing.assert_allclose(
        values(schedule, [0, 25, 50, 99, 100, 150]), expected, atol=1e-7
    )


def test_cosine_with_warmup():
    schedule = schedules.WarmupCosineDecay(1.0, total_steps=110, warmup_steps=10)
    # Warmup: (k + 1) / 10; then cosine over the remaining 100 steps.
    np.testing.assert_allclose(
        values(schedule, [0, 4, 9, 10, 60, 110]),
        [0.1, 0.5, 1.0, 1.0, 0.5, 0.0],
        atol=1e-6,
    )


def test_cifar_warmup_and_steps():
    schedule = schedules.WarmupStepDecay(0.1, steps_per_epoch=10)
    # 5 warmup epochs = 50 steps; x0.01 from epoch 160, x0.001 from 180.
    steps = [0, 24, 49, 50, 1599, 1600, 1799, 1800, 1999]
    expected = [0.002, 0.05, 0.1, 0.1, 0.1, 1e-3, 1e-3, 1e-4, 1e-4]
    np.testing.assert_allclose(values(schedule, steps), expected, rtol=1e-6)


def test_step_decay_without_warmup():
    schedule = schedules.WarmupStepDecay(
        1.0, steps_per_epoch=3, warmup_epochs=0, boundaries=[2], factors=[0.5]
    )
    np.testing.assert_allclose(values(schedule, [0, 5, 6, 7]), [1, 1, 0.5, 0.5])


def test_schedules_drive_an_optimizer():
    schedule = schedules.WarmupStepDecay(0.1, steps_per_epoch=10)
    optimizer = keras.optimizers.SGD(schedule)
    optimizer.iterations.assign(1600)
    assert float(optimizer.learning_rate) == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "schedule",
    [
        schedules.WarmupCosineDecay(0.2, total_steps=900, warmup_steps=30),
        schedules.WarmupStepDecay(
            0.1, 20, warmup_epochs=2, boundaries=(8, 9), factors=(0.1, 0.01)
        ),
    ],
)
def test_serialization_round_trip(schedule):
    config = keras.saving.serialize_keras_object(schedule)
    assert config["registered_name"].startswith("nbn_keras>")
    restored = keras.saving.deserialize_keras_object(config)
    assert restored.get_config() == schedule.get_config()
    steps = [0, 10, 100, 170, 185, 500]
    np.testing.assert_allclose(values(restored, steps), values(schedule, steps))


def test_invalid_arguments():
    with pytest.raises(ValueError):
        schedules.WarmupCosineDecay(0.1, total_steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="same length"):
        schedules.WarmupStepDecay(0.1, 10, boundaries=(160, 180), factors=(0.1,))
    with pytest.raises(ValueError, match="increase"):
        schedules.WarmupStepDecay(0.1, 10, boundaries=(180, 160))


# The PyTorch references run in a process of their own: creating a torch
# optimizer imports torch._dynamo, which crashes a process that has loaded
# TensorFlow.
TORCH_RATES = """
import json
import torch


class CIFARWarmStep(torch.optim.lr_scheduler.LRScheduler):
    # The NBN authors' CIFARWarmStepLR, restated from its rule.
    def get_lr(self):
        e = self.last_epoch
        factor = e / 5 if e <= 5 else 0.001 if e > 180 else 0.01 if e > 160 else 1.0
        return [lr * factor for lr in self.base_lrs]


def epoch_rates(make_scheduler, base, epochs):
    # The rate each epoch trains at, stepped as the NBN authors' main.py.
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    scheduler = make_scheduler(optimizer)
    rates = []
    for _ in range(epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # train(...)
        scheduler.step()  # after validate(...)
    return rates


cosine = lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=90)
print(json.dumps({
    "cifar_warm_step": epoch_rates(CIFARWarmStep, 0.1, 200),
    "cosine_90": epoch_rates(cosine, 0.2, 90),
    "cosine_90_for_200": epoch_rates(cosine, 0.1, 200),
}))
"""


@pytest.fixture(scope="module")
def torch_rates():
    result = subprocess.run([sys.executable, "-c", TORCH_RATES], capture_output=True,
                            text=True, timeout=120, check=True)
    return json.loads(result.stdout)


def ldam_drw_rate(base, epoch):
    """LDAM-DRW's adjust_learning_rate, called before each epoch (from 0)."""
    epoch = epoch + 1
    if epoch <= 5:
        return base * epoch / 5
    return base * (0.0001 if epoch > 180 else 0.01 if epoch > 160 else 1.0)


def recipe_epoch_rates(recipe, steps_per_epoch=3):
    """The rate of the first and last step of each epoch under a recipe file."""
    config = parse_config(f"--flagfile={REPO}/configs/recipes/{recipe}")
    optimizer = optimizers.from_config(config, steps_per_epoch)
    schedule = optimizer._learning_rate
    lr = schedules.scaled_learning_rate(config.base_lr, config.global_batch_size)
    starts = values(schedule, [e * steps_per_epoch for e in range(config.epochs)])
    ends = values(schedule, [(e + 1) * steps_per_epoch - 1 for e in range(config.epochs)])
    return lr, config, np.array(starts), np.array(ends)


@pytest.mark.slow  # About 8 s: the PyTorch process.
@pytest.mark.parametrize("recipe, reference", [
    ("cifar_lt.cfg", "cifar_warm_step"),
    ("cifar_lt_ldam_drw.cfg", None),
    ("imagenet_lt.cfg", "cosine_90"),
    ("imagenet_lt_ride.cfg", "cosine_90_for_200"),
])
def test_recipe_rates_are_the_pytorch_schedulers_epoch_by_epoch(recipe, reference,
                                                                torch_rates):
    lr, config, starts, ends = recipe_epoch_rates(recipe)
    if reference is None:
        expected = [ldam_drw_rate(lr, e) for e in range(config.epochs)]
    else:
        expected = torch_rates[reference]
    assert len(expected) == config.epochs
    np.testing.assert_allclose(starts, expected, rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(starts, ends)  # Constant within an epoch.


def test_recipe_rates_by_hand():
    _, _, cifar, _ = recipe_epoch_rates("cifar_lt.cfg")
    np.testing.assert_allclose(cifar[[0, 1, 5, 160, 161, 180, 181, 199]],
                               [0, 0.02, 0.1, 0.1, 1e-3, 1e-3, 1e-4, 1e-4], rtol=1e-6)
    _, config, imagenet, _ = recipe_epoch_rates("imagenet_lt.cfg")
    assert config.epochs == 90 and imagenet[0] == pytest.approx(0.2)
    assert imagenet[-1] == pytest.approx(0.2 * (1 + math.cos(math.pi * 89 / 90)) / 2, rel=1e-4)
    assert imagenet[-1] / imagenet[0] == pytest.approx(3.05e-4, rel=1e-2)


def test_epoch_warmup_step_decay_round_trip_and_errors():
    schedule = schedules.EpochWarmupStepDecay(0.1, 4, 2, (3,), (0.5,), first_epoch=1)
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(schedule))
    steps = list(range(24))
    np.testing.assert_allclose(values(restored, steps), values(schedule, steps))
    # t = e + 1: 0.05, 0.1, 0.1, then 0.05 from t = 4.
    np.testing.assert_allclose(values(schedule, [0, 4, 8, 12, 23]), [0.05, 0.1, 0.1, 0.05, 0.05])
    with pytest.raises(ValueError, match="same length"):
        schedules.EpochWarmupStepDecay(0.1, 10, boundaries=(160, 180), factors=(0.1,))
