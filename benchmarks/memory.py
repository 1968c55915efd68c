"""Peak memory of a training run, NBN against plain BN.

Each measurement is a fresh subprocess that builds the classifier and its
NBN copy (as `train_step.py` does), keeps one of the two, compiles it
(cross-entropy, SGD with momentum 0.9) and runs `--steps` training steps on
a random batch. It reports two peaks:

- TF allocator: the peak bytes of live tensors on `CPU:0` during the
  training steps after the first (`tf.config.experimental.get_memory_info`,
  reset after the first step, which also builds the optimizer);
- peak RSS: the process's peak resident set size at the end
  (`getrusage(RUSAGE_SELF).ru_maxrss`, Linux), which includes TensorFlow
  itself, the model and the allocator's unreturned memory; the RSS just
  before training is shown too.

Both depend on the order in which TensorFlow runs independent ops, which
varies from run to run with several inter-op threads, so runs are repeated
(alternating BN, NBN, NBN, BN, ...) and the table gives the median and the
range of each variant.

Run (from the repository root):

    python benchmarks/memory.py
    python benchmarks/memory.py --configs resnet50:224:16 --steps 10

A configuration is `backbone:image_size:batch_size`.
"""

import argparse
import gc
import json
import subprocess
import sys

import common

VARIANTS = ("BN", "NBN")


def current_rss_mb():
    """The current resident set size of this process, in MiB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found in /proc/self/status.")


def child(args):
    """Runs the training steps of one variant; prints one JSON line."""
    import tensorflow as tf

    common.set_tf_threads(args.threads)
    if args.inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(
            args.inter_op_threads
        )
    name, image_size, batch_size = args.config
    _, _, num_classes = common.model_sizes(name)
    bn, nbn = common.build_bn_and_nbn(name, image_size, num_classes)
    model = bn if args.variant == "BN" else nbn
    del bn, nbn
    gc.collect()
    common.compile_for_training(model)
    images, labels = common.random_batch(batch_size, image_size, num_classes)
    before = current_rss_mb()
    step = common.train_step_fn(model, images, labels)
    step()
    tf.config.experimental.reset_memory_stats("CPU:0")
    for _ in range(args.steps - 1):
        step()
    print(json.dumps({
        "before_mb": before,
        "peak_mb": common.peak_rss_mb(),
        "tf_peak_mb": tf.config.experimental.get_memory_info("CPU:0")["peak"]
        / 2**20,
    }))


def run_child(config, variant, args):
    command = [
        sys.executable, __file__, "--child", "--variant", variant,
        "--configs", ":".join(str(c) for c in config),
        "--steps", str(args.steps), "--threads", str(args.threads),
        "--inter_op_threads", str(args.inter_op_threads),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_model_arguments(
        parser, [("resnet32", 32, 128), ("resnet50", 224, 16)])
    parser.add_argument("--steps", type=int, default=5,
                        help="Training steps per run.")
    parser.add_argument("--repeats", type=int, default=3,
                        help="Runs per variant and configuration.")
    parser.add_argument("--inter_op_threads", type=int, default=0,
                        help="TF inter-op threads if > 0 (1 makes the op "
                             "order, hence the peaks, steadier).")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        args.config = args.configs[0]
        child(args)
        return

    rows = []
    for config in args.configs:
        runs = {v: [] for v in VARIANTS}
        for r in range(args.repeats):
            for variant in VARIANTS if r % 2 == 0 else reversed(VARIANTS):
                runs[variant].append(run_child(config, variant, args))
        medians = {
            variant: {
                key: common.median([run[key] for run in runs[variant]])
                for key in ("before_mb", "peak_mb", "tf_peak_mb")
            }
            for variant in VARIANTS
        }

        def spread(variant, key):
            values = [run[key] for run in runs[variant]]
            return f"{min(values):.0f}-{max(values):.0f}"

        def ratio(variant, key):
            # The allocator peak reads 0 when a tiny model fits in its pools.
            base = medians["BN"][key]
            return f"{medians[variant][key] / base:.3f}" if base else "n/a"

        for variant in VARIANTS:
            m = medians[variant]
            rows.append([
                config[0],
                f"{config[1]}x{config[1]}",
                config[2],
                variant,
                f"{m['tf_peak_mb']:.0f} ({spread(variant, 'tf_peak_mb')})",
                ratio(variant, "tf_peak_mb"),
                f"{m['before_mb']:.0f}",
                f"{m['peak_mb']:.0f} ({spread(variant, 'peak_mb')})",
                ratio(variant, "peak_mb"),
            ])
    print()
    print(common.machine_line(args.threads or "default"))
    print(f"{args.steps} training steps per run; medians (and ranges) of "
          f"{args.repeats} runs per variant; inter-op threads: "
          f"{args.inter_op_threads or 'default'}")
    print(common.format_table(
        ["model", "input", "batch", "variant", "TF allocator peak MiB",
         "/ BN", "RSS before training MiB", "peak RSS MiB", "/ BN"],
        rows,
    ))


if __name__ == "__main__":
    main()
