"""SGD with PyTorch's coupled L2 weight decay and momentum form."""

import keras
from keras import ops

from nbn_keras.training import schedules


@keras.saving.register_keras_serializable(package="nbn_keras")
class CoupledSGD(keras.optimizers.SGD):
    """SGD with coupled L2 weight decay, as PyTorch's `torch.optim.SGD`.

    With `coupled_weight_decay=wd`, `wd * w` is added to the gradient before
    momentum, so the decay goes through the momentum buffer like any
    gradient (an L2 penalty `wd / 2 * ||w||^2` in the loss, without
    computing it). Keras' own `weight_decay` argument is *decoupled*
    (`w -= lr * wd * w` outside momentum, as in AdamW); use the stock
    `keras.optimizers.SGD(weight_decay=...)` for that. The two cannot be
    combined here.

    With `torch_momentum=True` (the default) the update is PyTorch's
    (dampening 0):

    ```
    g = gradient + wd * w
    v = momentum * v + g
    w = w - lr * v                      # nesterov: w - lr * (g + momentum * v)
    ```

    Keras' SGD (`torch_momentum=False`) keeps `m = momentum * m - lr * g;
    w = w + m` instead. Both give the same steps while the learning rate is
    constant; when it changes, PyTorch's form applies the new rate to the
    whole buffer at once while Keras' form lets past steps fade out at their
    old rates.

    Gradient clipping and loss-scale unscaling happen before the decay is
    added, as in PyTorch where `optimizer.step()` adds it.

    Args:
        learning_rate: A float or a `LearningRateSchedule`. Defaults to
            `0.01`.
        momentum: Momentum in `[0, 1]`. Defaults to `0.0`.
        nesterov: Whether to use Nesterov momentum. Defaults to `False`.
        coupled_weight_decay: L2 coefficient added to the gradient. Defaults
            to `0.0`.
        exclude_from_coupled_decay: Substrings of variable paths (e.g.
            `"nbn_scale"`, or `"alpha"`) whose variables get no coupled
            decay. Defaults to `None` (decay everything, as the reference
            NBN code does by default, NBN's scale included).
        torch_momentum: Whether to use PyTorch's momentum form (see above).
            Defaults to `True`.
        **kwargs: Other `keras.optimizers.SGD` arguments (`clipnorm`,
            `use_ema`, `name`, ...).

    Example:

    >>> optimizer = CoupledSGD(
    ...     learning_rate=0.2, momentum=0.9, coupled_weight_decay=5e-4,
    ...     exclude_from_coupled_decay=["nbn_scale"])
    >>> model.compile(optimizer=optimizer, loss=...)
    """

    def __init__(
        self,
        learning_rate=0.01,
        momentum=0.0,
        nesterov=False,
        coupled_weight_decay=0.0,
        exclude_from_coupled_decay=None,
        torch_momentum=True,
        **kwargs,
    ):
        if coupled_weight_decay < 0:
            raise ValueError(
                "coupled_weight_decay must be >= 0, got "
                f"{coupled_weight_decay}."
            )
        if coupled_weight_decay and kwargs.get("weight_decay"):
            raise ValueError(
                "Pass either coupled_weight_decay (L2 added to the gradient) "
                "or weight_decay (decoupled), not both."
            )
        super().__init__(
            learning_rate=learning_rate,
            momentum=float(momentum),
            nesterov=nesterov,
            **kwargs,
        )
        self.coupled_weight_decay = float(coupled_weight_decay)
        self.exclude_from_coupled_decay = list(exclude_from_coupled_decay or [])
        self.torch_momentum = bool(torch_momentum)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._decay_mask = [
            not any(s in v.path for s in self.exclude_from_coupled_decay)
            for v in variables
        ]

    def update_step(self, gradient, variable, learning_rate):
        gradient = ops.cast(gradient, variable.dtype)
        if self.coupled_weight_decay and self._decay_mask[
            self._get_variable_index(variable)
        ]:
            wd = ops.cast(self.coupled_weight_decay, variable.dtype)
            gradient = ops.add(gradient, ops.multiply(wd, variable))
        if not self.torch_momentum:
            return super().update_step(gradient, variable, learning_rate)

        learning_rate = ops.cast(learning_rate, variable.dtype)
        if self.momentum == 0:
            self.assign_sub(variable, ops.multiply(learning_rate, gradient))
            return
        momentum = ops.cast(self.momentum, variable.dtype)
        velocity = self.momentums[self._get_variable_index(variable)]
        self.assign(velocity, ops.add(ops.multiply(momentum, velocity), gradient))
        step = velocity
        if self.nesterov:
            step = ops.add(gradient, ops.multiply(momentum, velocity))
        self.assign_sub(variable, ops.multiply(learning_rate, step))

    def get_config(self):
        config = super().get_config()
        config.update(
            coupled_weight_decay=self.coupled_weight_decay,
            exclude_from_coupled_decay=list(self.exclude_from_coupled_decay),
            torch_momentum=self.torch_momentum,
        )
        return config


def from_config(config, steps_per_epoch):
    """SGD with a training config's schedule, momentum and weight decay.

    Args:
        config: A `nbn_keras.training.config.TrainConfig` (`weight_decay_mode`,
            `weight_decay`, `momentum`, `decay_nbn_scale` and the schedule's
            fields, see `nbn_keras.training.schedules.from_config`).
        steps_per_epoch: Optimizer steps per epoch.

    Returns:
        A `CoupledSGD` (`--weight_decay_mode=coupled`) or a Keras `SGD`.

    Example:

    >>> optimizer = from_config(config_lib.from_flagfile("runs/x/flags.cfg"), 98)
    """
    schedule = schedules.from_config(config, steps_per_epoch)
    exclude = [] if config.decay_nbn_scale else ["alpha"]
    if config.weight_decay_mode == "coupled":
        return CoupledSGD(schedule, momentum=config.momentum,
                          coupled_weight_decay=config.weight_decay,
                          exclude_from_coupled_decay=exclude)
    optimizer = keras.optimizers.SGD(schedule, momentum=config.momentum,
                                     weight_decay=config.weight_decay)
    if exclude:
        optimizer.exclude_from_weight_decay(var_names=exclude)
    return optimizer
