"""Every private Keras API the package uses, in one place.

Checked against Keras 3.15 (`setup.cfg` admits 3.15.x only): a new minor
version needs these rechecked, which `tests/test_keras_internals.py` does on
the installed Keras. No other module reaches into Keras' private attributes.
"""

CHECKED_AGAINST = "3.15"


def inbound_nodes(layer):
    """The graph nodes at which `layer` was called (`Layer._inbound_nodes`)."""
    return layer._inbound_nodes  # pylint: disable=protected-access


def outbound_nodes(layer):
    """The graph nodes that consume `layer`'s outputs (`Layer._outbound_nodes`)."""
    return layer._outbound_nodes  # pylint: disable=protected-access


def producing_operation(tensor):
    """The layer or operation that produced a symbolic tensor (`_keras_history`)."""
    return tensor._keras_history.operation  # pylint: disable=protected-access


def build_for_fit(model, sample_batch):
    """Builds a compiled model's metrics from one batch, and skips `fit`'s own build.

    `fit` builds them from a batch it reduces across replicas, which
    `MultiWorkerMirroredStrategy` cannot do (`distribute.adapt_to_multi_worker`).
    """
    model._symbolic_build(data_batch=sample_batch)  # pylint: disable=protected-access
    model._maybe_symbolic_build = lambda *args, **kwargs: None  # pylint: disable=protected-access
