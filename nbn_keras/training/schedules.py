"""Learning-rate schedules of the reference recipes.

Every schedule takes the optimizer's step (`optimizer.iterations`, 0 for the
first batch). `WarmupCosineDecay` and `WarmupStepDecay` change per step;
their warmup is linear per step: step `k < warmup_steps` uses
`base * (k + 1) / warmup_steps`, so the last warmup step reaches `base`.
`EpochCosineAnnealing` and `EpochWarmupStepDecay` are PyTorch schedulers
stepped once per epoch: constant within an epoch, as in the NBN authors'
`main.py`.
"""

import math

import keras
from keras import ops


def scaled_learning_rate(base_lr, global_batch_size):
    """The linear scaling rule: `base_lr * global_batch_size / 256`.

    `global_batch_size` is the batch summed over all replicas, the number the
    recipe's batch size refers to. The ImageNet-LT recipe's 0.2 at batch 512
    is `scaled_learning_rate(0.1, 512)`.

    Args:
        base_lr: Learning rate for a global batch of 256.
        global_batch_size: Global batch size.

    Returns:
        The scaled learning rate, a float.
    """
    if global_batch_size <= 0:
        raise ValueError(
            f"global_batch_size must be positive, got {global_batch_size}."
        )
    return float(base_lr) * global_batch_size / 256.0


def _warmup_factor(step, warmup_steps):
    return ops.minimum((step + 1.0) / float(warmup_steps), 1.0)


@keras.saving.register_keras_serializable(package="nbn_keras")
class WarmupCosineDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Cosine decay to 0 over `total_steps`, after an optional linear warmup.

    After warmup, `lr = base * 0.5 * (1 + cos(pi * t / T))` with
    `t = step - warmup_steps` and `T = total_steps - warmup_steps`; steps
    past `total_steps` get 0.

    Args:
        base_learning_rate: Peak learning rate.
        total_steps: Number of training steps (epochs * steps per epoch).
        warmup_steps: Steps of linear warmup. Defaults to `0` (the
            ImageNet-LT recipe has none).

    Example:

    >>> schedule = WarmupCosineDecay(0.2, total_steps=90 * steps_per_epoch)
    >>> optimizer = CoupledSGD(schedule, momentum=0.9)
    """

    def __init__(self, base_learning_rate, total_steps, warmup_steps=0):
        if total_steps <= 0 or not 0 <= warmup_steps < total_steps:
            raise ValueError(
                "Need total_steps > 0 and 0 <= warmup_steps < total_steps, got "
                f"total_steps={total_steps}, warmup_steps={warmup_steps}."
            )
        self.base_learning_rate = float(base_learning_rate)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        decay_steps = float(self.total_steps - self.warmup_steps)
        progress = ops.clip((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
        lr = self.base_learning_rate * 0.5 * (1.0 + ops.cos(math.pi * progress))
        if self.warmup_steps:
            lr = lr * _warmup_factor(step, self.warmup_steps)
        return lr

    def get_config(self):
        return {
            "base_learning_rate": self.base_learning_rate,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
        }


def _checked_steps(steps_per_epoch, warmup_epochs, boundaries, factors):
    """The boundaries and factors as lists, after checking all four."""
    boundaries = [int(b) for b in boundaries]
    factors = [float(f) for f in factors]
    if steps_per_epoch <= 0 or warmup_epochs < 0:
        raise ValueError(
            "Need steps_per_epoch > 0 and warmup_epochs >= 0, got "
            f"{steps_per_epoch} and {warmup_epochs}."
        )
    if len(boundaries) != len(factors):
        raise ValueError(
            f"boundaries {boundaries} and factors {factors} must have the "
            "same length."
        )
    if boundaries != sorted(set(boundaries)):
        raise ValueError(
            f"boundaries must increase strictly, got {boundaries}."
        )
    return boundaries, factors


@keras.saving.register_keras_serializable(package="nbn_keras")
class WarmupStepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup, then the base rate times a factor that drops at epochs.

    The CIFAR-LT recipe: 5 epochs of warmup, `base * 0.01` from epoch 160,
    `base * 0.001` from epoch 180 (of 200). Factors multiply the base rate;
    they are not cumulative. Epochs count from 0: epoch `e` starts at step
    `e * steps_per_epoch`.

    Args:
        base_learning_rate: Learning rate after warmup.
        steps_per_epoch: Training steps per epoch.
        warmup_epochs: Epochs of linear warmup. Defaults to `5`.
        boundaries: Increasing epochs at which the factor changes. Defaults
            to `(160, 180)`.
        factors: Factor applied to the base rate from each boundary on.
            Defaults to `(0.01, 0.001)`.

    Example:

    >>> schedule = WarmupStepDecay(0.1, steps_per_epoch=85)
    >>> schedule(160 * 85)  # 0.1 * 0.01 = 1e-3
    """

    def __init__(
        self,
        base_learning_rate,
        steps_per_epoch,
        warmup_epochs=5,
        boundaries=(160, 180),
        factors=(0.01, 0.001),
    ):
        boundaries, factors = _checked_steps(
            steps_per_epoch, warmup_epochs, boundaries, factors)
        self.base_learning_rate = float(base_learning_rate)
        self.steps_per_epoch = int(steps_per_epoch)
        self.warmup_epochs = int(warmup_epochs)
        self.boundaries = boundaries
        self.factors = factors

    def __call__(self, step):
        step = ops.cast(step, "float32")
        factor = ops.ones_like(step)
        for boundary, value in zip(self.boundaries, self.factors):
            reached = step >= float(boundary * self.steps_per_epoch)
            factor = ops.where(reached, value, factor)
        warmup_steps = self.warmup_epochs * self.steps_per_epoch
        if warmup_steps:
            factor = factor * _warmup_factor(step, warmup_steps)
        return self.base_learning_rate * factor

    def get_config(self):
        return {
            "base_learning_rate": self.base_learning_rate,
            "steps_per_epoch": self.steps_per_epoch,
            "warmup_epochs": self.warmup_epochs,
            "boundaries": list(self.boundaries),
            "factors": list(self.factors),
        }


@keras.saving.register_keras_serializable(package="nbn_keras")
class EpochCosineAnnealing(keras.optimizers.schedules.LearningRateSchedule):
    """PyTorch's `CosineAnnealingLR` stepped once per epoch, past `T_max` too.

    Epoch `e` (from 0) trains at
    `eta_min + (base - eta_min) * 0.5 * (1 + cos(pi * e / t_max_epochs))`,
    constant within the epoch. PyTorch's recursive update gives this closed
    form for every epoch, so past `T_max` the rate does not stay at
    `eta_min`: it rises again, back to `base` at `2 * T_max`, with period
    `2 * T_max`. This is what the NBN authors' RIDE configs run (T_max 90,
    200 epochs: 0 at epoch 90, 0.1 again at epoch 180, about 0.089 at the
    last epoch, 199).

    Args:
        base_learning_rate: Learning rate of epoch 0.
        steps_per_epoch: Training steps per epoch.
        t_max_epochs: PyTorch's `T_max`, in epochs.
        eta_min: Lowest learning rate. Defaults to `0.0`.

    Example:

    >>> schedule = EpochCosineAnnealing(0.1, steps_per_epoch=10, t_max_epochs=90)
    >>> float(schedule(180 * 10))  # back at the base rate
    0.1
    """

    def __init__(self, base_learning_rate, steps_per_epoch, t_max_epochs, eta_min=0.0):
        if steps_per_epoch <= 0 or t_max_epochs <= 0:
            raise ValueError(
                "Need steps_per_epoch > 0 and t_max_epochs > 0, got "
                f"{steps_per_epoch} and {t_max_epochs}."
            )
        self.base_learning_rate = float(base_learning_rate)
        self.steps_per_epoch = int(steps_per_epoch)
        self.t_max_epochs = int(t_max_epochs)
        self.eta_min = float(eta_min)

    def __call__(self, step):
        epoch = ops.floor(ops.cast(step, "float32") / float(self.steps_per_epoch))
        cosine = 0.5 * (1.0 + ops.cos(math.pi * epoch / float(self.t_max_epochs)))
        return self.eta_min + (self.base_learning_rate - self.eta_min) * cosine

    def get_config(self):
        return {
            "base_learning_rate": self.base_learning_rate,
            "steps_per_epoch": self.steps_per_epoch,
            "t_max_epochs": self.t_max_epochs,
            "eta_min": self.eta_min,
        }


@keras.saving.register_keras_serializable(package="nbn_keras")
class EpochWarmupStepDecay(WarmupStepDecay):
    """Warmup then step drops, constant within an epoch (a per-epoch scheduler).

    With `t = epoch + first_epoch` (`epoch` counted from 0 by Keras), epoch
    `epoch` trains at `base * factor(t)`, where `factor(t) = t / warmup_epochs`
    while `t <= warmup_epochs`, else `factors[i]` for the last `i` with
    `t > boundaries[i]`, else 1. This is the rule of two CIFAR-LT schedulers:

    - `first_epoch=0`: the NBN authors' `CIFARWarmStepLR`
      (`scheduler/CIFAR_WarmStep_LR.py`), stepped after every epoch by their
      `main.py`, so epoch 0 trains at 0, epoch 5 at `base`, epochs 161-180 at
      `base * 0.01` and 181 on at `base * 0.001`.
    - `first_epoch=1`: LDAM-DRW's `adjust_learning_rate` (`epoch + 1`),
      called before every epoch: epoch 0 at `base / 5`, `base * 0.01` from
      epoch 160 and `base * 0.0001` from 180 with its factors.

    Args:
        base_learning_rate: Learning rate after warmup.
        steps_per_epoch: Training steps per epoch.
        warmup_epochs: `W` above; `0` for no warmup. Defaults to `5`.
        boundaries: Increasing `t` after which each factor applies.
            Defaults to `(160, 180)`.
        factors: Factor of the base rate after each boundary. Defaults to
            `(0.01, 0.001)`.
        first_epoch: Number of Keras' first epoch in the scheduler's count.
            Defaults to `0`.

    Example:

    >>> schedule = EpochWarmupStepDecay(0.1, steps_per_epoch=85)
    >>> float(schedule(0)), float(schedule(161 * 85))  # 0.0 and 0.1 * 0.01
    """

    def __init__(
        self,
        base_learning_rate,
        steps_per_epoch,
        warmup_epochs=5,
        boundaries=(160, 180),
        factors=(0.01, 0.001),
        first_epoch=0,
    ):
        super().__init__(base_learning_rate, steps_per_epoch, warmup_epochs,
                         boundaries, factors)
        self.first_epoch = int(first_epoch)

    def __call__(self, step):
        epoch = ops.floor(ops.cast(step, "float32") / float(self.steps_per_epoch))
        t = epoch + float(self.first_epoch)
        factor = ops.ones_like(t)
        for boundary, value in zip(self.boundaries, self.factors):
            factor = ops.where(t > float(boundary), value, factor)
        if self.warmup_epochs:
            warming = t <= float(self.warmup_epochs)
            factor = ops.where(warming, t / float(self.warmup_epochs), factor)
        return self.base_learning_rate * factor

    def get_config(self):
        return {**super().get_config(), "first_epoch": self.first_epoch}


def from_config(config, steps_per_epoch):
    """The learning-rate schedule a training config names.

    Args:
        config: A `nbn_keras.training.config.TrainConfig` (`schedule`, `base_lr`
            or `learning_rate`, `global_batch_size`, `epochs`, `warmup_epochs`,
            `lr_drop_epochs`, `lr_drop_factors`, `cosine_t_max`).
        steps_per_epoch: Optimizer steps per epoch.

    Returns:
        A `keras.optimizers.schedules.LearningRateSchedule`.

    Example:

    >>> schedule = from_config(config_lib.from_flagfile("runs/x/flags.cfg"), 98)
    """
    lr = config.learning_rate or scaled_learning_rate(
        config.base_lr, config.global_batch_size)
    if config.schedule == "cosine_annealing":
        return EpochCosineAnnealing(lr, steps_per_epoch, config.cosine_t_max or config.epochs)
    if config.schedule in ("cifar_warm_step", "ldam_drw_warm_step"):
        return EpochWarmupStepDecay(
            lr, steps_per_epoch, warmup_epochs=config.warmup_epochs,
            boundaries=list(config.lr_drop_epochs), factors=list(config.lr_drop_factors),
            first_epoch=int(config.schedule == "ldam_drw_warm_step"))
    if config.schedule == "cosine":
        return WarmupCosineDecay(
            lr, total_steps=config.epochs * steps_per_epoch,
            warmup_steps=config.warmup_epochs * steps_per_epoch)
    return WarmupStepDecay(
        lr, steps_per_epoch, warmup_epochs=config.warmup_epochs,
        boundaries=list(config.lr_drop_epochs), factors=list(config.lr_drop_factors))
