"""Figures of the effect study (`effect_plan.py`), drawn from its records.

Matplotlib's Agg canvas without pyplot, as in `nbn_keras.analysis.plots`.
"""

import math
import os

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

import effect_plan
from nbn_keras.analysis import plots

GROUP_METRICS = ("top1", "many", "medium", "few")
CELL_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:cyan",
               "tab:olive", "tab:pink")


def _tag(data, factor):
    return f"{data.removesuffix('_lt')}_if{factor:g}"


def _forest(ax, rows, title):
    """Horizontal mean ± 95 % t-interval bars; `rows` is `[(label, interval)]`."""
    y = np.arange(len(rows))[::-1]
    for yi, (label, interval) in zip(y, rows):
        if interval["n"] == 0:
            continue
        low = interval["low"] if not math.isnan(interval["low"]) else interval["mean"]
        high = interval["high"] if not math.isnan(interval["high"]) else interval["mean"]
        ax.plot([low, high], [yi, yi], color="0.3")
        ax.plot(interval["mean"], yi, "o", color="tab:red")
    ax.axvline(0, color="0.6", lw=0.8)
    ax.set_yticks(y)
    ax.set_yticklabels([label for label, _ in rows], fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="x")


def plot_paired_differences(entries, label, path, title=""):
    """NBN − BN per entry and metric: mean and 95 % t-interval.

    `entries` are the study's `cells` or `decays`, `label(entry)` names a row.
    """
    figure = Figure(figsize=(10, 0.9 + 0.4 * len(entries)))
    axes = figure.subplots(1, len(GROUP_METRICS), sharey=True)
    for ax, name in zip(axes, GROUP_METRICS):
        rows = [(f"{label(e)} (n={e['paired_nbn_minus_bn'][name]['n']})",
                 e["paired_nbn_minus_bn"][name]) for e in entries]
        _forest(ax, rows, f"{name}: NBN − BN (points)")
    figure.suptitle("Paired test-accuracy difference, mean and 95 % t-interval over "
                    "seeds" + title, fontsize=10)
    figure.tight_layout()
    return plots._save(figure, path)


def plot_ablations(stats, labels, path):
    """Each ablation minus the paper's NBN and minus BN, top1 and few."""
    figure = Figure(figsize=(10, 0.6 + 0.45 * max(1, len(stats["ablations"]))))
    axes = figure.subplots(1, 4, sharey=True)
    panels = [("minus_nbn", "top1"), ("minus_nbn", "few"), ("minus_bn", "top1"),
              ("minus_bn", "few")]
    for ax, (reference, name) in zip(axes, panels):
        rows = [(f"{labels[a['arm']]} (n={a[reference][name]['n']})", a[reference][name])
                for a in stats["ablations"]]
        ref = "NBN" if reference == "minus_nbn" else "BN"
        _forest(ax, rows, f"{name}: arm − {ref}")
    return plots._save(figure, path)


def plot_mechanism(records, labels, bn_arms, nbn_arms, path):
    """Scale over training, raw norms over training, final direction change.

    Curves for the runs of `bn_arms` and `nbn_arms`, coloured by data, imbalance
    factor and weight decay; direction changes of every arm.
    """
    figure = Figure(figsize=(13, 3.6))
    ax_alpha, ax_norm, ax_cos = figure.subplots(1, 3)
    curves = [r for r in records if r["arm"] in nbn_arms + bn_arms]
    keys = list(dict.fromkeys((r["data"], r["imbalance_factor"], r["weight_decay"])
                              for r in curves))
    colors = dict(zip(keys, CELL_COLORS * 3))
    seen = set()
    for r in curves:
        key = (r["data"], r["imbalance_factor"], r["weight_decay"])
        color = colors[key]
        label = (f"{r['data'].removesuffix('_lt')} IF {r['imbalance_factor']:g}, "
                 f"wd {r['weight_decay']:g}")
        steps = [e["step"] for e in r["trajectory"]]
        if r["arm"] in nbn_arms:
            alpha = [next(iter(e["scales"].values())) for e in r["trajectory"]]
            ax_alpha.plot(steps, alpha, color=color, lw=0.8,
                          label=label if ("a", key) not in seen else None)
            seen.add(("a", key))
        layer = r["tracked_layers"][-1]
        for symbol, style in (("gamma", "-"), ("beta", ":")):
            norms = np.asarray([e["layers"][layer].get(f"{symbol}_norm", np.nan)
                                for e in r["trajectory"]], dtype=float)
            # gamma relative to its start, beta to its norm after step 1.
            reference = r["mechanics"][layer].get(
                "beta_norm_peak" if symbol == "beta" else "gamma_norm_initial")
            if not len(norms) or not reference:
                continue
            ax_norm.plot(steps, norms / reference, style,
                         color="0.5" if r["arm"] in bn_arms else color, lw=0.7)
    ax_alpha.set_title("NBN alpha over training", fontsize=9)
    ax_alpha.set_xlabel("step")
    ax_alpha.legend(fontsize=7)
    ax_alpha.grid(alpha=0.3)
    ax_norm.set_title("raw norm / start (gamma) or peak (beta), last tracked layer\n"
                      "(— gamma, ··· beta; grey: BN, colour: NBN)", fontsize=9)
    ax_norm.set_xlabel("step")
    ax_norm.set_yscale("log")
    ax_norm.grid(alpha=0.3)
    arms = list(dict.fromkeys(r["arm"] for r in records))
    for i, arm in enumerate(arms):
        for j, symbol in enumerate(("gamma", "beta")):
            values = [entry.get(f"{symbol}_direction_change") for r in records
                      if r["arm"] == arm for entry in r["mechanics"].values()]
            values = [max(v, 1e-12) for v in values if v is not None and not math.isnan(v)]
            x = i + (j - 0.5) * 0.3 + np.random.default_rng(i * 2 + j).uniform(
                -0.05, 0.05, len(values))
            ax_cos.plot(x, values, "o", ms=3, alpha=0.6,
                        color=("tab:blue", "tab:red")[j],
                        label=symbol if i == 0 else None)
    ax_cos.set_xticks(range(len(arms)))
    ax_cos.set_xticklabels([labels[a] for a in arms], rotation=30, ha="right", fontsize=7)
    ax_cos.set_yscale("log")
    ax_cos.set_title("direction change 1 − cos per layer and run\n"
                     "(gamma: start → last; beta: after step 1 → last)", fontsize=9)
    ax_cos.legend(fontsize=7)
    ax_cos.grid(alpha=0.3)
    return plots._save(figure, path)


def plot_run_mechanism(record, label, path):
    """One run: its scale(s), every tracked layer's raw norms, direction changes."""
    figure = Figure(figsize=(13, 3.4))
    ax_alpha, ax_norm, ax_cos = figure.subplots(1, 3)
    steps = [e["step"] for e in record["trajectory"]]
    scale_names = list(record["trajectory"][0]["scales"]) if record["trajectory"] else []
    for name in scale_names:
        ax_alpha.plot(steps, [e["scales"][name] for e in record["trajectory"]],
                      label=name.split("/")[-2] if "/" in name else name)
    if scale_names:
        ax_alpha.legend(fontsize=6)
    layers = record["tracked_layers"]
    for color, layer in zip(CELL_COLORS * 4, layers):
        entry = record["mechanics"][layer]
        for symbol, style, key in (("gamma", "-", "gamma_norm_initial"),
                                   ("beta", ":", "beta_norm_peak")):
            reference = entry.get(key)
            norms = [e["layers"][layer].get(f"{symbol}_norm", np.nan)
                     for e in record["trajectory"]]
            if reference:
                ax_norm.plot(steps, np.asarray(norms, dtype=float) / reference, style,
                             color=color, lw=0.8, label=layer if symbol == "gamma" else None)
    ax_norm.set_yscale("log")
    ax_norm.legend(fontsize=5)
    x = np.arange(len(layers))
    for offset, symbol, color in ((-0.2, "gamma", "tab:blue"), (0.2, "beta", "tab:red")):
        values = [max(record["mechanics"][layer].get(f"{symbol}_direction_change",
                                                     np.nan), 1e-14) for layer in layers]
        ax_cos.bar(x + offset, values, width=0.4, color=color, label=symbol)
    ax_cos.set_yscale("log")
    ax_cos.set_xticks(x)
    ax_cos.set_xticklabels(layers, rotation=30, ha="right", fontsize=5)
    ax_cos.legend(fontsize=7)
    for ax, title in ((ax_alpha, "scale(s) over training"),
                      (ax_norm, "raw norm / start (— gamma) or peak (··· beta)"),
                      (ax_cos, "direction change 1 − cos per layer")):
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    ax_alpha.set_xlabel("step")
    ax_norm.set_xlabel("step")
    figure.suptitle(label, fontsize=10)
    figure.tight_layout()
    return plots._save(figure, path)


def plot_premise(records, data, factor, path):
    """|gamma_eff| and |beta_eff| per channel against the served class's size."""
    figure = Figure(figsize=(9, 3.4))
    axes = figure.subplots(1, 2)
    for arm, color, marker in (("bn", "tab:blue", "o"), ("nbn", "tab:red", "x")):
        runs = [r for r in records if r["data"] == data
                and r["imbalance_factor"] == factor and r["arm"] == arm]
        for k, r in enumerate(runs):
            served = r["served"]
            counts = np.asarray(served["served_count"], dtype=float)
            jitter = np.exp(np.random.default_rng(k).uniform(-0.08, 0.08, len(counts)))
            for ax, key in zip(axes, ("abs_gamma", "abs_beta")):
                values = np.asarray(served[key])
                # Each run's channels relative to its own mean, so runs of
                # different scale (NBN's alpha) share an axis.
                mean = values.mean()
                ax.plot(counts * jitter, values / mean if mean > 0 else values,
                        marker, ms=3, alpha=0.35, color=color,
                        label=("BN" if arm == "bn" else "NBN") if k == 0 else None)
    for ax, symbol in zip(axes, ("gamma", "beta")):
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("training images of the served class")
        ax.set_ylabel(f"|{symbol}_eff| / run mean")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.suptitle(f"Last BN of the last stage, {data} IF {factor:g}: channel strength "
                    "against the size of the class it serves (all seeds)", fontsize=9)
    return plots._save(figure, path)


def write_all(args, records, stats, out_dir):
    """Writes every figure of the study; returns their paths."""
    import keras

    from nbn_keras import data as data_lib

    labels = effect_plan.LABELS
    paths = []
    if stats["cells"]:
        paths.append(plot_paired_differences(
            stats["cells"],
            lambda c: f"{c['data'].removesuffix('_lt')} IF {c['imbalance_factor']:g}",
            os.path.join(out_dir, "effect_paired_differences.png")))
    if len(stats["decays"]) > 1:
        paths.append(plot_paired_differences(
            stats["decays"], lambda d: f"wd {d['weight_decay']:g}",
            os.path.join(out_dir, "effect_weight_decay.png"),
            title=f", digits IF {args.ablation_imbalance_factor:g}"))
    if stats["ablations"]:
        paths.append(plot_ablations(stats, labels,
                                    os.path.join(out_dir, "effect_ablations.png")))
    decays = effect_plan.decay_cells(args)
    paths.append(plot_mechanism(records, labels, [bn for _, bn, _ in decays],
                                [nbn for _, _, nbn in decays],
                                os.path.join(out_dir, "effect_mechanism.png")))
    for r in records:  # Next to each run's own files, not in out_dir.
        plot_run_mechanism(
            r, f"{effect_plan.run_name(r['data'], r['imbalance_factor'], r['arm'], r['seed'])}"
               f" ({labels[r['arm']]})",
            os.path.join(effect_plan.REPO, r["run_dir"], "mechanism.png"))
    for data, factor in effect_plan.cells(args):
        runs = [r for r in records if r["data"] == data and r["imbalance_factor"] == factor]
        if not runs:
            continue
        tag = _tag(data, factor)
        paths.append(plot_premise(records, data, factor,
                                  os.path.join(out_dir, f"effect_premise_{tag}.png")))
        per_arm = {}
        for r in runs:
            if r["arm"] in ("bn", "nbn"):
                per_arm.setdefault(labels[r["arm"]], []).append(
                    r["figures"])
        paths.append(plots.plot_per_class_accuracy(
            per_arm, os.path.join(out_dir, f"per_class_accuracy_{tag}.png")))
    # Magnitudes and Grad-CAM of the first seed at the hardest digits cell.
    digits = [f for d, f in effect_plan.cells(args) if d == "digits_lt"]
    if digits:
        factor = max(digits)
        seed = min(args.seeds)
        models = {labels[r["arm"]]: keras.models.load_model(
                      os.path.join(effect_plan.REPO, r["run_dir"], "model.keras"),
                      compile=False)
                  for r in records if r["data"] == "digits_lt" and r["arm"] in ("bn", "nbn")
                  and r["imbalance_factor"] == factor and r["seed"] == seed}
        if models:
            tag = _tag("digits_lt", factor)
            paths.append(plots.plot_bn_magnitudes(
                models, os.path.join(out_dir, f"bn_magnitudes_{tag}.png")))
            loaded = data_lib.load("digits_lt", imbalance_factor=factor, seed=seed,
                                   image_size=16)
            images, image_labels = plots.tail_test_examples(loaded, num_images=4)
            paths.append(plots.plot_gradcam(
                models, images, image_labels, os.path.join(out_dir, f"gradcam_{tag}.png"),
                class_counts=loaded.class_counts, class_names=loaded.class_names))
    return paths
