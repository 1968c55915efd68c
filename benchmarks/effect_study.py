"""Does NBN help the tail? NBN against plain BN on small long-tailed sets.

For every data set, imbalance factor and seed, two models are trained with
`nbn_keras.train.run`, in this process, from the same config file: the
digits config (`configs/digits_lt_bn.cfg` / `digits_lt_nbn.cfg`, identical
but for `--nbn`) with only these overrides, the same for both variants:

    --imbalance_factor=IF --seed=S --data_seed=S --run_dir=... --noexport
    --nopictures --verbose=0 [--data=synthetic_lt] [--epochs=E]

So the recipe is the digits one (CIFAR ResNet-32, 30 epochs, batch 64, SGD
lr 0.05 with 2 warmup epochs and drops at 24 and 27, coupled weight decay
5e-4, instance sampling, cross-entropy, best epoch chosen on the balanced
validation split) and each seed changes the initialisation, the sampling
and augmentation order, and the long-tailed subset together. The many /
few thresholds of the config (more than 60, fewer than 20 training
images) are kept at every imbalance factor; the table gives how many classes
fall in each group.

Besides test accuracy, every trained model's last BN layer of the last stage
is examined, with NBN folded into its effective gamma and beta: the spread of
the channel magnitudes |gamma_eff| (coefficient of variation, CV) and a
direct check of the paper's motivating observation: the mean |gamma_eff| of
channels whose largest classifier weight goes to a few-shot class, over that
of channels that go to a many-shot class ("few/many strength").

Runs go seed by seed (all settings of seed 0, then seed 1, ...), and a new
seed is started only if the budget allows it, so every cell of the table has
the same seeds. A run directory that holds a finished run with the same
training flags (`flags.cfg`, `test_metrics.json`, `model.keras`) is not
trained again, so a study stopped by its budget continues where it stopped
when run again with more seeds.

Run (from the repository root):

    python benchmarks/effect_study.py
    python benchmarks/effect_study.py --seeds 0 1 --budget_minutes 20

Writes `effect_study.md` and `effect_study.json` and the comparison pictures
to `--out_dir` (default `docs/figures`); run directories go to `--work_dir`.
"""

import argparse
import contextlib
import json
import os
import sys
import time

import common  # noqa: F401  (quiet TensorFlow start-up)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {variant: os.path.join(REPO, "configs", f"digits_lt_{variant}.cfg")
           for variant in ("bn", "nbn")}
VARIANTS = ("bn", "nbn")
LABELS = {"bn": "BN", "nbn": "NBN"}
GROUPS = ("many", "medium", "few")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--imbalance_factors", type=float, nargs="+", default=[10, 50, 100])
    parser.add_argument("--synthetic_imbalance_factors", type=float, nargs="*",
                        default=[100])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None,
                        help="Override the config's epochs (and LR drops scale "
                             "with them); default: the config's 30.")
    parser.add_argument("--budget_minutes", type=float, default=35.0,
                        help="Start another seed only if it is expected to "
                             "finish within this wall time.")
    parser.add_argument("--work_dir", default=os.path.join(REPO, "runs", "effect_study"))
    parser.add_argument("--out_dir", default=os.path.join(REPO, "docs", "figures"))
    parser.add_argument("--picture_seed", type=int, default=None,
                        help="Seed whose models the BN-magnitude and Grad-CAM "
                             "pictures show (default: the first).")
    return parser.parse_args()


def settings(args):
    return ([("digits_lt", f) for f in args.imbalance_factors]
            + [("synthetic_lt", f) for f in args.synthetic_imbalance_factors])


def run_name(data, imbalance_factor, variant, seed):
    return f"{data}_if{imbalance_factor:g}_{variant}_seed{seed}"


def train_one(args, data, imbalance_factor, variant, seed):
    """Trains one model with `nbn_keras.train.run`.

    Returns:
        `(figures, run_dir, reused)`.
    """
    import keras
    from absl import flags
    from nbn_keras import train

    run_dir = os.path.join(args.work_dir, run_name(data, imbalance_factor, variant, seed))
    argv = [f"--flagfile={CONFIGS[variant]}", f"--data={data}",
            f"--imbalance_factor={imbalance_factor:g}", f"--seed={seed}",
            f"--data_seed={seed}", f"--run_dir={run_dir}", "--noexport",
            "--nopictures", "--verbose=0"]
    if args.epochs:
        argv += _scaled_schedule(args.epochs)
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["train", *argv])
    finished = _finished_run(run_dir, [
        f.serialize() for f in flags.FLAGS.get_flags_for_module(train)])
    if finished is not None:
        return finished, run_dir, True
    keras.backend.clear_session()
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "train.log"), "w") as log, \
            contextlib.redirect_stdout(log):
        figures = train.run(run_dir)
    return figures, run_dir, False


def _finished_run(run_dir, flag_lines):
    """The figures of a finished run with all of `flag_lines`, else `None`."""
    paths = [os.path.join(run_dir, name)
             for name in ("flags.cfg", "test_metrics.json", "model.keras")]
    if not all(os.path.exists(p) for p in paths):
        return None
    with open(paths[0]) as f:
        if not set(flag_lines) - {""} <= set(f.read().splitlines()):
            return None
    with open(paths[1]) as f:
        return json.load(f)


def _scaled_schedule(epochs, config_epochs=30, drops=(24, 27)):
    scaled = []
    for drop in drops:  # Boundaries must increase strictly.
        scaled.append(max(round(drop * epochs / config_epochs), scaled[-1] + 1 if scaled else 1))
    return [f"--epochs={epochs}", f"--lr_drop_epochs={','.join(map(str, scaled))}"]


def channel_analysis(model, class_counts, many_threshold, few_threshold):
    """Spread and head/tail balance of the last BN layer's |gamma_eff|.

    Each channel of the last BN layer feeds (through the residual sum, ReLU
    and pooling) the same channel of the pooled features; the class with the
    largest classifier weight on that channel is its preferred class.
    """
    import numpy as np
    from nbn_keras import plots
    from nbn_keras.metrics import class_groups

    parameters = plots.effective_bn_parameters(model)
    name = list(parameters)[-1]
    gamma, beta = parameters[name]
    kernel = np.asarray(model.get_layer("logits").kernel)
    if kernel.shape[0] != len(gamma):
        raise ValueError(f"{name} has {len(gamma)} channels but the head "
                         f"{kernel.shape[0]} inputs.")
    preferred = kernel.argmax(axis=1)
    groups = class_groups(class_counts, many_threshold, few_threshold)
    magnitude = np.abs(gamma)
    strength = {}
    for group, mask in groups.items():
        channels = mask[preferred]
        strength[group] = (float(magnitude[channels].mean() / magnitude.mean())
                           if channels.any() else float("nan"))
        strength[f"{group}_channels"] = int(channels.sum())
    gamma_summary = plots.magnitude_summary(gamma)
    return {
        "layer": name,
        "gamma": gamma_summary,
        "beta": plots.magnitude_summary(beta),
        "relative_strength": strength,
        "few_over_many": strength["few"] / strength["many"],
    }


def mean_std(values):
    import numpy as np

    values = np.asarray([v for v in values if v == v], dtype=float)
    if not len(values):
        return float("nan"), float("nan")
    return float(values.mean()), float(values.std())


def fmt(values, digits=1):
    mean, std = mean_std(values)
    if mean != mean:
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def summarise(records, seeds):
    """Markdown tables of the study from its per-run records."""
    keys = sorted({(r["data"], r["imbalance_factor"]) for r in records},
                  key=lambda k: (k[0] != "digits_lt", k[0], k[1]))
    lines = [
        f"Test accuracy (%), mean ± std over seeds {seeds} (population std).",
        "",
        "| data | IF | classes many/med/few | train counts | variant "
        "| overall | many | medium | few |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    deltas = ["", "Paired difference NBN − BN (same seed, same subset), points:", "",
              "| data | IF | overall | many | medium | few | NBN better on few (seeds) |",
              "|---|---|---|---|---|---|---|"]
    channels = ["", "Last BN of the last stage, effective gamma (NBN folded): "
                "CV of |gamma_eff| over channels, mean |gamma_eff|, and the "
                "few/many strength ratio (mean |gamma_eff| of channels whose "
                "top classifier weight goes to a few-shot class over those "
                "going to a many-shot class; 1 = even):", "",
                "| data | IF | variant | CV | mean abs gamma_eff | few/many strength | NBN alpha |",
                "|---|---|---|---|---|---|---|"]
    for data, imbalance_factor in keys:
        runs = {v: sorted((r for r in records if r["data"] == data
                           and r["imbalance_factor"] == imbalance_factor
                           and r["variant"] == v), key=lambda r: r["seed"])
                for v in VARIANTS}
        first = runs["bn"][0]["figures"]
        groups = first["classes_per_group"]
        group_text = "/".join(str(groups[g]) for g in GROUPS)
        counts = ",".join(str(c) for c in sorted(first["class_counts"], reverse=True))
        for variant in VARIANTS:
            figs = [r["figures"] for r in runs[variant]]
            cells = [fmt([f[k] for f in figs]) for k in ("overall",) + GROUPS]
            lines.append(f"| {data} | {imbalance_factor:g} | {group_text} | {counts} | "
                         f"{LABELS[variant]} | " + " | ".join(cells) + " |")
            stats = [r["channels"] for r in runs[variant]]
            alphas = [r.get("alpha") for r in runs[variant] if r.get("alpha") is not None]
            channels.append(
                f"| {data} | {imbalance_factor:g} | {LABELS[variant]} | "
                f"{fmt([s['gamma']['cv'] for s in stats], 2)} | "
                f"{fmt([s['gamma']['mean'] for s in stats], 3)} | "
                f"{fmt([s['few_over_many'] for s in stats], 2)} | "
                f"{fmt(alphas, 2) if alphas else '–'} |")
        pairs = list(zip(runs["bn"], runs["nbn"]))
        diff = {k: [n["figures"][k] - b["figures"][k] for b, n in pairs]
                for k in ("overall",) + GROUPS}
        better = sum(d > 0 for d in diff["few"])
        deltas.append(f"| {data} | {imbalance_factor:g} | "
                      + " | ".join(fmt(diff[k]) for k in ("overall",) + GROUPS)
                      + f" | {better}/{len(pairs)} |")
    return "\n".join(lines + deltas + channels)


def write_pictures(args, records, out_dir):
    """Comparison pictures of BN against NBN into `out_dir`."""
    import keras
    from nbn_keras import data as data_lib
    from nbn_keras import plots

    paths = []
    seed = args.picture_seed if args.picture_seed is not None else args.seeds[0]
    for data, imbalance_factor in sorted({(r["data"], r["imbalance_factor"])
                                          for r in records}):
        tag = f"{data.removesuffix('_lt')}_if{imbalance_factor:g}"
        runs = [r for r in records if r["data"] == data
                and r["imbalance_factor"] == imbalance_factor]
        paths.append(plots.plot_per_class_accuracy(
            {LABELS[v]: [r["figures"] for r in runs if r["variant"] == v]
             for v in VARIANTS},
            os.path.join(out_dir, f"per_class_accuracy_{tag}.png")))
        if data != "digits_lt" or imbalance_factor != max(args.imbalance_factors):
            continue
        models = {LABELS[r["variant"]]: keras.models.load_model(
                      os.path.join(r["run_dir"], "model.keras"), compile=False)
                  for r in runs if r["seed"] == seed}
        paths.append(plots.plot_bn_magnitudes(
            models, os.path.join(out_dir, f"bn_magnitudes_{tag}.png")))
        loaded = data_lib.load(data, imbalance_factor=imbalance_factor, seed=seed)
        images, labels = plots.tail_test_examples(loaded, num_images=4)
        paths.append(plots.plot_gradcam(
            models, images, labels, os.path.join(out_dir, f"gradcam_{tag}.png"),
            class_counts=loaded.class_counts, class_names=loaded.class_names))
    return paths


def main():
    args = parse_args()
    from absl import flags
    from absl import logging

    import keras
    import numpy as np
    from nbn_keras.callbacks import scale_variables

    import tensorflow as tf

    logging.set_verbosity(logging.WARNING)
    tf.get_logger().setLevel("ERROR")  # Retracing notes of repeated runs.
    os.makedirs(args.out_dir, exist_ok=True)
    budget = 60.0 * args.budget_minutes
    start = time.time()
    records, seeds_done, round_times = [], [], []
    for seed in args.seeds:
        elapsed = time.time() - start
        if round_times and elapsed + max(round_times) > budget:
            print(f"Budget: stopping before seed {seed} ({elapsed / 60:.1f} min spent, "
                  f"a seed takes {max(round_times) / 60:.1f} min).", file=sys.stderr)
            break
        round_start = time.time()
        for data, imbalance_factor in settings(args):
            for variant in VARIANTS:
                run_start = time.time()
                figures, run_dir, reused = train_one(
                    args, data, imbalance_factor, variant, seed)
                model = keras.models.load_model(
                    os.path.join(run_dir, "model.keras"), compile=False)
                scales = scale_variables(model)
                records.append({
                    "data": data, "imbalance_factor": imbalance_factor,
                    "variant": variant, "seed": seed, "run_dir": run_dir,
                    "figures": figures,
                    "channels": channel_analysis(
                        model, figures["class_counts"], flags.FLAGS.many_threshold,
                        flags.FLAGS.few_threshold),
                    "alpha": (float(np.asarray(next(iter(scales.values()))))
                              if scales else None),
                    "seconds": None if reused else time.time() - run_start,
                })
                print(f"{run_name(data, imbalance_factor, variant, seed)}: overall "
                      f"{figures['overall']:.1f} few {figures['few']:.1f} "
                      f"({time.time() - run_start:.0f} s)", file=sys.stderr, flush=True)
        seeds_done.append(seed)
        round_times.append(time.time() - round_start)

    table = summarise(records, seeds_done)
    pictures = write_pictures(args, records, args.out_dir)
    minutes = (time.time() - start) / 60
    reused_count = sum(r["seconds"] is None for r in records)
    header = (f"# NBN against BN: effect study\n\n"
              f"`python benchmarks/effect_study.py {' '.join(sys.argv[1:])}`, "
              f"{len(records)} runs ({reused_count} reused from an earlier "
              f"invocation), {minutes:.1f} min wall. "
              f"{common.machine_line(os.cpu_count())}\n\n")
    with open(os.path.join(args.out_dir, "effect_study.md"), "w") as f:
        f.write(header + table + "\n")
    with open(os.path.join(args.out_dir, "effect_study.json"), "w") as f:
        json.dump({"argv": sys.argv[1:], "seeds": seeds_done, "minutes": minutes,
                   "pictures": [os.path.relpath(p, REPO) for p in pictures],
                   "runs": [{k: v for k, v in r.items() if k != "run_dir"}
                            | {"run_dir": os.path.relpath(r["run_dir"], REPO)}
                            for r in records]},
                  f, indent=1)
    print(table)
    print("\nPictures:\n" + "\n".join(pictures))


if __name__ == "__main__":
    main()
