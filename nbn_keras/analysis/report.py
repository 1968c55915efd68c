"""Final figures of a run: test-split accuracy overall, by group and class."""

import math
import os

import numpy as np

from nbn_keras import files
from nbn_keras.data import make_eval_dataset
from nbn_keras.training.metrics import GROUPS
from nbn_keras.training.metrics import class_groups
from nbn_keras.training.metrics import long_tail_report

FIGURES_FILENAME = "test_metrics.json"


def evaluate(model, data, many_threshold=100, few_threshold=20, split="test"):
    """Accuracy of `model` on one split of `data`, in percent.

    Args:
        model: A classifier returning logits or probabilities.
        data: A `nbn_keras.data.LongTailedData`.
        many_threshold: See `nbn_keras.training.metrics.class_groups`.
        few_threshold: See `nbn_keras.training.metrics.class_groups`.
        split: The split to evaluate; `"test"` for the final report.

    Returns:
        A dict: `top1`, `many`, `medium`, `few`, `balanced` (floats),
        `per_class` (list), the group sizes `classes_per_group`, the training
        `class_counts`, and `split`.
    """
    scores = model.predict(make_eval_dataset(data, split), verbose=0)
    labels = data.get_split(split).labels
    report = long_tail_report(labels, scores, data.class_counts,
                              many_threshold, few_threshold)
    groups = class_groups(data.class_counts, many_threshold, few_threshold)
    percent = lambda value: float(100.0 * value)
    return {
        "split": split,
        **{key: percent(report[key]) for key in ("top1", *GROUPS, "balanced")},
        "per_class": [percent(v) for v in report["per_class"]],
        "classes_per_group": {g: int(m.sum()) for g, m in groups.items()},
        "class_counts": [int(c) for c in data.class_counts],
    }


def undefined_as_none(value):
    """`value` with every NaN or infinite float replaced by `None`.

    Args:
        value: Nested dicts, lists and tuples of numbers and strings.

    Returns:
        The same structure (tuples as lists), ready for strict JSON.

    Example:

    >>> undefined_as_none({"few": float("nan"), "per_class": [50.0, float("nan")]})
    {'few': None, 'per_class': [50.0, None]}
    """
    if isinstance(value, dict):
        return {key: undefined_as_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [undefined_as_none(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write(figures, run_dir):
    """Writes `figures` as strict JSON to `<run_dir>/test_metrics.json`, atomically.

    An undefined figure (NaN: a group without classes, a class without test
    images) is written as `null`.
    """
    path = os.path.join(run_dir, FIGURES_FILENAME)
    files.write_json(path, undefined_as_none(figures), allow_nan=False)
    return path


def table(figures):
    """A plain-text table of the group figures and the per-class ones."""
    groups = figures["classes_per_group"]
    lines = [
        f"{'split':<8}{'top1':>9}{'many':>9}{'medium':>9}{'few':>9}{'balanced':>10}",
        f"{figures['split']:<8}{figures['top1']:>9.2f}{figures['many']:>9.2f}"
        f"{figures['medium']:>9.2f}{figures['few']:>9.2f}{figures['balanced']:>10.2f}",
        f"{'classes':<8}{sum(groups.values()):>9}{groups['many']:>9}"
        f"{groups['medium']:>9}{groups['few']:>9}{sum(groups.values()):>10}",
        "",
        f"{'class':>6}{'train images':>14}{'accuracy':>10}",
    ]
    order = np.argsort(figures["class_counts"], kind="stable")[::-1]
    for c in order:
        lines.append(f"{c:>6}{figures['class_counts'][c]:>14}"
                     f"{figures['per_class'][c]:>10.2f}")
    return "\n".join(lines)
