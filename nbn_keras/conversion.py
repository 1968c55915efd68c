"""Putting NBN into a model (`convert_to_nbn`) and taking it out (`fold_nbn`)."""

import keras

from nbn_keras import graph
from nbn_keras import selection as selection_lib
from nbn_keras.graph import leaf_layers
from nbn_keras.layers import NBNScale
from nbn_keras.layers import NormalizedBatchNormalization
from nbn_keras.models import registry
from nbn_keras.selection import SCALE_LAYER_NAME

SCALE_SHARING_MODES = ("model", "layer")
GENERIC_SELECTIONS = ("paper", "all")


def resnet_layer_location(name):
    """Returns `(naming, stage, block)` of a ResNet layer name, or `None`.

    Args:
        name: A layer name following one of the families' naming contracts
            (`nbn_keras.models.registry.namings`).
    """
    return selection_lib.locate(registry.namings(), name)


def resolve_selection(selection, stages=None):
    """The `nbn_keras.selection.Selection` a `convert_to_nbn` argument means.

    Args:
        selection: A `Selection`; `"paper"` (see
            `nbn_keras.selection.PaperSelection`), `"all"`, or the name of a
            selection a model family declares (RIDE's); a collection of
            layer names; or a predicate `fn(layer) -> bool` called on every
            plain BN layer.
        stages: With `selection="paper"`, the stages to convert instead of
            the last one.

    Returns:
        A `Selection`.

    Raises:
        ValueError: for an unknown name, or `stages` without `"paper"`.
    """
    if isinstance(selection, selection_lib.Selection):
        return selection
    family_selections = registry.family_selections()
    if isinstance(selection, str) and selection in family_selections:
        return family_selections[selection][1]
    if stages is not None and selection != "paper":
        raise ValueError("`stages` only applies to selection='paper'.")
    if selection == "paper":
        return selection_lib.PaperSelection(
            registry.namings(), None if stages is None else tuple(stages))
    if selection == "all":
        return selection_lib.AllSelection()
    if callable(selection):
        return selection_lib.PredicateSelection(selection)
    if isinstance(selection, str):
        names = ", ".join(f"'{n}'" for n in GENERIC_SELECTIONS + tuple(family_selections))
        raise ValueError(
            f"Unknown selection '{selection}'. Use {names}, a "
            "collection of layer names or a predicate."
        )
    return selection_lib.NameSelection(frozenset(selection))


def select_bn_layers(model, selection="paper", stages=None):
    """Returns the BN layers of `model` (nested models included) to convert.

    Args:
        model: A Keras model.
        selection: See `resolve_selection`.
        stages: With `selection="paper"`, the stages to convert instead of
            the last one.

    Returns:
        The list of selected `keras.layers.BatchNormalization` layers, every
        group of the selection in turn.
    """
    resolved = resolve_selection(selection, stages)
    resolved.check_options(stages, "model", False)
    groups = resolved.groups(model)
    return [layer for layers in groups.values() for layer in layers]


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
            BN), `"all"`, the name of a selection a model family declares
            (RIDE's: every BN of each expert's last stage, one scale per
            expert, `nbn_keras.models.ride.selection`), a collection of
            layer names, a predicate `fn(layer) -> bool`, or a
            `nbn_keras.selection.Selection`. See `resolve_selection`. With
            `scale_sharing="model"` each group of the selection gets its
            own `NBNScale`, named as the group.
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
    resolved = resolve_selection(selection, stages)
    resolved.check_options(stages, scale_sharing, preserve_outputs)
    model = graph.as_functional(model)
    groups = resolved.groups(model)
    shared = scale_sharing == "model"
    if shared:
        _check_scale_wiring(model, groups)

    def make_nbn(layer):
        return NormalizedBatchNormalization.from_batch_normalization(
            layer, shared_scale=shared, separate_scales=separate_scales,
            preserve_outputs=preserve_outputs,
        )

    group_of_new = {}
    converted = graph.clone(
        model, _replacer(groups, make_nbn, group_of_new),
        _scale_caller(group_of_new, separate_scales) if shared else None,
    )
    if beta_initializer is not None:
        _draw_betas(converted, beta_initializer)
    return converted


def _replacer(groups, make_nbn, group_of_new):
    """`replace(layer)` for `graph.clone`: NBN for the selected layers.

    Records the group (shared scale) of each new layer in `group_of_new`,
    keyed by `id`, for `_scale_caller`.
    """
    group_of = {id(layer): group for group, layers in groups.items() for layer in layers}

    def replace(layer):
        if id(layer) not in group_of:
            return None
        new = make_nbn(layer)
        group_of_new[id(new)] = group_of[id(layer)]
        return new

    return replace


def _scale_caller(group_of_new, separate_scales):
    """`call_function` for `clone_model`: feeds each NBN layer its group's scale.

    The scale layer of a group (named as the group) is made at its group's
    first layer and called on that layer's input, so it joins the graph there.
    """
    scale_tensors = {}

    def call_with_scale(layer, *args, **kwargs):
        group = group_of_new.get(id(layer))
        if group is not None:
            if group not in scale_tensors:
                scale_layer = NBNScale(separate_scales=separate_scales, name=group)
                scale_tensors[group] = scale_layer(args[0])
            kwargs["scale"] = scale_tensors[group]
        return layer(*args, **kwargs)

    return call_with_scale


def _draw_betas(model, beta_initializer):
    """Redraws the raw beta of every NBN layer, one seed offset per layer."""
    nbn_layers = [l for l in leaf_layers(model)
                  if isinstance(l, NormalizedBatchNormalization) and l.center]
    for position, layer in enumerate(nbn_layers):
        initializer = _offset_seed(beta_initializer, position)
        layer.beta.assign(initializer(layer.beta.shape, layer.beta.dtype))


def _check_scale_wiring(model, groups):
    """Each group's scale must be wireable and its name free."""
    for group, layers in groups.items():
        _check_single_graph(model, {id(layer) for layer in layers})
    clashing = sorted({l.name for l in leaf_layers(model)} & set(groups))
    if clashing == [SCALE_LAYER_NAME]:
        raise ValueError(
            f"Model '{model.name}' already has a layer named "
            f"'{SCALE_LAYER_NAME}'."
        )
    if clashing:
        raise ValueError(f"Model '{model.name}' already has layers {clashing}.")


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
    model = graph.as_functional(model)

    def make_stock(layer):
        return layer.stock_equivalent() if has_fold_hook(layer) else None

    def call_without_scale(layer, *args, **kwargs):
        kwargs.pop("scale", None)
        return layer(*args, **kwargs)

    return graph.clone(model, make_stock, call_without_scale)


def _walk_with_paths(model, path):
    """Yields `(layer, parent, parent's path)`; paths join model names by '/'."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _walk_with_paths(layer, f"{path}/{layer.name}")
        else:
            yield layer, model, path


def _check_single_graph(model, selected_ids):
    """A shared scale is one graph edge, so all its layers need one graph."""
    parents, selected = {}, {}
    for layer, parent, path in _walk_with_paths(model, model.name):
        if id(layer) in selected_ids:
            parents[id(parent)] = parent
            selected.setdefault(path, []).append(layer.name)
    if len(parents) > 1:
        # Paths, not names: a nested backbone often shares its parent's name.
        spans = "; ".join(f"'{path}': {len(names)} ({', '.join(names[:3])}"
                          f"{', ...' if len(names) > 3 else ''})"
                          for path, names in selected.items())
        raise ValueError(
            "A shared scale needs every converted layer in one functional "
            f"model, but the selection spans {len(parents)} (sub-)models: {spans}. "
            "Use scale_sharing='layer' or narrow the selection."
        )
    (parent,) = parents.values()
    if isinstance(parent, keras.Sequential):
        raise ValueError(
            f"A shared scale cannot be wired inside the Sequential sub-model "
            f"'{parent.name}'. Use scale_sharing='layer'."
        )


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
