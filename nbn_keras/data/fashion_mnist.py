"""Fashion-MNIST-LT: a real long-tailed benchmark that works offline.

Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017; Zalando, MIT/Expat licence)
has 60,000 training and 10,000 test images, 28x28 grey, 10 classes of 6,000
and 1,000. The split:

1. Per class, after a shuffle with `split_seed`, the first `val_per_class`
   training images (default 500) form the balanced validation split, used
   for model selection. The other 5,500 per class are the training pool.
2. The long-tailed training set is cut from the pool with the standard
   profiles (`nbn_keras.data.long_tail`), `n_max` 5000 by default, so the
   class counts are CIFAR-10-LT's (12,406 images at imbalance factor 100).
3. The 10,000 test images are the balanced test split.

The images are read, in this order, from: a prepared TFDS `fashion_mnist`
(never downloading), the four idx `.gz` files in `idx_dir`, the Debian /
Ubuntu package `dataset-fashion-mnist` (`DEBIAN_DIR`). Only with
`download=True` does TFDS download the set when none is found. Every idx
file is checked against `KNOWN_SHA256` before it is parsed.

Indices of the subset refer to the training split in the idx files' order;
a TFDS copy (which does not keep that order) is used in its read order with
`shuffle_files=False`, and the subset file says which.
"""

import gzip
import hashlib
import os

import numpy as np

from nbn_keras.data import base
from nbn_keras.data import digits
from nbn_keras.data import long_tail

NUM_CLASSES = 10
N_MAX = 5000
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot"]
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# The files of github.com/zalandoresearch/fashion-mnist, as registered by
# tensorflow-datasets 4.9 (tensorflow_datasets/url_checksums/fashion_mnist.txt)
# and downloaded, unchecked, by keras.datasets.
UPSTREAM_SHA256 = {
    "train-images-idx3-ubyte.gz":
        "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    "train-labels-idx1-ubyte.gz":
        "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    "t10k-images-idx3-ubyte.gz":
        "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "t10k-labels-idx1-ubyte.gz":
        "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}
# Debian's dataset-fashion-mnist 0.0~git20200523.55506a9-1 (`sha256sum` of
# the installed files): the same compressed data, but Debian rewrote the
# gzip header (no file name, another time stamp).
DEBIAN_SHA256 = {
    "train-images-idx3-ubyte.gz":
        "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz":
        "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz":
        "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz":
        "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
KNOWN_SHA256 = {name: (UPSTREAM_SHA256[name], DEBIAN_SHA256[name]) for name in UPSTREAM_SHA256}
_IDX_UBYTE = 0x08
_PAD = 2  # 28x28 -> 32x32


def parse_idx(data, source="idx data"):
    """Parses uncompressed idx bytes of unsigned bytes (LeCun's MNIST format).

    Args:
        data: The bytes: two zero bytes, type code 0x08, the number of
            dimensions, each dimension as a big-endian uint32, the values.
        source: Name used in error messages.

    Returns:
        A uint8 array of the stored shape.

    Example:

    >>> parse_idx(bytes([0, 0, 8, 1, 0, 0, 0, 2, 7, 9]))
    array([7, 9], dtype=uint8)
    """
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != _IDX_UBYTE:
        raise ValueError(f"{source}: not an idx file of unsigned bytes (header "
                         f"{data[:4].hex() or 'empty'}).")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    values = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if values.size != int(np.prod(shape)):
        raise ValueError(f"{source}: the header says {shape} ({int(np.prod(shape))} "
                         f"values) but the file holds {values.size}.")
    return values.reshape(shape)


def read_idx_file(path, checksums=None):
    """Reads one gzipped idx file after checking its SHA-256.

    Not `keras.datasets.fashion_mnist`: it downloads when the files are
    missing and checks nothing.

    Args:
        path: The `.gz` file.
        checksums: Accepted SHA-256 hex digests by file name, or the path
            of a `sha256sum`-format file of them; default `KNOWN_SHA256`
            (upstream and Debian). A name missing from it is an error.

    Returns:
        A uint8 array.
    """
    if checksums is None:
        checksums = KNOWN_SHA256
    elif isinstance(checksums, str):
        checksums = read_checksum_file(checksums)
    name = os.path.basename(path)
    with open(path, "rb") as f:
        raw = f.read()
    digest = hashlib.sha256(raw).hexdigest()
    accepted = checksums.get(name, ())
    accepted = (accepted,) if isinstance(accepted, str) else tuple(accepted)
    if digest not in accepted:
        raise ValueError(f"{path}: SHA-256 {digest} is not a known Fashion-MNIST file "
                         f"(expected one of {', '.join(accepted) or 'none listed'}).")
    return parse_idx(gzip.decompress(raw), path)


def read_checksum_file(path):
    """Reads a `sha256sum`-format file: `<hex digest>  <file name>` per line.

    Args:
        path: The file; blank lines and lines starting with `#` are skipped.

    Returns:
        `{file name: (digest,)}`, usable as `checksums`.
    """
    checksums = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.split()
            if (len(parts) != 2 or len(parts[0]) != 64
                    or any(c not in "0123456789abcdef" for c in parts[0].lower())):
                raise ValueError(f"{path}:{number}: expected `<sha256 hex>  <file name>`, "
                                 f"got {line.strip()!r}.")
            name = os.path.basename(parts[1].lstrip("*"))
            checksums[name] = checksums.get(name, ()) + (parts[0].lower(),)
    return checksums


def read_idx_dir(directory, checksums=None):
    """Reads the four Fashion-MNIST idx files of `directory`.

    Args:
        directory: Folder holding the files of `FILES`.
        checksums: As in `read_idx_file`.

    Returns:
        `{"train": (images, labels), "test": (images, labels)}`, images
        uint8 `(N, 28, 28)`, labels int64.
    """
    missing = [n for names in FILES.values() for n in names
               if not os.path.isfile(os.path.join(directory, n))]
    if missing:
        raise FileNotFoundError(f"{directory} lacks the Fashion-MNIST file(s) "
                                f"{', '.join(missing)}.")
    out = {}
    for split, (image_file, label_file) in FILES.items():
        images = read_idx_file(os.path.join(directory, image_file), checksums)
        labels = read_idx_file(os.path.join(directory, label_file), checksums)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{directory}: {image_file} {images.shape} and {label_file} "
                             f"{labels.shape} are not N images with N labels.")
        if labels.size and labels.max() >= NUM_CLASSES:
            raise ValueError(f"{os.path.join(directory, label_file)}: label "
                             f"{labels.max()} outside [0, {NUM_CLASSES}).")
        out[split] = (images, labels.astype(np.int64))
    return out


def _tfds_builder(data_dir):
    import tensorflow_datasets as tfds

    return tfds.builder("fashion_mnist", data_dir=data_dir)


def _read_tfds(builder):
    import tensorflow_datasets as tfds

    out = {}
    for split in FILES:
        ds = builder.as_dataset(split=split, shuffle_files=False)
        images, labels = [], []
        for batch in tfds.as_numpy(ds.batch(10000)):
            images.append(batch["image"][..., 0])
            labels.append(batch["label"])
        out[split] = (np.concatenate(images), np.concatenate(labels).astype(np.int64))
    return out


def read_raw(idx_dir=None, data_dir=None, download=False, checksums=None):
    """The full Fashion-MNIST from the first source that has it.

    Args:
        idx_dir: Folder of the four idx `.gz` files (second choice).
        data_dir: TFDS data directory (default: TFDS's own).
        download: Let TFDS download and prepare the set if no source has it.
        checksums: Accepted SHA-256s of the idx files (see `read_idx_file`).

    Returns:
        `(splits, source)`: splits as `read_idx_dir` returns them and a
        sentence naming where they came from.
    """
    builder = _tfds_builder(data_dir)
    if builder.is_prepared():
        return _read_tfds(builder), f"TFDS fashion_mnist in {builder.data_dir}"
    if idx_dir is not None and not os.path.isdir(idx_dir):
        raise FileNotFoundError(f"Fashion-MNIST idx folder {idx_dir} does not exist.")
    for directory in (idx_dir, DEBIAN_DIR):
        if directory is not None and os.path.isdir(directory):
            return read_idx_dir(directory, checksums), f"idx files in {directory}"
    if download:
        builder.download_and_prepare()
        return _read_tfds(builder), f"TFDS fashion_mnist in {builder.data_dir}"
    raise FileNotFoundError(
        "Fashion-MNIST not found: no prepared TFDS `fashion_mnist` in "
        f"{data_dir or 'the default TFDS data directory'}, "
        "no --fashion_mnist_dir given, "
        f"no {DEBIAN_DIR} (`apt-get install dataset-fashion-mnist`). Pass "
        "--download_fashion_mnist to let TFDS download it.")


def to_images(images, padded=False):
    """`(N, 28, 28)` uint8 to `(N, 28, 28, 1)`, or zero-padded `(N, 32, 32, 3)`."""
    images = images[..., None]
    if padded:
        images = np.pad(images, [(0, 0), (_PAD, _PAD), (_PAD, _PAD), (0, 0)])
        images = np.repeat(images, 3, axis=-1)
    return images


def load_fashion_mnist_lt(imbalance_factor=100.0, profile="exp", n_max=None,
                          val_per_class=500, seed=0, split_seed=0, padded=False,
                          subset=None, idx_dir=None, data_dir=None, download=False,
                          checksums=None):
    """Long-tailed Fashion-MNIST with balanced validation and test splits.

    Args:
        imbalance_factor: Ratio of head to tail class size (>= 1).
        profile: `"exp"` or `"step"`.
        n_max: Training images of the head class; `None` for 5000 (at
            most the smallest pool, 6000 - `val_per_class`).
        val_per_class: Validation images per class, held out of the
            training split before the long-tailed selection.
        seed: Seed of the long-tailed selection.
        split_seed: Seed of the validation hold-out.
        padded: Zero-pad to 32x32 and repeat the grey value over 3
            channels (for networks that expect CIFAR-shaped input).
        subset: A `LongTailSubset`, or a path to one written by
            `LongTailedData.write_subset`, to rebuild instead of selecting.
        idx_dir: Folder of the four idx `.gz` files.
        data_dir: TFDS data directory.
        download: Let TFDS download the set when no source has it.
        checksums: Accepted SHA-256s of the idx files (default
            `KNOWN_SHA256`).

    Returns:
        A `LongTailedData`.

    Example:

    >>> data = load_fashion_mnist_lt(imbalance_factor=100)
    >>> int(data.class_counts.sum()), data.image_shape, len(data.val_split)
    (12406, (28, 28, 1), 5000)
    """
    splits, source = read_raw(idx_dir, data_dir, download, checksums)
    images, labels = splits["train"]
    pool, val, _ = digits.split_indices(labels, val_per_class, 0, split_seed)
    largest = int(np.bincount(labels[pool], minlength=NUM_CLASSES).min())
    if largest < 1:
        raise ValueError(f"`val_per_class`={val_per_class} leaves a class without "
                         "training images.")
    n_max = min(N_MAX, largest) if n_max is None else n_max
    if n_max > largest:
        raise ValueError(f"`n_max`={n_max} exceeds the smallest training pool ({largest}).")
    index_space = (f"Fashion-MNIST training split, {source}: "
                   + ("read order, shuffle_files=False" if source.startswith("TFDS")
                      else "the idx file's order"))
    if subset is None:
        chosen = long_tail.make_subset("fashion_mnist", labels[pool], NUM_CLASSES, n_max,
                                       imbalance_factor, profile, seed)
        subset = long_tail.LongTailSubset(
            dataset="fashion_mnist", indices=[pool[i] for i in chosen.indices],
            profile=profile, imbalance_factor=imbalance_factor, n_max=int(n_max),
            seed=seed, index_space=index_space)
    else:
        if not isinstance(subset, long_tail.LongTailSubset):
            subset = long_tail.read_subset(subset)
        long_tail.check_subset(subset, labels)
        if np.intersect1d(subset.flat_indices, val).size:
            raise ValueError("`subset` overlaps the held-out validation split.")
    train = subset.flat_indices
    train_images = to_images(images[train], padded)
    pixels = train_images.reshape(-1, train_images.shape[-1]) / 255.0
    test_images, test_labels = splits["test"]
    return base.LongTailedData(
        name="fashion_mnist_lt",
        train_split=base.Split(train_images, labels[train]),
        val_split=base.Split(to_images(images[val], padded), labels[val]),
        test_split=base.Split(to_images(test_images, padded), test_labels),
        num_classes=NUM_CLASSES,
        image_shape=train_images.shape[1:],
        mean=pixels.mean(axis=0),
        std=pixels.std(axis=0),
        recipe="cifar",
        class_names=list(CLASS_NAMES),
        subset=subset,
        info={"profile": subset.profile, "imbalance_factor": subset.imbalance_factor,
              "n_max": subset.n_max, "seed": subset.seed, "split_seed": split_seed,
              "val_per_class": val_per_class, "padded": padded, "source": source},
    )
