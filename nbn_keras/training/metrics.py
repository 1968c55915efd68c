"""Long-tailed accuracy metrics: top-1, many/medium/few, per-class, balanced.

All metrics take sparse integer labels and `(batch, num_classes)` logits or
probabilities (the prediction is the argmax), keep per-class counts of hits
and of examples in variables aggregated by sum (so they are exact under
`tf.distribute` strategies), and work in `model.compile(metrics=...)` for
`fit` and `evaluate`.

Groups follow the training class counts: "many" has more than
`many_threshold` (100) training images, "few" fewer than `few_threshold`
(20), "medium" the rest. A group's accuracy is the mean per-class accuracy
over its classes that appeared in the evaluated data. A group with no such
class gives NaN: it has no defined accuracy, and NaN cannot be mistaken for
a real 0%.
"""

import keras
import numpy as np
from keras import ops

GROUPS = ("many", "medium", "few")


def class_groups(class_counts, many_threshold=100, few_threshold=20):
    """Boolean class masks of the many / medium / few groups.

    Args:
        class_counts: Training images per class.
        many_threshold: Classes with more images than this are "many".
        few_threshold: Classes with fewer images than this are "few".

    Returns:
        A dict from group name to a boolean numpy array over classes.

    Example:

    >>> class_groups([500, 100, 20, 19])["medium"]
    array([False,  True,  True, False])
    """
    if few_threshold > many_threshold:
        raise ValueError(
            f"`few_threshold` ({few_threshold}) must not exceed `many_threshold` "
            f"({many_threshold})."
        )
    counts = np.asarray(class_counts)
    many = counts > many_threshold
    few = counts < few_threshold
    return {"many": many, "medium": ~many & ~few, "few": few}


def long_tail_report(y_true, y_pred, class_counts, many_threshold=100, few_threshold=20):
    """The metrics of this module computed once, in numpy.

    Args:
        y_true: Integer labels `(N,)`.
        y_pred: Predicted labels `(N,)` or scores `(N, num_classes)`.
        class_counts: Training images per class.
        many_threshold: See `class_groups`.
        few_threshold: See `class_groups`.

    Returns:
        A dict with `top1`, `many`, `medium`, `few`, `balanced` (floats)
        and `per_class` (array, NaN for classes absent from `y_true`): the
        names the compiled metrics of `long_tail_metrics` have.
    """
    y_true = np.asarray(y_true).reshape(-1)
    y_pred = np.asarray(y_pred)
    if y_pred.ndim == 2:
        y_pred = y_pred.argmax(axis=-1)
    num_classes = len(class_counts)
    total = np.bincount(y_true, minlength=num_classes)
    correct = np.bincount(y_true[y_pred == y_true], minlength=num_classes)
    seen = total > 0
    per_class = np.where(seen, correct / np.maximum(total, 1), np.nan)
    report = {"top1": correct.sum() / max(total.sum(), 1)}
    for group, mask in class_groups(class_counts, many_threshold, few_threshold).items():
        members = mask & seen
        report[group] = per_class[members].mean() if members.any() else np.nan
    report["balanced"] = per_class[seen].mean() if seen.any() else np.nan
    report["per_class"] = per_class
    return report


class _ClassHits(keras.metrics.Metric):
    """Base: per-class counts of examples and of correct predictions."""

    def __init__(self, num_classes, name=None, dtype=None):
        super().__init__(name=name, dtype=dtype)
        if int(num_classes) != num_classes or num_classes < 1:
            raise ValueError(f"`num_classes` must be a positive integer. Received: {num_classes!r}")
        self.num_classes = int(num_classes)
        self.correct = self.add_variable(
            shape=(self.num_classes,), initializer="zeros", name="correct", aggregation="sum"
        )
        self.total = self.add_variable(
            shape=(self.num_classes,), initializer="zeros", name="total", aggregation="sum"
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        labels = ops.cast(ops.reshape(y_true, [-1]), "int32")
        predicted = ops.cast(ops.argmax(y_pred, axis=-1), "int32")
        predicted = ops.reshape(predicted, [-1])
        weight = ops.ones_like(labels, dtype=self.dtype)
        if sample_weight is not None:
            weight = ops.cast(ops.reshape(sample_weight, [-1]), self.dtype)
        one_hot = ops.one_hot(labels, self.num_classes, dtype=self.dtype) * weight[:, None]
        hit = ops.cast(ops.equal(labels, predicted), self.dtype)
        self.total.assign_add(ops.sum(one_hot, axis=0))
        self.correct.assign_add(ops.sum(one_hot * hit[:, None], axis=0))

    def reset_state(self):
        for variable in (self.correct, self.total):
            variable.assign(ops.zeros_like(variable))

    def _per_class(self):
        seen = self.total > 0
        accuracy = self.correct / ops.maximum(self.total, 1e-12)
        return ops.where(seen, accuracy, ops.full_like(accuracy, np.nan)), seen

    def _mean_over(self, mask):
        per_class, seen = self._per_class()
        members = ops.logical_and(mask, seen)
        count = ops.sum(ops.cast(members, self.dtype))
        total = ops.sum(ops.where(members, per_class, ops.zeros_like(per_class)))
        return ops.where(count > 0, total / ops.maximum(count, 1.0), np.nan)

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype, "num_classes": self.num_classes}


@keras.saving.register_keras_serializable(package="nbn_keras")
class PerClassAccuracy(_ClassHits):
    """Accuracy of each class: a `(num_classes,)` vector, NaN for unseen classes.

    Args:
        num_classes: Number of classes.
        name: Metric name.
        dtype: Dtype of the state and result.
    """

    def __init__(self, num_classes, name="per_class", dtype=None):
        super().__init__(num_classes, name=name, dtype=dtype)

    def result(self):
        return self._per_class()[0]


@keras.saving.register_keras_serializable(package="nbn_keras")
class BalancedAccuracy(_ClassHits):
    """Mean per-class accuracy over the classes seen (NaN before any).

    Args:
        num_classes: Number of classes.
        name: Metric name.
        dtype: Dtype of the state and result.
    """

    def __init__(self, num_classes, name="balanced", dtype=None):
        super().__init__(num_classes, name=name, dtype=dtype)

    def result(self):
        return self._mean_over(ops.ones([self.num_classes], dtype="bool"))


@keras.saving.register_keras_serializable(package="nbn_keras")
class GroupAccuracy(_ClassHits):
    """Mean per-class accuracy of the many-, medium- or few-shot classes.

    Args:
        class_counts: Training images per class (sets `num_classes`).
        group: `"many"`, `"medium"` or `"few"`.
        many_threshold: Classes with more training images are "many".
        few_threshold: Classes with fewer training images are "few".
        name: Metric name; defaults to `group`.
        dtype: Dtype of the state and result.

    Returns NaN when no class of the group has been seen.

    Example:

    >>> m = GroupAccuracy([500, 50, 5], group="few")
    >>> m.update_state([2, 2], [[0, 0, 1], [1, 0, 0]])
    >>> float(m.result())
    0.5
    """

    def __init__(self, class_counts, group="many", many_threshold=100, few_threshold=20,
                 name=None, dtype=None):
        if group not in GROUPS:
            raise ValueError(f"`group` must be one of {GROUPS}. Received: {group!r}")
        counts = [int(c) for c in np.asarray(class_counts).reshape(-1)]
        mask = class_groups(counts, many_threshold, few_threshold)[group]
        super().__init__(len(counts), name=name or group, dtype=dtype)
        self.class_counts = counts
        self.group = group
        self.many_threshold = many_threshold
        self.few_threshold = few_threshold
        self._mask = mask

    def result(self):
        return self._mean_over(ops.convert_to_tensor(self._mask))

    def get_config(self):
        config = super().get_config()
        del config["num_classes"]
        config.update(
            class_counts=self.class_counts,
            group=self.group,
            many_threshold=self.many_threshold,
            few_threshold=self.few_threshold,
        )
        return config


def long_tail_metrics(class_counts, many_threshold=100, few_threshold=20):
    """The standard metric list for `model.compile(metrics=...)`.

    Args:
        class_counts: Training images per class (from `LongTailedData`).
        many_threshold: See `class_groups`.
        few_threshold: See `class_groups`.

    Returns:
        `[SparseCategoricalAccuracy, GroupAccuracy("many"),
        GroupAccuracy("medium"), GroupAccuracy("few"), BalancedAccuracy]`,
        named `top1`, `many`, `medium`, `few`, `balanced`: the one
        vocabulary of the progress bar, `history.csv`, TensorBoard and
        `test_metrics.json`.

    Example:

    >>> model.compile(optimizer="sgd", loss=loss,
    ...               metrics=long_tail_metrics(data.class_counts))
    """
    num_classes = len(class_counts)
    return [keras.metrics.SparseCategoricalAccuracy(name="top1")] + [
        GroupAccuracy(class_counts, group, many_threshold, few_threshold) for group in GROUPS
    ] + [BalancedAccuracy(num_classes)]
