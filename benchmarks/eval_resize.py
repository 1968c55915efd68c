"""The evaluation transform against torchvision's, on JPEG files.

For each file, the 224x224 input of the data pipeline's evaluation transform
(`nbn_keras.data.transforms.center_crop_resize`) and of the transform the NBN
authors evaluate with (torchvision `Resize(256)`, `CenterCrop(224)` on a PIL
image: PIL's antialiased bilinear resize), restated with PIL since
torchvision is not installed beside torch here. Also the transform this
project used before (the central square cut from the original, then
resized bilinear without antialiasing). Prints the pixel differences and the
logit differences of a ResNet-50 (seeded random weights: only the relative
size of the differences means anything) against the PIL inputs.

    python benchmarks/eval_resize.py IMAGE.jpg [IMAGE.jpg ...]
"""

import argparse

import common  # noqa: F401  (quiet TensorFlow)
import numpy as np
import tensorflow as tf
from PIL import Image

from nbn_keras.models.registry import build_classifier
from nbn_keras.data import transforms

SIZE, SHORT = 224, 256


def torchvision_style(path):
    """`Resize(256)` then `CenterCrop(224)` of the PIL image, as torchvision does."""
    image = Image.open(path).convert("RGB")
    width, height = image.size
    if width <= height:
        size = (SHORT, int(SHORT * height / width))
    else:
        size = (int(SHORT * width / height), SHORT)
    image = image.resize(size, Image.BILINEAR)
    top = int(round((size[1] - SIZE) / 2.0))
    left = int(round((size[0] - SIZE) / 2.0))
    return np.asarray(image.crop((left, top, left + SIZE, top + SIZE)), np.float32)


def previous_transform(data):
    """The former evaluation transform: central square, resize, no antialiasing."""
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    shape = tf.shape(image)
    short = tf.cast(tf.minimum(shape[0], shape[1]), tf.float32)
    side = tf.cast(tf.round(short / (SHORT / SIZE)), tf.int32)
    image = tf.image.crop_to_bounding_box(
        image, (shape[0] - side) // 2, (shape[1] - side) // 2, side, side)
    return tf.image.resize(image, [SIZE, SIZE], method="bilinear")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+")
    args = parser.parse_args()
    reference = np.stack([torchvision_style(p) for p in args.images])
    data = [tf.io.read_file(p) for p in args.images]
    ours = np.stack([transforms.center_crop_resize(d, None, SIZE).numpy() for d in data])
    before = np.stack([previous_transform(d).numpy() for d in data])
    tf.keras.utils.set_random_seed(0)
    model = build_classifier("resnet50", 1000, (SIZE, SIZE, 3),
                             mean=common.IMAGENET_MEAN, std=common.IMAGENET_STD)
    logits = {name: model.predict(x, batch_size=2, verbose=0)
              for name, x in (("pil", reference), ("ours", ours), ("before", before))}
    print(f"{len(args.images)} JPEG files; differences from torchvision-style PIL input\n")
    print("| transform | pixels: mean abs | pixels: max abs | logits: max abs "
          "| logits: max abs / max abs PIL logit | top-1 same |")
    print("|---|---|---|---|---|---|")
    scale = np.abs(logits["pil"]).max()
    for name, x in (("antialiased (now)", ours), ("no antialiasing (before)", before)):
        key = "ours" if x is ours else "before"
        diff = np.abs(logits[key] - logits["pil"])
        same = np.mean(logits[key].argmax(1) == logits["pil"].argmax(1))
        print(f"| {name} | {np.abs(x - reference).mean():.3f} | {np.abs(x - reference).max():.0f} "
              f"| {diff.max():.4g} | {diff.max() / scale:.2e} | {same:.0%} |")


if __name__ == "__main__":
    main()
