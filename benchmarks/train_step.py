"""Training step time of an NBN model against the same model with plain BN.

For each configuration, one classifier is built with plain BN and converted
with `nbn_keras.convert_to_nbn` (the paper's selection: in the last stage,
the last BN of each block and the shortcut BN, one shared alpha). Both are
compiled the same way (cross-entropy, SGD with momentum 0.9) and trained on
one fixed random batch with `train_on_batch`. After a warm-up (tracing and
the first steps), the two are timed in alternating rounds (BN, NBN, NBN, BN,
...) so that the machine's slow phases hit both alike. The table gives the
median step time of each and the median of the per-round NBN/BN ratios.

Run (from the repository root):

    python benchmarks/train_step.py
    python benchmarks/train_step.py --configs resnet32:32:128 --rounds 20
    python benchmarks/train_step.py --configs resnet50:224:16 --jit_compile

A configuration is `backbone:image_size:batch_size`. Nothing about speed is
asserted; read the numbers.
"""

import argparse

import common


def parse_config(text):
    name, image_size, batch_size = text.split(":")
    return name, int(image_size), int(batch_size)


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
    warmup = common.interleaved_timings(steps, rounds=1, steps_per_round=args.warmup)
    step_time = min(warmup["BN"][-1], warmup["NBN"][-1])
    per_round = max(1, round(args.round_seconds / step_time))
    times = common.interleaved_timings(steps, args.rounds, per_round)
    bn_time, nbn_time = common.median(times["BN"]), common.median(times["NBN"])
    return [
        name,
        f"{image_size}x{image_size}",
        batch_size,
        common.count_nbn_layers(nbn),
        f"{args.rounds}x{per_round}",
        f"{1000 * bn_time:.1f}",
        f"{1000 * nbn_time:.1f}",
        f"{batch_size / bn_time:.1f}",
        f"{batch_size / nbn_time:.1f}",
        f"{common.paired_ratio(times, 'NBN', 'BN'):.3f}",
        f"{nbn_time / bn_time:.3f}",
        f"{100 * common.spread(times['BN']):.0f}% / "
        f"{100 * common.spread(times['NBN']):.0f}%",
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--configs", nargs="+", type=parse_config,
        default=[("resnet32", 32, 128), ("resnet50", 224, 16)],
        help="backbone:image_size:batch_size, e.g. resnet50:224:16.",
    )
    parser.add_argument("--rounds", type=int, default=12,
                        help="Alternating timing rounds per configuration.")
    parser.add_argument("--round_seconds", type=float, default=3.0,
                        help="About how long each variant runs per round.")
    parser.add_argument("--warmup", type=int, default=3,
                        help="Untimed steps per model before timing.")
    parser.add_argument("--threads", type=int, default=0,
                        help="TF intra/inter-op threads (0: one per core).")
    parser.add_argument("--jit_compile", action="store_true",
                        help="Compile the training steps with XLA.")
    parser.add_argument("--weight_decay", type=float, default=0.0,
                        help="Coupled L2 weight decay (CoupledSGD) if > 0.")
    args = parser.parse_args()

    common.set_tf_threads(args.threads)
    rows = [benchmark(*config, args) for config in args.configs]
    print()
    print(common.machine_line(args.threads or "default"))
    print(f"XLA: {args.jit_compile}, weight decay: {args.weight_decay}")
    print(common.format_table(
        ["model", "input", "batch", "NBN layers", "rounds x steps",
         "BN ms/step", "NBN ms/step", "BN img/s", "NBN img/s",
         "NBN/BN (paired median)", "NBN/BN (medians)", "spread BN / NBN"],
        rows,
    ))


if __name__ == "__main__":
    main()
