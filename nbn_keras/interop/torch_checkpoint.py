"""The NBN authors' PyTorch checkpoints as Keras models.

    python -m nbn_keras.import_torch --checkpoint=FILE --arch=ARCH \
        --num_classes=N --output=OUT.keras

reads a checkpoint of the authors' code (github.com/yuxiangbao/NBN, `main.py`:
`torch.save({'state_dict': ..., 'epoch': ..., ...})`, keys prefixed `module.`
under DataParallel/DDP), builds the same network with `nbn_keras.models`
(`--arch` = their `arch`: `resnet50`, `resnet50_nbn`, `resnext50`,
`resnext50_nbn`, and the multi-expert `resnet50_ride`, `resnet50_ride_nbn` of
`nbn_keras.models.ride`, whose experts, head type, `reduce_dimension` and
`share_layer3` are read from the checkpoint), reads the head type from the
checkpoint's keys (`fc.bn.*`: their `Linear_fcbn`, or without weight and bias
`Linear_fcbn_notaffine`, for the archs whose builders pass `fc_type` on;
printed), loads every weight and BN statistic into it and saves it as a
`.keras` file. The model takes what nbn_keras models take: raw pixels in
[0, 255], NHWC, with the ImageNet mean/std normalisation inside the graph, so
its logits on `x` are those of their model in eval mode on
`(x / 255 - mean) / std` in NCHW. It loads with `import nbn_keras;
keras.models.load_model(OUT)` and exports for TF Serving with
`python -m nbn_keras.export --model=OUT`.

PyTorch is needed only here: `pip install -e ".[torch]"`.
"""

import os
import zipfile

import keras
import numpy as np

from nbn_keras import conversion
from nbn_keras import files
from nbn_keras import graph
from nbn_keras import interrupts
from nbn_keras.models import registry
from nbn_keras.models.registry import build_classifier
from nbn_keras.data.list_files import IMAGENET_MEAN
from nbn_keras.data.list_files import IMAGENET_STD
from nbn_keras.layers import NBNScale
from nbn_keras.models.heads import TORCH_FC_TYPES

# Their `arch` -> (our backbone, converted to NBN), from the families'
# checkpoint mappings (`nbn_keras.models.family.CheckpointArch`).
ARCHS = {arch: (entry.architecture, entry.nbn)
         for arch, (_, entry) in registry.checkpoint_archs().items()}
# Their NBN models hold the shared alpha as `scale_factor[0]` of a vector
# with one entry per NBN-capable BN (the rest are never used); RIDE's hold
# expert e's alpha as `scale_factor[e]`.
SCALE_KEY = "scale_factor"
# The heads each of their builders can build (some pass `arch_args.fc_type`
# on; the others always build `nn.Linear`).
ARCH_HEADS = {arch: entry.heads for arch, (_, entry) in registry.checkpoint_archs().items()}
# A BN counter PyTorch keeps; unused at inference, accepted when present.
OPTIONAL_SUFFIX = ".num_batches_tracked"
_MAX_LISTED = 10


def check_checkpoint_file(path):
    """Raises a `ValueError` saying what is wrong with an unreadable file.

    Checks what can be checked without unpickling: the file is not empty,
    and a file in `torch.save`'s zip format (the default since PyTorch 1.6)
    is a complete archive whose members match their checksums.

    Args:
        path: Path of an existing file.
    """
    if os.path.getsize(path) == 0:
        raise ValueError(f"'{path}' is empty (0 bytes): it is not a PyTorch checkpoint.")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return  # Not a zip: the legacy pickle format, or no checkpoint.
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        raise ValueError(
            f"'{path}' is truncated or damaged: torch.save writes a zip archive, "
            f"and this one is incomplete ({error})."
        ) from None
    if damaged is not None:
        raise ValueError(
            f"'{path}' is damaged: its member '{damaged}' does not match its checksum."
        )


def read_checkpoint(path, weights_only=True):
    """Reads a PyTorch checkpoint's state dict as float32 NumPy arrays.

    Accepts the authors' training checkpoints (a dict with `state_dict`)
    and bare state dicts; strips DataParallel's `module.` prefixes.

    Args:
        path: Path of a file written by `torch.save`.
        weights_only: Passed to `torch.load`: `True` (the default) refuses to
            run code stored in the file. Set `False` only for files you
            trust.

    Returns:
        `(state_dict, arch)`: a dict from key to array, and the `arch` the
        checkpoint records, or `None`.
    """
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            "Importing PyTorch checkpoints needs PyTorch: "
            'pip install -e ".[torch]"'
        ) from error
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No checkpoint file at '{path}'.")
    check_checkpoint_file(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as error:
        cause = str(error).strip() or (
            "the data ends early (a truncated file?)" if isinstance(error, EOFError)
            else f"{type(error).__name__} without a message")
        refused = weights_only and "weights_only" in cause.lower().replace(" ", "_")
        raise ValueError(
            f"'{path}' could not be read as a PyTorch checkpoint"
            + (" with weights_only=True (use --noweights_only only for a "
               "file you trust)" if refused else "")
            + f": {cause}"
        ) from error
    arch = None
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        arch = checkpoint.get("arch")
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not all(
        torch.is_tensor(value) for value in checkpoint.values()
    ):
        raise ValueError(
            f"'{path}' holds neither a dict with a 'state_dict' entry nor a "
            "state dict of tensors."
        )
    state_dict = {}
    for key, value in checkpoint.items():
        state_dict[key.removeprefix("module.")] = (
            value.detach().cpu().float().numpy()
            if value.is_floating_point() else value.cpu().numpy()
        )
    return state_dict, arch


def torch_key(layer_name):
    """The PyTorch module path of a layer of the authors' networks.

    The head `logits` is their `fc`, its logit BN `logits_bn` their `fc.bn`.
    """
    if layer_name == "logits" or layer_name.startswith("logits_"):
        layer_name = "fc" + layer_name[len("logits"):]
    return layer_name.replace("_", ".")


def _conv_kernel(weight):
    # PyTorch (out, in / groups, kh, kw) -> Keras (kh, kw, in / groups, out).
    return weight.transpose(2, 3, 1, 0)


def _expected_arrays(model):
    """`{torch key: (variable, to_keras, torch shape)}` for `model`'s variables."""
    expected = {}
    scales = {}

    def expect(key, variable, to_keras=None, torch_shape=None):
        shape = tuple(variable.shape) if torch_shape is None else torch_shape
        expected[key] = (variable, to_keras, shape)

    for layer in conversion.leaf_layers(model):
        path = torch_key(layer.name)
        if isinstance(layer, keras.layers.Conv2D):
            kh, kw, fan_in, out = layer.kernel.shape
            expect(path + ".weight", layer.kernel, _conv_kernel, (out, fan_in, kh, kw))
        elif isinstance(layer, keras.layers.Dense):
            expect(path + ".weight", layer.kernel, np.transpose,
                   tuple(layer.kernel.shape)[::-1])
            expect(path + ".bias", layer.bias)
        elif isinstance(layer, keras.layers.BatchNormalization):
            if layer.scale:  # Not in a BN over the logits with affine=False.
                expect(path + ".weight", layer.gamma)
            if layer.center:
                expect(path + ".bias", layer.beta)
            expect(path + ".running_mean", layer.moving_mean)
            expect(path + ".running_var", layer.moving_variance)
        elif isinstance(layer, NBNScale):
            scales[_scale_index(layer.name)] = layer.scales[0]
        elif layer.weights:
            raise AssertionError(f"No checkpoint mapping for layer '{layer.name}'.")
    if scales:
        expect(SCALE_KEY, _ScaleEntries(scales), None, (_scale_factor_length(model),))
    return expected


def _scale_index(name):
    """The `scale_factor` entry of a scale layer: 0, or the one its family says.

    (RIDE's: the expert index.)
    """
    if name == conversion.SCALE_LAYER_NAME:
        return 0
    found = registry.scale_family(name)
    if found is None:
        raise AssertionError(f"No checkpoint mapping for scale layer '{name}'.")
    return found[1]


class _ScaleEntries:
    """Assigns entries of `scale_factor` to scale variables, by index."""

    dtype = "float32"

    def __init__(self, variables):
        self.variables = variables

    def assign(self, vector):
        for index, variable in self.variables.items():
            variable.assign(vector[index])


def _scale_factor_length(model):
    """How many entries the authors' `scale_factor` has for this network.

    One per BN of their NBN class: the last BN of every residual block and
    every shortcut BN, i.e. the BN layers that feed a residual sum; or what
    the family of the model's scale layers says (RIDE: every 2D BN, the BN
    over the logits being PyTorch's BatchNorm1d).
    """
    for layer in conversion.leaf_layers(model):
        found = isinstance(layer, NBNScale) and registry.scale_family(layer.name)
        if found and found[0].scale_factor_length is not None:
            return found[0].scale_factor_length(model)
    return sum(
        graph.feeds_residual_sum(layer)
        for layer in conversion.leaf_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization)
    )


def _listed(keys):
    keys = sorted(keys)
    more = len(keys) - _MAX_LISTED
    return ", ".join(keys[:_MAX_LISTED]) + (f" and {more} more" if more > 0 else "")


def build_model(arch, num_classes, image_size=224, ride_options=None, head="linear"):
    """The authors' network `arch` in Keras, freshly initialised.

    Args:
        arch: One of `ARCHS`.
        num_classes: Number of classes of the classifier.
        image_size: Height and width of the model's input.
        ride_options: For the archs whose family reads options from their
            checkpoints (RIDE's), the options of its classifier builder
            (`nbn_keras.models.family.Family.checkpoint_options`).
        head: The head, one of `nbn_keras.models.heads.HEADS` (see `head_type`).

    Returns:
        A `keras.Model` from raw pixels in [0, 255] (ImageNet mean/std
        normalisation inside) to logits, named `arch`.
    """
    if arch not in ARCHS:
        raise ValueError(f"Unknown arch '{arch}'. Choose one of {tuple(ARCHS)}.")
    family, entry = registry.checkpoint_archs()[arch]
    model = build_classifier(
        entry.architecture, num_classes, (image_size, image_size, 3),
        mean=IMAGENET_MEAN, std=IMAGENET_STD, name=arch,
        ride_options=ride_options if family.checkpoint_options else None,
        head=head,
    )
    if not entry.nbn:
        return model
    return conversion.convert_to_nbn(model, family.nbn_selection)


def head_type(state_dict, arch):
    """The head a state dict of the authors' `arch` holds, and the evidence.

    Their `fc` (the family's `checkpoint_head`; RIDE: each of `linears.{e}`,
    read on `linears.0`) is `Linear_fcbn` when it has a
    BN (`fc.bn.running_mean`) with `fc.bn.weight`, `Linear_fcbn_notaffine`
    when that BN has no weight and bias, else `Linear`.

    Args:
        state_dict: A dict from their keys (without `module.`) to arrays.
        arch: One of `ARCHS`; the head must be one its builder makes
            (`ARCH_HEADS`).

    Returns:
        `(head, description)`: one of `nbn_keras.models.heads.HEADS` and a
        sentence saying which keys decided it.

    Raises:
        ValueError: if `arch`'s builder never makes that head.
    """
    fc = registry.checkpoint_archs()[arch][0].checkpoint_head
    if f"{fc}.bn.running_mean" not in state_dict:
        head, keys = "linear", f"no '{fc}.bn.*' keys"
    elif f"{fc}.bn.weight" in state_dict:
        head, keys = "fcbn", f"'{fc}.bn.*' with weight and bias"
    else:
        head, keys = "fcbn_notaffine", f"'{fc}.bn.*' without weight and bias"
    found = f"head {TORCH_FC_TYPES[head]} ({keys})"
    if head not in ARCH_HEADS[arch]:
        makes = ", ".join(TORCH_FC_TYPES[h] for h in ARCH_HEADS[arch])
        raise ValueError(
            f"The checkpoint has a {found}, which their arch '{arch}' never "
            f"builds (it builds {makes}); is it another arch?")
    return head, found


def load_state_dict(model, state_dict):
    """Loads the authors' `state_dict` into `model` (from `build_model`).

    Every key of `state_dict` must be used and every variable of the model
    filled, with matching shapes; otherwise a `ValueError` names the keys
    and `model` is left unchanged.

    Args:
        model: A model from `build_model`.
        state_dict: A dict from the authors' PyTorch keys (without `module.`)
            to NumPy arrays, e.g. from `read_checkpoint`.

    Returns:
        `model`.
    """
    expected = _expected_arrays(model)
    given = {k: v for k, v in state_dict.items() if not k.endswith(OPTIONAL_SUFFIX)}
    missing = set(expected) - set(given)
    extra = set(given) - set(expected)
    problems = []
    if missing:
        problems.append(f"missing keys: {_listed(missing)}")
    if extra:
        problems.append(f"unexpected keys: {_listed(extra)}")
    misshaped = [
        f"{key} {tuple(given[key].shape)} (expected {expected[key][2]})"
        for key in set(expected) & set(given)
        if tuple(given[key].shape) != expected[key][2]
    ]
    if misshaped:
        problems.append(f"mis-shaped keys: {_listed(misshaped)}")
    if problems:
        arch = model.name
        hint = ""
        if SCALE_KEY in extra:
            hint = f" It has NBN ('{SCALE_KEY}'): is it arch '{arch}_nbn'?"
        elif SCALE_KEY in missing:
            hint = (f" It has no NBN ('{SCALE_KEY}'): is it arch "
                    f"'{arch.removesuffix('_nbn')}'?")
        raise ValueError(
            f"The checkpoint does not match arch '{arch}' with "
            f"{model.outputs[0].shape[-1]} classes: "
            + "; ".join(problems) + "." + hint
        )
    for key, (variable, to_keras, _) in expected.items():
        value = given[key] if to_keras is None else to_keras(given[key])
        variable.assign(np.asarray(value, dtype=variable.dtype))
    return model


def import_checkpoint(
    checkpoint,
    arch,
    num_classes,
    output=None,
    image_size=224,
    weights_only=True,
    overwrite=False,
):
    """Imports an authors' checkpoint; optionally saves it as a `.keras` file.

    Args:
        checkpoint: Path of the PyTorch checkpoint.
        arch: One of `ARCHS`. If the checkpoint records its `arch`, they
            must agree.
        num_classes: Number of classes (1000 for ImageNet-LT).
        output: Path of the `.keras` file to write, or `None`.
        image_size: Height and width of the model's input (their models are
            trained and evaluated at 224).
        weights_only: See `read_checkpoint`.
        overwrite: Replace an existing `output`. Without it an existing
            file is an error. The file is written under a temporary name and
            renamed, so a failed import leaves no partial file.

    Returns:
        The Keras model.

    Example:

    >>> model = nbn_keras.interop.torch_checkpoint.import_checkpoint(
    ...     "resnext50_nbn/model_best.pth.tar", "resnext50_nbn", 1000,
    ...     output="resnext50_nbn.keras")
    """
    if output is not None:
        if not output.endswith(".keras"):
            raise ValueError(f"The output must be a .keras file, got '{output}'.")
        if os.path.exists(output) and not overwrite:
            raise FileExistsError(
                f"'{output}' exists; pass overwrite=True (--overwrite) to "
                "replace it."
            )
    state_dict, recorded_arch = read_checkpoint(checkpoint, weights_only)
    # (Their RIDE NBN arch is spelt `resnet50_ride_NBN`.)
    if recorded_arch is not None and recorded_arch.lower() != arch:
        raise ValueError(
            f"The checkpoint was trained as arch '{recorded_arch}', not "
            f"'{arch}'."
        )
    if arch not in ARCHS:
        raise ValueError(f"Unknown arch '{arch}'. Choose one of {tuple(ARCHS)}.")
    family = registry.checkpoint_archs()[arch][0]
    options = None
    if family.checkpoint_options is not None:
        options = family.checkpoint_options(state_dict)
    head, found = head_type(state_dict, arch)
    print(f"{arch}: found {found}.", flush=True)
    model = load_state_dict(
        build_model(arch, num_classes, image_size, options, head), state_dict)
    if output is not None:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with files.atomic_write(output) as tmp_path:
            model.save(tmp_path)
    return model


def main(argv):
    """The command line; see the module docstring."""
    from absl import flags

    interrupts.start_command(argv, "the output file is written whole or not at all; run "
                                   "the same command again.")
    f = flags.FLAGS
    try:
        import_checkpoint(
            f.checkpoint, f.arch, f.num_classes, output=f.output,
            image_size=f.image_size, weights_only=f.weights_only,
            overwrite=f.overwrite,
        )
    except (FileNotFoundError, FileExistsError, ImportError, ValueError) as error:
        raise SystemExit(f"nbn_keras.import_torch: error: {error}")
    print(f.output)


def define_flags():
    from absl import flags

    flags.DEFINE_string("checkpoint", None, "The authors' PyTorch checkpoint.")
    flags.DEFINE_enum("arch", None, list(ARCHS), "Their `arch` of the checkpoint.")
    flags.DEFINE_integer("num_classes", None, "Classes of the classifier.", lower_bound=1)
    flags.DEFINE_string("output", None, "The .keras file to write.")
    flags.DEFINE_integer("image_size", 224, "Input height and width.", lower_bound=32)
    flags.DEFINE_boolean(
        "weights_only", True,
        "Load with torch.load(weights_only=True), which runs no code stored "
        "in the file; --noweights_only only for checkpoints you trust.",
    )
    flags.DEFINE_boolean("overwrite", False, "Replace an existing --output.")
    for name in ("checkpoint", "arch", "num_classes", "output"):
        flags.mark_flag_as_required(name)
