"""Long-tailed data sets and their tf.data pipelines.

One entry point for the trainer:

```python
data = nbn_keras.data.load("cifar100_lt", imbalance_factor=100)
data.write_subset(run_dir)
train_ds = nbn_keras.data.make_train_dataset(data, global_batch_size=128,
                                             sampler="instance", epochs=200)
val_ds = nbn_keras.data.make_eval_dataset(data, "val", batch_size=256)
model.fit(train_ds, epochs=200, validation_data=val_ds,
          steps_per_epoch=nbn_keras.data.steps_per_epoch(data, 128))
```

Every data set yields `(image, label)`: image float32 in [0, 255] (no
mean/std normalisation; `data.mean` / `data.std` are for the model), label
int32.
"""

from nbn_keras.data.base import LongTailedData, Split
from nbn_keras.data.cifar_lt import load_cifar_lt
from nbn_keras.data.digits import load_digits_lt
from nbn_keras.data.fashion_mnist import load_fashion_mnist_lt
from nbn_keras.data.list_files import load_list_file_lt
from nbn_keras.data.list_files import INATURALIST_MEAN, INATURALIST_STD
from nbn_keras.data.long_tail import LongTailSubset, class_counts, read_subset
from nbn_keras.data.pipeline import make_eval_dataset, make_train_dataset, steps_per_epoch
from nbn_keras.data.samplers import SAMPLERS
from nbn_keras.data.synthetic import load_synthetic_lt


def _cifar(name):
    return lambda **options: load_cifar_lt(name, **options)


def _list_files(name, recipe, mean=None, std=None):
    def loader(**options):
        defaults = {"name": name, "recipe": recipe}
        if mean is not None:
            defaults.update(mean=mean, std=std)
        return load_list_file_lt(**{**defaults, **options})

    return loader


LOADERS = {
    "digits_lt": load_digits_lt,
    "fashion_mnist_lt": load_fashion_mnist_lt,
    "synthetic_lt": load_synthetic_lt,
    "cifar10_lt": _cifar("cifar10"),
    "cifar100_lt": _cifar("cifar100"),
    "imagenet_lt": _list_files("imagenet_lt", "imagenet"),
    "places_lt": _list_files("places_lt", "imagenet"),
    "inaturalist": _list_files("inaturalist", "inaturalist", INATURALIST_MEAN, INATURALIST_STD),
}
TFDS_DATA_SETS = ("cifar10_lt", "cifar100_lt")
LIST_FILE_DATA_SETS = ("imagenet_lt", "places_lt", "inaturalist")


def uses_list_files(name):
    """Whether data set `name` is read from `path label` list files."""
    return name in LIST_FILE_DATA_SETS


def uses_tfds(name):
    """Whether data set `name` comes from TensorFlow Datasets."""
    return name in TFDS_DATA_SETS


def load(name, **options):
    """Loads a long-tailed data set by name.

    Args:
        name: One of `LOADERS`: `"digits_lt"`, `"fashion_mnist_lt"`,
            `"synthetic_lt"`, `"cifar10_lt"`, `"cifar100_lt"`, `"imagenet_lt"`, `"places_lt"`,
            `"inaturalist"`.
        **options: Keyword arguments of the loader: `load_digits_lt`,
            `load_fashion_mnist_lt`, `load_synthetic_lt`, `load_cifar_lt`
            (without `name`) or
            `load_list_file_lt` (`train_list`, `val_list`, `image_root`, ...).

    Returns:
        A `LongTailedData`.

    Example:

    >>> data = nbn_keras.data.load("digits_lt", imbalance_factor=10)
    >>> data.num_classes, data.image_shape
    (10, (32, 32, 3))
    """
    if name not in LOADERS:
        raise ValueError(f"`name` must be one of {sorted(LOADERS)}. Received: {name!r}")
    return LOADERS[name](**options)


__all__ = [
    "LIST_FILE_DATA_SETS", "LOADERS", "LongTailSubset", "TFDS_DATA_SETS", "LongTailedData", "SAMPLERS", "Split", "class_counts",
    "load", "load_cifar_lt", "load_digits_lt", "load_fashion_mnist_lt", "load_list_file_lt",
    "load_synthetic_lt",
    "make_eval_dataset", "make_train_dataset", "read_subset", "steps_per_epoch",
    "uses_list_files", "uses_tfds",
]
