import math

import keras
import numpy as np
import pytest

from nbn_keras import schedules


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
