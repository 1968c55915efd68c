"""Inference cost of NBN: folded and unfolded exports against plain BN.

For each configuration, a classifier with plain BN is built and converted to
NBN (the paper's selection); the NBN layers get random gamma, beta and alpha
so that folding has something to fold. Three SavedModels are written with
`model.export()`:

- `BN`: the plain-BN model;
- `NBN folded`: `nbn_keras.fold_nbn(nbn_model)`, the model one serves;
- `NBN unfolded`: the NBN model itself, which recomputes its effective
  gamma and beta on every call.

Each export is loaded back with `tf.saved_model.load` and its
`serving_default` signature is used for both measures:

- ops: the nodes of the signature's graph, counting the nodes of every
  function it calls (once per call site), plus the op types whose counts
  differ from the BN export;
- latency: the signature's call time on one fixed batch, the variants
  timed in alternating rounds; the ratios are medians of per-round ratios,
  of wall-clock time and of CPU time (all threads; steadier than wall time
  when other processes share the cores).

Run (from the repository root):

    python benchmarks/inference.py
    python benchmarks/inference.py --configs resnet50:224:1 --rounds 30

A configuration is `backbone:image_size:batch_size`. Nothing about speed is
asserted; read the numbers.
"""

import argparse
import tempfile

import common

VARIANTS = ("BN", "NBN folded", "NBN unfolded")


def randomize_nbn(model, seed=0):
    """Gives every NBN layer random gamma and beta, and the scale 1.7."""
    import keras
    import numpy as np

    import nbn_keras

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            randomize_nbn(layer, seed + 1)
        elif isinstance(layer, nbn_keras.NBNScale):
            for scale in layer.scales:
                scale.assign(1.7)
        elif isinstance(layer, nbn_keras.NormalizedBatchNormalization):
            for weight in (layer.gamma, layer.beta):
                weight.assign(rng.normal(size=weight.shape).astype("float32"))


def benchmark(name, image_size, batch_size, args, export_dir):
    import numpy as np
    import tensorflow as tf

    import nbn_keras

    _, _, num_classes = common.model_sizes(name)
    bn, nbn = common.build_bn_and_nbn(name, image_size, num_classes)
    randomize_nbn(nbn)
    models = dict(zip(VARIANTS, (bn, nbn_keras.fold_nbn(nbn), nbn)))
    images, _ = common.random_batch(batch_size, image_size, num_classes)

    signatures, counts, outputs = {}, {}, {}
    for i, (variant, model) in enumerate(models.items()):
        path = f"{export_dir}/{name}_{batch_size}_{i}"
        model.export(path, verbose=False)
        loaded = tf.saved_model.load(path)
        signature = loaded.signatures["serving_default"]
        signatures[variant] = (loaded, signature)
        counts[variant] = common.op_counts(signature)
        outputs[variant] = next(iter(signature(images=images).values())).numpy()
    fold_error = (
        float(np.max(np.abs(outputs["NBN folded"] - outputs["NBN unfolded"]))),
        float(np.max(np.abs(outputs["NBN unfolded"]))),
    )

    def call(signature):
        def run():
            next(iter(signature(images=images).values())).numpy()

        return run

    steps = {v: call(signatures[v][1]) for v in VARIANTS}
    common.interleaved_timings(steps, rounds=1, steps_per_round=args.warmup)
    call_time = min(common.interleaved_timings(steps, 1, 2)[0]["BN"])
    per_round = max(1, round(args.round_seconds / call_time))
    wall, cpu = common.interleaved_timings(steps, args.rounds, per_round)

    rows = []
    for variant in VARIANTS:
        rows.append([
            name,
            f"{image_size}x{image_size}",
            batch_size,
            variant,
            sum(counts[variant].values()),
            common.describe_diff(counts[variant], counts["BN"]),
            f"{1000 * common.median(wall[variant]):.2f}",
            f"{common.paired_ratio(wall, variant, 'BN'):.3f}",
            f"{common.paired_ratio(cpu, variant, 'BN'):.3f}",
        ])
    return rows, fold_error, f"{args.rounds}x{per_round}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_model_arguments(
        parser, [("resnet32", 32, 128), ("resnet50", 224, 1), ("resnet50", 224, 16)])
    parser.add_argument("--rounds", type=int, default=20,
                        help="Alternating timing rounds per configuration.")
    parser.add_argument("--round_seconds", type=float, default=1.0,
                        help="About how long each variant runs per round.")
    parser.add_argument("--warmup", type=int, default=3,
                        help="Untimed calls per export before timing.")
    args = parser.parse_args()

    common.set_tf_threads(args.threads)
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as export_dir:
        for config in args.configs:
            config_rows, fold_error, rounds = benchmark(*config, args, export_dir)
            rows += config_rows
            notes.append(
                f"{config[0]} batch {config[2]}: {rounds} rounds x calls; "
                "max |folded - unfolded| logit difference "
                f"{fold_error[0]:.2e} (max |logit| {fold_error[1]:.2e})"
            )
    print()
    print(common.machine_line(args.threads or "default"))
    print("\n".join(notes))
    print(common.format_table(
        ["model", "input", "batch", "export", "ops", "op types vs BN",
         "ms/call", "wall / BN (paired median)",
         "CPU time / BN (paired median)"],
        rows,
    ))


if __name__ == "__main__":
    main()
