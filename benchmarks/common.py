"""Helpers shared by the benchmark scripts: timing, machine, tables, models.

Only the standard library is imported at module level, so the PyTorch
worker of `torch_reference.py` (which runs in a venv without TensorFlow) can
import it too. TensorFlow and nbn_keras are imported inside the
functions that need them.
"""

import collections
import os
import statistics
import time

# Keep TensorFlow's start-up chatter out of the tables.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Per-model sizes used when a script is not told otherwise.
MODEL_DEFAULTS = {
    # name: (image size, batch size, number of classes)
    "resnet32": (32, 128, 100),
    "resnet50": (224, 16, 1000),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


def machine_line(threads):
    """One line describing the machine, for the top of a table."""
    from nbn_keras.analysis import machine  # Imports TensorFlow: not in the PyTorch worker.

    return machine.machine_line(threads)


def interleaved_timings(variants, rounds, steps_per_round):
    """Times several step functions in turns: A, B, ..., then B, A, ... .

    Every round runs `steps_per_round` calls of each variant back to back;
    the order is reversed every other round so that no variant always
    follows the same one. Noise from other processes (slow phases of the
    machine) then hits all variants alike.

    Both wall-clock time and CPU time are recorded. CPU time (of all threads)
    is what a step costs in core-seconds; it varies much less than wall time
    when other processes compete for the cores. It is this process's CPU
    time, unless `fn` returns a float: then that is taken as the CPU time
    of the call (for work done in another process).

    Args:
        variants: A dict `name -> fn`; `fn()` runs one step and returns only
            when its work is done.
        rounds: Number of rounds.
        steps_per_round: Calls of each variant per round.

    Returns:
        A pair of dicts `(wall, cpu)`, each `name -> list of per-round mean
        step times (seconds)`.
    """
    names = list(variants)
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            fn = variants[name]
            reported = 0.0
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(steps_per_round):
                result = fn()
                if isinstance(result, float):
                    reported += result
            end, end_cpu = time.perf_counter(), time.process_time()
            wall[name].append((end - start) / steps_per_round)
            cpu[name].append((reported or end_cpu - start_cpu) / steps_per_round)
    return wall, cpu


def median(values):
    """The median of a list of numbers."""
    return statistics.median(values)


def paired_ratio(times, numerator, denominator):
    """Median over rounds of `numerator / denominator` round times.

    Each round's ratio compares two variants timed moments apart, so it is
    less sensitive to slow drifts of the machine than a ratio of medians.
    """
    return statistics.median(
        a / b for a, b in zip(times[numerator], times[denominator])
    )


def spread(values):
    """Relative spread (max - min) / median of a list of times."""
    return (max(values) - min(values)) / statistics.median(values)


def format_table(headers, rows):
    """A Markdown table as a string."""
    cells = [[str(c) for c in row] for row in [headers] + list(rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    separator = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), separator] + [line(r) for r in cells[1:]])


def peak_rss_mb():
    """Peak resident set size of this process so far, in MiB (Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def op_counts(concrete_function):
    """Counts op types in a function's graph and every function it calls.

    The nodes of a called function (`StatefulPartitionedCall`, `While`,
    `If`, ...) are counted once per call site.
    """
    graph_def = concrete_function.graph.as_graph_def()
    library = {f.signature.name: f for f in graph_def.library.function}
    counts = collections.Counter()

    def visit(nodes):
        for node in nodes:
            counts[node.op] += 1
            for value in node.attr.values():
                if value.HasField("func") and value.func.name in library:
                    visit(library[value.func.name].node_def)

    visit(graph_def.node)
    return counts


def describe_diff(counts, reference):
    """`+3 Sqrt, -1 Mul`-style text of the op types whose counts differ."""
    diff = []
    for op in sorted(set(counts) | set(reference)):
        delta = counts[op] - reference[op]
        if delta:
            diff.append(f"{delta:+d} {op}")
    return ", ".join(diff) or "none"


# --- TensorFlow side -------------------------------------------------------


def set_tf_threads(threads):
    """Gives TensorFlow `threads` intra-op and inter-op threads.

    Must run before TensorFlow executes its first op. `0` keeps TF's
    defaults (one thread per core).
    """
    import tensorflow as tf

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)


def parse_config(text):
    """`"resnet50:224:16"` -> `("resnet50", 224, 16)`."""
    name, image_size, batch_size = text.split(":")
    return name, int(image_size), int(batch_size)


def add_model_arguments(parser, default_configs):
    """Adds the `--configs` and `--threads` flags the TF scripts share."""
    parser.add_argument(
        "--configs", nargs="+", type=parse_config, default=default_configs,
        help="backbone:image_size:batch_size, e.g. resnet50:224:16.",
    )
    parser.add_argument("--threads", type=int, default=0,
                        help="TF intra/inter-op threads (0: one per core).")


def model_sizes(name, image_size=None, batch_size=None, num_classes=None):
    """`(image_size, batch_size, num_classes)`, defaults filled in per model."""
    default = MODEL_DEFAULTS.get(name, (224, 16, 1000))
    return (
        image_size or default[0],
        batch_size or default[1],
        num_classes or default[2],
    )


def build_bn_and_nbn(name, image_size, num_classes, seed=0):
    """Returns `(bn_model, nbn_model)`: one classifier and its NBN copy.

    The NBN model is `convert_to_nbn(bn_model)` with the paper's selection
    (last stage, last BN of each block and the shortcut BN, one shared
    alpha), so both have the same weights and differ only by NBN.
    """
    import keras

    import nbn_keras

    keras.utils.set_random_seed(seed)
    small = image_size <= 64
    model = nbn_keras.models.build_classifier(
        name,
        num_classes=num_classes,
        input_shape=(image_size, image_size, 3),
        mean=CIFAR_MEAN if small else IMAGENET_MEAN,
        std=CIFAR_STD if small else IMAGENET_STD,
    )
    return model, nbn_keras.convert_to_nbn(model)


def count_nbn_layers(model):
    """Number of NBN layers in `model`, nested models included."""
    import nbn_keras

    return sum(
        isinstance(layer, nbn_keras.NormalizedBatchNormalization)
        for layer in nbn_keras.conversion.leaf_layers(model)
    )


def nbn_parameter_math_time(model, calls=200, repeats=7):
    """Time of NBN's extra math alone: effective gamma/beta and gradients.

    Runs, in one `tf.function`, what NBN adds to a training step: every NBN
    layer's effective gamma and beta from the raw vectors and the shared
    scale, and the gradients back to the raw vectors and the scale. Returns
    the median over `repeats` of the mean time of `calls` calls, in seconds:
    an upper bound of NBN's extra work per step (in a real step these small
    ops can also overlap with the convolutions).
    """
    import tensorflow as tf

    import nbn_keras

    layers = list(nbn_keras.conversion.leaf_layers(model))
    nbn_layers = [
        l for l in layers if isinstance(l, nbn_keras.NormalizedBatchNormalization)
    ]
    scales = [l for l in layers if isinstance(l, nbn_keras.NBNScale)]
    variables = [v for l in nbn_layers + scales for v in l.trainable_variables]
    upstream = [tf.random.normal(l.gamma.shape) for l in nbn_layers]

    @tf.function
    def extra_math():
        with tf.GradientTape() as tape:
            scale = scales[0].value() if scales else None
            loss = 0.0
            for layer, g in zip(nbn_layers, upstream):
                gamma, beta = layer.effective_parameters(scale)
                loss += tf.reduce_sum(gamma * g) + tf.reduce_sum(beta * g)
        return tape.gradient(loss, variables)

    def run():
        start = time.perf_counter()
        for _ in range(calls):
            result = extra_math()
        result[0].numpy()
        return (time.perf_counter() - start) / calls

    run()
    return median([run() for _ in range(repeats)])


def compile_for_training(model, jit_compile=False, weight_decay=0.0):
    """Compiles `model` as the reference trains: cross-entropy, SGD 0.9.

    With `weight_decay`, PyTorch's coupled L2 (`nbn_keras`' CoupledSGD);
    without, the stock Keras SGD.
    """
    import keras

    from nbn_keras.training.optimizers import CoupledSGD

    if weight_decay:
        optimizer = CoupledSGD(
            learning_rate=0.1, momentum=0.9, coupled_weight_decay=weight_decay
        )
    else:
        optimizer = keras.optimizers.SGD(learning_rate=0.1, momentum=0.9)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    return model


def random_batch(batch_size, image_size, num_classes, seed=0, channels=3):
    """A batch of raw pixels in [0, 255] and integer labels, as tensors."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, (batch_size, image_size, image_size, channels))
    labels = rng.integers(0, num_classes, (batch_size,))
    return (
        tf.constant(images, dtype=tf.float32),
        tf.constant(labels, dtype=tf.int32),
    )


def train_step_fn(model, images, labels):
    """A zero-argument function running one compiled training step.

    `train_on_batch` returns the loss as a Python float, which waits for the
    step to finish, so timing the call times the step.
    """

    def step():
        model.train_on_batch(images, labels)

    return step


def train_step_op_counts(model, images, labels):
    """Op counts of one training step (forward, gradients, SGD update).

    Traces `model.train_step` in a `tf.function` of its own, without running
    it. Call after the model has trained a step (the optimizer is built).
    """
    import tensorflow as tf

    function = tf.function(model.train_step)
    return op_counts(function.get_concrete_function((images, labels)))
