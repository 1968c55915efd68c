"""Putting NBN into a model (`convert_to_nbn`) and taking it out (`fold_nbn`)."""

import re

import keras
import numpy as np

from nbn_keras.layers import NBNScale
from nbn_keras.layers import NormalizedBatchNormalization

SCALE_LAYER_NAME = "nbn_scale"
SCALE_SHARING_MODES = ("model", "layer")
_NBN_ONLY_CONFIG_KEYS = (
    "shared_scale", "separate_scales", "alpha_initializer",
    "alpha_regularizer", "norm_epsilon",
)

# `v2_stack_{stage}_block{block}_{index}_bn`: KerasCV ResNets (v1 and v2)
# and `nbn_keras.backbones.cifar_resnet`. Index 0 is the shortcut BN, the
# highest index the block's last BN; blocks count from 1, stages from 0.
_RESNET_BN_NAME = re.compile(r"(?:^|_)stack_?(\d+)_block(\d+)_(\d+)_bn$")


def parse_resnet_bn_name(name):
    """Returns `(stage, block, index)` of a ResNet BN layer name, or `None`."""
    match = _RESNET_BN_NAME.search(name)
    return tuple(int(g) for g in match.groups()) if match else None


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


def paper_selection(bn_layers, stages=None):
    """Picks the BN layers NBN converts in the reference ResNets.

    In each selected stage: the last BN of every residual block and the BN of
    the shortcut branch.

    Args:
        bn_layers: The candidate BN layers.
        stages: Stage indices (negative counts from the last stage), or
            `None` for the last stage only, as in the paper.

    Returns:
        The list of selected layers.
    """
    parsed = {}
    for layer in bn_layers:
        key = parse_resnet_bn_name(layer.name)
        if key is not None:
            parsed[id(layer)] = (layer, key)
    if not parsed:
        raise ValueError(
            "No ResNet BN layer names (`..._stack{s}_block{b}_{i}_bn`) were "
            "found, so the paper's selection is undefined for this model. "
            "Pass `selection='all'`, a list of layer names, or a predicate."
        )
    all_stages = sorted({key[0] for _, key in parsed.values()})
    wanted = set()
    for stage in [-1] if stages is None else stages:
        if not -len(all_stages) <= stage < len(all_stages):
            raise ValueError(
                f"Stage {stage} does not exist: the model's stages are "
                f"{all_stages}."
            )
        wanted.add(all_stages[stage])
    last_index = {}
    for _, (stage, block, index) in parsed.values():
        last_index[stage, block] = max(index, last_index.get((stage, block), 0))
    return [
        layer
        for layer, (stage, block, index) in parsed.values()
        if stage in wanted and (index == 0 or index == last_index[stage, block])
    ]


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
        selected = paper_selection(bn_layers, stages)
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
    and beta set to the BN's, and its scale(s) set to 1.0: converting a
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
            BN), `"all"`, a collection of layer names, or a predicate
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

    >>> backbone = nbn_keras.backbones.build_backbone("resnet18", (32, 32, 3))
    >>> nbn_backbone = nbn_keras.convert_to_nbn(backbone)
    >>> [l.name for l in nbn_backbone.layers
    ...  if isinstance(l, nbn_keras.NormalizedBatchNormalization)]
    ['v2_stack_3_block1_0_bn', 'v2_stack_3_block1_2_bn',
     'v2_stack_3_block2_2_bn']
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
        config = layer.get_config()
        config.update(shared_scale=shared, separate_scales=separate_scales)
        return NormalizedBatchNormalization.from_config(config)

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

    converted, pairs = _clone(
        model,
        lambda layer: make_nbn(layer) if id(layer) in selected_ids else None,
        call_with_shared_scale if shared else None,
    )
    converted_count = 0
    for old, new in pairs:
        if isinstance(new, NormalizedBatchNormalization):
            _copy_bn_to_nbn(old, new, preserve_outputs)
            if beta_initializer is not None and new.center:
                initializer = _offset_seed(beta_initializer, converted_count)
                new.beta.assign(initializer(new.beta.shape, new.beta.dtype))
            converted_count += 1
        else:
            new.set_weights(old.get_weights())
    return converted


def fold_nbn(model):
    """Returns a copy of `model` with every NBN layer folded into a plain BN.

    A trained NBN layer is exactly a BatchNormalization layer whose gamma and
    beta are NBN's effective ones, so the result gives the same inference
    outputs and contains stock Keras layers only. This is the model to export
    and serve. `NBNScale` layers disappear.

    Args:
        model: A functional or Sequential Keras model.

    Returns:
        A new `keras.Model` without any nbn_keras layer.

    Example:

    >>> served = nbn_keras.fold_nbn(nbn_model)
    >>> np.testing.assert_allclose(served(x), nbn_model(x), atol=1e-5)
    """
    model = _as_functional(model)

    def make_bn(layer):
        if not isinstance(layer, NormalizedBatchNormalization):
            return None
        config = layer.get_config()
        for key in _NBN_ONLY_CONFIG_KEYS:
            config.pop(key)
        return keras.layers.BatchNormalization.from_config(config)

    def call_without_scale(layer, *args, **kwargs):
        kwargs.pop("scale", None)
        return layer(*args, **kwargs)

    folded, pairs = _clone(model, make_bn, call_without_scale)
    for old, new in pairs:
        if not isinstance(old, NormalizedBatchNormalization):
            new.set_weights(old.get_weights())
            continue
        gamma, beta = old.effective_parameters(_shared_scale_value(old))
        new.set_weights(
            [np.asarray(w) for w in (gamma, beta) if w is not None]
            + [np.asarray(old.moving_mean), np.asarray(old.moving_variance)]
        )
    return folded


def _shared_scale_value(nbn_layer):
    """The value of `nbn_layer`'s shared scale, or `None` if it owns one."""
    if not nbn_layer.shared_scale:
        return None
    for node in nbn_layer._inbound_nodes:
        scale = node.arguments.kwargs.get("scale")
        if scale is not None:
            return scale._keras_history.operation.value()
    raise ValueError(f"Layer '{nbn_layer.name}' is not connected to a scale.")


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
    """`clone_model` with per-layer replacement; returns the clone and pairs.

    `replace(layer)` returns a new layer, or `None` to clone it unchanged.
    The pairs `(old, new)` of leaf layers are returned because `clone_model`
    copies no weights.
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
    return clone, pairs


def _copy_bn_to_nbn(bn, nbn, preserve_outputs):
    nbn.moving_mean.assign(bn.moving_mean)
    nbn.moving_variance.assign(bn.moving_variance)
    if bn.scale:
        nbn.gamma.assign(bn.gamma)
    if bn.center:
        nbn.beta.assign(bn.beta)
    if preserve_outputs:
        if bn.scale:
            nbn.gamma_alpha.assign(_norm(bn.gamma) + nbn.norm_epsilon)
        if bn.center:
            nbn.beta_alpha.assign(_norm(bn.beta) + nbn.norm_epsilon)


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


def _norm(variable):
    return float(np.linalg.norm(np.asarray(variable, dtype=np.float64)))
