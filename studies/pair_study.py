"""NBN against BN for any pair of training configs, paired by seed.

The effect study (`effect_study.py`) for two configs given on the command
line, a BN one and an NBN one that differ only in `--nbn` (and their run
directory and model name). Every run is the training command in a
subprocess,

    python -m nbn_keras.train --flagfile=<config> --seed=S --data_seed=S \\
        --run_dir=<work_dir>/<run> --nbn_dynamics --noexport --nopictures \\
        --verbose=0 [extra flags]

so the seed draws the long-tailed subset, the initial weights and the
sampling order, and the BN and NBN runs of a seed share all three. The
report gives the test accuracy per arm, the paired NBN − BN differences with
95 % t-intervals (top-1, many, medium, few), the measured shrink of NBN's raw
gamma and beta and their direction change, the recipe's total-decay formula
exp(−wd · Σlr / (1 − momentum)), the machine, its load and the wall times.

Resumable: a finished run of the same command line is reused, an unfinished
one resumes (the training command's backup). Rerun the same command after an
interruption.

Run (from the repository root), e.g. the Fashion-MNIST-LT study:

    python studies/pair_study.py configs/fashion_mnist_lt_if100_bn.cfg \\
        configs/fashion_mnist_lt_if100_nbn.cfg --seeds 0 1 2 3 4 \\
        --work_dir runs/pair_fashion_mnist_lt_if100 \\
        --out_dir docs/figures/fashion_mnist_lt_if100

Writes `pair_study.md`, `pair_study.json` and the figures to `--out_dir`.
"""

import argparse
import os
import sys
import time

import effect_plan
import effect_stats
import effect_study

ARMS = ("bn", "nbn")
LABELS = {"bn": "BN", "nbn": "NBN"}
# Flags a BN/NBN pair may differ in (besides these, a pair is one recipe).
PAIR_MAY_DIFFER = {"nbn", "run_dir", "model_name"}
STUDY_FLAGS = ["--nbn_dynamics", "--noexport", "--nopictures", "--verbose=0"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bn_config", help="Flagfile of the BN arm (--nonbn).")
    parser.add_argument("nbn_config", help="Flagfile of the NBN arm (--nbn).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--workers", type=int, default=1,
                        help="Training subprocesses at a time.")
    parser.add_argument("--threads", type=int, default=2,
                        help="TensorFlow intra- and inter-op threads per run.")
    parser.add_argument("--extra_flag", dest="extra_flags", action="append", default=[],
                        help="A training flag appended to both arms' runs, e.g. "
                             "--extra_flag=--fashion_mnist_dir=DIR (repeatable).")
    parser.add_argument("--work_dir", required=True)
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--no_pictures", action="store_true", help="Tables only.")
    parser.add_argument("--report_only", action="store_true",
                        help="Train nothing: tabulate the finished runs in --work_dir.")
    args = parser.parse_args(argv)
    # The runs start in the repository root.
    args.bn_config, args.nbn_config = map(os.path.abspath, (args.bn_config, args.nbn_config))
    return args


def parse_config(argv):
    """The `TrainConfig` of a training command line."""
    from absl import flags

    from nbn_keras.training import config as config_lib

    flag_values = flags.FlagValues()
    config_lib.define_flags(flag_values)
    flag_values(["train", *argv])
    return config_lib.from_flags(flag_values)


def check_pair(args):
    """Parses both configs; raises ValueError unless they are a BN/NBN pair.

    Returns:
        `{"bn": TrainConfig, "nbn": TrainConfig}` (with the extra flags).
    """
    configs = {}
    cwd = os.getcwd()
    os.chdir(effect_plan.REPO)  # Configs name their recipe relative to the root.
    try:
        for arm, path in (("bn", args.bn_config), ("nbn", args.nbn_config)):
            if not os.path.isfile(path):
                raise ValueError(f"{arm}_config {path} does not exist.")
            configs[arm] = parse_config([f"--flagfile={path}", *args.extra_flags])
    finally:
        os.chdir(cwd)
    bn, nbn = configs["bn"], configs["nbn"]
    if bn.nbn or not nbn.nbn:
        raise ValueError(f"{args.bn_config} must train BN (--nonbn) and {args.nbn_config} "
                         "NBN (--nbn).")
    differ = sorted(name for name, value in vars(bn).items()
                    if getattr(nbn, name) != value and name not in PAIR_MAY_DIFFER)
    if differ:
        raise ValueError(f"{args.bn_config} and {args.nbn_config} differ in "
                         f"{', '.join('--' + d for d in differ)}: not a paired comparison.")
    return configs


def jobs(args, configs):
    """`(data, imbalance_factor, arm, seed)`, BN and NBN of each seed in turn."""
    data, factor = configs["bn"].data, configs["bn"].imbalance_factor
    return [(data, factor, arm, seed) for seed in args.seeds for arm in ARMS]


def make_command(args):
    """The `effect_study.train` command builder of this pair."""
    paths = {"bn": args.bn_config, "nbn": args.nbn_config}

    def command(study_args, data, imbalance_factor, arm, seed, run_dir):
        return [sys.executable, "-m", "nbn_keras.train", f"--flagfile={paths[arm]}",
                f"--seed={seed}", f"--data_seed={seed}", f"--run_dir={run_dir}",
                *STUDY_FLAGS, *study_args.extra_flags]

    return command


def statistics(records):
    """The paired NBN − BN intervals and the number of equal initial convolutions."""
    data, factor = records[0]["data"], records[0]["imbalance_factor"]
    bn = effect_study.by_cell(records, data, factor, "bn")
    nbn = effect_study.by_cell(records, data, factor, "nbn")
    seeds = sorted(set(bn) & set(nbn))
    return {
        "data": data, "imbalance_factor": factor, "seeds": seeds,
        "classes_per_group": next(iter(bn.values()))["figures"]["classes_per_group"]
        if bn else None,
        "paired_nbn_minus_bn": {
            m: effect_study.paired(records, data, factor, "nbn", "bn",
                                   effect_study.metric(m))
            for m in effect_plan.METRICS},
        "same_initial_convs": sum(bn[s]["conv_kernel_fingerprint"]
                                  == nbn[s]["conv_kernel_fingerprint"] for s in seeds),
    }


def tables(args, records, stats, shrink, thresholds):
    """The Markdown tables of the pair study."""
    data, factor = stats["data"], stats["imbalance_factor"]
    groups = stats["classes_per_group"] or {}
    lines = ["## Test accuracy", "",
             "Test accuracy (%) on the balanced test split, mean ± sample standard "
             "deviation (ddof 1) over seeds; best-validation epoch. Groups: many > "
             f"{thresholds[0]}, few < {thresholds[1]} training images (classes "
             f"many/medium/few: {'/'.join(str(groups.get(g)) for g in effect_plan.GROUPS)}).",
             "", "| arm | config | seeds | top1 | many | medium | few |",
             "|---|---|---|---|---|---|---|"]
    for arm, path in (("bn", args.bn_config), ("nbn", args.nbn_config)):
        runs = effect_study.by_cell(records, data, factor, arm)
        lines.append(f"| {LABELS[arm]} | `{os.path.relpath(path)}` | {len(runs)} | " + " | ".join(
            effect_study.mean_sd([r["figures"][m] for r in runs.values()])
            for m in effect_plan.METRICS) + " |")
    p = stats["paired_nbn_minus_bn"]
    lines += ["", "## Paired difference NBN − BN", "",
              "Per seed, NBN minus BN (same subset, same initial convolutions), in "
              "accuracy points: mean [95 % t-interval, t with n − 1 df].", "",
              "| n | top1 | many | medium | few | few: NBN ahead/behind | same initial convs |",
              "|---|---|---|---|---|---|---|",
              f"| {p['top1']['n']} | "
              + " | ".join(effect_stats.format_interval(p[m]) for m in effect_plan.METRICS)
              + f" | {p['few']['positive']}/{p['few']['negative']} | "
              f"{stats['same_initial_convs']}/{len(stats['seeds'])} |"]
    lines += ["", "## Mechanism: do the raw gamma and beta shrink and turn?", "",
              "Coupled weight decay alone shrinks a weight by exp(−wd · Σlr / (1 − m)) "
              f"over a run of this recipe: {shrink['predicted']:.3g} (wd "
              f"{shrink['weight_decay']:g}, m {shrink['momentum']:g}, Σlr = "
              f"{shrink['sum_lr']:.1f} over {shrink['steps']} steps). Measured, per tracked "
              "layer and run at the last epoch: direction change 1 − cos of raw gamma "
              "(initial → last) and of raw beta (after step 1 → last); gamma norm last / "
              "initial; beta norm last / peak; beta's peak norm; the scale(s) at the end. "
              "Median (min–max) over runs × layers.", "",
              "| arm | runs | 1−cos gamma | 1−cos beta | gamma norm ratio "
              "| beta norm / peak | beta peak norm | scale(s) at end |",
              "|---|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        runs = list(effect_study.by_cell(records, data, factor, arm).values())
        lines.append(f"| {LABELS[arm]} | {len(runs)} | {effect_study.mechanism_cells(runs)} |")
    return "\n".join(lines)


def write_figures(records, stats, out_dir):
    """Paired differences, mechanism, per-run mechanism and per-class accuracy."""
    import effect_figures

    from nbn_keras.analysis import plots

    paths = [effect_figures.plot_paired_differences(
        [stats], lambda s: f"{s['data'].removesuffix('_lt')} IF {s['imbalance_factor']:g}",
        os.path.join(out_dir, "pair_paired_differences.png")),
        effect_figures.plot_mechanism(records, LABELS, ["bn"], ["nbn"],
                                      os.path.join(out_dir, "pair_mechanism.png"))]
    for r in records:  # Next to each run's own files, not in out_dir.
        effect_figures.plot_run_mechanism(
            r, f"{os.path.basename(r['run_dir'])} ({LABELS[r['arm']]})",
            os.path.join(effect_plan.REPO, r["run_dir"], "mechanism.png"))
    per_arm = {}
    for r in records:
        per_arm.setdefault(LABELS[r["arm"]], []).append(r["figures"])
    paths.append(plots.plot_per_class_accuracy(
        per_arm, os.path.join(out_dir, "pair_per_class_accuracy.png")))
    return paths


def main(argv=None):
    args = parse_args(argv)
    configs = check_pair(args)
    start = time.time()
    os.makedirs(args.out_dir, exist_ok=True)
    todo, command = jobs(args, configs), make_command(args)
    done = (effect_study.finished_runs(args, todo, command) if args.report_only
            else effect_study.train_all(args, todo, command))
    train_minutes = (time.time() - start) / 60
    records = [effect_study.read_run(job, *done[job]) for job in todo if job in done]
    if not records:
        raise RuntimeError(f"No finished run in {args.work_dir}.")
    stats = statistics(records)
    run_dir = os.path.join(effect_plan.REPO, records[0]["run_dir"])
    sum_lr, predicted = effect_study.lr_sum_and_shrink(run_dir)
    config = effect_study.run_config(run_dir)
    shrink = {"sum_lr": sum_lr, "predicted": predicted, "weight_decay": config.weight_decay,
              "momentum": config.momentum,
              "steps": effect_study.read_figures(run_dir)["steps_trained"]}
    pictures = [] if args.no_pictures else write_figures(records, stats, args.out_dir)
    shown = sys.argv[1:] if argv is None else argv
    text = "\n".join([
        "# NBN against BN: paired study", "",
        f"`python studies/pair_study.py {' '.join(shown)}`: "
        f"{effect_study.timing_sentence(args, records, train_minutes)}", "",
        f"Extra flags: {' '.join(args.extra_flags) or 'none'}.", "",
        tables(args, records, stats, shrink,
               (configs["bn"].many_threshold, configs["bn"].few_threshold))]) + "\n"
    effect_study.write_report(args.out_dir, "pair_study", text, pictures, {
        "argv": shown, "train_minutes": train_minutes, "shrink": shrink, "statistics": stats,
        "runs": records})
    return stats


if __name__ == "__main__":
    main()
