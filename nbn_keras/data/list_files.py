"""ImageNet-LT, Places-LT and iNaturalist-2018 from list files.

These benchmarks are distributed as text files with one
`relative/path/to/image.jpg label` line per image (the path may contain
spaces: the label is the last field), against an image root the user
downloads separately. Blank lines and lines starting with `#` are ignored.

Errors, decided here:

- A malformed line (not "path label", or a label that is not a
  non-negative integer) raises `ValueError` naming the list file and line
  number.
- A missing image file raises `FileNotFoundError` at load time naming the
  file and the list line that refers to it (checked eagerly, one stat per
  file; `check_files=False` turns this off).
- A file that is not an image fails during iteration with an
  `InvalidArgumentError` naming the file (see `transforms.read_image_file`).
- With `on_bad_image="skip"`, missing files are dropped instead, and every
  image is decoded once at load time (parallel tf.data pass; slow for large
  sets) to drop undecodable ones too. Skipped paths are kept, per split, in
  `LongTailedData.skipped` and written by `write_subset`.
"""

import os

import numpy as np
import tensorflow as tf

from nbn_keras.data import base
from nbn_keras.data import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INATURALIST_MEAN = (0.466, 0.471, 0.380)
INATURALIST_STD = (0.195, 0.194, 0.192)
BAD_IMAGE_POLICIES = ("error", "skip")


def parse_list_file(list_file, image_root=""):
    """Reads a `relative/path label` list file.

    Args:
        list_file: Path of the list file.
        image_root: Directory the relative paths start from.

    Returns:
        `(paths, labels, line_numbers)`: numpy arrays of full paths (str),
        int32 labels and the 1-based line of each entry.

    Example:

    >>> paths, labels, _ = parse_list_file("ImageNet_LT_train.txt", "/data/imagenet")
    """
    paths, labels, lines = [], [], []
    with tf.io.gfile.GFile(list_file) as f:
        for number, line in enumerate(f, start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            fields = text.rsplit(None, 1)
            if len(fields) != 2 or not fields[1].isdigit():
                raise ValueError(
                    f"{list_file}, line {number}: expected 'relative/path label' with an "
                    f"integer label >= 0, got {text!r}"
                )
            paths.append(os.path.join(image_root, fields[0]))
            labels.append(int(fields[1]))
            lines.append(number)
    if not paths:
        raise ValueError(f"{list_file}: no entries.")
    return np.asarray(paths), np.asarray(labels, np.int32), np.asarray(lines)


def find_undecodable(paths):
    """Paths among `paths` that cannot be read and decoded as images.

    Decodes every file once in a parallel tf.data pass.

    Args:
        paths: Sequence of image paths.

    Returns:
        A list of the paths that failed.
    """
    def decode(position, path):
        data, _ = transforms.read_image_file(path)
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        with tf.control_dependencies([image]):
            return tf.identity(position)

    ds = tf.data.Dataset.from_tensor_slices((np.arange(len(paths)), np.asarray(paths)))
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors().batch(4096)
    good = np.zeros(len(paths), bool)
    for positions in ds.as_numpy_iterator():
        good[positions] = True
    return [str(p) for p, ok in zip(paths, good) if not ok]


def _exists(path):
    return tf.io.gfile.exists(path) if "://" in path else os.path.exists(path)


def _read_split(list_file, image_root, check_files, on_bad_image):
    paths, labels, lines = parse_list_file(list_file, image_root)
    skipped = []
    if check_files or on_bad_image == "skip":
        present = np.asarray([_exists(p) for p in paths], bool)
        if not present.all():
            if on_bad_image == "error":
                first = int(np.flatnonzero(~present)[0])
                raise FileNotFoundError(
                    f"Image file not found: {paths[first]} (listed in {list_file}, line "
                    f"{lines[first]}); {int((~present).sum())} file(s) missing in total. "
                    "Pass on_bad_image='skip' to drop them."
                )
            skipped = paths[~present].tolist()
            paths, labels = paths[present], labels[present]
    if on_bad_image == "skip":
        bad = find_undecodable(paths)
        if bad:
            keep = ~np.isin(paths, bad)
            skipped += bad
            paths, labels = paths[keep], labels[keep]
    return base.Split(paths, labels), skipped


def load_list_file_lt(train_list, val_list, image_root, test_list=None, name="imagenet_lt",
                      recipe="imagenet", image_size=224, num_classes=None, mean=IMAGENET_MEAN,
                      std=IMAGENET_STD, class_names=None, check_files=True,
                      on_bad_image="error"):
    """A long-tailed set described by list files (ImageNet-LT style).

    Args:
        train_list: Training list file (`relative/path label` lines).
        val_list: Validation list file (model selection).
        image_root: Directory (or `gs://` URL) the listed paths start from.
        test_list: Test list file; `None` uses the validation list as test
            (iNaturalist 2018 has no separate test set).
        name: Name recorded in the returned object.
        recipe: `"imagenet"` (with colour jitter) or `"inaturalist"`.
        image_size: Side of the square crops (224).
        num_classes: Number of classes; `None` infers `max label + 1`.
        mean: Per-channel mean in [0, 1] units.
        std: Per-channel standard deviation in [0, 1] units.
        class_names: Optional class names.
        check_files: Check at load time that every listed file exists.
        on_bad_image: `"error"` or `"skip"` (see the module docstring).

    Returns:
        A `LongTailedData` whose records are file paths.

    Example:

    >>> data = load_list_file_lt("ImageNet_LT_train.txt", "ImageNet_LT_val.txt",
    ...                          "/data/imagenet", test_list="ImageNet_LT_test.txt")
    """
    if recipe not in transforms.FILE_RECIPES:
        raise ValueError(f"`recipe` must be one of {transforms.FILE_RECIPES}. Received: {recipe!r}")
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(
            f"`on_bad_image` must be one of {BAD_IMAGE_POLICIES}. Received: {on_bad_image!r}"
        )
    lists = {"train": train_list, "val": val_list, "test": test_list or val_list}
    splits, skipped = {}, {}
    for split, list_file in lists.items():
        if split == "test" and test_list is None:
            splits[split], skipped[split] = splits["val"], skipped["val"]
            continue
        splits[split], skipped[split] = _read_split(list_file, image_root, check_files,
                                                    on_bad_image)
    largest = max(int(s.labels.max()) for s in splits.values())
    if num_classes is None:
        num_classes = largest + 1
    elif largest >= num_classes:
        raise ValueError(f"`num_classes`={num_classes} but a list has label {largest}.")
    return base.LongTailedData(
        name=name,
        train_split=splits["train"],
        val_split=splits["val"],
        test_split=splits["test"],
        num_classes=num_classes,
        image_shape=(image_size, image_size, 3),
        mean=mean,
        std=std,
        recipe=recipe,
        class_names=class_names,
        skipped={k: v for k, v in skipped.items() if v},
        info={"lists": lists, "image_root": image_root, "on_bad_image": on_bad_image},
    )
