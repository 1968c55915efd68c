"""The training run's configuration: its hyperparameters, its options, their flags.

`TrainConfig` holds the hyperparameters, everything a run's result depends
on; `RunOptions` holds where the run lives (`run_dir`, `export_dir`) and
how it runs (`verbose`, the `allow_*` overrides, limits). Their fields define
the command-line flags of `python -m nbn_keras.train` (`define_flags`), are
read back from parsed flags (`from_flags`, `options_from_flags`) or from a
run's `flags.cfg` (`from_flagfile`), written as one flagfile
(`to_flagfile`), compared on resume (`changed_fields`) and checked together
(`validate`) before the run writes anything. Only the command modules touch
absl's global flags.
"""

import dataclasses
import math
import os
import re
from typing import Optional

from absl import flags

from nbn_keras import data as data_lib
from nbn_keras.serving import versions
from nbn_keras.training import run_files
from nbn_keras.models import registry
from nbn_keras.models.registry import BACKBONES
from nbn_keras.models.registry import min_image_size
from nbn_keras.conversion import SCALE_SHARING_MODES
from nbn_keras.data.samplers import SAMPLERS
from nbn_keras.models.heads import HEADS
from nbn_keras.training.losses import loss_names


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the flags."""


class _NumberListParser(flags.ArgumentParser):
    """Comma-separated numbers, e.g. `--lr_drop_epochs=160,180`."""

    def __init__(self, number_type):
        super().__init__()
        self.number_type = number_type

    def parse(self, argument):
        if isinstance(argument, (list, tuple)):
            return [self.number_type(value) for value in argument]
        text = str(argument).strip()
        if not text:
            return []
        try:
            return [self.number_type(value) for value in text.split(",")]
        except ValueError:
            raise ValueError(
                f"expected comma-separated {self.number_type.__name__} values") from None

    def flag_type(self):
        return f"comma-separated {self.number_type.__name__} list"


def _field(default, help_text, kind, choices=None, kept_on_resume=True):
    # `help_text` and `choices` may be functions, called when the flags are
    # defined: what they list comes from the registry, which may have grown.
    return dataclasses.field(default=default, metadata={
        "help": help_text, "kind": kind, "choices": choices,
        "kept_on_resume": kept_on_resume})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The hyperparameters: what a run trains, and what it writes (see `--helpfull`).

    A resumed run must have the same ones (`changed_fields`).
    """

    # Data.
    data: str = _field("digits_lt", "Long-tailed data set.", "enum",
                       tuple(data_lib.LOADERS))
    imbalance_factor: float = _field(
        10.0, "Largest over smallest class size (CIFAR-LT, digits, synthetic).", "float")
    n_max: Optional[int] = _field(
        None, "Training images of the largest class (default: the data set's "
        "standard, e.g. 5000 for CIFAR-10-LT, 500 for CIFAR-100-LT).", "int")
    imbalance_profile: str = _field("exp", "Class-size profile of the long-tailed subset.",
                                    "enum", ("exp", "step"))
    data_seed: int = _field(0, "Seed choosing the long-tailed subset.", "int")
    image_size: Optional[int] = _field(None, "Side of the square training and test "
                                       "images (default: 32 for digits-LT and the "
                                       "synthetic set, 224 for list files). Not for "
                                       "CIFAR-LT.", "int")
    data_dir: Optional[str] = _field(None, "TFDS data directory (CIFAR-LT, "
                                     "Fashion-MNIST-LT). Must exist when given.", "string")
    manual_dir: Optional[str] = _field(None, "Directory with a manually downloaded TFDS "
                                       "archive (CIFAR-LT).", "string")
    download: bool = _field(True, "Let TFDS download CIFAR when it is not prepared in "
                            "--data_dir.", "bool")
    fashion_mnist_dir: Optional[str] = _field(
        None, "Folder of the four Fashion-MNIST idx .gz files (read when no prepared "
        "TFDS fashion_mnist is in --data_dir; then /usr/share/datasets/fashion-mnist).",
        "string")
    fashion_mnist_sha256: Optional[str] = _field(
        None, "A sha256sum-format file of the accepted Fashion-MNIST idx files, instead "
        "of the upstream and Debian checksums the code lists.", "string")
    download_fashion_mnist: bool = _field(
        False, "Let TFDS download Fashion-MNIST when no copy is found.", "bool")
    fashion_mnist_val_per_class: int = _field(
        500, "Fashion-MNIST-LT: validation images per class, held out of the training "
        "split before the long-tailed selection.", "int")
    fashion_mnist_padded: bool = _field(
        False, "Zero-pad Fashion-MNIST to 32x32 and repeat it over 3 channels (default: "
        "28x28x1).", "bool")
    image_root: Optional[str] = _field(None, "Image root of list-file data sets.", "string")
    train_list: Optional[str] = _field(None, "`path label` training list file.", "string")
    val_list: Optional[str] = _field(None, "`path label` validation list file.", "string")
    test_list: Optional[str] = _field(None, "`path label` test list file (default: the "
                                      "validation list).", "string")
    on_bad_image: str = _field("error", "List-file images that are missing or undecodable: "
                               "fail, or skip and count them.", "enum", ("error", "skip"))
    num_classes: Optional[int] = _field(
        None, "Classes of a list-file data set; labels must be in [0, num_classes) "
        "(default: inferred from the training list and enforced on the others).", "int")
    allow_outside_image_root: bool = _field(
        False, "Accept list-file paths that resolve outside --image_root.", "bool")
    allow_duplicate_paths: bool = _field(
        False, "Accept a list-file path listed more than once with the same label "
        "(oversampling on purpose).", "bool")
    sampler: str = _field("instance", "Training sampler ('class_aware': the authors' "
                          "resample, --samples_per_class images of a class in a row).",
                          "enum", SAMPLERS)
    samples_per_class: int = _field(4, "--sampler=class_aware: images of one class in a "
                                    "row (the authors' resample: 4).", "int")
    many_threshold: int = _field(100, "Classes with more training images than this are "
                                 "'many'.", "int")
    few_threshold: int = _field(20, "Classes with fewer training images than this are "
                                "'few'.", "int")

    # Model.
    backbone: str = _field("resnet32", "Backbone network.", "enum", BACKBONES)
    nbn: bool = _field(True, "Convert the selected BN layers to NBN.", "bool")
    head: str = _field("linear", "Classifier head (every expert's, for RIDE), the authors' "
                       "fc_type: 'linear'; 'fcbn' = linear + BN over the logits "
                       "(Linear_fcbn); 'fcbn_notaffine' = the same BN without gamma and "
                       "beta (Linear_fcbn_notaffine).", "enum", HEADS)
    nbn_selection: str = _field("paper", lambda: (
        "'paper' (last stage: last BN of each block and shortcut BN), 'all', "
        + "".join(f"'{name}' ({family.name} backbones: {selection.description}), "
                  for name, (family, selection) in registry.family_selections().items())
        + "or comma-separated BN layer names."), "string")
    nbn_stages: tuple = _field((), "With --nbn_selection=paper: stage indices to convert "
                               "instead of the last stage.", "int_list")
    nbn_scale_sharing: str = _field("model", "One NBN scale for the model (the paper's) or "
                                    "one per layer.", "enum", SCALE_SHARING_MODES)
    nbn_separate_scales: bool = _field(False, "Separate scales for gamma and beta.", "bool")
    nbn_beta_init_std: float = _field(
        0.0, "Start NBN's raw beta from N(0, std^2) instead of BN's zeros (0: the "
        "reference's zero start).", "float")
    nbn_dynamics: bool = _field(
        False, "Write the raw gamma/beta norms, directions and scales of the NBN (or "
        "would-be NBN) layers per epoch to <run_dir>/nbn_dynamics.json.", "bool")
    init_from: Optional[str] = _field(
        None, "A .keras file (trained here or from nbn_keras.import_torch) whose weights "
        "start the model, matched by layer name, weight name and shape; what did not "
        "match is printed.", "string")
    train_only_head: bool = _field(
        False, "Classifier re-training: train only the head (and its logit BN) and the "
        "NBN scales; every other layer is frozen, its BN in inference mode (statistics "
        "kept).", "bool")
    synchronized_bn: bool = _field(
        True, "Synchronise BN batch statistics across replicas; off = per-replica "
        "statistics, as in PyTorch DDP without SyncBatchNorm.", "bool")
    ride_experts: int = _field(3, "RIDE backbones: number of experts.", "int")
    ride_reduce_dimension: bool = _field(
        False, "RIDE backbones: experts' layer3/layer4 planes 192/384 instead of "
        "256/512.", "bool")
    ride_share_layer3: bool = _field(False, "RIDE backbones: one layer3 shared by the "
                                     "experts.", "bool")

    # Optimisation.
    epochs: int = _field(200, "Training epochs.", "int")
    global_batch_size: int = _field(128, "Batch size summed over all replicas and workers.",
                                    "int")
    base_lr: float = _field(0.2, "Learning rate for a global batch of 256; the run uses "
                            "base_lr * global_batch_size / 256.", "float")
    learning_rate: Optional[float] = _field(None, "Explicit learning rate; overrides "
                                            "--base_lr scaling.", "float")
    momentum: float = _field(0.9, "SGD momentum.", "float")
    weight_decay: float = _field(5e-4, "Weight decay.", "float")
    weight_decay_mode: str = _field(
        "coupled", "'coupled': L2 added to the gradient before momentum, like the "
        "reference (PyTorch SGD); 'decoupled': Keras' own.", "enum", ("coupled", "decoupled"))
    decay_nbn_scale: bool = _field(True, "Apply weight decay to the NBN scale too (the "
                                   "reference does).", "bool")
    schedule: str = _field(
        "warmup_steps", "'warmup_steps' (warmup and drops per step), 'cifar_warm_step' (the "
        "NBN authors' CIFARWarmStepLR per epoch: epoch e <= --warmup_epochs at lr * e / "
        "warmup, each factor for epochs > its --lr_drop_epochs), 'ldam_drw_warm_step' "
        "(LDAM-DRW's: the same rule on e + 1), 'cosine' (per step, to 0 at the end) or "
        "'cosine_annealing' (PyTorch's CosineAnnealingLR stepped once per epoch with period "
        "--cosine_t_max epochs).", "enum",
        ("warmup_steps", "cifar_warm_step", "ldam_drw_warm_step", "cosine", "cosine_annealing"))
    cosine_t_max: Optional[int] = _field(None, "T_max in epochs of --schedule=cosine_annealing "
                                         "(default: --epochs).", "int")
    warmup_epochs: int = _field(5, "Linear warmup epochs.", "int")
    lr_drop_epochs: tuple = _field((160, 180), "Epochs of the step drops ('warmup_steps': "
                                   "from that epoch on; '*_warm_step': after it).", "int_list")
    lr_drop_factors: tuple = _field((0.01, 0.001), "Learning-rate factors from each drop "
                                    "epoch on.", "float_list")
    loss: str = _field("cross_entropy", "Training loss.", "enum", loss_names)
    logit_adjust_tau: float = _field(1.0, "tau of the logit-adjusted loss.", "float")
    drw_epoch: int = _field(160, "Epoch deferred re-weighting starts (ldam_drw).", "int")
    ride_reweight_epoch: Optional[int] = _field(
        None, "--loss=ride: re-weighting is on in epochs after this one (0-based); "
        "unset = never.", "int")
    ride_diversity_factor: float = _field(-0.2, "--loss=ride, ride_balanced_softmax: weight "
                                          "of the diversity (KL) term.", "float")
    ride_reweight_factor: float = _field(
        0.05, "--loss=ride: the reweight_factor of the per-class diversity temperatures "
        "(0.05 is the default of RIDELoss, 0.02 RIDE's ImageNet-LT config's).", "float")
    hcm_n: int = _field(300, "--loss=hcm: classes kept by the hard-class mask (the NBN "
                        "authors' HCM_N).", "int")
    steps_per_epoch: Optional[int] = _field(
        None, "Steps per epoch, all complete batches (default: see --keep_partial_batch).",
        "int")
    keep_partial_batch: bool = _field(
        True, "End each epoch with its partial batch, as the NBN authors' DataLoader does: "
        "ceil(N' / global batch) steps, N' the training images rounded up to a multiple of "
        "the replicas; off: floor(N / global batch) complete batches.", "bool")
    seed: int = _field(0, "Seed of initialisation, sampling and augmentation.", "int")
    # Execution.
    mixed_precision: str = _field("none", "Mixed-precision compute dtype.", "enum",
                                  ("none", "float16", "bfloat16"))
    xla: bool = _field(False, "XLA-compile the training step (single device only).", "bool")
    export: bool = _field(True, "Export a SavedModel for TF Serving at the end.", "bool")
    max_image_pixels: int = _field(
        4096 * 4096, "Largest height * width the export's `serve_image_bytes` decodes "
        "(read from the image header; larger images are refused).", "int")
    pictures: bool = _field(True, "Write pictures of the trained model (BN magnitudes, "
                            "per-class accuracy, Grad-CAM) to <run_dir>/pictures and "
                            "TensorBoard.", "bool")

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def _option(default, help_text, kind, kept_on_resume=False):
    return _field(default, help_text, kind, kept_on_resume=kept_on_resume)


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Where a run lives and how it runs, apart from its hyperparameters.

    A resumed run may change every option but where its export goes
    (`export_dir`, `model_name`), which is checked like a hyperparameter.

    Example:

    >>> options = RunOptions(run_dir="runs/digits", export_dir="saved_models")
    >>> options.served_model_name
    'digits'
    """

    run_dir: str = _option("runs/default", "Directory of the run's files.", "string")
    allow_foreign_run_dir: bool = _option(
        False, "Use a --run_dir that holds files but no run of this project (they may "
        "be overwritten).", "bool")
    export_dir: str = _option("saved_models", "TF Serving base directory of the export.",
                              "string", kept_on_resume=True)
    model_name: Optional[str] = _option(None, "Name of the served model (default: the run "
                                        "directory's name).", "string", kept_on_resume=True)
    allow_foreign_export_dir: bool = _option(
        False, "Export although <export_dir>/<model_name> holds entries other than "
        "model versions.", "bool")
    verbose: int = _option(1, "Keras progress output: 0, 1 (bar) or 2.", "int")
    allow_changed_flags: bool = _option(
        False, "Resume a run although flags differ from its flags.cfg (which is kept "
        "as it is).", "bool")
    cluster_timeout: int = _option(
        300, "Seconds a worker of a TF_CONFIG cluster waits for its peers before it "
        "stops with an error naming their addresses.", "int")
    memory_limit_gb: Optional[float] = _option(
        None, "Refuse a run whose training activations (estimated from the network's "
        "layer outputs x --global_batch_size) need more memory than this, in GB "
        "(default: this machine's memory; not checked on GPUs).", "float")

    @property
    def served_model_name(self):
        return self.model_name or os.path.basename(os.path.normpath(self.run_dir))

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


_CLASSES = (TrainConfig, RunOptions)


_DEFINE = {
    "string": flags.DEFINE_string,
    "int": flags.DEFINE_integer,
    "float": flags.DEFINE_float,
    "bool": flags.DEFINE_boolean,
}


def _all_fields():
    return [field for cls in _CLASSES for field in dataclasses.fields(cls)]


def define_flags(flag_values):
    """Defines one absl flag per `TrainConfig` and `RunOptions` field in `flag_values`.

    Args:
        flag_values: The `absl.flags.FlagValues` to define them in
            (`absl.flags.FLAGS` for a command).

    Example:

    >>> flag_values = flags.FlagValues()
    >>> define_flags(flag_values)
    >>> flag_values(["train", "--epochs=2", "--run_dir=/tmp/run"])
    """
    for field in _all_fields():
        meta = {key: value() if callable(value) else value
                for key, value in field.metadata.items()}
        kind, default = meta["kind"], field.default
        if kind == "enum":
            flags.DEFINE_enum(field.name, default, list(meta["choices"]), meta["help"],
                              flag_values=flag_values)
        elif kind.endswith("_list"):
            number_type = int if kind == "int_list" else float
            flags.DEFINE(_NumberListParser(number_type), field.name, list(default),
                         meta["help"], flag_values=flag_values,
                         serializer=flags.CsvListSerializer(","))
        else:
            _DEFINE[kind](field.name, default, meta["help"], flag_values=flag_values)


def from_flags(flag_values, cls=TrainConfig):
    """The `TrainConfig` (or, with `cls=RunOptions`, the options) of parsed flags."""
    values = {}
    for field in dataclasses.fields(cls):
        value = flag_values[field.name].value
        values[field.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def options_from_flags(flag_values):
    """The `RunOptions` of parsed flags."""
    return from_flags(flag_values, RunOptions)


def from_flagfile(path, cls=TrainConfig):
    """The `TrainConfig` (or `RunOptions`) a flagfile such as a run's `flags.cfg` describes.

    Raises:
        ConfigError: naming `path`, when it cannot be read or holds a flag
            this version does not define or a bad value.
    """
    flag_values = flags.FlagValues()
    define_flags(flag_values)
    try:
        flag_values(["train", f"--flagfile={path}"])
    except flags.Error as error:
        raise ConfigError(f"{path}: {error}") from None
    return from_flags(flag_values, cls)


def to_flagfile(config, options):
    """`config` and `options` as flagfile text: every field, one `--flag=value` per line."""
    flag_values = flags.FlagValues()
    define_flags(flag_values)
    lines = []
    for instance in (config, options):
        for field in dataclasses.fields(instance):
            flag = flag_values[field.name]
            value = getattr(instance, field.name)
            flag.value = list(value) if isinstance(value, tuple) else value
            if value is not None:
                lines.append(flag.serialize())
    return "\n".join(lines) + "\n"


def changed_fields(saved, current):
    """The fields a resumed run must keep that differ, with both values.

    Args:
        saved: The `TrainConfig` or `RunOptions` a run was started with.
        current: The same class, now.

    Returns:
        `[(name, saved_value, current_value)]`: every differing hyperparameter,
        and the options marked `kept_on_resume`.
    """
    return [
        (field.name, getattr(saved, field.name), getattr(current, field.name))
        for field in dataclasses.fields(current)
        if field.metadata["kept_on_resume"]
        and getattr(saved, field.name) != getattr(current, field.name)
    ]


_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_POSITIVE = ("n_max", "image_size", "num_classes", "max_image_pixels", "epochs",
             "global_batch_size", "base_lr", "learning_rate", "steps_per_epoch",
             "ride_experts", "cosine_t_max", "fashion_mnist_val_per_class",
             "samples_per_class", "hcm_n", "memory_limit_gb", "cluster_timeout")
_NON_NEGATIVE = ("momentum", "weight_decay", "warmup_epochs", "drw_epoch", "logit_adjust_tau",
                 "nbn_beta_init_std")


def validate(config, options=None):
    """Checks `config` (and `options`) as a whole; raises `ConfigError` naming every problem.

    Runs before the run writes anything: numbers finite and in range, files
    and directories that must exist, names usable as paths, the run and
    export directories writable.

    Args:
        config: A `TrainConfig`.
        options: The run's `RunOptions`; `None` checks the hyperparameters only.

    Raises:
        ConfigError: One message listing every problem found.
    """
    instances = (config,) if options is None else (config, options)
    problems = _number_problems(instances)
    problems += _data_problems(config) + _model_problems(config)
    if options is not None:
        problems += _place_problems(config, options)
    problems += _recipe_problems(config)
    if problems:
        raise ConfigError(" ".join(problems))


def _number_problems(instances):
    """Numbers that are not finite or out of range."""
    problems = []
    values = {}
    for instance in instances:
        for field in dataclasses.fields(instance):
            value = values[field.name] = getattr(instance, field.name)
            numbers = value if isinstance(value, tuple) else (value,)
            if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
                problems.append(f"--{field.name}={value} is not a finite number.")
    for name in _POSITIVE:
        value = values.get(name)
        if value is not None and not value > 0:
            problems.append(f"--{name} must be positive (got {value}).")
    for name in _NON_NEGATIVE:
        if not values[name] >= 0:
            problems.append(f"--{name} must be >= 0 (got {values[name]}).")
    for name in ("seed", "data_seed"):
        if not 0 <= values[name] < 2**32:
            problems.append(f"--{name} must be in [0, 2**32) (got {values[name]}).")
    if not values["momentum"] < 1:
        problems.append(f"--momentum must be < 1 (got {values['momentum']}).")
    return problems


def _data_problems(config):
    """Data and schedule flags that cannot work together or name missing files."""
    problems = []
    smallest = min_image_size(config.backbone)
    if config.image_size and config.image_size < smallest:
        problems.append(
            f"--image_size={config.image_size} is smaller than {smallest}, the smallest "
            f"input of --backbone={config.backbone} (its total stride: at {smallest}x"
            f"{smallest} its last stage is 1x1).")
    if not config.imbalance_factor >= 1:
        problems.append("--imbalance_factor must be >= 1 (largest / smallest class size).")
    if not 0 <= config.few_threshold <= config.many_threshold:
        problems.append("Need 0 <= --few_threshold <= --many_threshold.")
    if (len(config.lr_drop_epochs) != len(config.lr_drop_factors)
            or list(config.lr_drop_epochs) != sorted(config.lr_drop_epochs)):
        problems.append("--lr_drop_epochs and --lr_drop_factors need the same number of "
                        "entries, epochs increasing.")
    for name in ("data_dir", "manual_dir", "fashion_mnist_dir"):
        path = getattr(config, name)
        if path is not None and not os.path.isdir(path):
            problems.append(f"--{name} does not exist: {path}")
    if data_lib.uses_list_files(config.data):
        paths = [config.image_root, config.train_list, config.val_list]
        if not (all(paths) and os.path.isdir(paths[0])
                and all(os.path.isfile(p) for p in paths[1:])):
            problems.append("List-file data sets need an existing --image_root, "
                            "--train_list and --val_list.")
        if config.test_list and not os.path.isfile(config.test_list):
            problems.append(f"--test_list does not exist: {config.test_list}")
    if config.fashion_mnist_sha256 and not os.path.isfile(config.fashion_mnist_sha256):
        problems.append(f"--fashion_mnist_sha256 does not exist: {config.fashion_mnist_sha256}")
    if config.image_size and config.data == "fashion_mnist_lt":
        problems.append("--image_size is not supported for --data=fashion_mnist_lt (28x28; "
                        "--fashion_mnist_padded gives 32x32).")
    return problems


def _model_problems(config):
    """Model-start flags that cannot work."""
    problems = []
    if config.init_from and not os.path.isfile(config.init_from):
        problems.append(f"--init_from does not exist: {config.init_from}")
    if config.train_only_head and config.nbn and config.nbn_scale_sharing != "model":
        problems.append("--train_only_head needs --nbn_scale_sharing=model (per-layer "
                        "scales live in the frozen BN layers).")
    if config.image_size and data_lib.uses_tfds(config.data):
        problems.append(f"--image_size is not supported for --data={config.data} "
                        "(its images are 32x32).")
    return problems


def _place_problems(config, options):
    """Run and export directories that cannot be written or hold others' files."""
    problems = []
    if config.export and not _MODEL_NAME.match(options.served_model_name):
        problems.append(
            f"--model_name={options.served_model_name!r} is not usable as a directory "
            "name (letters, digits, '_', '-', '.'; not starting with '.').")
    directories = [("run_dir", options.run_dir)]
    if config.export:
        directories.append(("export_dir", options.export_dir))
    for name, path in directories:
        problem = _not_writable(path)
        if problem:
            problems.append(f"--{name}={path}: {problem}")
    return problems + _foreign_files(config, options)


def _recipe_problems(config):
    """Schedule, loss and selection flags that do not fit the rest."""
    problems = []
    if config.schedule == "cosine_annealing" and config.warmup_epochs:
        problems.append("--schedule=cosine_annealing has no warmup: set --warmup_epochs=0.")
    return problems + _family_problems(config)


def _family_problems(config):
    """A family's loss or NBN selection asked for with another family's backbone."""
    problems = []
    family = registry.loss_family(config.loss)
    if family is not None and config.backbone not in family.architectures:
        problems.append(f"--loss={config.loss} needs a {family.name} backbone "
                        f"({', '.join(family.architectures)}), not --backbone={config.backbone}.")
    family = registry.selection_family(config.nbn_selection)
    if config.nbn and family is not None and config.backbone not in family.architectures:
        problems.append(f"--nbn_selection={config.nbn_selection} needs a {family.name} "
                        f"backbone, not --backbone={config.backbone}.")
    return problems


def _foreign_files(config, options):
    """Problems of run and export directories holding files that are not ours."""
    problems = []
    foreign = run_files.foreign_entries(options.run_dir)
    if foreign and not options.allow_foreign_run_dir:
        listed = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        problems.append(
            f"--run_dir={options.run_dir} holds no run of this project but {len(foreign)} "
            f"other entr{'y' if len(foreign) == 1 else 'ies'} ({listed}); a run would "
            "overwrite them. Choose an empty or new "
            "--run_dir, or pass --allow_foreign_run_dir to use it anyway.")
    if config.export and not options.allow_foreign_export_dir and _MODEL_NAME.match(
            options.served_model_name):
        model_dir = os.path.join(options.export_dir, options.served_model_name)
        message = versions.foreign_model_dir_error(model_dir, "--allow_foreign_export_dir")
        if message:
            problems.append(f"--export_dir={options.export_dir}: {message}")
    return problems


def _not_writable(path):
    """Why files cannot be created under `path`, or `None` when they can."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is not a directory."
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable."
    return None
