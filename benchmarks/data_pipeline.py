"""Input pipeline throughput against what a training step consumes.

Measures, on this machine:

1. The CIFAR-LT training pipeline (pad-crop-flip augmentation, instance and
   class-balanced samplers) on random CIFAR-shaped uint8 images with the
   CIFAR-10-LT IF 100 class counts, through `make_train_dataset`.
2. The ImageNet-LT training pipeline (JPEG decode, random-resized crop 224,
   flip, colour jitter) on generated JPEGs of ImageNet-like sizes written to
   a temporary directory, through the list-file loader.
3. The training-step throughput of ResNet-32 (32x32) and ResNet-50
   (224x224) on a fixed in-memory batch, without any input pipeline.

and prints images/s and the ratio pipeline / model (the pipeline should
outrun the model by at least 5x so that it never starves it).

Usage:

    python benchmarks/data_pipeline.py [--batches 60] [--jpegs 256]
"""

import argparse
import os
import tempfile
import time

import numpy as np
import tensorflow as tf

import nbn_keras.data as nbn_data
from nbn_keras.data import base
from nbn_keras.data import long_tail


def pipeline_rate(ds, batches, warmup=5):
    iterator = iter(ds)
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    images = 0
    for _ in range(batches):
        x, _ = next(iterator)
        images += int(x.shape[0])
    return images / (time.perf_counter() - start)


def model_rate(backbone, input_shape, num_classes, batch, steps, warmup=2):
    import keras

    from nbn_keras.models import registry as backbones

    model = backbones.build_classifier(backbone, num_classes=num_classes,
                                       input_shape=input_shape)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=False)
    rng = np.random.RandomState(0)
    x = tf.constant(rng.uniform(0, 255, (batch,) + input_shape).astype(np.float32))
    y = tf.constant(rng.randint(0, num_classes, batch).astype(np.int32))
    for _ in range(warmup):
        model.train_on_batch(x, y)
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    return batch * steps / (time.perf_counter() - start)


def cifar_data():
    counts = long_tail.class_counts(10, 5000, 100)
    labels = np.repeat(np.arange(10), counts)
    images = np.random.RandomState(0).randint(0, 256, (len(labels), 32, 32, 3), np.uint8)
    split = base.Split(images, labels)
    return base.LongTailedData("cifar10_lt_synthetic", split, split, split, 10, (32, 32, 3),
                               (0.5,) * 3, (0.25,) * 3, recipe="cifar")


def write_jpegs(directory, count, num_classes=10, seed=0):
    """Smooth random images (they compress like photos) of ImageNet-like sizes."""
    rng = np.random.RandomState(seed)
    lines = []
    for i in range(count):
        height, width = rng.randint(300, 500), rng.randint(350, 500)
        coarse = rng.uniform(0, 255, (1, height // 16 + 1, width // 16 + 1, 3)).astype(np.float32)
        image = tf.image.resize(coarse, [height, width], method="bicubic")[0]
        image = tf.cast(tf.clip_by_value(image + rng.normal(0, 8, image.shape), 0, 255), tf.uint8)
        name = f"class_{i % num_classes}/img_{i}.jpg"
        os.makedirs(os.path.join(directory, os.path.dirname(name)), exist_ok=True)
        tf.io.write_file(os.path.join(directory, name), tf.io.encode_jpeg(image, quality=90))
        lines.append(f"{name} {i % num_classes}")
    list_file = os.path.join(directory, "train.txt")
    with open(list_file, "w") as f:
        f.write("\n".join(lines) + "\n")
    return list_file


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=60, help="CIFAR batches timed")
    parser.add_argument("--cifar-batch", type=int, default=128)
    parser.add_argument("--imagenet-batch", type=int, default=32)
    parser.add_argument("--imagenet-batches", type=int, default=12)
    parser.add_argument("--jpegs", type=int, default=256)
    parser.add_argument("--model-steps", type=int, default=5)
    args = parser.parse_args()

    rows = []
    cifar = cifar_data()
    resnet32 = model_rate("resnet32", (32, 32, 3), 10, args.cifar_batch, args.model_steps)
    for sampler in ("instance", "class_balanced"):
        ds = nbn_data.make_train_dataset(cifar, args.cifar_batch, sampler=sampler)
        rows.append((f"CIFAR-LT aug, {sampler}", pipeline_rate(ds, args.batches),
                     "resnet32 32x32", resnet32))

    with tempfile.TemporaryDirectory() as directory:
        list_file = write_jpegs(directory, args.jpegs)
        imagenet = nbn_data.load("imagenet_lt", train_list=list_file, val_list=list_file,
                                 image_root=directory)
        ds = nbn_data.make_train_dataset(imagenet, args.imagenet_batch, sampler="instance")
        jpeg_rate = pipeline_rate(ds, args.imagenet_batches, warmup=2)
    resnet50 = model_rate("resnet50", (224, 224, 3), 1000, 16, args.model_steps)
    rows.append(("ImageNet-LT JPEG aug", jpeg_rate, "resnet50 224x224", resnet50))

    print(f"\nTensorFlow {tf.__version__}, {os.cpu_count()} CPU cores, "
          f"GPUs: {len(tf.config.list_physical_devices('GPU'))}")
    header = f"{'pipeline':<30}{'img/s':>10}  {'model step':<18}{'img/s':>9}{'ratio':>8}"
    print(header)
    print("-" * len(header))
    for name, rate, model, step in rows:
        print(f"{name:<30}{rate:>10.0f}  {model:<18}{step:>9.1f}{rate / step:>8.1f}")


if __name__ == "__main__":
    main()
