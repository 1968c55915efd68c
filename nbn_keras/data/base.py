"""The object every loader returns.

A split is held as two numpy arrays: `records` (uint8 images `(N, H, W, C)`
for in-memory sets, or string file paths `(N,)` for list-file sets) and
int32 `labels`. Decoding, resizing and augmentation are done later in
tf.data by `nbn_keras.data.transforms`, chosen by `recipe`.
"""

import dataclasses
import json
import os

import numpy as np
import tensorflow as tf

from nbn_keras import files
from nbn_keras.data import transforms

CLASS_COUNTS_FILENAME = "class_counts.json"


@dataclasses.dataclass
class Split:
    """Records and labels of one split.

    Args:
        records: uint8 images `(N, H, W, C)` or string paths `(N,)`.
        labels: Integer labels `(N,)`.
    """

    records: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int32)
        if len(self.records) != len(self.labels):
            raise ValueError(
                f"{len(self.records)} records but {len(self.labels)} labels."
            )

    def __len__(self):
        return len(self.labels)


@dataclasses.dataclass
class LongTailedData:
    """A long-tailed training set with balanced validation and test sets.

    `train`, `val` and `test` are unbatched `tf.data.Dataset`s of
    `(image, label)`: image float32 in [0, 255] of shape `image_shape`
    after the evaluation transform (no augmentation, no mean/std
    normalisation), label int32. Use `nbn_keras.data.make_train_dataset`
    and `make_eval_dataset` for batched, augmented, prefetched pipelines.

    Args:
        name: Data set name (e.g. `"cifar100_lt"`).
        train_split: Training `Split`.
        val_split: Validation `Split` (model selection).
        test_split: Test `Split` (final report only).
        num_classes: Number of classes.
        image_shape: `(height, width, channels)` of the produced images.
        mean: Per-channel pixel mean in [0, 1] units, for the model's
            in-graph normalisation.
        std: Per-channel pixel standard deviation in [0, 1] units.
        recipe: Transform recipe name (see `transforms.RECIPES`).
        class_names: Optional list of class names.
        subset: The `LongTailSubset` that made the training set, if any.
        skipped: Per split, the files skipped as missing or undecodable.
        info: Free-form record of the loader's options, written with the
            class counts.
    """

    name: str
    train_split: Split
    val_split: Split
    test_split: Split
    num_classes: int
    image_shape: tuple
    mean: tuple
    std: tuple
    recipe: str
    class_names: list = None
    subset: object = None
    skipped: dict = dataclasses.field(default_factory=dict)
    info: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.recipe not in transforms.RECIPES:
            raise ValueError(
                f"`recipe` must be one of {sorted(transforms.RECIPES)}. "
                f"Received: {self.recipe!r}"
            )
        self.image_shape = tuple(int(d) for d in self.image_shape)
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)

    @property
    def class_counts(self):
        """Training images per class, an int64 array of shape `(num_classes,)`."""
        return np.bincount(self.train_split.labels, minlength=self.num_classes).astype(
            np.int64
        )

    @property
    def train(self):
        return self.split_dataset("train")

    @property
    def val(self):
        return self.split_dataset("val")

    @property
    def test(self):
        return self.split_dataset("test")

    def get_split(self, split):
        """Returns the `Split` named `"train"`, `"val"` or `"test"`."""
        splits = {"train": self.train_split, "val": self.val_split, "test": self.test_split}
        if split not in splits:
            raise ValueError(f"`split` must be one of {list(splits)}. Received: {split!r}")
        return splits[split]

    def split_dataset(self, split):
        """An unbatched dataset of one split with the evaluation transform.

        Args:
            split: `"train"`, `"val"` or `"test"`.

        Returns:
            A `tf.data.Dataset` of `(float32 image, int32 label)`.
        """
        part = self.get_split(split)
        decode = transforms.eval_transform(self.recipe, self.image_shape)
        if transforms.is_file_recipe(self.recipe):
            records, labels = tf.constant(part.records), tf.constant(part.labels)
            return transforms.map_image_files(
                tf.data.Dataset.range(len(part)).map(lambda i: (i, i)), part.records,
                lambda position, index: (decode(records[index]), labels[index]),
            )
        ds = tf.data.Dataset.from_tensor_slices((part.records, part.labels))
        return ds.map(
            lambda record, label: (decode(record), label),
            num_parallel_calls=tf.data.AUTOTUNE,
        )

    def write_subset(self, run_dir):
        """Writes what is needed to rebuild the training set into `run_dir`.

        Always writes `class_counts.json` (counts, names, options, skipped
        files); writes `data_subset.json` (the chosen pool indices) too when
        the training set was cut from a balanced pool.

        Args:
            run_dir: Directory, created if needed.

        Returns:
            The list of paths written.
        """
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, CLASS_COUNTS_FILENAME)
        record = {
            "name": self.name,
            "num_classes": self.num_classes,
            "class_counts": self.class_counts.tolist(),
            "num_train": len(self.train_split),
            "num_val": len(self.val_split),
            "num_test": len(self.test_split),
            "image_shape": list(self.image_shape),
            "mean": list(self.mean),
            "std": list(self.std),
            "class_names": self.class_names,
            "skipped": self.skipped,
            "info": self.info,
        }
        files.write_text(path, json.dumps(record, indent=1, default=str))
        paths = [path]
        if self.subset is not None:
            paths.append(self.subset.write(run_dir))
        return paths
