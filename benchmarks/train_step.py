"""Training step time of an NBN model against the same model with plain BN.

For each configuration, one classifier is built with plain BN and converted
with `nbn_keras.convert_to_nbn` (the paper's selection: in the last stage,
the last BN of each block and the shortcut BN, one shared alpha). Both are
compiled the same way (cross-entropy, SGD with momentum 0.9) and trained on
one fixed random batch with `train_on_batch`. After a warm-up (tracing and
the first steps), the two are timed in alternating rounds (BN, NBN, NBN, BN,
...) so that the machine's slow phases hit both alike. The table gives the
median step time of each and NBN/BN ratios: the median of per-round ratios
of wall-clock time, the ratio of the fastest rounds, and the median of
per-round ratios of CPU time (all threads; steadier than wall time when
other processes share the cores). It also counts the ops of one training
step's graph (forward, gradients, SGD update) for both models, and times
NBN's extra math alone (effective gamma and beta of every NBN layer and
their gradients, in one `tf.function`), an upper bound of its added work.

Run (from the repository root):

    python benchmarks/train_step.py
    python benchmarks/train_step.py --configs resnet32:32:128 --rounds 20
    python benchmarks/train_step.py --configs resnet50:224:16 --jit_compile

A configuration is `backbone:image_size:batch_size`. Nothing about speed is
asserted; read the numbers.
"""

import argparse

import common


def benchmark(name, image_size, batch_size, args):
    _, _, num_classes = common.model_sizes(name)
    bn, nbn = common.build_bn_and_nbn(name, image_size, num_classes)
    images, labels = common.random_batch(batch_size, image_size, num_classes)
    steps = {}
    for label, model in (("BN", bn), ("NBN", nbn)):
        common.compile_for_training(
            model, jit_compile=args.jit_compile, weight_decay=args.weight_decay
        )
        steps[label] = common.train_step_fn(model, images, labels)
    # Warm-up: tracing, graph optimisation and the first (slower) steps.
    common.interleaved_timings(steps, rounds=1, steps_per_round=args.warmup)
    step_time = min(common.interleaved_timings(steps, 1, 2)[0]["BN"])
    per_round = max(1, round(args.round_seconds / step_time))
    wall, cpu = common.interleaved_timings(steps, args.rounds, per_round)
    ops = {label: common.train_step_op_counts(model, images, labels)
           for label, model in (("BN", bn), ("NBN", nbn))}
    extra = common.nbn_parameter_math_time(nbn)
    bn_time, nbn_time = common.median(wall["BN"]), common.median(wall["NBN"])
    return [
        name,
        f"{image_size}x{image_size}",
        batch_size,
        common.count_nbn_layers(nbn),
        f"{args.rounds}x{per_round}",
        f"{1000 * bn_time:.0f}",
        f"{1000 * nbn_time:.0f}",
        f"{batch_size / bn_time:.1f}",
        f"{batch_size / nbn_time:.1f}",
        f"{common.paired_ratio(wall, 'NBN', 'BN'):.3f}",
        f"{min(wall['NBN']) / min(wall['BN']):.3f}",
        f"{common.paired_ratio(cpu, 'NBN', 'BN'):.3f}",
        f"{100 * common.spread(wall['BN']):.0f}% / "
        f"{100 * common.spread(wall['NBN']):.0f}%",
        f"{sum(ops['BN'].values())} / {sum(ops['NBN'].values())}",
        f"{1e6 * extra:.0f} us ({100 * extra / bn_time:.2f}%)",
    ], common.describe_diff(ops["NBN"], ops["BN"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_model_arguments(
        parser, [("resnet32", 32, 128), ("resnet50", 224, 16)])
    parser.add_argument("--rounds", type=int, default=20,
                        help="Alternating timing rounds per configuration.")
    parser.add_argument("--round_seconds", type=float, default=2.0,
                        help="About how long each variant runs per round.")
    parser.add_argument("--warmup", type=int, default=3,
                        help="Untimed steps per model before timing.")
    parser.add_argument("--jit_compile", action="store_true",
                        help="Compile the training steps with XLA.")
    parser.add_argument("--weight_decay", type=float, default=0.0,
                        help="Coupled L2 weight decay (CoupledSGD) if > 0.")
    args = parser.parse_args()

    common.set_tf_threads(args.threads)
    rows, diffs = [], []
    for config in args.configs:
        row, diff = benchmark(*config, args)
        rows.append(row)
        diffs.append(f"{config[0]}: extra ops of the NBN training step: {diff}")
    print()
    print(common.machine_line(args.threads or "default"))
    print(f"XLA: {args.jit_compile}, weight decay: {args.weight_decay}; "
          "times are medians over rounds; CPU time counts all threads")
    print(common.format_table(
        ["model", "input", "batch", "NBN layers", "rounds x steps",
         "BN ms/step", "NBN ms/step", "BN img/s", "NBN img/s",
         "NBN/BN wall (paired median)", "NBN/BN wall (minimums)",
         "NBN/BN CPU time (paired median)", "wall spread BN / NBN",
         "train-step ops BN / NBN", "NBN math alone (of BN step)"],
        rows,
    ))
    print("\n".join(diffs))


if __name__ == "__main__":
    main()
