"""nbn_keras: Normalizing Batch Normalization for long-tailed recognition.

Importing the package registers everything it puts into `.keras` files with
Keras (layers, the optimizer, learning-rate schedules, losses and metrics),
so `keras.models.load_model` restores any model it saved, trained ones
included, after `import nbn_keras` (or pass
`custom_objects=nbn_keras.custom_objects()`).
"""

from nbn_keras import interrupts

if interrupts.started_as_command():
    # Before TensorFlow loads: a signal then ends the command with one line.
    interrupts.supervise()
    interrupts.exit_on_signals(interrupts.STARTING_MESSAGE)

import keras  # noqa: E402

# Imported for their `register_keras_serializable` side effect too: a
# trained model's file names the optimizer, schedule, loss and metrics.
from nbn_keras import models
from nbn_keras.conversion import convert_to_nbn
from nbn_keras.conversion import fold_nbn
from nbn_keras.conversion import select_bn_layers
from nbn_keras.layers import GroupedConv2D
from nbn_keras.layers import NBNScale
from nbn_keras.layers import NormalizedBatchNormalization
from nbn_keras.models import ride
from nbn_keras.saving import load_model
from nbn_keras.training import losses
from nbn_keras.training import metrics
from nbn_keras.training import optimizers
from nbn_keras.training import schedules

__version__ = "0.1.0"


def __getattr__(name):
    # The importer needs PyTorch, so it is imported when asked for.
    if name == "interop":
        import importlib

        return importlib.import_module("nbn_keras.interop")
    raise AttributeError(f"module 'nbn_keras' has no attribute '{name}'")


def custom_objects():
    """Returns the `custom_objects` mapping for `keras.models.load_model`.

    Example:

    >>> model = keras.models.load_model(
    ...     "model.keras", custom_objects=nbn_keras.custom_objects())
    """
    classes = (
        NormalizedBatchNormalization,
        NBNScale,
        GroupedConv2D,
        optimizers.CoupledSGD,
        schedules.WarmupCosineDecay,
        schedules.WarmupStepDecay,
        schedules.EpochCosineAnnealing,
        schedules.EpochWarmupStepDecay,
        losses.LogitAdjustedCrossEntropy,
        losses.BalancedSoftmaxCrossEntropy,
        losses.LDAMLoss,
        losses.HardCategoryMiningLoss,
        ride.RIDELoss,
        ride.RIDEBalancedSoftmaxLoss,
        ride.ExpertAverage,
        metrics.PerClassAccuracy,
        metrics.BalancedAccuracy,
        metrics.GroupAccuracy,
    )
    return {keras.saving.get_registered_name(c): c for c in classes}
