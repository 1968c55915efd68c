"""Putting NBN into a model (`convert_to_nbn`) and taking it out (`fold_nbn`)."""

import re

import keras

from nbn_keras import keras_internals
from nbn_keras.layers import NBNScale
from nbn_keras.layers import NormalizedBatchNormalization

SCALE_LAYER_NAME = "nbn_scale"
SCALE_SHARING_MODES = ("model", "layer")

# How a ResNet's layer names say which stage and block a layer is in. Each
# backbone of `nbn_keras.models` declares its structure by naming its
# layers after one of these contracts, and so does KerasCV. Names are what
# survives `clone_model`, folding and `.keras` round trips unchanged (a layer
# attribute does not, and a model subclass is lost by `clone_model`). Which
# BN of a stage the paper converts is read from the graph, not from names:
# see `paper_selection`.
RESNET_NAMING = {
    # `layer{stage}_{block}_...`, stages from 1, blocks from 0: the
    # torchvision / authors' layout (`nbn_keras.models.resnet`), whose
    # layer names are the PyTorch module paths with "_" for ".".
    "torchvision": re.compile(r"(?:^|_)layer(\d+)_(\d+)_"),
    # `..._stack_{stage}_block{block}_...`, stages from 0, blocks from 1:
    # KerasCV ResNet v1 and v2 (prefix `v2_stack_` for both) and
    # `nbn_keras.models.cifar_resnet`.
    "keras_cv": re.compile(r"(?:^|_)stack_?(\d+)_block(\d+)_"),
}


def resnet_layer_location(name):
    """Returns `(naming, stage, block)` of a ResNet layer name, or `None`.

    Args:
        name: A layer name following one of `RESNET_NAMING`.
    """
    for naming, pattern in RESNET_NAMING.items():
        match = pattern.search(name)
        if match:
            return (naming,) + tuple(int(g) for g in match.groups())
    return None


def _is_plain_bn(layer):
    return isinstance(layer, keras.layers.BatchNormalization) and not isinstance(
        layer, NormalizedBatchNormalization
    )


def leaf_layers(model):
    """Yields every layer of `model` that is not a model, nested ones included."""
    for layer, _ in _walk(model):
        yield layer


def _walk(model):
    """Yields `(layer, parent_model)` for every leaf layer, depth first."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _walk(layer)
        else:
            yield layer, model


def feeds_residual_sum(layer):
    """Whether `layer`'s output goes straight into an `Add` layer.

    In a post-activation ResNet (v1, v1.5, ResNeXt) these are exactly the BN
    that ends each residual branch and the BN of a projection shortcut.
    """
    return any(
        isinstance(node.operation, keras.layers.Add)
        for node in keras_internals.outbound_nodes(layer)
    )


def paper_selection(bn_layers, stages=None):
    """Picks the BN layers NBN converts in the reference ResNets.

    In each selected stage: the last BN of every residual block and the BN of
    the shortcut branch, i.e. the BN layers whose output goes straight into
    the residual sum. Stages come from the layer names (`RESNET_NAMING`),
    the roles from the model graph, so a model the rule does not describe
    raises an error instead of being converted by a guess. In particular a
    pre-activation ResNet (KerasCV `ResNetV2Backbone`), whose residual
    branches end in a convolution and whose shortcuts have no BN, is refused.

    Args:
        bn_layers: The candidate BN layers (of one model, connected).
        stages: Stage indices (negative counts from the last stage), or
            `None` for the last stage only, as in the paper.

    Returns:
        The list of selected layers.
    """
    options = (
        "Pass `selection='all'`, a list of layer names, or a predicate "
        "`fn(layer) -> bool`."
    )
    located = []
    for layer in bn_layers:
        location = resnet_layer_location(layer.name)
        if location is not None:
            located.append((layer, location))
    if not located:
        raise ValueError(
            "The paper's selection is undefined for this model: none of its "
            "BN layers is named as a ResNet's (the backbones of "
            "`nbn_keras.models`, KerasCV's ResNetBackbone). " + options
        )
    namings = sorted({naming for _, (naming, _, _) in located})
    if len(namings) > 1:
        raise ValueError(
            f"The model's BN layers mix the ResNet naming contracts {namings}, "
            "so its stages are ambiguous. " + options
        )
    all_stages = sorted({stage for _, (_, stage, _) in located})
    wanted = []
    for stage in [-1] if stages is None else stages:
        if not -len(all_stages) <= stage < len(all_stages):
            raise ValueError(
                f"Stage {stage} does not exist: the model's stages are "
                f"{all_stages}."
            )
        wanted.append(all_stages[stage])
    selected = []
    for stage in wanted:
        in_stage = [
            layer for layer, (_, s, _) in located
            if s == stage and feeds_residual_sum(layer)
        ]
        if not in_stage:
            raise ValueError(
                f"No BN layer of stage {stage} feeds a residual sum, so the "
                "paper's rule (the BN ending each residual branch and the "
                "shortcut BN) does not apply: this is not a post-activation "
                "ResNet. A pre-activation ResNet (e.g. KerasCV's "
                "ResNetV2Backbone) ends its branches with a convolution. "
                + options
            )
        already = [l.name for l in in_stage if not _is_plain_bn(l)]
        if already:
            raise ValueError(f"Layers {already} are already NBN layers.")
        selected.extend(in_stage)
    return selected


def select_bn_layers(model, selection="paper", stages=None):
    """Returns the BN layers of `model` (nested models included) to convert.

    Args:
        model: A Keras model.
        selection: `"paper"` (the default: see `paper_selection`), `"all"`
            (every BatchNormalization layer), a collection of layer names, or
            a predicate `fn(layer) -> bool` called on every BN layer.
        stages: With `selection="paper"`, the stages to convert instead of
            the last one.

    Returns:
        The list of selected `keras.layers.BatchNormalization` layers.
    """
    bn_layers = [layer for layer in leaf_layers(model) if _is_plain_bn(layer)]
    if stages is not None and selection != "paper":
        raise ValueError("`stages` only applies to selection='paper'.")
    if selection == "paper":
        selected = paper_selection(
            [layer for layer in leaf_layers(model)
             if isinstance(layer, keras.layers.BatchNormalization)],
            stages,
        )
    elif selection == "all":
        selected = bn_layers
    elif callable(selection):
        selected = [layer for layer in bn_layers if selection(layer)]
    elif isinstance(selection, str):
        raise ValueError(
            f"Unknown selection '{selection}'. Use 'paper', 'all', a "
            "collection of layer names or a predicate."
        )
    else:
        names = set(selection)
        selected = [layer for layer in bn_layers if layer.name in names]
        missing = names - {layer.name for layer in selected}
        if missing:
            raise ValueError(
                f"No BatchNormalization layers named {sorted(missing)} in "
                f"model '{model.name}'."
            )
    if not selected:
        raise ValueError(f"The selection matches no BN layer of '{model.name}'.")
    return selected


def convert_to_nbn(
    model,
    selection="paper",
    stages=None,
    scale_sharing="model",
    separate_scales=False,
    preserve_outputs=False,
    beta_initializer=None,
):
    """Returns a copy of `model` whose selected BN layers are NBN layers.

    The copy is made with `keras.models.clone_model(..., recursive=True)`, so
    any functional model works, nested ones included (a classifier around a
    KerasCV `ResNetBackbone`, say); the result is a plain functional model.
    Every weight is copied. Each selected BatchNormalization layer becomes a
    `NormalizedBatchNormalization` with the same configuration, its raw gamma
    and beta set to the BN's, and its scale(s) set to 1.0
    (`NormalizedBatchNormalization.from_batch_normalization`): converting a
    freshly built model gives the reference's initial state.

    With the default `scale_sharing="model"`, one `NBNScale` layer named
    `"nbn_scale"` holds the single `alpha` of the model (two scalars with
    `separate_scales=True`), as in the reference code. Effective gamma and
    beta then all have norm `alpha`, so a converted *trained* model no longer
    gives its former outputs: each layer keeps the direction of its gamma and
    beta but not their magnitude, and needs training. With
    `scale_sharing="layer"` and `separate_scales=True`, `preserve_outputs=True`
    sets each layer's scales to `||gamma|| + 1e-6` and `||beta|| + 1e-6`,
    which keeps inference outputs unchanged.

    Args:
        model: A functional or Sequential Keras model.
        selection: Which BN layers to convert: `"paper"` (default: in the
            last stage, the last BN of each residual block and the shortcut
            BN), `"ride"` (a RIDE model's every BN of each expert's last
            stage, one scale per expert: `nbn_keras.models.ride`), `"all"`, a collection of layer names, or a predicate
            `fn(layer) -> bool`. See `select_bn_layers`.
        stages: With `selection="paper"`, a list of stage indices to convert
            instead of the last stage (negative indices count from the end).
        scale_sharing: `"model"` for one scale shared by all converted layers,
            `"layer"` for one per layer.
        separate_scales: If `True`, gamma and beta get separate scales.
        preserve_outputs: If `True`, set the scales so that inference outputs
            are unchanged. Needs `scale_sharing="layer"` and
            `separate_scales=True`.
        beta_initializer: `None` (default) copies BN's beta, which is zero in
            a fresh model: the reference's start. Otherwise a Keras
            initializer (or its name) drawing each converted layer's raw
            beta instead, e.g. `keras.initializers.RandomNormal(stddev=0.1)`
            for a small random start (not the paper's). A seeded
            initializer's seed is offset by the layer's position among the
            converted layers and an unseeded one redrawn per layer, so that
            layers differ.

    Returns:
        A new `keras.Model`; `model` itself is not changed.

    Example:

    >>> backbone = nbn_keras.models.build_backbone("resnet18", (32, 32, 3))
    >>> nbn_backbone = nbn_keras.convert_to_nbn(backbone)
    >>> [l.name for l in nbn_backbone.layers
    ...  if isinstance(l, nbn_keras.NormalizedBatchNormalization)]
    ['layer4_0_bn2', 'layer4_0_downsample_1', 'layer4_1_bn2']
    """
    if scale_sharing not in SCALE_SHARING_MODES:
        raise ValueError(
            f"scale_sharing must be one of {SCALE_SHARING_MODES}, got "
            f"'{scale_sharing}'."
        )
    if preserve_outputs and not (scale_sharing == "layer" and separate_scales):
        raise ValueError(
            "preserve_outputs=True needs scale_sharing='layer' and "
            "separate_scales=True: a shared scale, or one scale for both "
            "gamma and beta, cannot keep every layer's magnitudes."
        )
    if beta_initializer is not None and preserve_outputs:
        raise ValueError(
            "beta_initializer replaces beta, so it cannot be combined with "
            "preserve_outputs=True."
        )
    if beta_initializer is not None:
        beta_initializer = keras.initializers.get(beta_initializer)
    if isinstance(selection, str) and selection == "ride":
        # RIDE groups its BN by expert, one scale each: see `nbn_keras.models.ride`.
        if stages is not None or scale_sharing != "model" or preserve_outputs:
            raise ValueError(
                "selection='ride' takes only `separate_scales`: it converts "
                "every BN of each expert's last stage, one scale per expert."
            )
        from nbn_keras.models.ride import network as ride

        return ride.convert_ride_to_nbn(model, separate_scales=separate_scales)
    model = _as_functional(model)
    selected_ids = {id(layer) for layer in select_bn_layers(model, selection, stages)}
    shared = scale_sharing == "model"
    if shared:
        _check_single_graph(model, selected_ids)
        if any(l.name == SCALE_LAYER_NAME for l in leaf_layers(model)):
            raise ValueError(
                f"Model '{model.name}' already has a layer named "
                f"'{SCALE_LAYER_NAME}'."
            )

    def make_nbn(layer):
        return NormalizedBatchNormalization.from_batch_normalization(
            layer, shared_scale=shared, separate_scales=separate_scales,
            preserve_outputs=preserve_outputs,
        )

    scale_tensors = []

    def call_with_shared_scale(layer, *args, **kwargs):
        if isinstance(layer, NormalizedBatchNormalization) and layer.shared_scale:
            if not scale_tensors:
                scale_layer = NBNScale(
                    separate_scales=separate_scales, name=SCALE_LAYER_NAME
                )
                scale_tensors.append(scale_layer(args[0]))
            kwargs["scale"] = scale_tensors[0]
        return layer(*args, **kwargs)

    converted = _clone(
        model,
        lambda layer: make_nbn(layer) if id(layer) in selected_ids else None,
        call_with_shared_scale if shared else None,
    )
    if beta_initializer is not None:
        nbn_layers = [l for l in leaf_layers(converted)
                      if isinstance(l, NormalizedBatchNormalization) and l.center]
        for position, layer in enumerate(nbn_layers):
            initializer = _offset_seed(beta_initializer, position)
            layer.beta.assign(initializer(layer.beta.shape, layer.beta.dtype))
    return converted


def has_fold_hook(layer):
    """Whether `layer` says how it folds into stock layers for export.

    A layer says so with a method `stock_equivalent()` returning the stock
    Keras layer that computes what it computes in inference, weights set,
    or `None` when folding makes it unused (an `NBNScale`, whose value its
    NBN layers take into their gamma and beta). Every nbn_keras layer has
    one; `fold_nbn` calls them.
    """
    return callable(getattr(layer, "stock_equivalent", None))


def fold_nbn(model):
    """Returns a copy of `model` with every foldable layer made stock.

    Each layer with a fold hook (`has_fold_hook`) is replaced by its
    `stock_equivalent()`: a trained NBN layer is exactly a BatchNormalization
    layer whose gamma and beta are NBN's effective ones, a `GroupedConv2D`
    the stock `Conv2D` it equals, a RIDE `ExpertAverage` a
    `GlobalAveragePooling1D` over the experts; `NBNScale` layers disappear.
    The result gives the same inference outputs with stock Keras layers
    only. This is the model to export and serve.

    Args:
        model: A functional or Sequential Keras model.

    Returns:
        A new `keras.Model`.

    Example:

    >>> served = nbn_keras.fold_nbn(nbn_model)
    >>> np.testing.assert_allclose(served(x), nbn_model(x), atol=1e-5)
    """
    model = _as_functional(model)

    def make_stock(layer):
        return layer.stock_equivalent() if has_fold_hook(layer) else None

    def call_without_scale(layer, *args, **kwargs):
        kwargs.pop("scale", None)
        return layer(*args, **kwargs)

    return _clone(model, make_stock, call_without_scale)


def _as_functional(model):
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


def _check_single_graph(model, selected_ids):
    """A shared scale is one graph edge, so all its layers need one graph."""
    parents = {id(parent): parent for layer, parent in _walk(model)
               if id(layer) in selected_ids}
    if len(parents) > 1:
        names = sorted(p.name for p in parents.values())
        raise ValueError(
            "A shared scale needs every converted layer in one functional "
            f"model, but the selection spans the sub-models {names}. Use "
            "scale_sharing='layer' or narrow the selection."
        )
    (parent,) = parents.values()
    if isinstance(parent, keras.Sequential):
        raise ValueError(
            f"A shared scale cannot be wired inside the Sequential sub-model "
            f"'{parent.name}'. Use scale_sharing='layer'."
        )


def _clone(model, replace, call_function):
    """`clone_model` with per-layer replacement and every weight carried over.

    `replace(layer)` returns a new layer holding its own weights, or `None`
    to clone `layer` unchanged (`clone_model` copies no weights, so they are
    copied here).
    """
    pairs = []

    def clone_function(layer):
        new = replace(layer)
        if new is None:
            new = layer.__class__.from_config(layer.get_config())
            pairs.append((layer, new))
        return new

    clone = keras.models.clone_model(
        model,
        clone_function=clone_function,
        call_function=call_function,
        recursive=True,
    )
    for old, new in pairs:
        new.set_weights(old.get_weights())
    return clone


def _offset_seed(initializer, offset):
    """A fresh copy of `initializer`, its integer seed (if any) + `offset`.

    Keras 3 initializers fix their seed at construction, so one instance
    returns the same values at every call. A fresh unseeded copy draws its
    seed from the global one (`keras.utils.set_random_seed`).
    """
    if not hasattr(initializer, "get_config"):
        return initializer  # A plain function `fn(shape, dtype)`.
    config = initializer.get_config()
    if isinstance(config.get("seed"), int):
        config["seed"] += offset
    return initializer.__class__.from_config(config)
