"""ImageNet-LT, Places-LT and iNaturalist-2018 from list files.

These benchmarks are distributed as text files with one
`relative/path/to/image.jpg label` line per image (the path may contain
spaces: the label is the last field), against an image root the user
downloads separately. Blank lines and lines starting with `#` are ignored.

Errors, decided here (each names the list file and line where there is
one):

- A malformed line (not "path label", or a label that is not a
  non-negative integer) raises `ValueError`.
- A label outside `[0, num_classes)` raises `ValueError`. Without
  `num_classes` the training list decides it (`max label + 1`), every class
  below that must occur in it (a stray `999` in a 10-class list is an
  error, not 990 empty classes) and the validation and test lists are held
  to it.
- A path that leaves the image root (`../x`, `/etc/passwd`) raises
  `ValueError` unless `allow_outside_image_root=True`. The check is on the
  listed text only: symbolic links inside the image root are followed.
- A missing image file raises `FileNotFoundError` at load time naming the
  file and the list line that refers to it (checked eagerly, one stat per
  file; `check_files=False` turns this off).
- A file that cannot be read or decoded fails during iteration with an
  `InvalidArgumentError` naming the file (see
  `transforms.map_image_files`).
- With `on_bad_image="skip"`, missing files are dropped instead, and every
  image is decoded in full once at load time (parallel tf.data pass; slow
  for large sets) to drop those that do not decode completely too (a JPEG
  with a valid header and corrupt or truncated data included). Skipped
  paths are kept, per split, in `LongTailedData.skipped` and written by
  `write_subset`.
"""

import os
import posixpath

import numpy as np
import tensorflow as tf

from nbn_keras.data import base
from nbn_keras.data import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INATURALIST_MEAN = (0.466, 0.471, 0.380)
INATURALIST_STD = (0.195, 0.194, 0.192)
BAD_IMAGE_POLICIES = ("error", "skip")


def _leaves_root(relative):
    """Whether a listed path names something outside its image root."""
    if os.path.isabs(relative) or "://" in relative:
        return True
    normal = posixpath.normpath(relative)
    return normal == ".." or normal.startswith("../")


def parse_list_file(list_file, image_root="", allow_outside_image_root=False):
    """Reads a `relative/path label` list file.

    Args:
        list_file: Path of the list file.
        image_root: Directory the relative paths start from.
        allow_outside_image_root: Accept absolute paths and paths that
            leave `image_root` with `..`; refused by default.

    Returns:
        `(paths, labels, line_numbers)`: numpy arrays of full paths (str),
        int32 labels and the 1-based line of each entry.

    Example:

    >>> paths, labels, _ = parse_list_file("ImageNet_LT_train.txt", "/data/imagenet")
    """
    if not tf.io.gfile.exists(list_file):
        raise FileNotFoundError(f"List file not found: {list_file}")
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
            if not allow_outside_image_root and _leaves_root(fields[0]):
                raise ValueError(
                    f"{list_file}, line {number}: the path {fields[0]!r} is outside the "
                    f"image root {image_root!r}. Listed paths must be relative and stay "
                    "inside it; pass allow_outside_image_root=True to allow such paths."
                )
            paths.append(os.path.join(image_root, fields[0]))
            labels.append(int(fields[1]))
            lines.append(number)
    if not paths:
        raise ValueError(f"{list_file}: no entries.")
    return np.asarray(paths), np.asarray(labels, np.int32), np.asarray(lines)


def find_undecodable(paths):
    """Paths among `paths` that cannot be read and decoded in full.

    Decodes every file completely once in a parallel tf.data pass (the
    training pipeline decodes only a crop window of JPEGs, which can hide a
    corrupt or truncated end of file).

    Args:
        paths: Sequence of image paths.

    Returns:
        A list of the paths that failed.
    """
    def decode(position, path):
        data, _ = transforms.read_image_file(path)
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        # Returning something computed from the pixels keeps the decode in
        # the graph (an unused result would be pruned).
        return position, tf.size(image) > 0

    ds = tf.data.Dataset.from_tensor_slices((np.arange(len(paths)), np.asarray(paths)))
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors().batch(4096)
    good = np.zeros(len(paths), bool)
    for positions, nonempty in ds.as_numpy_iterator():
        good[positions] = nonempty
    return [str(p) for p, ok in zip(paths, good) if not ok]


def _exists(path):
    return tf.io.gfile.exists(path) if "://" in path else os.path.exists(path)


def _check_labels(lists, parsed, num_classes):
    """Checks every label against `[0, num_classes)`; returns num_classes.

    With `num_classes=None` it is `max training label + 1`, and every class
    below it must occur in the training list.
    """
    train_file, (_, train_labels, train_lines) = lists["train"], parsed["train"]
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1
        missing = np.setdiff1d(np.arange(num_classes), train_labels)
        if missing.size:
            at = int(np.argmax(train_labels))
            shown = ", ".join(str(c) for c in missing[:5]) + (", ..." if missing.size > 5 else "")
            raise ValueError(
                f"{train_file}, line {train_lines[at]}: label {num_classes - 1} makes "
                f"{num_classes} classes, but {missing.size} of them ({shown}) have no "
                "training image. Fix the label, or pass num_classes if the data set "
                "really has classes without training images."
            )
        source = (f"num_classes={num_classes}, inferred from the training list; pass "
                  "num_classes if the data set has more classes")
    else:
        if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1:
            raise ValueError(f"`num_classes` must be a positive integer. Received: {num_classes!r}")
        num_classes = int(num_classes)
        source = f"num_classes={num_classes}"
    for split, (_, labels, lines) in parsed.items():
        bad = np.flatnonzero(labels >= num_classes)
        if bad.size:
            first = int(bad[0])
            raise ValueError(
                f"{lists[split]}, line {lines[first]}: label {labels[first]} is not in "
                f"[0, {num_classes}) ({source}); {bad.size} line(s) of this list are "
                "out of range."
            )
    return num_classes


def _read_split(list_file, parsed, check_files, on_bad_image):
    paths, labels, lines = parsed
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
                      on_bad_image="error", allow_outside_image_root=False):
    """A long-tailed set described by list files (ImageNet-LT style).

    Every list is parsed and its labels and paths checked before any image
    file is looked at (see the module docstring for the errors).

    Args:
        train_list: Training list file (`relative/path label` lines).
        val_list: Validation list file (model selection).
        image_root: Directory (or `gs://` URL) the listed paths start from.
        test_list: Test list file; `None` uses the validation list as test
            (iNaturalist 2018 has no separate test set).
        name: Name recorded in the returned object.
        recipe: `"imagenet"` (with colour jitter) or `"inaturalist"`.
        image_size: Side of the square crops (224).
        num_classes: Number of classes; every label of every list must be in
            `[0, num_classes)`. `None` infers `max training label + 1` and
            requires each of those classes to occur in the training list.
        mean: Per-channel mean in [0, 1] units.
        std: Per-channel standard deviation in [0, 1] units.
        class_names: Optional class names.
        check_files: Check at load time that every listed file exists.
        on_bad_image: `"error"` or `"skip"` (see the module docstring).
        allow_outside_image_root: Accept listed paths that are absolute or
            leave `image_root` with `..` (refused by default).

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
    lists = {"train": train_list, "val": val_list}
    if test_list is not None:
        lists["test"] = test_list
    parsed = {split: parse_list_file(list_file, image_root, allow_outside_image_root)
              for split, list_file in lists.items()}
    num_classes = _check_labels(lists, parsed, num_classes)
    splits, skipped = {}, {}
    for split, list_file in lists.items():
        splits[split], skipped[split] = _read_split(list_file, parsed[split], check_files,
                                                    on_bad_image)
    if test_list is None:
        splits["test"], skipped["test"] = splits["val"], skipped["val"]
        lists["test"] = val_list
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
