"""CIFAR-10-LT and CIFAR-100-LT from tensorflow-datasets.

The training subset follows `nbn_keras.data.long_tail` (n_max 5000 for
CIFAR-10, 500 for CIFAR-100; seed 0). Indices refer to the original CIFAR
training order: TFDS stores each image's position in the original files in
its `id` feature (`train_00042`), and the split is sorted by it before
selection, so the subset does not depend on TFDS's storage order. (If the
ids are not such positions, as under some mocks, the TFDS read order with
`shuffle_files=False` is used and recorded.) As in the literature, the
validation and test splits are both the balanced CIFAR test split.

Offline use: pass `data_dir` holding a prepared copy, or `manual_dir` holding
the downloaded archive (`cifar-10-python.tar.gz` / `cifar-100-python.tar.gz`,
checksum-verified by TFDS). With neither and no network, TFDS retries for
minutes before failing.
"""

import re

import numpy as np
import tensorflow_datasets as tfds

from nbn_keras.data import base
from nbn_keras.data import long_tail

N_MAX = {"cifar10": 5000, "cifar100": 500}
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)
_READ_BATCH = 10000


def _load_split(name, split, data_dir, download, manual_dir):
    kwargs = {}
    if manual_dir is not None:
        kwargs["download_and_prepare_kwargs"] = {
            "download_config": tfds.download.DownloadConfig(manual_dir=manual_dir)
        }
    ds, info = tfds.load(name, split=split, shuffle_files=False, data_dir=data_dir,
                         download=download, with_info=True, **kwargs)
    # Read in batches rather than with `tfds.load(..., batch_size=-1)`: under
    # `tfds.testing.mock_data` the splits have no size and batch_size=-1
    # aborts the process (std::length_error), so no test could cover it.
    parts = {"image": [], "label": [], "id": []}
    for batch in tfds.as_numpy(ds.batch(_READ_BATCH)):
        for key in parts:
            parts[key].append(batch[key])
    arrays = {key: np.concatenate(value) for key, value in parts.items()}
    return arrays, info


def _original_order(ids, prefix):
    """Permutation sorting examples by their original CIFAR position, or None."""
    pattern = re.compile(rf"^{prefix}_(\d+)$")
    positions = []
    for raw in ids:
        match = pattern.match(raw.decode() if isinstance(raw, bytes) else str(raw))
        if match is None:
            return None
        positions.append(int(match.group(1)))
    positions = np.asarray(positions)
    if not np.array_equal(np.sort(positions), np.arange(len(positions))):
        return None
    return np.argsort(positions)


def load_cifar_lt(name="cifar10", imbalance_factor=100.0, profile="exp", seed=0,
                  n_max=None, subset=None, data_dir=None, download=True, manual_dir=None):
    """CIFAR-10-LT or CIFAR-100-LT.

    Args:
        name: `"cifar10"` or `"cifar100"`.
        imbalance_factor: Ratio of head to tail class size (>= 1).
        profile: `"exp"` or `"step"`.
        seed: Selection seed (0 is the standard).
        n_max: Head class size; `None` for the standard 5000 / 500.
        subset: A `LongTailSubset` or the path of a saved one (file or run
            directory), to rebuild that exact subset instead of selecting.
        data_dir: TFDS data directory.
        download: Let TFDS download and prepare the data if missing.
        manual_dir: Directory with a manually downloaded archive.

    Returns:
        A `LongTailedData`; `write_subset(run_dir)` saves the counts and
        chosen indices.

    Example:

    >>> data = load_cifar_lt("cifar100", imbalance_factor=100)
    >>> int(data.class_counts.sum())
    10847
    """
    if name not in N_MAX:
        raise ValueError(f"`name` must be one of {list(N_MAX)}. Received: {name!r}")
    train, info = _load_split(name, "train", data_dir, download, manual_dir)
    test, _ = _load_split(name, "test", data_dir, download, manual_dir)
    order = _original_order(train["id"], "train")
    index_space = f"TFDS {name} train split sorted by its `id` (original CIFAR order)"
    if order is None:
        order = np.arange(len(train["label"]))
        index_space = f"TFDS {name} train split in read order (shuffle_files=False)"
    images, labels = train["image"][order], train["label"][order].astype(np.int64)
    num_classes = info.features["label"].num_classes
    if subset is None:
        subset = long_tail.make_subset(
            name, labels, num_classes, n_max or N_MAX[name], imbalance_factor, profile,
            seed, index_space=index_space,
        )
    elif not isinstance(subset, long_tail.LongTailSubset):
        subset = long_tail.read_subset(subset)
    long_tail.check_subset(subset, labels)
    keep = subset.flat_indices
    test_split = base.Split(test["image"], test["label"])
    return base.LongTailedData(
        name=f"{name}_lt",
        train_split=base.Split(images[keep], labels[keep]),
        val_split=test_split,
        test_split=test_split,
        num_classes=num_classes,
        image_shape=(32, 32, 3),
        mean=MEAN,
        std=STD,
        recipe="cifar",
        class_names=list(info.features["label"].names),
        subset=subset,
        info={"profile": subset.profile, "imbalance_factor": subset.imbalance_factor,
              "n_max": subset.n_max, "seed": subset.seed, "data_dir": data_dir,
              "val_is_test": True},
    )
