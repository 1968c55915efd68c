"""Does NBN help the tail? NBN against plain BN where NBN's directions can learn.

Every run is the training command in a subprocess,

    python -m nbn_keras.train --flagfile=configs/effect_study.cfg \
        --run_dir=<work_dir>/<run> --seed=S --data_seed=S \
        --imbalance_factor=IF [--data=synthetic_lt] --nbn|--nonbn [ablation]

so the seed draws the long-tailed subset, the initial weights and the
sampling order, and the BN and NBN runs of a seed share all three (the
study checks that their convolution kernels start equal). The recipe
(`configs/effect_study.cfg`: CIFAR ResNet-8 on 16x16 images, batch 32, 400
SGD steps at lr 0.8 with a one-epoch warmup and drops to 0.1x and 0.01x for
the last two of 8 epochs, coupled weight decay 5e-4, momentum 0.9) is
chosen so that weight decay alone would shrink a weight by
exp(-5e-4 * sum(lr) / 0.1) = 0.32 over a run; the study measures what the
raw gamma/beta norms and directions actually do.

Cells: digits-LT at imbalance factors 10, 50, 100 and the synthetic set at
100, BN and NBN (the paper's selection and shared alpha), seeds 0-4. On
digits-LT IF 100, also with seeds 0-4: BN and NBN at weight decay 2e-3 and
5e-3 (the decay formula 1e-2 and 1e-5, the latter the paper's ImageNet-LT
level), and the ablations: a small random start of beta, separate gamma/beta
scales, two stages, and two stages with one alpha per layer (ResNet-8's last
stage has a single NBN layer, so per-layer alpha differs from the shared one
only with more stages). 80 runs.

Resumable: a run directory with a finished run of the same command line is
reused; an unfinished one resumes (the training command's backup). Rerun
the same command after an interruption.

Time: on an otherwise idle 2-core machine, 2 runs at a time with 1 TF thread
each, a run takes about 60 s wall and the whole study about 45 minutes
(the report's header gives the measured times and load).
`--tiny` (the smoke test) trains 2 runs of 8 steps.

Run (from the repository root):

    python studies/effect_study.py              # the full study
    python studies/effect_study.py --tiny --work_dir /tmp/s --out_dir /tmp/o

Writes `effect_study.md`, `effect_study.json` and the figures to
`--out_dir` (default `docs/figures`).
"""

import argparse
import concurrent.futures
import json
import math
import os
import shutil
import subprocess
import sys
import time

import effect_stats
from effect_plan import ABLATIONS, ALL_ARMS, ARMS, DECAYS, GROUPS, LABELS, METRICS, RECIPE, REPO
from effect_plan import cells, decay_cells, run_name

TIMING_FILE = "study_timing.json"
LOAD_SAMPLE_SECONDS = 60

# Keep TensorFlow's start-up chatter out of the tables.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TINY_FLAGS = ["--epochs=2", "--steps_per_epoch=4", "--warmup_epochs=1",
              "--lr_drop_epochs=1,2"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--imbalance_factors", type=float, nargs="*", default=[10, 50, 100])
    parser.add_argument("--synthetic_imbalance_factors", type=float, nargs="*",
                        default=[100])
    parser.add_argument("--ablation_seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    parser.add_argument("--ablation_imbalance_factor", type=float, default=100)
    parser.add_argument("--ablations", nargs="*", default=list(ABLATIONS),
                        choices=list(ABLATIONS))
    parser.add_argument("--decays", nargs="*", default=None, choices=list(DECAYS),
                        help="Weight-decay cells (BN and NBN, digits-LT at "
                             "--ablation_imbalance_factor, every seed; default: "
                             "all, none with --tiny).")
    parser.add_argument("--workers", type=int, default=2,
                        help="Training subprocesses at a time.")
    parser.add_argument("--threads", type=int, default=1,
                        help="TensorFlow intra- and inter-op threads per run.")
    parser.add_argument("--extra_flag", dest="extra_flags", action="append", default=[],
                        help="A training flag appended to every run, e.g. "
                             "--extra_flag=--epochs=24 (repeatable).")
    parser.add_argument("--tiny", action="store_true",
                        help="Smoke test: digits IF 100, seed 0, BN and NBN, "
                             "8 steps, no ablations or weight-decay cells unless "
                             "--decays names some.")
    parser.add_argument("--work_dir", default=os.path.join(REPO, "runs", "effect_study"))
    parser.add_argument("--out_dir", default=os.path.join(REPO, "docs", "figures"))
    parser.add_argument("--no_pictures", action="store_true",
                        help="Tables only (no figures).")
    parser.add_argument("--report_only", action="store_true",
                        help="Train nothing: tabulate the finished runs in "
                             "--work_dir (e.g. of a study stopped early).")
    args = parser.parse_args(argv)
    if args.tiny:
        args.seeds, args.imbalance_factors = [0], [100]
        args.synthetic_imbalance_factors, args.ablation_seeds = [], []
        args.decays = args.decays or []
        args.extra_flags = TINY_FLAGS + args.extra_flags
    elif args.decays is None:
        args.decays = list(DECAYS)
    return args


# --- Runs --------------------------------------------------------------------


def jobs(args):
    """`(data, imbalance_factor, arm, seed)` in the order they are trained.

    A study stopped early should hold the most telling runs: the main cells
    for the first three seeds, then the first ablation (the start of beta),
    the remaining seeds, the weight-decay cells and the other ablations.
    """
    def main(seeds):
        return [(data, factor, arm, seed) for seed in seeds
                for data, factor in cells(args) for arm in ARMS]

    def ablation(arms):
        return [("digits_lt", args.ablation_imbalance_factor, arm, seed)
                for seed in args.ablation_seeds for arm in ["bn", "nbn"] + arms]

    decays = [("digits_lt", args.ablation_imbalance_factor, f"{arm}_{name}", seed)
              for name in args.decays for seed in args.seeds for arm in ARMS]
    order = (main(args.seeds[:3]) + ablation(args.ablations[:1])
             + main(args.seeds[3:]) + decays + ablation(args.ablations[1:]))
    return list(dict.fromkeys(order))


def command(args, data, imbalance_factor, arm, seed, run_dir):
    flags = ALL_ARMS[arm]
    return [sys.executable, "-m", "nbn_keras.train", f"--flagfile={RECIPE}",
            f"--data={data}", f"--imbalance_factor={imbalance_factor:g}",
            f"--seed={seed}", f"--data_seed={seed}", f"--run_dir={run_dir}",
            *flags, *args.extra_flags]


def train(args, job, make_command=None):
    """Trains one run unless a finished one with the same command exists.

    Args:
        args: The parsed study arguments (`work_dir`, `threads`).
        job: `(data, imbalance_factor, arm, seed)`.
        make_command: `(args, *job, run_dir) -> argv`; default `command`.

    Returns:
        `(run_dir, seconds)`, seconds `None` for a reused run.
    """
    run_dir = os.path.join(args.work_dir, run_name(*job))
    cmd = (make_command or command)(args, *job, run_dir)
    marker = os.path.join(run_dir, "study_command.json")
    recorded = None
    if os.path.exists(marker):
        with open(marker) as f:
            recorded = json.load(f)["command"][1:]
    if recorded is not None and recorded != cmd[1:]:
        # Another recipe's run: keep it aside rather than mixing the two.
        stale = os.path.join(args.work_dir, "stale", f"{run_name(*job)}-{int(time.time())}")
        os.makedirs(os.path.dirname(stale), exist_ok=True)
        shutil.move(run_dir, stale)
        recorded = None
    if recorded is not None and os.path.exists(os.path.join(run_dir, "test_metrics.json")):
        return run_dir, None
    os.makedirs(run_dir, exist_ok=True)
    with open(marker, "w") as f:
        json.dump({"command": cmd}, f)
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2",
               TF_NUM_INTRAOP_THREADS=str(args.threads),
               TF_NUM_INTEROP_THREADS=str(args.threads), CUDA_VISIBLE_DEVICES="")
    sittings = read_sittings(run_dir)
    if sittings and "end" not in sittings[-1]:  # That sitting was killed.
        sittings[-1].update(end=last_file_write(run_dir), end_from="last file write")
    # The machine's 1-minute load average around each sitting (2 runs at a
    # time on 2 cores read about 2).
    sittings.append({"start": time.time(), "load_before": os.getloadavg()[0]})
    write_sittings(run_dir, sittings)
    with open(os.path.join(run_dir, "train.log"), "a") as log:
        # The study's own files (the marker, this log) are in the run
        # directory before the run's first file.
        process = subprocess.Popen([*cmd, "--allow_foreign_run_dir"], cwd=REPO, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
        # The load while it trains, sampled (written as it goes: a killed
        # sitting keeps its samples).
        sittings[-1]["load_samples"] = []
        while True:
            try:
                returncode = process.wait(timeout=LOAD_SAMPLE_SECONDS)
                break
            except subprocess.TimeoutExpired:
                sittings[-1]["load_samples"].append(round(os.getloadavg()[0], 2))
                write_sittings(run_dir, sittings)
    if returncode:
        raise RuntimeError(f"{run_name(*job)} failed (exit {returncode}); see "
                           f"{os.path.join(run_dir, 'train.log')}.")
    sittings[-1].update(end=time.time(), load_after=os.getloadavg()[0])
    write_sittings(run_dir, sittings)
    return run_dir, sittings[-1]["end"] - sittings[-1]["start"]


def read_sittings(run_dir):
    """The sittings a run was trained in: `[{start, end, load_before, load_after}]`.

    A sitting without `end` is running or was killed; one whose `end_from`
    is `"last file write"` was killed, and ended no earlier than that.
    """
    path = os.path.join(run_dir, TIMING_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        timing = json.load(f)
    if "sittings" in timing:
        return timing["sittings"]
    # One sitting, as earlier versions wrote it (the oldest without timestamps).
    end = timing.get("end", os.path.getmtime(path))
    return [{"start": timing.get("start", end - timing["seconds"]), "end": end,
             "load_before": timing["load_before"], "load_after": timing["load_after"]}]


def write_sittings(run_dir, sittings):
    path = os.path.join(run_dir, TIMING_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump({"sittings": sittings}, f, indent=1)
    os.replace(path + ".tmp", path)


def last_file_write(run_dir):
    """When the run last wrote a file (the study's own files aside)."""
    own = {TIMING_FILE, TIMING_FILE + ".tmp", "study_command.json"}
    return max((os.path.getmtime(os.path.join(directory, name))
                for directory, _, names in os.walk(run_dir) for name in names
                if name not in own), default=time.time())


def finished_runs(args, todo=None, make_command=None):
    """`{job: (run_dir, True)}` for the jobs whose run finished with this command."""
    done = {}
    make_command = make_command or command
    for job in jobs(args) if todo is None else todo:
        run_dir = os.path.join(args.work_dir, run_name(*job))
        marker = os.path.join(run_dir, "study_command.json")
        if not (os.path.exists(marker)
                and os.path.exists(os.path.join(run_dir, "test_metrics.json"))):
            continue
        with open(marker) as f:
            if json.load(f)["command"][1:] == make_command(args, *job, run_dir)[1:]:
                done[job] = (run_dir, True)
    return done


def train_all(args, todo=None, make_command=None):
    """Trains every job (default `jobs(args)`), `args.workers` at a time.

    Returns:
        `{job: (run_dir, reused)}`.
    """
    todo = jobs(args) if todo is None else todo
    done = {}
    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
        futures = {pool.submit(train, args, job, make_command): job for job in todo}
        for future in concurrent.futures.as_completed(futures):
            job = futures[future]
            try:
                run_dir, seconds = future.result()
            except RuntimeError as error:  # One failed run does not stop the rest.
                print(f"FAILED {error}", file=sys.stderr, flush=True)
                continue
            done[job] = (run_dir, seconds is None)
            state = "reused" if seconds is None else f"{seconds:.0f} s"
            print(f"[{len(done)}/{len(todo)}] {run_name(*job)}: {state}",
                  file=sys.stderr, flush=True)
    return done


# --- Reading runs ------------------------------------------------------------


def read_figures(run_dir):
    with open(os.path.join(run_dir, "test_metrics.json")) as f:
        return json.load(f)


def run_config(run_dir):
    """The `TrainConfig` of a run, from its resolved `flags.cfg`."""
    from nbn_keras.training import config as config_lib

    return config_lib.from_flagfile(os.path.join(run_dir, "flags.cfg"))


def lr_sum_and_shrink(run_dir):
    """Sum of the learning rate over the run's steps and the decay formula.

    Returns:
        `(sum_lr, predicted)`: `predicted = exp(-wd * sum_lr / (1 - momentum))`,
        the factor coupled weight decay alone shrinks a weight by.
    """
    import numpy as np

    from nbn_keras.training import schedules

    config = run_config(run_dir)
    # Without --steps_per_epoch the run's epoch length came from its data.
    steps = config.steps_per_epoch or read_figures(run_dir)["steps_trained"] // config.epochs
    schedule = schedules.from_config(config, steps)
    total = float(np.sum(np.asarray(schedule(np.arange(steps * config.epochs)))))
    return total, math.exp(-config.weight_decay * total / (1.0 - config.momentum))


# The paper's schedules (configs/*_nbn.cfg): training images, global batch,
# learning rate, epochs, schedule, warmup epochs, drop epochs and factors.
PAPER_SCHEDULES = {
    "ImageNet-LT (ResNet-50, 90 epochs)": (115846, 512, 0.2, 90, "cosine", 0, (), ()),
    "CIFAR-100-LT IF 100 (200 epochs)": (10847, 128, 0.1, 200, "warmup_steps", 5,
                                         (160, 180), (0.01, 0.001)),
    "CIFAR-10-LT IF 100 (200 epochs)": (12406, 128, 0.1, 200, "warmup_steps", 5,
                                        (160, 180), (0.01, 0.001)),
}


def paper_shrinks(weight_decay=5e-4, momentum=0.9):
    """`{name: (steps, sum_lr, predicted shrink)}` of the paper's schedules."""
    import numpy as np

    from nbn_keras.training import schedules

    out = {}
    for name, (images, batch, lr, epochs, kind, warmup, drops, factors) in \
            PAPER_SCHEDULES.items():
        steps_per_epoch = -(-images // batch)
        total = steps_per_epoch * epochs
        if kind == "cosine":
            schedule = schedules.WarmupCosineDecay(lr, total_steps=total,
                                                   warmup_steps=warmup * steps_per_epoch)
        else:
            schedule = schedules.WarmupStepDecay(lr, steps_per_epoch, warmup_epochs=warmup,
                                                 boundaries=drops, factors=factors)
        sum_lr = float(np.sum(np.asarray(schedule(np.arange(total)))))
        out[name] = (total, sum_lr, math.exp(-weight_decay * sum_lr / (1 - momentum)))
    return out


def read_run(job, run_dir, reused=False):
    """One run's record: test figures, mechanics and the served-class check."""
    import keras
    import numpy as np

    import nbn_keras  # noqa: F401  (registers the NBN layers for loading)
    from nbn_keras.analysis import plots
    from nbn_keras.training.callbacks import scale_variables

    data, imbalance_factor, arm, seed = job
    figures = read_figures(run_dir)
    with open(os.path.join(run_dir, "nbn_dynamics.json")) as f:
        dynamics = json.load(f)
    model = keras.models.load_model(os.path.join(run_dir, "model.keras"), compile=False)
    parameters = plots.effective_bn_parameters(model)
    last_bn = list(parameters)[-1]
    gamma, beta = parameters[last_bn]
    served = effect_stats.served_class_strength(
        gamma, beta, model.get_layer("logits").kernel, figures["class_counts"])
    return {
        "data": data, "imbalance_factor": imbalance_factor, "arm": arm, "seed": seed,
        "run_dir": os.path.relpath(run_dir, REPO),
        "weight_decay": run_config(run_dir).weight_decay,
        "figures": {k: figures[k] for k in METRICS + ("balanced", "per_class",
                                                        "class_counts",
                                                        "classes_per_group")},
        "steps_trained": figures.get("steps_trained"),
        "conv_kernel_fingerprint": dynamics["conv_kernel_fingerprint"],
        "tracked_layers": dynamics["layers"],
        "mechanics": effect_stats.dynamics_summary(dynamics),
        "trajectory": [{"step": e["step"], "scales": e["scales"],
                        "layers": e["layers"]} for e in dynamics["epochs"]],
        "scales_selected_model": {p: float(np.asarray(v))
                                  for p, v in scale_variables(model).items()},
        "served": served | {"layer": last_bn},
        **timing_of(run_dir),
        "reused": reused,
    }


def timing_of(run_dir):
    """A run's wall time (seconds, summed over its sittings), loads, first start, last end."""
    sittings = [s for s in read_sittings(run_dir) if "end" in s]
    return {
        "seconds": sum(s["end"] - s["start"] for s in sittings) if sittings else None,
        "sittings": len(sittings),
        "load": [s[k] for s in sittings for k in ("load_before", "load_after") if k in s],
        "load_samples": [x for s in sittings for x in s.get("load_samples", [])],
        "start": sittings[0]["start"] if sittings else None,
        "end": sittings[-1]["end"] if sittings else None,
    }


# --- Tables ------------------------------------------------------------------


def by_cell(records, data, imbalance_factor, arm):
    return {r["seed"]: r for r in records if r["data"] == data
            and r["imbalance_factor"] == imbalance_factor and r["arm"] == arm}


def paired(records, data, imbalance_factor, arm, reference, key):
    """`paired_interval` of `key(record)` for `arm - reference` over shared seeds."""
    a = by_cell(records, data, imbalance_factor, arm)
    b = by_cell(records, data, imbalance_factor, reference)
    seeds = sorted(set(a) & set(b))
    return effect_stats.paired_interval([key(a[s]) for s in seeds],
                                        [key(b[s]) for s in seeds]) | {"seeds": seeds}


def metric(name):
    return lambda record: record["figures"][name]


def mean_sd(values):
    import numpy as np

    values = np.asarray([v for v in values if v is not None and not math.isnan(v)])
    if not len(values):
        return "n/a"
    sd = values.std(ddof=1) if len(values) > 1 else float("nan")
    return f"{values.mean():.1f} ± {sd:.1f}"


def median_range(values, digits=2, scientific=False):
    import numpy as np

    values = np.asarray([v for v in values if v is not None and not math.isnan(v)])
    if not len(values):
        return "n/a"
    spec = f".{digits}e" if scientific else f".{digits}f"
    return (f"{np.median(values):{spec}} ({values.min():{spec}}–{values.max():{spec}})")


def statistics(args, records):
    """Every table's numbers, as a JSON-able dict."""
    out = {"cells": [], "ablations": [], "decays": []}
    for data, factor in cells(args):
        bn = by_cell(records, data, factor, "bn")
        nbn = by_cell(records, data, factor, "nbn")
        if not bn or not nbn:
            continue
        cell = {"data": data, "imbalance_factor": factor,
                "seeds": sorted(set(bn) & set(nbn)),
                "classes_per_group": next(iter(bn.values()))["figures"]["classes_per_group"],
                "paired_nbn_minus_bn": {m: paired(records, data, factor, "nbn", "bn",
                                                  metric(m)) for m in METRICS},
                "same_initial_convs": sum(
                    bn[s]["conv_kernel_fingerprint"] == nbn[s]["conv_kernel_fingerprint"]
                    for s in set(bn) & set(nbn))}
        out["cells"].append(cell)
    for arm in args.ablations:
        factor = args.ablation_imbalance_factor
        if not by_cell(records, "digits_lt", factor, arm):
            continue
        out["ablations"].append({
            "arm": arm, "data": "digits_lt", "imbalance_factor": factor,
            "minus_nbn": {m: paired(records, "digits_lt", factor, arm, "nbn", metric(m))
                          for m in METRICS},
            "minus_bn": {m: paired(records, "digits_lt", factor, arm, "bn", metric(m))
                         for m in METRICS}})
    factor = args.ablation_imbalance_factor
    for name, bn_arm, nbn_arm in decay_cells(args):
        nbn = by_cell(records, "digits_lt", factor, nbn_arm)
        if not nbn or not by_cell(records, "digits_lt", factor, bn_arm):
            continue
        sum_lr, predicted = lr_sum_and_shrink(
            os.path.join(REPO, next(iter(nbn.values()))["run_dir"]))
        out["decays"].append({
            "name": name, "bn_arm": bn_arm, "nbn_arm": nbn_arm,
            "data": "digits_lt", "imbalance_factor": factor,
            "weight_decay": next(iter(nbn.values()))["weight_decay"],
            "sum_lr": sum_lr, "predicted_shrink": predicted,
            "paired_nbn_minus_bn": {m: paired(records, "digits_lt", factor, nbn_arm,
                                              bn_arm, metric(m)) for m in METRICS}})
    return out


def _layer_values(records, key, layer_filter=None):
    values = []
    for r in records:
        for name, entry in r["mechanics"].items():
            if layer_filter is None or layer_filter(name):
                values.append(entry.get(key))
    return values


def _final_scales(record):
    last = record["trajectory"][-1]["scales"] if record["trajectory"] else {}
    return list(last.values())


def mechanism_cells(runs):
    """The mechanism table's measured columns for `runs`, `|`-separated."""
    scales = [s for r in runs for s in _final_scales(r)]
    return " | ".join([
        median_range(_layer_values(runs, "gamma_direction_change"), 2, True),
        median_range(_layer_values(runs, "beta_direction_change"), 2, True),
        median_range(_layer_values(runs, "gamma_norm_ratio"), 3),
        median_range(_layer_values(runs, "beta_norm_shrink_from_peak"), 3),
        median_range(_layer_values(runs, "beta_norm_peak"), 2, True),
        median_range(scales, 2) if scales else "–"])


def tables(args, records, stats, shrink):
    """The Markdown tables of the study."""
    arms_in_order = (["bn", "nbn"] + args.ablations
                     + [arm for _, bn, nbn in decay_cells(args)[1:] for arm in (bn, nbn)])
    lines = ["## Test accuracy", "",
             "Test accuracy (%) on the balanced test split, mean ± sample standard "
             "deviation (ddof 1) over the seeds given; best-validation epoch. Groups: "
             "many > 60, few < 20 training images.", "",
             "| data | IF | classes many/med/few | arm | seeds | top1 | many | medium | few |",
             "|---|---|---|---|---|---|---|---|---|"]
    for data, factor in _all_cells(args):
        for arm in arms_in_order:
            runs = by_cell(records, data, factor, arm)
            if not runs:
                continue
            groups = next(iter(runs.values()))["figures"]["classes_per_group"]
            lines.append(
                f"| {data} | {factor:g} | {'/'.join(str(groups[g]) for g in GROUPS)} | "
                f"{LABELS[arm]} | {len(runs)} | "
                + " | ".join(mean_sd([r["figures"][m] for r in runs.values()])
                             for m in METRICS) + " |")
    lines += ["", "## Paired difference NBN − BN", "",
              "Per seed, NBN minus BN (same subset, same initial convolutions), in "
              "accuracy points: mean [95 % t-interval, t with n − 1 df], and the "
              "seeds where NBN is ahead / behind on that metric.", "",
              "| data | IF | n | top1 | many | medium | few | few: NBN ahead/behind "
              "| same initial convs |",
              "|---|---|---|---|---|---|---|---|---|"]
    for cell in stats["cells"]:
        p = cell["paired_nbn_minus_bn"]
        lines.append(
            f"| {cell['data']} | {cell['imbalance_factor']:g} | {p['top1']['n']} | "
            + " | ".join(effect_stats.format_interval(p[m]) for m in METRICS)
            + f" | {p['few']['positive']}/{p['few']['negative']} | "
            f"{cell['same_initial_convs']}/{len(cell['seeds'])} |")
    if stats["ablations"]:
        lines += ["", f"## Ablations (digits-LT IF {args.ablation_imbalance_factor:g})", "",
                  "Paired differences in accuracy points, mean [95 % t-interval], over "
                  "the seeds each arm has (n).", "",
                  "| arm | n | top1 − NBN | few − NBN | top1 − BN | few − BN |",
                  "|---|---|---|---|---|---|"]
        for ab in stats["ablations"]:
            lines.append(
                f"| {LABELS[ab['arm']]} | {ab['minus_nbn']['top1']['n']} | "
                f"{effect_stats.format_interval(ab['minus_nbn']['top1'])} | "
                f"{effect_stats.format_interval(ab['minus_nbn']['few'])} | "
                f"{effect_stats.format_interval(ab['minus_bn']['top1'])} | "
                f"{effect_stats.format_interval(ab['minus_bn']['few'])} |")
    if len(stats["decays"]) > 1:
        lines += ["", f"## Total weight decay (digits-LT IF {args.ablation_imbalance_factor:g})",
                  "", "BN and NBN trained with a larger weight decay (everything else the "
                  "recipe's). Paired NBN − BN in accuracy points, mean [95 % t-interval]; "
                  "the decay formula exp(−wd · Σlr / (1 − m)); NBN's raw beta measured: "
                  "last norm / peak norm and direction change 1 − cos (after step 1 → "
                  "last), and alpha at the last epoch, median (min–max) over runs × "
                  "layers.", "",
                  "| wd | exp(−wd · Σlr / (1 − m)) | n | top1 | many | medium | few "
                  "| NBN beta norm / peak | NBN 1−cos beta | NBN alpha at end |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for decay in stats["decays"]:
            p = decay["paired_nbn_minus_bn"]
            nbn = list(by_cell(records, decay["data"], decay["imbalance_factor"],
                               decay["nbn_arm"]).values())
            scales = [s for r in nbn for s in _final_scales(r)]
            lines.append(
                f"| {decay['weight_decay']:g} | {decay['predicted_shrink']:.1e} | "
                f"{p['top1']['n']} | "
                + " | ".join(effect_stats.format_interval(p[m]) for m in METRICS)
                + f" | {median_range(_layer_values(nbn, 'beta_norm_shrink_from_peak'), 2, True)}"
                f" | {median_range(_layer_values(nbn, 'beta_direction_change'), 2, True)}"
                f" | {median_range(scales, 2)} |")
    lines += ["", "## Mechanism: do the raw directions move?", "",
              "Coupled weight decay alone shrinks a weight by exp(−wd · Σlr / (1 − momentum)) "
              f"over a run: {shrink['predicted']:.3f} in this study (Σlr = "
              f"{shrink['sum_lr']:.1f}). The same formula for the paper's schedules "
              "(formula only, nothing trained here; wd 5e-4, momentum 0.9):", "",
              "| schedule | SGD steps | Σlr | exp(−wd · Σlr / (1 − m)) |", "|---|---|---|---|"]
    for name, (steps, sum_lr, predicted) in paper_shrinks().items():
        lines.append(f"| {name} | {steps} | {sum_lr:.0f} | {predicted:.1e} |")
    lines += ["", "Measured, per tracked layer and run at the last epoch (not the selected "
              "one): direction change 1 − cos of raw gamma (initial → last) and of raw "
              "beta (after step 1 → last; beta starts at 0, without a direction); norm "
              "ratios (gamma: last / initial; beta: last / its peak, the largest of the "
              "after-step-1 and epoch-end norms); raw beta's peak norm; the scale(s) at "
              "the last epoch. Median (min–max) over runs × layers. For BN, the same "
              "figures of the same layers' gamma and beta (then the effective ones).", ""]
    lines += ["| data | IF | arm | runs | 1−cos gamma | 1−cos beta | gamma norm ratio "
              "| beta norm / peak | beta peak norm | scale(s) at end |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for data, factor in _all_cells(args):
        for arm in arms_in_order:
            runs = list(by_cell(records, data, factor, arm).values())
            if not runs:
                continue
            lines.append(f"| {data} | {factor:g} | {LABELS[arm]} | {len(runs)} | "
                         f"{mechanism_cells(runs)} |")
    lines += ["", "## The paper's premise: are frequent-class channels stronger?", "",
              "Last BN layer of the last stage (effective gamma/beta, NBN folded) of the "
              "selected model. A channel serves the class with the largest classifier "
              "weight on it. Spearman correlation over channels of |gamma_eff| (and "
              "|beta_eff|) with the served class's training-set size, per run; mean "
              "[95 % t-interval] over seeds. Positive: channels serving frequent classes "
              "are stronger, which NBN is meant to even out.", "",
              "| data | IF | arm | n | rho(abs gamma, class size) | rho(abs beta, class size) |",
              "|---|---|---|---|---|---|"]
    for data, factor in cells(args):
        for arm in ARMS:
            runs = list(by_cell(records, data, factor, arm).values())
            if not runs:
                continue
            g = effect_stats.mean_interval([r["served"]["spearman_gamma"] for r in runs])
            b = effect_stats.mean_interval([r["served"]["spearman_beta"] for r in runs])
            lines.append(f"| {data} | {factor:g} | {LABELS[arm]} | {g['n']} | "
                         f"{effect_stats.format_interval(g, 2)} | "
                         f"{effect_stats.format_interval(b, 2)} |")
    return "\n".join(lines)


def _all_cells(args):
    return list(dict.fromkeys(cells(args) + [("digits_lt", args.ablation_imbalance_factor)]))


# --- Main --------------------------------------------------------------------


def timing_sentence(args, records, train_minutes):
    """Runs reused, wall times, the machine's load and the machine itself."""
    from nbn_keras.analysis import machine

    seconds = [r["seconds"] for r in records if r["seconds"] is not None]
    starts = [r["start"] for r in records if r["start"] is not None]
    ends = [r["end"] for r in records if r["end"] is not None]
    span = (max(ends) - min(starts)) / 60 if starts and ends else float("nan")
    reused = sum(r["reused"] for r in records)
    resumed = sum(r["sittings"] > 1 for r in records)
    loads = [x for r in records for x in r["load"]]
    samples = [x for r in records for x in r["load_samples"]]
    with_samples = sum(bool(r["load_samples"]) for r in records)
    return (
        f"{len(records)} finished runs ({reused} reused from an earlier invocation); "
        f"training of this invocation {train_minutes:.1f} min wall. The runs were trained "
        f"{args.workers} at a time with {args.threads} TF thread(s) each, first start "
        f"to last end {span:.1f} min wall"
        + (f", one run {min(seconds):.0f}–{max(seconds):.0f} s wall (median "
           f"{sorted(seconds)[len(seconds) // 2]:.0f} s)" if seconds else "")
        + (f"; {resumed} run(s) trained over more than one sitting (a run's wall time "
           "is the sum of its sittings, a killed one counted up to the run's last file "
           "write)" if resumed else "")
        + (f", the machine's 1-minute load average {min(loads):.1f}–{max(loads):.1f} "
           "at the runs' starts and ends" if loads else "")
        + (f" and {min(samples):.1f}–{max(samples):.1f} (median "
           f"{sorted(samples)[len(samples) // 2]:.1f}) in {len(samples)} samples while "
           f"{with_samples} of the runs trained" if samples else "") + ". "
        + machine.machine_line(args.threads))



def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    os.makedirs(args.out_dir, exist_ok=True)
    done = finished_runs(args) if args.report_only else train_all(args)
    train_minutes = (time.time() - start) / 60
    order = jobs(args)
    records = [read_run(job, *done[job]) for job in order if job in done]
    stats = statistics(args, records)
    sum_lr, predicted = lr_sum_and_shrink(done[order[0]][0])
    shrink = {"sum_lr": sum_lr, "predicted": predicted}
    pictures = []
    if not args.no_pictures:
        import effect_figures

        pictures = effect_figures.write_all(args, records, stats, args.out_dir)
    header = [
        "# NBN against BN: effect study", "",
        f"`python studies/effect_study.py {' '.join(sys.argv[1:] if argv is None else argv)}`"
        f": {timing_sentence(args, records, train_minutes)}", "",
        f"Recipe: `configs/effect_study.cfg` (extra flags: {' '.join(args.extra_flags) or 'none'}). "
        "Every run is `python -m nbn_keras.train --flagfile=configs/effect_study.cfg "
        "--seed=S --data_seed=S --imbalance_factor=IF [--data=synthetic_lt] "
        "--nbn|--nonbn [ablation flags]`.", ""]
    text = "\n".join(header) + "\n" + tables(args, records, stats, shrink) + "\n"
    write_report(args.out_dir, "effect_study", text, pictures, {
        "argv": sys.argv[1:] if argv is None else argv, "train_minutes": train_minutes,
        "shrink": shrink, "statistics": stats, "runs": records},
        note=("Per run, next to its files: `<work_dir>/<run>/mechanism.png` (its "
              "scale(s) over training, every tracked layer's raw norms and direction "
              "changes)."))
    return stats


def write_report(out_dir, name, text, pictures, record, note=None):
    """Writes `<name>.md` (the tables, then the figures) and `<name>.json`; prints the tables.

    Args:
        out_dir: The report's directory.
        name: The files' base name.
        text: The Markdown tables.
        pictures: The figures' paths, in `out_dir`.
        record: What `<name>.json` holds, besides the figures' names.
        note: A line after the figures, if there are any.
    """
    names = [os.path.basename(p) for p in pictures]
    if names:
        text += "\n## Figures\n\n" + "\n".join(f"![{n}]({n})" for n in names) + "\n"
        text += f"\n{note}\n" if note else ""
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump({**record, "pictures": names}, f, indent=1)
    print(text)


if __name__ == "__main__":
    main()
