"""nbn_keras: Normalizing Batch Normalization for long-tailed recognition.

Importing the package registers its layers with Keras, so
`keras.models.load_model` restores converted models after `import nbn_keras`
(or pass `custom_objects=nbn_keras.custom_objects()`).
"""

import importlib

from nbn_keras.conversion import convert_to_nbn
from nbn_keras.conversion import fold_nbn
from nbn_keras.conversion import select_bn_layers
from nbn_keras.layers import GroupedConv2D
from nbn_keras.layers import NBNScale
from nbn_keras.layers import NormalizedBatchNormalization

__version__ = "0.1.0"


def __getattr__(name):
    # Backbones need KerasCV (and so TensorFlow), the importer PyTorch; the
    # layer and the conversion run on any Keras backend, so the rest is
    # imported lazily.
    if name in ("backbones", "resnet", "import_torch"):
        return importlib.import_module(f"nbn_keras.{name}")
    raise AttributeError(f"module 'nbn_keras' has no attribute '{name}'")


def custom_objects():
    """Returns the `custom_objects` mapping for `keras.models.load_model`.

    Example:

    >>> model = keras.models.load_model(
    ...     "model.keras", custom_objects=nbn_keras.custom_objects())
    """
    return {
        "nbn_keras>NormalizedBatchNormalization": NormalizedBatchNormalization,
        "nbn_keras>NBNScale": NBNScale,
        "nbn_keras>GroupedConv2D": GroupedConv2D,
    }
