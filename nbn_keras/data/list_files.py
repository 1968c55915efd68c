"""ImageNet-LT, Places-LT and iNaturalist-2018 from list files.

These benchmarks are distributed as text files with one
`relative/path/to/image.jpg label` line per image (the path may contain
spaces: the label is the last field), against an image root the user
downloads separately. Lines end in `\\n`, `\\r\\n` or `\\r`.

Format: the file is UTF-8 (a byte-order mark is accepted; paths may use any
script). The label is the last field, separated from the path by spaces or
tabs (other Unicode spaces belong to the path), written with the ASCII
digits 0-9. Blank lines are ignored, and so are comments: lines whose first
non-blank character is `#` followed by a space, a tab or the end of the
line. Any other line is an entry, so `#1/a.jpg 3` names the file `#1/a.jpg`;
a path that starts with `# ` is written `./# a.jpg`. A path cannot start or
end with spaces or tabs.

Errors, decided here (each names the list file and line where there is
one):

- A file that is not UTF-8, and a malformed line (not "path label", or a
  label that is not a non-negative integer of ASCII digits below 2**31:
  `-1`, `cat`, Arabic-Indic or fullwidth digits) raise `ValueError`.
- A path listed twice in one list (compared after normalisation, so `a.jpg`
  and `./a.jpg` are the same) raises `ValueError`: duplicate lines change
  class sizes. `allow_duplicate_paths=True` accepts repeats with the same
  label (oversampling on purpose); one path under two labels is always an
  error.
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

import codecs
import os
import posixpath
import re
import unicodedata

import numpy as np
import tensorflow as tf

from nbn_keras.data import base
from nbn_keras.data import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INATURALIST_MEAN = (0.466, 0.471, 0.380)
INATURALIST_STD = (0.195, 0.194, 0.192)
BAD_IMAGE_POLICIES = ("error", "skip")
LABEL_LIMIT = 2**31 - 1  # Labels are stored as int32.
# The path is everything before the last run of spaces or tabs.
_ENTRY = re.compile(r"(.+?)[ \t]+([^ \t]+)", re.DOTALL)
_ASCII_DIGITS = re.compile(r"[0-9]+")
_BLANKS = " \t\r\n\f\v"
_UTF16_32_BOMS = (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE, codecs.BOM_UTF16_LE,
                  codecs.BOM_UTF16_BE)


def _leaves_root(relative):
    """Whether a listed path names something outside its image root."""
    if os.path.isabs(relative) or "://" in relative:
        return True
    normal = posixpath.normpath(relative)
    return normal == ".." or normal.startswith("../")


def _read_lines(list_file):
    """Yields `(line number, text)` of a UTF-8 list file, blanks stripped."""
    with tf.io.gfile.GFile(list_file, "rb") as f:
        data = f.read()
    if data.startswith(_UTF16_32_BOMS):
        raise ValueError(
            f"{list_file}: the file is UTF-16 or UTF-32 encoded (it starts with "
            "that byte-order mark); list files must be UTF-8."
        )
    data = data[len(codecs.BOM_UTF8):] if data.startswith(codecs.BOM_UTF8) else data
    # Lines end in \n, \r\n or \r (bytes.splitlines knows no other breaks).
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(
                f"{list_file}, line {number}: not valid UTF-8 (byte "
                f"{raw[error.start:error.start + 1]!r} at column {error.start + 1}); "
                "list files must be UTF-8 (a byte-order mark is accepted)."
            ) from None
        yield number, text.strip(_BLANKS)


def _is_comment(text):
    """Whether a stripped line is a comment: `#`, then a blank or nothing."""
    return text == "#" or text.startswith(("# ", "#\t"))


def _label_problem(label):
    """Why the text `label` is not a valid label; `None` when it is one."""
    if _ASCII_DIGITS.fullmatch(label):
        if int(label) > LABEL_LIMIT:
            return f"the label {label} is larger than {LABEL_LIMIT}"
        return None
    if label.startswith("-") and _ASCII_DIGITS.fullmatch(label[1:]):
        return f"the label {label} is negative"
    foreign = sorted({c for c in label if c.isdigit() and not "0" <= c <= "9"})
    if foreign:
        named = ", ".join(f"U+{ord(c):04X} {unicodedata.name(c, '?')}" for c in foreign)
        return f"the label {label!r} has digits other than ASCII 0-9 ({named})"
    return f"the label {label!r} is not an integer"


def _parse_entry(list_file, number, text):
    """`(relative path, label)` of an entry line; raises naming the line."""
    match = _ENTRY.fullmatch(text)
    problem = "there is no label" if match is None else _label_problem(match[2])
    if problem:
        raise ValueError(
            f"{list_file}, line {number}: expected 'relative/path label' with an "
            f"integer label >= 0, got {text!r}: {problem}."
        )
    return match[1], int(match[2])


def _check_duplicates(list_file, relatives, labels, lines, allow_duplicate_paths):
    """Raises on a path listed twice (always when under two labels)."""
    first = {}
    repeats, conflicts = [], []
    for relative, label, number in zip(relatives, labels, lines):
        key = posixpath.normpath(relative)
        if key not in first:
            first[key] = (number, label)
            continue
        seen_at, seen_label = first[key]
        (conflicts if label != seen_label else repeats).append(
            (number, relative, label, seen_at, seen_label))
    if conflicts:
        number, relative, label, seen_at, seen_label = conflicts[0]
        raise ValueError(
            f"{list_file}, line {number}: {relative!r} has label {label}, but line "
            f"{seen_at} lists it with label {seen_label}; one image cannot have two "
            f"labels ({len(conflicts)} such line(s) in this list)."
        )
    if repeats and not allow_duplicate_paths:
        number, relative, _, seen_at, _ = repeats[0]
        raise ValueError(
            f"{list_file}, line {number}: {relative!r} is listed again (first on line "
            f"{seen_at}); {len(repeats)} duplicate line(s) in this list, which change "
            "the class sizes. Remove them, or pass allow_duplicate_paths=True "
            "(--allow_duplicate_paths) to oversample on purpose."
        )


def parse_list_file(list_file, image_root="", allow_outside_image_root=False,
                    allow_duplicate_paths=False):
    """Reads a `relative/path label` list file.

    The format (UTF-8, comments, separators) and its errors are in the
    module docstring; every error names the file and line.

    Args:
        list_file: Path of the list file.
        image_root: Directory the relative paths start from.
        allow_outside_image_root: Accept absolute paths and paths that
            leave `image_root` with `..`; refused by default.
        allow_duplicate_paths: Accept a path listed more than once with the
            same label (each line is one training example); refused by
            default.

    Returns:
        `(paths, labels, line_numbers)`: numpy arrays of full paths (str),
        int32 labels and the 1-based line of each entry.

    Example:

    >>> paths, labels, _ = parse_list_file("ImageNet_LT_train.txt", "/data/imagenet")
    """
    if not tf.io.gfile.exists(list_file):
        raise FileNotFoundError(f"List file not found: {list_file}")
    relatives, labels, lines = [], [], []
    for number, text in _read_lines(list_file):
        if not text or _is_comment(text):
            continue
        relative, label = _parse_entry(list_file, number, text)
        if not allow_outside_image_root and _leaves_root(relative):
            raise ValueError(
                f"{list_file}, line {number}: the path {relative!r} is outside the "
                f"image root {image_root!r}. Listed paths must be relative and stay "
                "inside it; pass allow_outside_image_root=True to allow such paths."
            )
        relatives.append(relative)
        labels.append(label)
        lines.append(number)
    if not relatives:
        raise ValueError(f"{list_file}: no entries.")
    _check_duplicates(list_file, relatives, labels, lines, allow_duplicate_paths)
    paths = [os.path.join(image_root, relative) for relative in relatives]
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
        present = np.unique(train_labels)
        if present.size < num_classes:
            # The first 5 missing classes are below present.size + 5 (no
            # arange over a stray label of 2**31 - 1).
            missing = np.setdiff1d(np.arange(min(num_classes, present.size + 5)), present)
            count = num_classes - present.size
            at = int(np.argmax(train_labels))
            shown = ", ".join(str(c) for c in missing[:5]) + (", ..." if count > 5 else "")
            raise ValueError(
                f"{train_file}, line {train_lines[at]}: label {num_classes - 1} makes "
                f"{num_classes} classes, but {count} of them ({shown}) have no "
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
                      on_bad_image="error", allow_outside_image_root=False,
                      allow_duplicate_paths=False):
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
        allow_duplicate_paths: Accept a path listed more than once in a
            list with the same label, e.g. to oversample on purpose (refused
            by default; two labels for one path are always refused).

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
    parsed = {split: parse_list_file(list_file, image_root, allow_outside_image_root,
                                     allow_duplicate_paths)
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
