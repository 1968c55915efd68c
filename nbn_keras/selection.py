"""Which BN layers NBN converts, grouped by the scale they share.

A selection is an object whose `groups(model)` returns
`{scale_name: [BN layers]}`: each group gets its own `NBNScale` when scales
are shared. `nbn_keras.convert_to_nbn` accepts one directly, or a name
(`"paper"`, `"all"`, or one a model family declares, such as RIDE's),
a collection of layer names or a predicate, which
`nbn_keras.conversion.resolve_selection` turns into one.

Stages and blocks are read from layer names by a `Naming`, the contract a
model family declares for its layer names. Names are what survives
`clone_model`, folding and `.keras` round trips unchanged (a layer
attribute does not, and a model subclass is lost by `clone_model`). Which BN
of a stage the paper converts is read from the graph, not from names.
"""

import dataclasses
import re

import keras

from nbn_keras import graph

# The one scale of a model whose converted layers share theirs.
SCALE_LAYER_NAME = "nbn_scale"
_OPTIONS = (
    "Pass `selection='all'`, a list of layer names, or a predicate "
    "`fn(layer) -> bool`."
)


@dataclasses.dataclass(frozen=True)
class Naming:
    """How a family's layer names give the stage and block of a layer.

    Args:
        name: The contract's name, e.g. `"torchvision"`.
        pattern: A regular expression searched in layer names, whose two
            groups are the stage and the block index.

    Example:

    >>> Naming("torchvision", r"(?:^|_)layer(\\d+)_(\\d+)_").locate("layer4_0_bn3")
    (4, 0)
    """

    name: str
    pattern: str

    def locate(self, layer_name):
        """`(stage, block)` of `layer_name`, or `None` if not named so."""
        match = re.search(self.pattern, layer_name)
        return None if match is None else tuple(int(g) for g in match.groups())


def locate(namings, layer_name):
    """`(naming name, stage, block)` of `layer_name` under the first of `namings` that matches, or `None`."""
    for naming in namings:
        location = naming.locate(layer_name)
        if location is not None:
            return (naming.name,) + location
    return None


class Selection:
    """Base class: which BN layers to convert, grouped by shared scale.

    Subclasses implement `groups(model)`. A selection whose groups are fixed
    by the network (one scale per expert, say) overrides `check_options` to
    refuse the conversion options it cannot honour.
    """

    def groups(self, model):
        """`{scale_name: [BN layers]}` of `model` (nested models included)."""
        raise NotImplementedError

    def check_options(self, stages, scale_sharing, preserve_outputs):
        """Raises `ValueError` for conversion options this selection refuses."""
        del scale_sharing, preserve_outputs
        if stages is not None:
            raise ValueError("`stages` only applies to selection='paper'.")


class _OneGroup(Selection):
    """A selection of plain BN layers sharing the model's one scale."""

    def groups(self, model):
        selected = [layer for layer in graph.leaf_layers(model)
                    if graph.is_plain_bn(layer) and self.wants(layer)]
        self.check_found(model, selected)
        if not selected:
            raise ValueError(f"The selection matches no BN layer of '{model.name}'.")
        return {SCALE_LAYER_NAME: selected}

    def wants(self, layer):
        """Whether plain BN `layer` is selected."""
        raise NotImplementedError

    def check_found(self, model, selected):
        """Raises `ValueError` when `selected` lacks something asked for."""


class AllSelection(_OneGroup):
    """Every plain BatchNormalization layer (`selection="all"`)."""

    def wants(self, layer):
        return True


@dataclasses.dataclass(frozen=True)
class PredicateSelection(_OneGroup):
    """The plain BN layers for which `predicate(layer)` is true."""

    predicate: object

    def wants(self, layer):
        return bool(self.predicate(layer))


@dataclasses.dataclass(frozen=True)
class NameSelection(_OneGroup):
    """The plain BN layers of the given names; each name must exist."""

    names: frozenset

    def wants(self, layer):
        return layer.name in self.names

    def check_found(self, model, selected):
        missing = self.names - {layer.name for layer in selected}
        if missing:
            raise ValueError(
                f"No BatchNormalization layers named {sorted(missing)} in "
                f"model '{model.name}'."
            )


@dataclasses.dataclass(frozen=True)
class PaperSelection(Selection):
    """The reference ResNets' selection (`selection="paper"`).

    In each selected stage: the last BN of every residual block and the BN of
    the shortcut branch, i.e. the BN layers whose output goes straight into
    the residual sum. Stages come from the layer names (`namings`), the roles
    from the model graph, so a model the rule does not describe raises an
    error instead of being converted by a guess. In particular a
    pre-activation ResNet (KerasCV `ResNetV2Backbone`), whose residual
    branches end in a convolution and whose shortcuts have no BN, is refused.

    Args:
        namings: The `Naming` contracts stages are read with.
        stages: Stage indices (negative counts from the last stage), or
            `None` for the last stage only, as in the paper.
    """

    namings: tuple
    stages: tuple = None

    def check_options(self, stages, scale_sharing, preserve_outputs):
        pass

    def groups(self, model):
        bn_layers = [layer for layer in graph.leaf_layers(model)
                     if isinstance(layer, keras.layers.BatchNormalization)]
        located = self._located(bn_layers)
        selected = []
        for stage in self._wanted_stages(located):
            selected.extend(self._in_stage(located, stage))
        return {SCALE_LAYER_NAME: selected}

    def _located(self, bn_layers):
        located = [(layer, locate(self.namings, layer.name)) for layer in bn_layers]
        located = [(layer, where) for layer, where in located if where is not None]
        if not located:
            raise ValueError(
                "The paper's selection is undefined for this model: none of its "
                "BN layers is named as a ResNet's (the backbones of "
                "`nbn_keras.models`, KerasCV's ResNetBackbone). " + _OPTIONS
            )
        namings = sorted({naming for _, (naming, _, _) in located})
        if len(namings) > 1:
            raise ValueError(
                f"The model's BN layers mix the ResNet naming contracts {namings}, "
                "so its stages are ambiguous. " + _OPTIONS
            )
        return located

    def _wanted_stages(self, located):
        all_stages = sorted({stage for _, (_, stage, _) in located})
        wanted = []
        for stage in [-1] if self.stages is None else self.stages:
            if not -len(all_stages) <= stage < len(all_stages):
                raise ValueError(
                    f"Stage {stage} does not exist: the model's stages are "
                    f"{all_stages}."
                )
            wanted.append(all_stages[stage])
        return wanted

    @staticmethod
    def _in_stage(located, stage):
        in_stage = [
            layer for layer, (_, s, _) in located
            if s == stage and graph.feeds_residual_sum(layer)
        ]
        if not in_stage:
            raise ValueError(
                f"No BN layer of stage {stage} feeds a residual sum, so the "
                "paper's rule (the BN ending each residual branch and the "
                "shortcut BN) does not apply: this is not a post-activation "
                "ResNet. A pre-activation ResNet (e.g. KerasCV's "
                "ResNetV2Backbone) ends its branches with a convolution. "
                + _OPTIONS
            )
        already = [l.name for l in in_stage if not graph.is_plain_bn(l)]
        if already:
            raise ValueError(f"Layers {already} are already NBN layers.")
        return in_stage


@dataclasses.dataclass(frozen=True)
class StageGroupSelection(Selection):
    """Every BN of one stage per branch, one scale per branch.

    For multi-branch networks (RIDE's experts): a BN layer whose name matches
    `pattern` belongs to the branch its first group gives, and each branch's
    layers share the scale `scale_name.format(branch)`.

    Args:
        pattern: A regular expression matched at the start of BN layer
            names; its one group is the branch index.
        scale_name: The scale layers' names, with `{}` for the branch.
        name: The selection's name, as users pass it.
        refusal: The error raised when conversion options other than
            `separate_scales` are asked for.
        not_found: The error raised when the model has no such layer
            (`{model}` is replaced by the model's name).
        description: What it converts, in a few words (the `--help` text).
    """

    pattern: str
    scale_name: str
    name: str
    refusal: str
    not_found: str
    description: str = ""

    def check_options(self, stages, scale_sharing, preserve_outputs):
        if stages is not None or scale_sharing != "model" or preserve_outputs:
            raise ValueError(self.refusal)

    def groups(self, model):
        by_branch = {}
        for layer in graph.leaf_layers(model):
            match = re.match(self.pattern, layer.name)
            if match and isinstance(layer, keras.layers.BatchNormalization):
                if not graph.is_plain_bn(layer):
                    raise ValueError(f"Layer '{layer.name}' is already an NBN layer.")
                by_branch.setdefault(int(match.group(1)), []).append(layer)
        if not by_branch:
            raise ValueError(self.not_found.format(model=model.name))
        return {self.scale_name.format(branch): layers
                for branch, layers in sorted(by_branch.items())}
