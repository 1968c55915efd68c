"""Pictures of what NBN changes: BN magnitudes, per-class accuracy, Grad-CAM.

Every `plot_*` function takes models or test figures, writes one PNG and
returns its path. Figures are drawn on matplotlib's Agg canvas without
pyplot, so nothing here touches global matplotlib state or needs a display.
"""

import itertools
import os

import numpy as np
from matplotlib.figure import Figure

from nbn_keras import conversion
from nbn_keras.analysis import gradcam
from nbn_keras.layers import NormalizedBatchNormalization

DPI = 100
PICTURES_DIRNAME = "pictures"
_COLORS = ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange")


def _has_nbn(model):
    return any(isinstance(layer, NormalizedBatchNormalization)
               for layer in conversion.leaf_layers(model))


def last_stage_bn_layers(model, stages=None):
    """The BN layers NBN converts (last stage by default), in block order.

    NBN layers are folded first (`nbn_keras.fold_nbn`), so every returned
    layer is a plain `BatchNormalization` whose gamma and beta are the
    effective ones, and plain and NBN models can be compared directly.

    Args:
        model: A classifier or backbone with ResNet BN names.
        stages: Stage indices, as in `nbn_keras.convert_to_nbn`.

    Returns:
        A list of BN layers sorted by `(stage, block, index)`.
    """
    if _has_nbn(model):
        model = conversion.fold_nbn(model)
    layers = conversion.select_bn_layers(model, "paper", stages)
    return sorted(
        layers, key=lambda l: (conversion.resnet_layer_location(l.name), l.name)
    )


def effective_bn_parameters(model, stages=None):
    """Effective `(gamma, beta)` of the last-stage BN layers, as numpy.

    Args:
        model: A plain or NBN classifier (see `last_stage_bn_layers`).
        stages: Stage indices, as in `nbn_keras.convert_to_nbn`.

    Returns:
        A dict from layer name to `(gamma, beta)` float arrays (`None` for
        a disabled parameter), in block order.
    """
    parameters = {}
    for layer in last_stage_bn_layers(model, stages):
        gamma = np.asarray(layer.gamma, np.float64) if layer.scale else None
        beta = np.asarray(layer.beta, np.float64) if layer.center else None
        parameters[layer.name] = (gamma, beta)
    return parameters


def magnitude_summary(values):
    """Scale and spread of per-channel magnitudes `|values|`.

    Returns:
        A dict: `norm` (L2), `mean`, `cv` (std / mean, scale-free spread),
        `top10_share` (fraction of the L2 energy in the largest 10% of
        channels) and `max_over_median`.
    """
    magnitude = np.sort(np.abs(np.asarray(values, np.float64)))[::-1]
    energy = np.square(magnitude)
    top = max(1, int(round(0.1 * len(magnitude))))
    mean = magnitude.mean()
    median = np.median(magnitude)
    return {
        "norm": float(np.sqrt(energy.sum())),
        "mean": float(mean),
        "cv": float(magnitude.std() / mean) if mean > 0 else float("nan"),
        "top10_share": float(energy[:top].sum() / energy.sum()) if energy.sum() > 0
        else float("nan"),
        "max_over_median": float(magnitude[0] / median) if median > 0 else float("inf"),
    }


def plot_bn_magnitudes(models, path, layer_name=None, stages=None):
    """Sorted per-channel |gamma_eff| and |beta_eff| of one BN layer per model.

    Args:
        models: A dict from label to model (plain BN or NBN), or one model.
        path: Output PNG path.
        layer_name: The BN layer to show; defaults to the last selected
            layer of the last stage (the last BN of the last block).
        stages: Stage indices, as in `nbn_keras.convert_to_nbn`.

    Returns:
        `path`.
    """
    if not isinstance(models, dict):
        models = {models.name: models}
    figure = Figure(figsize=(8, 3.2))
    axes = figure.subplots(1, 2)
    for color, (label, model) in zip(itertools.cycle(_COLORS), models.items()):
        parameters = effective_bn_parameters(model, stages)
        name = layer_name or list(parameters)[-1]
        if name not in parameters:
            raise ValueError(f"No selected BN layer '{name}' in '{label}'; "
                             f"choose one of {list(parameters)}.")
        for ax, values, symbol in zip(axes, parameters[name], ("gamma", "beta")):
            if values is None:
                continue
            magnitude = np.sort(np.abs(values))[::-1]
            cv = magnitude_summary(values)["cv"]
            ax.plot(np.arange(1, len(magnitude) + 1), np.maximum(magnitude, 1e-8),
                    color=color, label=f"{label} (CV {cv:.2f})")
    for ax, symbol in zip(axes, ("gamma", "beta")):
        ax.set_yscale("log")
        ax.set_xlabel("channel rank")
        ax.set_ylabel(f"|effective {symbol}|")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    figure.suptitle(f"Effective BN parameters, {name}", fontsize=10)
    return _save(figure, path)


def _mean_std(figures_list, key):
    values = np.array([np.asarray(f[key], np.float64) for f in figures_list])
    return np.nanmean(values, axis=0), np.nanstd(values, axis=0)


def plot_per_class_accuracy(figures, path):
    """Test accuracy of each class against its training-set size.

    Args:
        figures: A dict from label to the figures of `nbn_keras.analysis.report.evaluate`
            (or a list of them, e.g. one per seed: mean and standard
            deviation are drawn), or one figures dict. All need the same
            `class_counts`.
        path: Output PNG path.

    Returns:
        `path`.
    """
    if "per_class" in figures:
        figures = {"model": figures}
    figures = {k: v if isinstance(v, (list, tuple)) else [v] for k, v in figures.items()}
    counts = np.asarray(next(iter(figures.values()))[0]["class_counts"])
    order = np.argsort(-counts, kind="stable")
    x = np.arange(len(counts))
    figure = Figure(figsize=(8, 3.6))
    ax = figure.subplots()
    sizes = ax.twinx()
    sizes.bar(x, counts[order], color="0.85", width=0.8, zorder=0)
    sizes.set_ylabel("training images")
    ax.set_zorder(sizes.get_zorder() + 1)
    ax.patch.set_visible(False)
    width = 0.8 / max(len(figures), 1)
    for i, (color, (label, runs)) in enumerate(zip(itertools.cycle(_COLORS), figures.items())):
        if any(np.any(np.asarray(r["class_counts"]) != counts) for r in runs):
            raise ValueError("All figures need the same `class_counts`.")
        mean, std = _mean_std(runs, "per_class")
        top1, _ = _mean_std(runs, "top1")
        ax.errorbar(x + (i - (len(figures) - 1) / 2) * width, mean[order],
                    yerr=std[order] if len(runs) > 1 else None, color=color,
                    marker="o", markersize=4, capsize=2,
                    label=f"{label} (top-1 {float(top1):.1f}%)")
    ax.set_xticks(x)
    ax.set_xticklabels([f"{c}\n{n}" for c, n in zip(order, counts[order])], fontsize=8)
    ax.set_xlabel("class / training images (head to tail)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return _save(figure, path)


def tail_test_examples(data, num_images=4, split="test"):
    """Test images of the rarest classes: one per class, rarest first.

    With fewer classes than `num_images`, classes are revisited for more
    images.

    Args:
        data: A `nbn_keras.data.LongTailedData`.
        num_images: Number of images.
        split: The split to draw from.

    Returns:
        `(images, labels)`: float32 `(N, H, W, C)` after the evaluation
        transform, int labels `(N,)`.
    """
    from nbn_keras.data import transforms
    import tensorflow as tf

    part = data.get_split(split)
    rarest = np.argsort(data.class_counts, kind="stable")
    members = [np.flatnonzero(part.labels == c) for c in rarest]
    chosen = []
    for rank in range(max((len(m) for m in members), default=0)):
        chosen += [m[rank] for m in members if rank < len(m)]
        if len(chosen) >= num_images:
            break
    chosen = np.asarray(chosen[:num_images], dtype=np.int64)
    decode = transforms.eval_transform(data.recipe, data.image_shape)
    images = np.stack([decode(tf.constant(r)).numpy() for r in part.records[chosen]])
    return images.astype(np.float32), part.labels[chosen]


def plot_gradcam(models, images, labels, path, class_counts=None, class_names=None):
    """A grid of images and their Grad-CAM maps, one column per model.

    Each map explains the true class. Column titles give the model's
    prediction.

    Args:
        models: A dict from label to classifier, or one classifier.
        images: Array `(N, H, W, C)` of input pixels in [0, 255].
        labels: True classes `(N,)`.
        path: Output PNG path.
        class_counts: Optional training images per class, for the captions.
        class_names: Optional class names.

    Returns:
        `path`.
    """
    if not isinstance(models, dict):
        models = {models.name: models}
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels).reshape(-1)
    name = (lambda c: class_names[c]) if class_names else str
    results = {label: gradcam.grad_cam(model, images, labels)
               for label, model in models.items()}
    rows, cols = len(images), 1 + len(models)
    figure = Figure(figsize=(1.9 * cols, 1.9 * rows + 0.3))
    axes = np.asarray(figure.subplots(rows, cols, squeeze=False))
    shown = np.clip(images / 255.0, 0.0, 1.0)
    for r in range(rows):
        caption = f"class {name(labels[r])}"
        if class_counts is not None:
            caption += f" (n={int(class_counts[labels[r]])})"
        axes[r, 0].imshow(shown[r].mean(axis=-1) if shown.shape[-1] == 1 else shown[r])
        axes[r, 0].set_title(caption, fontsize=8)
        for c, (label, (maps, logits)) in enumerate(results.items(), start=1):
            axes[r, c].imshow(shown[r].mean(axis=-1), cmap="gray")
            axes[r, c].imshow(maps[r], cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
            predicted = int(np.argmax(logits[r]))
            axes[r, c].set_title(f"{label}: pred {name(predicted)}", fontsize=8,
                                 color="black" if predicted == labels[r] else "red")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    figure.suptitle("Grad-CAM of the true class on tail-class test images", fontsize=9)
    return _save(figure, path)


def write_run_pictures(model, data, figures, run_dir, tensorboard_dir=None, step=0,
                       num_images=4):
    """The pictures of one trained model, for a training run.

    Writes `bn_magnitudes.png`, `per_class_accuracy.png` and
    `gradcam_tail.png` to `<run_dir>/pictures/`, and the same images to
    TensorBoard when `tensorboard_dir` is given.

    Args:
        model: The trained classifier.
        data: Its `nbn_keras.data.LongTailedData`.
        figures: Its test figures (`nbn_keras.analysis.report.evaluate`).
        run_dir: The run directory.
        tensorboard_dir: Optional TensorBoard log directory for the images.
        step: TensorBoard step.
        num_images: Tail-class test images in the Grad-CAM grid.

    Returns:
        The list of PNG paths written.
    """
    directory = os.path.join(run_dir, PICTURES_DIRNAME)
    label = "NBN" if _has_nbn(model) else "BN"
    images, labels = tail_test_examples(data, num_images)
    paths = [
        plot_bn_magnitudes({label: model}, os.path.join(directory, "bn_magnitudes.png")),
        plot_per_class_accuracy({label: figures},
                                os.path.join(directory, "per_class_accuracy.png")),
        plot_gradcam({label: model}, images, labels,
                     os.path.join(directory, "gradcam_tail.png"),
                     class_counts=data.class_counts, class_names=data.class_names),
    ]
    if tensorboard_dir:
        write_to_tensorboard(paths, tensorboard_dir, step)
    return paths


def write_to_tensorboard(paths, logdir, step=0):
    """Writes PNG files to TensorBoard as images, named by file stem."""
    import tensorflow as tf

    writer = tf.summary.create_file_writer(logdir)
    with writer.as_default():
        for path in paths:
            image = tf.image.decode_png(tf.io.read_file(path), channels=3)
            tf.summary.image(os.path.splitext(os.path.basename(path))[0],
                             image[None], step=step)
    writer.close()


def _save(figure, path):
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    return path
