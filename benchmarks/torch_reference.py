"""ResNet-50 / ResNeXt-50 + NBN training throughput: ours against the authors'.

Our side is the `--arch` classifier of `nbn_keras.models` (`resnet50` or
`resnext50`: the authors' networks, layer for layer) converted with
`convert_to_nbn` (the paper's selection: 4 NBN layers in the last stage, one
shared alpha), compiled with cross-entropy and SGD with momentum 0.9
(PyTorch-style coupled weight decay when `--weight_decay` > 0), and trained
with `train_on_batch` on one fixed random batch.

Their side is `resnet50_nbn` or `resnext50_nbn` from a checkout of the
authors' repository (github.com/yuxiangbao/NBN, `models/ResNet_NBN.py`,
`models/ResNext_NBN.py`), trained as their `main.py` does without mixed
precision: `nn.CrossEntropyLoss`, `torch.optim.SGD`
with momentum 0.9 and the same weight decay, `zero_grad`, forward, backward,
`step`, on one fixed random batch of the same size. It runs in a separate
process started with `--torch_python` (a Python that has torch; TensorFlow
is not needed there), which loads their module from `--nbn_repo`, warms up,
and then runs steps on request, answering with JSON lines. The two
frameworks never share a process, and both get `--threads` intra-op and
inter-op threads.

The variants are timed in alternating rounds (ours, theirs, theirs, ours,
...); the table gives the median step time (wall clock and CPU time of all
threads) and throughput of each, and the median of the per-round throughput
ratios against their model, from wall time and from CPU time (steadier when
other processes share the cores).

Run (from the repository root; the checkout is not part of this repo):

    python benchmarks/torch_reference.py --nbn_repo /path/to/NBN \\
        --torch_python /path/to/torchvenv/bin/python
    python benchmarks/torch_reference.py --nbn_repo /path/to/NBN \\
        --xla --torch_channels_last --rounds 6
    python benchmarks/torch_reference.py --nbn_repo /path/to/NBN \\
        --arch resnext50

Nothing about speed is asserted; read the numbers.
"""

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time

import common

REFERENCE = "torch (authors)"
ARCH_NAMES = {"resnet50": "ResNet-50", "resnext50": "ResNeXt-50 32x4d"}


# --- PyTorch worker: runs in the torch venv, imports no TensorFlow ----------


def torch_worker(args):
    import torch
    from torch import nn

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(args.threads)
    torch.manual_seed(0)
    sys.path.insert(0, os.path.abspath(args.nbn_repo))
    # Their constructor prints a banner; stdout is kept for the JSON lines.
    with contextlib.redirect_stdout(sys.stderr):
        if args.arch == "resnet50":
            from models.ResNet_NBN import resnet50_nbn as build
        else:
            from models.ResNext_NBN import resnext50_nbn as build

        model = build(num_classes=args.num_classes)
    if args.image_size != 224:
        # Their head pools with a fixed 7x7 window, sized for 224x224 inputs.
        model.avgpool = nn.AdaptiveAvgPool2d(1)
    memory_format = (
        torch.channels_last if args.channels_last else torch.contiguous_format
    )
    model = model.to(memory_format=memory_format).train()
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9, weight_decay=args.weight_decay
    )
    images = torch.randn(
        args.batch_size, 3, args.image_size, args.image_size
    ).to(memory_format=memory_format)
    labels = torch.randint(0, args.num_classes, (args.batch_size,))

    def step():
        optimizer.zero_grad()
        loss = criterion(model(images), labels)
        loss.backward()
        optimizer.step()
        return loss.item()

    for _ in range(args.warmup):
        step()
    # The layers NBN rescaled in the last forward pass (their `scale()`
    # stores the effective weight as `w`).
    nbn_layers = sum(
        hasattr(m, "w") for n, m in model.named_modules() if "layer4" in n
    )
    print(json.dumps({
        "ready": True,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "nbn_layers": nbn_layers,
        "params": sum(p.numel() for p in model.parameters()),
    }), flush=True)
    for line in sys.stdin:
        command = line.split()
        if command[0] == "run":
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(int(command[1])):
                step()
            print(json.dumps({
                "seconds": time.perf_counter() - start,
                "cpu_seconds": time.process_time() - start_cpu,
            }), flush=True)
        else:
            print(json.dumps({"peak_rss_mb": common.peak_rss_mb()}), flush=True)
            return


class TorchWorker:
    """The driver's handle on a PyTorch worker process."""

    def __init__(self, args, channels_last):
        command = [
            args.torch_python, os.path.abspath(__file__), "--worker",
            "--nbn_repo", args.nbn_repo,
            "--arch", args.arch,
            "--batch_size", str(args.batch_size),
            "--image_size", str(args.image_size),
            "--num_classes", str(args.num_classes),
            "--threads", str(args.threads),
            "--weight_decay", str(args.weight_decay),
            "--warmup", str(args.warmup),
        ] + (["--channels_last"] if channels_last else [])
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.info = self._read()

    def _read(self):
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(
                f"The PyTorch worker exited (code {self.process.wait()}); "
                "see its messages above."
            )
        return json.loads(line)

    def run(self, steps):
        """Runs `steps` steps; returns their CPU time in the worker."""
        self.process.stdin.write(f"run {steps}\n")
        self.process.stdin.flush()
        return float(self._read()["cpu_seconds"])

    def close(self):
        self.process.stdin.write("quit\n")
        self.process.stdin.flush()
        peak = self._read()["peak_rss_mb"]
        self.process.wait()
        return peak


# --- Driver: runs our side in this process (TensorFlow) ---------------------


def keras_step(args, jit_compile):
    """Builds and warms up our NBN network; returns its step and facts."""
    _, nbn = common.build_bn_and_nbn(
        args.arch, args.image_size, args.num_classes
    )
    common.compile_for_training(
        nbn, jit_compile=jit_compile, weight_decay=args.weight_decay
    )
    images, labels = common.random_batch(
        args.batch_size, args.image_size, args.num_classes
    )
    step = common.train_step_fn(nbn, images, labels)
    for _ in range(args.warmup):
        step()
    params = sum(math.prod(v.shape) for v in nbn.trainable_variables)
    return step, common.count_nbn_layers(nbn), params


def driver(args):
    import keras
    import tensorflow as tf

    common.set_tf_threads(args.threads)
    steps, described = {}, {}
    workers = {REFERENCE: TorchWorker(args, channels_last=False)}
    if args.torch_channels_last:
        workers[REFERENCE + ", channels_last"] = TorchWorker(
            args, channels_last=True
        )
    for name, worker in workers.items():
        # One step per call: the pipe round trip is far below a step's time.
        steps[name] = lambda worker=worker: worker.run(1)
        info = worker.info
        described[name] = (
            f"torch {info['torch']}", info["nbn_layers"], info["params"]
        )
    keras_variants = {"nbn_keras": False}
    if args.xla:
        keras_variants["nbn_keras, XLA"] = True
    for name, jit_compile in keras_variants.items():
        step, nbn_layers, params = keras_step(args, jit_compile)
        steps[name] = step
        described[name] = (
            f"TF {tf.__version__}, Keras {keras.__version__}", nbn_layers, params
        )

    order = list(keras_variants) + list(workers)
    step_time = min(common.interleaved_timings(steps, 1, 1)[0].values())[0]
    per_round = max(1, round(args.round_seconds / step_time))
    wall, cpu = common.interleaved_timings(
        {name: steps[name] for name in order}, args.rounds, per_round
    )
    peaks = {name: worker.close() for name, worker in workers.items()}

    rows = []
    for name in order:
        stack, nbn_layers, params = described[name]
        seconds = common.median(wall[name])
        rows.append([
            name,
            stack,
            nbn_layers,
            f"{params:,}",
            f"{seconds:.2f}",
            f"{common.median(cpu[name]):.2f}",
            f"{args.batch_size / seconds:.2f}",
            f"{common.paired_ratio(wall, REFERENCE, name):.2f}",
            f"{common.paired_ratio(cpu, REFERENCE, name):.2f}",
            f"{100 * common.spread(wall[name]):.0f}%",
        ])
    print()
    print(common.machine_line(args.threads))
    print(
        f"{ARCH_NAMES[args.arch]} + NBN training, input {args.image_size}x{args.image_size}, "
        f"batch {args.batch_size}, {args.num_classes} classes, SGD momentum 0.9, "
        f"weight decay {args.weight_decay}, cross-entropy, float32; "
        f"{args.rounds} rounds x {per_round} steps per variant"
    )
    print(common.format_table(
        ["implementation", "stack", "NBN layers", "trainable params",
         "s/step", "CPU s/step", "img/s",
         "throughput / authors' (wall, paired median)",
         "same, from CPU time", "wall spread"],
        rows,
    ))
    print("peak RSS of the PyTorch workers (MiB): " + ", ".join(
        f"{name}: {peak:.0f}" for name, peak in peaks.items()
    ))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nbn_repo", required=True,
                        help="Path of a checkout of the authors' NBN code.")
    parser.add_argument("--arch", choices=sorted(ARCH_NAMES), default="resnet50",
                        help="The network, on both sides.")
    parser.add_argument("--torch_python", default="python",
                        help="A Python interpreter that can import torch.")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="Intra-op and inter-op threads of each side.")
    parser.add_argument("--weight_decay", type=float, default=5e-4,
                        help="Coupled L2 weight decay on both sides "
                             "(the authors' default is 5e-4).")
    parser.add_argument("--rounds", type=int, default=8,
                        help="Alternating timing rounds.")
    parser.add_argument("--round_seconds", type=float, default=3.0,
                        help="About how long each variant runs per round.")
    parser.add_argument("--warmup", type=int, default=3,
                        help="Untimed steps per variant before timing.")
    parser.add_argument("--xla", action="store_true",
                        help="Also time our side compiled with XLA.")
    parser.add_argument("--torch_channels_last", action="store_true",
                        help="Also time their model in channels-last memory "
                             "format (not what their code does).")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--channels_last", action="store_true",
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        torch_worker(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
