"""Reading and rebuilding a model's layer graph, nested models included.

The pieces `nbn_keras.conversion` and the model families share: walking
leaf layers, telling plain BN from NBN, the residual structure a layer sits
in, and cloning with per-layer replacement and every weight carried over.
"""

import math

import keras

from nbn_keras import keras_internals
from nbn_keras.layers import NormalizedBatchNormalization


def walk_layers(model):
    """Yields `(layer, parent_model)` for every leaf layer, depth first."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from walk_layers(layer)
        else:
            yield layer, model


def leaf_layers(model):
    """Yields every layer of `model` that is not a model, nested ones included."""
    for layer, _ in walk_layers(model):
        yield layer


def is_plain_bn(layer):
    """Whether `layer` is a BatchNormalization layer that is not NBN yet."""
    return isinstance(layer, keras.layers.BatchNormalization) and not isinstance(
        layer, NormalizedBatchNormalization
    )


def feeds_residual_sum(layer):
    """Whether `layer`'s output goes straight into an `Add` layer.

    In a post-activation ResNet (v1, v1.5, ResNeXt) these are exactly the BN
    that ends each residual branch and the BN of a projection shortcut.
    """
    return any(
        isinstance(node.operation, keras.layers.Add)
        for node in keras_internals.outbound_nodes(layer)
    )


def as_functional(model):
    """`model` as a functional model: a built Sequential is wrapped.

    Raises:
        ValueError: for an unbuilt Sequential or a subclassed model.
    """
    if isinstance(model, keras.Sequential):
        if not model.built:
            raise ValueError(
                f"Sequential model '{model.name}' is not built; give it an "
                "Input first."
            )
        return keras.Model(model.inputs, model.outputs, name=model.name)
    if not isinstance(model, keras.Model) or not hasattr(model, "_nodes_by_depth"):
        raise ValueError(
            f"'{getattr(model, 'name', model)}' is not a functional or "
            "Sequential Keras model; subclassed models cannot be converted."
        )
    return model


def clone(model, replace, call_function):
    """`clone_model` with per-layer replacement and every weight carried over.

    Args:
        model: A functional model.
        replace: `replace(layer)` returns a new layer holding its own
            weights, or `None` to clone `layer` unchanged (`clone_model`
            copies no weights, so they are copied here).
        call_function: `keras.models.clone_model`'s `call_function`, or `None`.

    Returns:
        The clone, a functional `keras.Model`.
    """
    pairs = []

    def clone_function(layer):
        new = replace(layer)
        if new is None:
            new = layer.__class__.from_config(layer.get_config())
            pairs.append((layer, new))
        return new

    cloned = keras.models.clone_model(
        model,
        clone_function=clone_function,
        call_function=call_function,
        recursive=True,
    )
    for old, new in pairs:
        new.set_weights(old.get_weights())
    return cloned


def activation_elements(model):
    """Numbers per example of every layer output of `model`, nested models included.

    Training keeps these outputs for the backward pass, so `batch *
    activation_elements(model) * bytes per number` estimates its memory.

    Args:
        model: A built functional `keras.Model` with static shapes.

    Returns:
        An int: the sum over layers (inputs excluded) of the sizes of their
        batched outputs without the batch axis (a layer's unbatched output,
        such as NBN's shared scale, is no per-example memory).

    Example:

    >>> activation_elements(build_classifier("resnet8", 10, (16, 16, 3)))
    """
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += activation_elements(layer)
        elif not isinstance(layer, keras.layers.InputLayer):
            for node in keras_internals.inbound_nodes(layer):
                for tensor in keras.tree.flatten(node.outputs):
                    if tensor.shape and tensor.shape[0] is None:
                        total += math.prod(tensor.shape[1:])
    return total
