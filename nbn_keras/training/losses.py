"""Losses for long-tailed classification: all take integer labels and logits.

`build_loss(name, class_counts, **options)` builds any of them by name. The
prior-based losses change training only: at inference the model's plain
logits are used (argmax of the raw logits).
"""

import functools

import keras
import numpy as np
from keras import ops

from nbn_keras.models import registry
from nbn_keras.training.class_balance import as_counts
from nbn_keras.training.class_balance import drw_class_weights
from nbn_keras.training.class_balance import ldam_margins
from nbn_keras.training.class_balance import sparse_labels

# The losses of this module; the model families contribute more (`loss_names`).
GENERIC_LOSSES = ("cross_entropy", "balanced_softmax", "logit_adjusted", "ldam", "ldam_drw",
                  "hcm")


def loss_names():
    """The loss names `build_loss` takes: this module's, then the families' (read now)."""
    return GENERIC_LOSSES + tuple(registry.family_losses())


def cross_entropy(**kwargs):
    """Plain softmax cross-entropy on logits with integer labels.

    This is `keras.losses.SparseCategoricalCrossentropy(from_logits=True)`.

    Args:
        **kwargs: Passed on to `SparseCategoricalCrossentropy` (`name`,
            `reduction`, `ignore_class`, ...).

    Returns:
        A `keras.losses.SparseCategoricalCrossentropy` instance.
    """
    kwargs.setdefault("name", "cross_entropy")
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, **kwargs)


@keras.saving.register_keras_serializable(package="nbn_keras")
class LogitAdjustedCrossEntropy(keras.losses.Loss):
    """Cross-entropy on logits shifted by the scaled log class prior.

    The loss is the softmax cross-entropy of `logits + tau * log(prior)`,
    where `prior[j] = n_j / sum(n)` is the training class frequency. Frequent
    classes get a head start during training, which pushes the model to
    learn larger margins for rare ones. Predict with the raw logits.

    Args:
        class_counts: Number of training examples of each class.
        tau: Scale of the log prior. Defaults to `1.0`.
        name: Name of the loss.
        reduction: Keras loss reduction. Defaults to `"sum_over_batch_size"`.
        dtype: Dtype of the loss computation. Defaults to float32.

    Example:

    >>> loss = LogitAdjustedCrossEntropy(class_counts=[500, 50, 5])
    >>> loss([0, 2], [[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])

    Reference:
        - [Menon et al., 2021](https://arxiv.org/abs/2007.07314),
          "Long-tail learning via logit adjustment".
    """

    def __init__(
        self,
        class_counts,
        tau=1.0,
        name="logit_adjusted",
        reduction="sum_over_batch_size",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        counts = as_counts(class_counts)
        self.class_counts = [int(n) for n in counts]
        self.tau = float(tau)
        self._log_prior = np.log(counts / counts.sum())

    def call(self, y_true, y_pred):
        shift = ops.convert_to_tensor(self.tau * self._log_prior, y_pred.dtype)
        return keras.losses.sparse_categorical_crossentropy(
            sparse_labels(y_true), y_pred + shift, from_logits=True
        )

    def get_config(self):
        config = super().get_config()
        config.update(class_counts=self.class_counts, tau=self.tau)
        return config


@keras.saving.register_keras_serializable(package="nbn_keras")
class BalancedSoftmaxCrossEntropy(LogitAdjustedCrossEntropy):
    """Balanced softmax: cross-entropy on `logits + log(prior)`.

    The same loss as `LogitAdjustedCrossEntropy` with `tau = 1`, derived as
    the softmax that compensates the label shift between a long-tailed
    training set and a balanced test set. Predict with the raw logits.

    Args:
        class_counts: Number of training examples of each class.
        name: Name of the loss.
        reduction: Keras loss reduction. Defaults to `"sum_over_batch_size"`.
        dtype: Dtype of the loss computation. Defaults to float32.

    Reference:
        - [Ren et al., 2020](https://arxiv.org/abs/2007.10740),
          "Balanced Meta-Softmax for Long-Tailed Visual Recognition".
    """

    def __init__(
        self,
        class_counts,
        name="balanced_softmax",
        reduction="sum_over_batch_size",
        dtype=None,
    ):
        super().__init__(
            class_counts, tau=1.0, name=name, reduction=reduction, dtype=dtype
        )

    def get_config(self):
        config = super().get_config()
        del config["tau"]
        return config


def _log_prior(class_counts):
    counts = as_counts(class_counts)
    return np.log(counts / counts.sum())


def hardest_classes_mask(labels, logits, num_hardest):
    """1 on the true class and the `num_hardest - 1` highest other logits, else 0.

    The class selection of the NBN authors' `HCMLoss`: the true class is put
    first, then the classes are ranked by their raw logit.

    Args:
        labels: Integer labels, shape `(batch,)`.
        logits: Logits, shape `(batch, classes)`.
        num_hardest: Classes kept per example (all if more than there are).

    Returns:
        A `(batch, classes)` mask of the logits' dtype.
    """
    num_classes = logits.shape[-1]
    one_hot = ops.one_hot(labels, num_classes, dtype=logits.dtype)
    ranked = ops.where(one_hot > 0, ops.cast(float("inf"), logits.dtype), logits)
    _, hardest = ops.top_k(ranked, k=min(int(num_hardest), num_classes))
    return ops.max(ops.one_hot(hardest, num_classes, dtype=logits.dtype), axis=1)


@keras.saving.register_keras_serializable(package="nbn_keras")
class HardCategoryMiningLoss(keras.losses.Loss):
    """Balanced softmax plus balanced softmax on each example's hardest classes.

    The NBN authors' `HCMLoss` (`loss/HCMLoss.py`): with `a = logits +
    log(prior)`, the loss is `CE(a, y) + CE(a * mask, y)`, where `mask` keeps
    the true class and the `hcm_n - 1` other classes of highest raw logit.
    The other classes are multiplied by 0 (so they enter the second softmax
    with logit 0, not dropped), as in their code. Predict with the raw
    logits.

    Args:
        class_counts: Number of training examples of each class.
        hcm_n: Classes kept by the mask (their `HCM_N`). Defaults to `300`.
        name: Name of the loss.
        reduction: Keras loss reduction. Defaults to `"sum_over_batch_size"`.
        dtype: Dtype of the loss computation. Defaults to float32.

    Example:

    >>> loss = HardCategoryMiningLoss(class_counts, hcm_n=30)
    >>> model.compile(optimizer, loss=loss)
    """

    def __init__(self, class_counts, hcm_n=300, name="hcm",
                 reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.class_counts = [int(n) for n in as_counts(class_counts)]
        if int(hcm_n) < 1:
            raise ValueError(f"`hcm_n` must be at least 1, got {hcm_n}.")
        self.hcm_n = int(hcm_n)
        self._log_prior = _log_prior(self.class_counts)

    def call(self, y_true, y_pred):
        labels = sparse_labels(y_true)
        adjusted = y_pred + ops.convert_to_tensor(self._log_prior, y_pred.dtype)
        mask = ops.stop_gradient(hardest_classes_mask(labels, y_pred, self.hcm_n))
        balanced = keras.losses.sparse_categorical_crossentropy(
            labels, adjusted, from_logits=True)
        hardest = keras.losses.sparse_categorical_crossentropy(
            labels, adjusted * mask, from_logits=True)
        return balanced + hardest

    def get_config(self):
        config = super().get_config()
        config.update(class_counts=self.class_counts, hcm_n=self.hcm_n)
        return config


@keras.saving.register_keras_serializable(package="nbn_keras")
class LDAMLoss(keras.losses.Loss):
    """Label-distribution-aware margin loss with deferred re-weighting (DRW).

    The true-class logit is lowered by a class margin
    `m_j = max_m * (n_min / n_j)^(1/4)` (so rare classes get the largest
    margin, `max_m`), all logits are multiplied by `s` (see `scale_logits`),
    and softmax cross-entropy is taken. From `drw_start_epoch` on, each
    example is weighted by the class-balanced weight of its class,
    `(1 - beta) / (1 - beta^n_j)` normalised to sum to the number of classes,
    and the batch loss is the weighted mean `sum(w_i l_i) / sum(w_i)` (the
    behaviour of PyTorch's `cross_entropy(weight=...)`), so re-weighting
    changes the balance between classes, not the overall loss scale.

    The switch is a non-trainable variable read inside the loss, so it works
    inside a compiled `fit` and under `tf.distribute`. Set it with
    `set_epoch(epoch)`, which the `DeferredReweighting` callback calls at the
    start of every epoch (epochs count from 0: with `drw_start_epoch=160` the
    161st epoch is the first re-weighted one). Predict with the raw logits.

    Args:
        class_counts: Number of training examples of each class.
        max_m: Largest margin (the rarest class's). Defaults to `0.5`.
        s: Logit scale. Defaults to `30.0`.
        drw_start_epoch: First (0-based) epoch with re-weighting, or `None`
            for plain LDAM. Defaults to `None`.
        beta: The class-balanced weighting's beta. Defaults to `0.9999`.
        scale_logits: If `True` (the paper's form), the loss is the
            cross-entropy of `s * (logits - m_y)`. If `False`, the logits are
            taken as already scaled (a normalised classifier with its own
            scale, as in the RIDE and NBN code bases) and the loss is the
            cross-entropy of `logits - s * m_y`. Defaults to `True`.
        name: Name of the loss.
        reduction: Keras loss reduction. Defaults to `"sum_over_batch_size"`.
        dtype: Dtype of the loss computation. Defaults to float32.

    Example:

    >>> loss = LDAMLoss(class_counts, drw_start_epoch=160)
    >>> model.compile(optimizer, loss=loss)
    >>> model.fit(data, epochs=200, callbacks=[DeferredReweighting()])

    Reference:
        - [Cao et al., 2019](https://arxiv.org/abs/1906.07413), "Learning
          Imbalanced Datasets with Label-Distribution-Aware Margin Loss".
    """

    def __init__(
        self,
        class_counts,
        max_m=0.5,
        s=30.0,
        drw_start_epoch=None,
        beta=0.9999,
        scale_logits=True,
        name="ldam_drw",
        reduction="sum_over_batch_size",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.class_counts = [int(n) for n in as_counts(class_counts)]
        self.max_m = float(max_m)
        self.s = float(s)
        if drw_start_epoch is not None:
            drw_start_epoch = int(drw_start_epoch)
        self.drw_start_epoch = drw_start_epoch
        self.beta = float(beta)
        self.scale_logits = bool(scale_logits)
        self._margins = ldam_margins(self.class_counts, self.max_m)
        self._class_weights = drw_class_weights(self.class_counts, self.beta)
        self.drw_active = keras.Variable(
            0.0, dtype="float32", trainable=False, name="drw_active"
        )

    def set_epoch(self, epoch):
        """Switches re-weighting on or off for the (0-based) `epoch`."""
        active = self.drw_start_epoch is not None and epoch >= self.drw_start_epoch
        self.drw_active.assign(1.0 if active else 0.0)

    def call(self, y_true, y_pred):
        labels = sparse_labels(y_true)
        num_classes = len(self.class_counts)
        one_hot = ops.one_hot(labels, num_classes, dtype=y_pred.dtype)
        margins = ops.convert_to_tensor(self._margins, y_pred.dtype)
        if self.scale_logits:
            logits = self.s * (y_pred - one_hot * margins)
        else:
            logits = y_pred - self.s * one_hot * margins
        losses = keras.losses.sparse_categorical_crossentropy(
            labels, logits, from_logits=True
        )
        class_weights = ops.convert_to_tensor(self._class_weights, y_pred.dtype)
        active = ops.cast(self.drw_active, y_pred.dtype)
        weights = 1.0 + active * (ops.take(class_weights, labels) - 1.0)
        # Normalising by the batch mean of the weights gives the weighted mean.
        return losses * weights / ops.maximum(ops.mean(weights), 1e-12)

    def get_config(self):
        config = super().get_config()
        config.update(
            class_counts=self.class_counts,
            max_m=self.max_m,
            s=self.s,
            drw_start_epoch=self.drw_start_epoch,
            beta=self.beta,
            scale_logits=self.scale_logits,
        )
        return config


class DeferredReweighting(keras.callbacks.Callback):
    """Calls `set_epoch(epoch)` on DRW losses at the start of every epoch.

    Because the state is set from the epoch number each time, resuming with
    `fit(..., initial_epoch=k)` gives the right state.

    Args:
        losses: The losses to drive (objects with a `set_epoch` method), or
            `None` to find them in the compiled model's `loss`.

    Example:

    >>> model.compile(optimizer, loss=build_loss("ldam_drw", counts,
    ...                                          drw_start_epoch=160))
    >>> model.fit(data, epochs=200, callbacks=[DeferredReweighting()])
    """

    def __init__(self, losses=None):
        super().__init__()
        if losses is not None and not isinstance(losses, (list, tuple)):
            losses = [losses]
        self.losses = losses

    def _targets(self):
        if self.losses is not None:
            return self.losses
        loss = getattr(self.model, "loss", None)
        if isinstance(loss, dict):
            candidates = list(loss.values())
        elif isinstance(loss, (list, tuple)):
            candidates = list(loss)
        else:
            candidates = [loss]
        targets = [c for c in candidates if hasattr(c, "set_epoch")]
        if not targets:
            raise ValueError(
                "DeferredReweighting found no loss with a `set_epoch` method "
                f"in the model's loss {loss!r}; pass `losses=` explicitly."
            )
        return targets

    def on_epoch_begin(self, epoch, logs=None):
        for loss in self._targets():
            loss.set_epoch(epoch)


def build_loss(name, class_counts=None, **options):
    """Builds a loss by name.

    Args:
        name: One of `"cross_entropy"`, `"balanced_softmax"`,
            `"logit_adjusted"`, `"ldam"` (LDAM without re-weighting, on
            unscaled logits: the NBN authors' `LDAMLoss`), `"ldam_drw"`,
            `"hcm"` (`HardCategoryMiningLoss`), or a loss a model family
            contributes (`nbn_keras.models.registry.family_losses`: RIDE's
            two, whose training callbacks the family also names).
        class_counts: Number of training examples of each class. Needed by
            every loss but `"cross_entropy"`.
        **options: Passed on to the loss (`tau` for `"logit_adjusted"`;
            `max_m`, `s`, `drw_start_epoch`, `beta` for `"ldam_drw"`;
            `hcm_n` for `"hcm"`).

    Returns:
        A `keras.losses.Loss`. For `"ldam_drw"`, add a `DeferredReweighting`
        callback to `fit` so re-weighting switches on.

    Example:

    >>> loss = build_loss("logit_adjusted", [500, 100, 20], tau=1.0)
    """
    if name == "cross_entropy":
        return cross_entropy(**options)
    classes = {
        "balanced_softmax": BalancedSoftmaxCrossEntropy,
        "logit_adjusted": LogitAdjustedCrossEntropy,
        # The NBN authors' LDAMLoss: no re-weighting, margins on unscaled logits.
        "ldam": functools.partial(LDAMLoss, drw_start_epoch=None, scale_logits=False,
                                  name="ldam"),
        "ldam_drw": LDAMLoss,
        "hcm": HardCategoryMiningLoss,
    }
    classes.update({loss_name: family_loss.loss
                    for loss_name, family_loss in registry.family_losses().items()})
    if name not in classes:
        raise ValueError(
            f"Unknown loss '{name}'. Valid names: {', '.join(loss_names())}."
        )
    if class_counts is None:
        raise ValueError(f"Loss '{name}' needs `class_counts`.")
    return classes[name](class_counts, **options)


# The options the generic losses take from a `TrainConfig`; a family's
# losses name theirs (`nbn_keras.models.family.FamilyLoss`).
_CONFIG_OPTIONS = {
    "logit_adjusted": lambda config: {"tau": config.logit_adjust_tau},
    # The head is a plain linear layer, so margins are subtracted from
    # unscaled logits, as in the reference code (not s * logits).
    "ldam_drw": lambda config: {"drw_start_epoch": config.drw_epoch, "scale_logits": False},
    "hcm": lambda config: {"hcm_n": config.hcm_n},
}


def from_config(config, class_counts):
    """The loss of a training run: `build_loss(config.loss, ...)` with its options.

    Args:
        config: A `nbn_keras.training.config.TrainConfig`.
        class_counts: Number of training examples of each class.

    Returns:
        A `keras.losses.Loss`; `callbacks_for(config.loss)` are the training
        callbacks it needs.
    """
    family_loss = registry.family_losses().get(config.loss)
    options = (family_loss.options if family_loss else
               _CONFIG_OPTIONS.get(config.loss, lambda config: {}))(config)
    return build_loss(config.loss, class_counts, **options)


def callbacks_for(loss_name):
    """The training callbacks loss `loss_name` needs, e.g. `DeferredReweighting`."""
    if loss_name == "ldam_drw":
        return [DeferredReweighting()]
    family_loss = registry.family_losses().get(loss_name)
    return family_loss.callbacks() if family_loss else []
