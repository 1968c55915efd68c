"""The RIDE loss (distribution-aware diversity loss) and its epoch hook.

The loss of the authors' `loss/RIDELoss.py` (github.com/yuxiangbao/NBN,
from RIDE), which their `plain_train_ensemble` calls as
`criterion(mean_logits, y, extra_info={"logits": per_expert})` after
`criterion._hook_before_epoch(epoch)`. Summed over the experts `e`:

- `base_loss_factor * CE(z_e - s * m_y, y)`: the LDAM cross-entropy of the
  expert's logits `z_e`, the true class lowered by `s * m_y`
  (`m_j = max_m * (n_min / n_j)^(1/4)`); from the epoch after
  `reweight_epoch` on, weighted by the class-balanced weights (the weighted
  mean of PyTorch's `cross_entropy(weight=...)`);
- `diversity_factor * T^2 * KL(softmax(z_mean / T) || softmax(z_e / T))`
  (batch mean of the per-example KL), `z_mean` the mean logits, held
  constant (no gradient); `T` is `base_diversity_temperature`, and after
  `reweight_epoch` the per-class temperatures
  `T_j = base * w_j`, `w_j = (C p_j f + 1 - f) / max(...)` (`f` the
  `reweight_factor`, `p_j` the class frequency), `T^2` then being the square
  of their mean.

With `diversity_factor = 0` their code uses the mean logits for the LDAM
term of every expert; so does this one.
"""

import keras
import numpy as np
from keras import ops

from nbn_keras.models.ride.trainer import ExpertLogitsTrainer
from nbn_keras.training.class_balance import as_counts
from nbn_keras.training.class_balance import drw_class_weights
from nbn_keras.training.class_balance import ldam_margins
from nbn_keras.training.class_balance import sparse_labels


def diversity_temperature_weights(class_counts, reweight_factor=0.05):
    """Per-class temperature factors `w_j`, the largest 1 (see the module)."""
    counts = as_counts(class_counts)
    frequencies = counts / counts.sum()
    weights = counts.size * frequencies * reweight_factor + 1.0 - reweight_factor
    weights = weights / weights.max()
    if not np.all(weights > 0):
        raise ValueError(
            f"reweight_factor={reweight_factor} is too large: some class "
            "temperatures are not positive."
        )
    return weights


@keras.saving.register_keras_serializable(package="nbn_keras")
class RIDELoss(keras.losses.Loss):
    """The RIDE loss: per-expert LDAM-DRW plus a diversity term.

    `y_pred` is the stacked expert logits `[batch, experts, classes]`. A
    RIDE classifier outputs only their mean: fit it through
    `training_model(classifier)` (an `ExpertLogitsTrainer`), which gives
    the loss the experts' logits. `RIDEEpochHook` sets the epoch, like their
    `_hook_before_epoch`.

    Args:
        class_counts: Number of training examples of each class.
        max_m: Largest LDAM margin. Defaults to `0.5`.
        s: Margin scale (the logits are not scaled). Defaults to `30.0`.
        reweight_epoch: Re-weighting (class-balanced CE weights, per-class
            temperatures) is on for epochs `> reweight_epoch` (0-based, as
            in their code), or never with `None`.
        base_loss_factor: Weight of the LDAM term. Defaults to `1.0`.
        diversity_factor: Their `additional_diversity_factor`. Defaults to
            `-0.2`.
        base_diversity_temperature: Defaults to `1.0`.
        reweight_factor: Defaults to `0.05`.
        beta: Beta of the class-balanced weights. Defaults to `0.9999`.
        name: Name of the loss.
        reduction: Keras loss reduction. Defaults to `"sum_over_batch_size"`.
        dtype: Dtype of the loss computation.

    Example:

    >>> loss = RIDELoss(class_counts, reweight_epoch=160)
    >>> trainer = loss.training_model(classifier)
    >>> trainer.compile(optimizer, loss=loss)
    >>> trainer.fit(data, epochs=200, callbacks=[RIDEEpochHook()])

    Reference:
    - [Wang et al., Long-tailed Recognition by Routing Diverse
      Distribution-Aware Experts, ICLR 2021](https://arxiv.org/abs/2010.01809).
    """

    def __init__(
        self,
        class_counts,
        max_m=0.5,
        s=30.0,
        reweight_epoch=None,
        base_loss_factor=1.0,
        diversity_factor=-0.2,
        base_diversity_temperature=1.0,
        reweight_factor=0.05,
        beta=0.9999,
        name="ride",
        reduction="sum_over_batch_size",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.class_counts = [int(n) for n in as_counts(class_counts)]
        self.max_m = float(max_m)
        self.s = float(s)
        self.reweight_epoch = None if reweight_epoch is None else int(reweight_epoch)
        self.base_loss_factor = float(base_loss_factor)
        self.diversity_factor = float(diversity_factor)
        self.base_diversity_temperature = float(base_diversity_temperature)
        self.reweight_factor = float(reweight_factor)
        self.beta = float(beta)
        self._margins = ldam_margins(self.class_counts, self.max_m)
        self._class_weights = drw_class_weights(self.class_counts, self.beta)
        self._temperature_weights = diversity_temperature_weights(
            self.class_counts, self.reweight_factor)
        self.reweight_active = keras.Variable(
            0.0, dtype="float32", trainable=False, name="reweight_active")

    def set_epoch(self, epoch):
        """Switches re-weighting on or off for the (0-based) `epoch`."""
        active = self.reweight_epoch is not None and epoch > self.reweight_epoch
        self.reweight_active.assign(1.0 if active else 0.0)

    def training_model(self, classifier):
        """The model to `fit` with this loss: `classifier` with its expert logits.

        The loss needs every expert's logits, which the classifier does not
        output; `ExpertLogitsTrainer` gives them to it.

        Args:
            classifier: A RIDE classifier (`build_ride_classifier`).

        Returns:
            An `ExpertLogitsTrainer` of `classifier`, sharing its weights.
        """
        return ExpertLogitsTrainer(classifier)

    def _expert_logits(self, y_pred):
        if len(y_pred.shape) != 3:
            raise ValueError(
                f"{type(self).__name__} takes the stacked expert logits [batch, experts, "
                f"classes]; got shape {tuple(y_pred.shape)}, which is not the output of a "
                "RIDE model's experts. Fit the RIDE classifier through "
                "nbn_keras.models.ride.ExpertLogitsTrainer (loss.training_model(model)).")
        return y_pred

    def call(self, y_true, y_pred):
        experts = ops.cast(self._expert_logits(y_pred), "float32")
        mean_logits = ops.mean(experts, axis=1)
        labels = sparse_labels(y_true)
        num_classes = len(self.class_counts)
        one_hot = ops.one_hot(labels, num_classes, dtype="float32")
        margins = ops.convert_to_tensor(self._margins, "float32")
        active = ops.cast(self.reweight_active, "float32")
        class_weights = ops.convert_to_tensor(self._class_weights, "float32")
        sample_weights = 1.0 + active * (ops.take(class_weights, labels) - 1.0)
        sample_weights = sample_weights / ops.maximum(ops.mean(sample_weights), 1e-12)
        temperature_weights = ops.convert_to_tensor(self._temperature_weights, "float32")
        temperature = self.base_diversity_temperature * (
            1.0 + active * (temperature_weights - 1.0))
        temperature_mean = ops.mean(temperature)
        target = ops.stop_gradient(ops.softmax(mean_logits / temperature, axis=-1))
        log_target = ops.log(ops.maximum(target, 1e-38))
        total = 0.0
        for e in range(experts.shape[1]):
            logits = experts[:, e]
            base_logits = logits if self.diversity_factor != 0 else mean_logits
            ce = keras.losses.sparse_categorical_crossentropy(
                labels, base_logits - self.s * one_hot * margins, from_logits=True)
            total += self.base_loss_factor * ce * sample_weights
            log_probs = ops.log_softmax(logits / temperature, axis=-1)
            kl = ops.sum(target * (log_target - log_probs), axis=-1)
            total += self.diversity_factor * temperature_mean ** 2 * kl
        return total

    def get_config(self):
        config = super().get_config()
        config.update(
            class_counts=self.class_counts, max_m=self.max_m, s=self.s,
            reweight_epoch=self.reweight_epoch,
            base_loss_factor=self.base_loss_factor,
            diversity_factor=self.diversity_factor,
            base_diversity_temperature=self.base_diversity_temperature,
            reweight_factor=self.reweight_factor, beta=self.beta,
        )
        return config


class RIDEEpochHook(keras.callbacks.Callback):
    """Sets the epoch of a `RIDELoss` at the start of every epoch.

    The epoch hook of their training loop (`_hook_before_epoch`); because the
    state is set from the epoch number, resuming with `initial_epoch` gives
    the right state.

    Args:
        loss: The `RIDELoss`, or `None` to take the compiled model's loss.
    """

    def __init__(self, loss=None):
        super().__init__()
        self.loss = loss

    def on_epoch_begin(self, epoch, logs=None):
        loss = self.loss if self.loss is not None else getattr(self.model, "loss", None)
        if not isinstance(loss, RIDELoss):
            raise ValueError(f"RIDEEpochHook needs a RIDELoss, got {loss!r}.")
        loss.set_epoch(epoch)


def ride_balanced_softmax_loss(expert_logits, labels, class_counts, diversity_factor=-0.2,
                               temperature=1.0):
    """The NBN authors' `RIDE_BalancedSoftmaxLoss`, per example.

    Summed over the experts `e`: the balanced softmax `CE(z_e + log(prior), y)`
    plus `diversity_factor * T^2 * KL(softmax(z_mean / T) || softmax(z_e / T))`,
    `z_mean` the mean of the experts' logits, held constant (no gradient).
    There is no re-weighting and no epoch state.

    Args:
        expert_logits: Per-expert logits, shape `(batch, experts, classes)`.
        labels: Integer labels, shape `(batch,)`.
        class_counts: Number of training examples of each class.
        diversity_factor: Their `additional_diversity_factor`. Defaults to
            `-0.2`.
        temperature: Their `base_diversity_temperature`. Defaults to `1.0`.

    Returns:
        The loss of each example, shape `(batch,)`; its batch mean is theirs.

    Example:

    >>> ride_balanced_softmax_loss(np.zeros((2, 3, 4)), [0, 3], [40, 20, 5, 1])
    """
    experts = ops.cast(expert_logits, "float32")
    labels = sparse_labels(labels)
    counts = as_counts(class_counts)
    log_prior = ops.convert_to_tensor(np.log(counts / counts.sum()), "float32")
    target = ops.stop_gradient(ops.softmax(ops.mean(experts, axis=1) / temperature, axis=-1))
    log_target = ops.log(ops.maximum(target, 1e-38))
    total = 0.0
    for e in range(experts.shape[1]):
        logits = experts[:, e]
        total += keras.losses.sparse_categorical_crossentropy(
            labels, logits + log_prior, from_logits=True)
        if diversity_factor:
            log_probs = ops.log_softmax(logits / temperature, axis=-1)
            kl = ops.sum(target * (log_target - log_probs), axis=-1)
            total += diversity_factor * temperature ** 2 * kl
    return total


@keras.saving.register_keras_serializable(package="nbn_keras")
class RIDEBalancedSoftmaxLoss(RIDELoss):
    """`ride_balanced_softmax_loss` as a Keras loss of a RIDE model.

    Takes `y_pred` as `RIDELoss` does (the stacked expert logits; fit a
    RIDE classifier through `training_model`). It has no epoch state: no
    `RIDEEpochHook` is needed.

    Args:
        class_counts: Number of training examples of each class.
        diversity_factor: Weight of the diversity term. Defaults to `-0.2`.
        base_diversity_temperature: Defaults to `1.0`.
        name: Name of the loss.
        reduction: Keras loss reduction. Defaults to `"sum_over_batch_size"`.
        dtype: Dtype of the loss computation.

    Example:

    >>> loss = RIDEBalancedSoftmaxLoss(class_counts)
    >>> trainer = loss.training_model(classifier)
    >>> trainer.compile(optimizer, loss=loss)
    """

    def __init__(self, class_counts, diversity_factor=-0.2, base_diversity_temperature=1.0,
                 name="ride_balanced_softmax", reduction="sum_over_batch_size", dtype=None):
        super().__init__(class_counts, diversity_factor=diversity_factor,
                         base_diversity_temperature=base_diversity_temperature,
                         name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true, y_pred):
        return ride_balanced_softmax_loss(
            self._expert_logits(y_pred), y_true, self.class_counts,
            self.diversity_factor, self.base_diversity_temperature)

    def get_config(self):
        config = keras.losses.Loss.get_config(self)
        config.update(class_counts=self.class_counts, diversity_factor=self.diversity_factor,
                      base_diversity_temperature=self.base_diversity_temperature)
        return config
