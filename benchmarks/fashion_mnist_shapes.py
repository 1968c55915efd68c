"""Epoch cost of the Fashion-MNIST-LT recipe at 28x28x1 against 32x32x3.

`--fashion_mnist_padded` zero-pads the 28x28 grey images to 32x32 and
repeats the grey value over 3 channels. This script builds the recipe's
network (`configs/recipes/fashion_mnist_lt.cfg`: CIFAR ResNet-20, 10
classes, NBN in the paper's selection unless `--bn`) for both input shapes,
compiles both as the recipe trains (cross-entropy, SGD momentum 0.9, coupled
weight decay 5e-4) and times, in alternating rounds, a training step on one
batch of 128 and an evaluation pass (`predict_on_batch`, batch 500). One
epoch is estimated as the training steps of the IF 100 and IF 10 training
sets (12,406 and 20,431 images) plus the 5,000 validation images; the
input pipeline (crop and flip of 28x28 or 32x32 uint8 images) is not timed.
The table gives medians and padded/grey ratios: the median of per-round
ratios of wall time and of CPU time.

Run (from the repository root):

    python benchmarks/fashion_mnist_shapes.py
    python benchmarks/fashion_mnist_shapes.py --rounds 20 --threads 2

Nothing about speed is asserted; read the numbers.
"""

import argparse
import math

import common

BATCH_SIZE = 128
EVAL_BATCH_SIZE = 500
NUM_CLASSES = 10
VALIDATION_IMAGES = 5000
TRAINING_IMAGES = {"IF 100": 12406, "IF 10": 20431}
SHAPES = {"grey 28x28x1": (28, 1), "padded 32x32x3": (32, 3)}


def build(image_size, channels, nbn):
    import keras

    import nbn_keras

    keras.utils.set_random_seed(0)
    model = nbn_keras.models.build_classifier(
        "resnet20", num_classes=NUM_CLASSES,
        input_shape=(image_size, image_size, channels),
        mean=(0.286,) * channels, std=(0.353,) * channels)
    if nbn:
        model = nbn_keras.convert_to_nbn(model)
    return common.compile_for_training(model, weight_decay=5e-4)


def step_functions(args):
    """`{shape: (train step fn, evaluation fn)}` for both input shapes."""
    functions = {}
    for label, (image_size, channels) in SHAPES.items():
        model = build(image_size, channels, nbn=not args.bn)
        images, labels = common.random_batch(
            BATCH_SIZE, image_size, NUM_CLASSES, channels=channels)
        eval_images, _ = common.random_batch(
            EVAL_BATCH_SIZE, image_size, NUM_CLASSES, seed=1, channels=channels)
        functions[label] = (
            common.train_step_fn(model, images, labels),
            lambda model=model, x=eval_images: model.predict_on_batch(x),
        )
    return functions


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=12,
                        help="Alternating timing rounds.")
    parser.add_argument("--steps_per_round", type=int, default=5,
                        help="Calls of each variant per round.")
    parser.add_argument("--threads", type=int, default=0,
                        help="TF intra/inter-op threads (0: one per core).")
    parser.add_argument("--bn", action="store_true",
                        help="Time the plain-BN arm instead of NBN.")
    args = parser.parse_args()

    common.set_tf_threads(args.threads)
    functions = step_functions(args)
    timings = {}
    for part, which in (("train step", 0), ("eval batch", 1)):
        variants = {label: fns[which] for label, fns in functions.items()}
        common.interleaved_timings(variants, 1, 3)  # Tracing and warm-up.
        timings[part] = common.interleaved_timings(
            variants, args.rounds, args.steps_per_round)

    def epoch_seconds(label, images):
        train = common.median(timings["train step"][0][label])
        evaluate = common.median(timings["eval batch"][0][label])
        return (math.ceil(images / BATCH_SIZE) * train
                + math.ceil(VALIDATION_IMAGES / EVAL_BATCH_SIZE) * evaluate)

    grey, padded = SHAPES
    rows = []
    for part, (wall, cpu) in timings.items():
        rows.append([
            part, f"{1000 * common.median(wall[grey]):.0f}",
            f"{1000 * common.median(wall[padded]):.0f}",
            f"{common.paired_ratio(wall, padded, grey):.2f}",
            f"{common.paired_ratio(cpu, padded, grey):.2f}",
            f"{100 * common.spread(wall[grey]):.0f}% / "
            f"{100 * common.spread(wall[padded]):.0f}%"])
    for name, images in TRAINING_IMAGES.items():
        rows.append([
            f"epoch estimate, {name}", f"{1000 * epoch_seconds(grey, images):.0f}",
            f"{1000 * epoch_seconds(padded, images):.0f}",
            f"{epoch_seconds(padded, images) / epoch_seconds(grey, images):.2f}",
            "", ""])
    print()
    print(common.machine_line(args.threads or "default"))
    print(f"ResNet-20, {'BN' if args.bn else 'NBN'}; train step batch {BATCH_SIZE}, "
          f"eval batch {EVAL_BATCH_SIZE}; {args.rounds} rounds x "
          f"{args.steps_per_round} calls; medians over rounds")
    print(common.format_table(
        ["part", f"{grey} ms", f"{padded} ms", "padded/grey wall (paired median)",
         "padded/grey CPU time (paired median)", "wall spread grey / padded"],
        rows))


if __name__ == "__main__":
    main()
