r"""The training run's phases: `train_and_evaluate(config, options)`.

`python -m nbn_keras.train` (the command, its flags) calls it. A run goes
through phases recorded in `<run_dir>/run_state.json`: `train` (epochs,
each ending in an atomic checkpoint), `select` (`model.keras` from the best
validation epoch), `evaluate` (`test_metrics.json` and pictures), `export`
(a SavedModel for TF Serving) and `done`. Every file is written atomically,
so a run killed at any instant is completed by running the same command
again: it resumes the phase it stopped in, training from the last completed
epoch with exactly the batches the uninterrupted run would have seen. One
process at a time may use a run directory, and a resumed run must have the
hyperparameters in its `flags.cfg` (`allow_changed_flags` overrides).
Everything that can refuse a run is checked before its first file.
"""

import os
import shutil
import uuid

import keras
import tensorflow as tf
from absl import logging

from nbn_keras import data as data_lib
from nbn_keras import files
from nbn_keras import graph
from nbn_keras.analysis import plots
from nbn_keras.analysis import report
from nbn_keras.conversion import GENERIC_SELECTIONS
from nbn_keras.conversion import convert_to_nbn
from nbn_keras.models import registry
from nbn_keras.models.registry import build_classifier
from nbn_keras.serving.export import export_for_serving
from nbn_keras.training import callbacks as nbn_callbacks
from nbn_keras.training import config as config_lib
from nbn_keras.training import distribute
from nbn_keras.training import finetune
from nbn_keras.training import losses
from nbn_keras.training import metrics
from nbn_keras.training import optimizers
from nbn_keras.training import run_files

PHASES = ("train", "select", "evaluate", "export", "done")
STATE_FILENAME = run_files.STATE_FILENAME
FLAGS_FILENAME = run_files.FLAGS_FILENAME


class RunError(RuntimeError):
    """A run that cannot go on; the message says why and what to do."""


def train_and_evaluate(config, options):
    """Runs, or resumes, every phase of a run; returns the test figures.

    Args:
        config: The run's hyperparameters, a `nbn_keras.training.config.TrainConfig`.
        options: Where and how it runs, a `nbn_keras.training.config.RunOptions`
            (`run_dir`, `export_dir`, `verbose`, ...).

    Returns:
        The test figures (`report.evaluate`), or `None` on a non-chief worker.

    Raises:
        ConfigError: Options that cannot run, before the run's first file.
        RunError: A run directory holding another or a finished run, or
            training stopped by a NaN loss.
        RunDirectoryLocked: Another process uses the run directory.

    Example:

    >>> flag_values = flags.FlagValues()
    >>> config_lib.define_flags(flag_values)
    >>> flag_values(["train", "--flagfile=configs/digits_lt_nbn.cfg"])
    >>> figures = train_and_evaluate(config_lib.from_flags(flag_values),
    ...                              config_lib.options_from_flags(flag_values))
    """
    config_lib.validate(config, options)
    # Everything that can refuse the run happens before its first file.
    strategy = make_strategy(config, options)
    chief = distribute.is_chief(strategy)
    run_dir = options.run_dir if chief else distribute.worker_dir(options.run_dir, strategy)
    # Phases only advance, so the phase read here before taking the lock
    # needs the data whenever the phase found under the lock does.
    phase = files.read_json(os.path.join(run_dir, STATE_FILENAME), {}).get(
        "phase", "train")
    recorded_flags(run_dir)  # An unreadable flags.cfg refuses the run before its lock file.
    if config.mixed_precision != "none":
        keras.mixed_precision.set_global_policy(f"mixed_{config.mixed_precision}")
    keras.utils.set_random_seed(config.seed)
    data = load_data(config) if phase in PHASES[:3] else None
    model = (build_training_model(config, data, strategy, options.memory_limit_gb)
             if phase == "train" else None)
    os.makedirs(run_dir, exist_ok=True)
    with run_files.RunLock(run_dir):
        state = open_run(config, options, run_dir)
        if state["phase"] == "train":
            steps_trained = train_phase(config, data, strategy, run_dir, model, options.verbose)
            if not chief:
                return None  # The chief selects, reports and exports.
            state = advance(run_dir, state, "select", steps_trained=steps_trained)
        state = finish(config, options, data, run_dir, state)
        shutil.rmtree(os.path.join(run_dir, "backup"), ignore_errors=True)
    return files.read_json(os.path.join(run_dir, report.FIGURES_FILENAME))


def make_strategy(config, options):
    """The run's distribution strategy, once the global batch fits its replicas."""
    strategy = distribute.make_strategy(
        single_device=config.xla, cluster_timeout=options.cluster_timeout)
    replicas = strategy.num_replicas_in_sync
    if config.global_batch_size % replicas:
        raise config_lib.ConfigError(
            f"--global_batch_size={config.global_batch_size} is not divisible by the "
            f"{replicas} replicas.")
    return strategy


def train_phase(config, data, strategy, run_dir, model, verbose):
    """The `train` phase with its run's summary line; returns the optimizer steps."""
    replicas = strategy.num_replicas_in_sync
    data.write_subset(run_dir)
    print(f"{data.name}: {len(data.train_split)} training images in "
          f"{data.num_classes} classes, {epoch_steps(config, data, replicas)} steps per "
          f"epoch, {replicas} replica(s); run directory {run_dir}", flush=True)
    return train(config, data, strategy, run_dir, model, verbose)


def finish(config, options, data, run_dir, state):
    """The chief's phases after training: select, evaluate, export; returns the state."""
    if state["phase"] == "select":
        select_model(run_dir)
        state = advance(run_dir, state, "evaluate")
    if state["phase"] == "evaluate":
        evaluate(config, data, run_dir, state["steps_trained"])
        state = advance(run_dir, state, "export")
    if state["phase"] == "export":
        path = export(config, options, run_dir, state) if config.export else None
        files.kill_point("exported")
        state = advance(run_dir, state, "done", export_path=path)
    return state


def recorded_flags(run_dir):
    """`(TrainConfig, RunOptions)` of the run's `flags.cfg`; `None` without one.

    Raises:
        RunError: when the file cannot be read as this version's flags.
    """
    flags_path = os.path.join(run_dir, FLAGS_FILENAME)
    if not os.path.exists(flags_path):
        return None
    try:
        return (config_lib.from_flagfile(flags_path, config_lib.TrainConfig),
                config_lib.from_flagfile(flags_path, config_lib.RunOptions))
    except config_lib.ConfigError as error:
        raise RunError(
            f"--run_dir={run_dir} holds a run whose flags cannot be read ({error}); "
            "it was started by another version of nbn_keras, or the file was edited. "
            "Choose another --run_dir, or resume it with the version that started it."
        ) from None


def open_run(config, options, run_dir):
    """Checks the run directory against `config`; returns the run's state.

    A new run gets `flags.cfg` (`config` and `options`) and a state in phase
    `train`. A run that exists must have been started with the same
    hyperparameters and export place (else `RunError` lists the
    differences) and must not be finished.
    """
    flags_path = os.path.join(run_dir, FLAGS_FILENAME)
    state = files.read_json(os.path.join(run_dir, STATE_FILENAME))
    saved = recorded_flags(run_dir)
    if saved is not None:
        changes = [change for old, current in zip(saved, (config, options))
                   for change in config_lib.changed_fields(old, current)]
        if changes and not options.allow_changed_flags:
            listed = "; ".join(f"--{name}: {old!r} in the run, {new!r} now"
                               for name, old, new in changes)
            raise RunError(
                f"--run_dir={run_dir} holds a run started with other flags ({listed}). "
                f"Rerun with --flagfile={flags_path}, choose another --run_dir, or pass "
                "--allow_changed_flags to resume anyway.")
        if changes:
            logging.warning("Resuming with changed flags: %s", changes)
    else:
        files.write_text(flags_path, config_lib.to_flagfile(config, options))
    if state is None:
        state = {"phase": "train", "run_id": uuid.uuid4().hex}
        files.write_json(os.path.join(run_dir, STATE_FILENAME), state)
    if state["phase"] == "done":
        # Training again there would mix logs and could keep the old best
        # checkpoint; a killed run resumes instead.
        raise RunError(
            f"--run_dir={run_dir} holds a finished run ({state.get('export_path') or 'not exported'}). "
            "Choose another --run_dir, or move that one away.")
    if state["phase"] != "train":
        print(f"Resuming the run in {run_dir} at phase '{state['phase']}'.", flush=True)
    return state


def advance(run_dir, state, phase, **facts):
    """Records that the run reached `phase` (atomically); returns the new state."""
    state = {**state, **facts, "phase": phase}
    files.write_json(os.path.join(run_dir, STATE_FILENAME), state)
    return state


def load_data(config):
    """Loads the data set `config` names."""
    if data_lib.uses_list_files(config.data):
        options = dict(train_list=config.train_list, val_list=config.val_list,
                       test_list=config.test_list, image_root=config.image_root,
                       on_bad_image=config.on_bad_image, num_classes=config.num_classes,
                       allow_outside_image_root=config.allow_outside_image_root,
                       allow_duplicate_paths=config.allow_duplicate_paths)
        if config.image_size:
            options["image_size"] = config.image_size
    else:
        options = dict(imbalance_factor=config.imbalance_factor,
                       profile=config.imbalance_profile, seed=config.data_seed)
        if config.n_max:
            options["n_max"] = config.n_max
        if config.image_size:
            options["image_size"] = config.image_size
        if data_lib.uses_tfds(config.data):
            options.update(data_dir=config.data_dir, manual_dir=config.manual_dir,
                           download=config.download)
        if config.data == "fashion_mnist_lt":
            options.update(idx_dir=config.fashion_mnist_dir, data_dir=config.data_dir,
                           download=config.download_fashion_mnist,
                           padded=config.fashion_mnist_padded,
                           val_per_class=config.fashion_mnist_val_per_class,
                           checksums=config.fashion_mnist_sha256)
    return data_lib.load(config.data, **options)


def build_training_model(config, data, strategy, memory_limit_gb=None):
    """The model to train, in `strategy`'s scope, once the batch fits data and memory.

    Args:
        config: The run's `TrainConfig`.
        data: The loaded data set.
        strategy: The run's `tf.distribute.Strategy`.
        memory_limit_gb: The `--memory_limit_gb` option (`None`: this
            machine's memory).

    Returns:
        The built (and converted) model.

    Raises:
        ConfigError: `--global_batch_size` exceeds the training images, or
            its estimated activation memory exceeds `--memory_limit_gb`
            (default: this machine's memory).
    """
    images = len(data.train_split)
    if config.global_batch_size > images:
        raise config_lib.ConfigError(
            f"--global_batch_size={config.global_batch_size} is larger than the {images} "
            f"training images of --data={config.data}.")
    with strategy.scope():
        model = build_model(config, data)
    check_memory(config, model, data.image_shape, memory_limit_gb)
    return model


def check_memory(config, model, image_shape, memory_limit_gb=None):
    """Refuses a batch whose activations would not fit (`--memory_limit_gb`)."""
    limit_gb, source = memory_limit_gb, "--memory_limit_gb"
    if limit_gb is None:
        limit_gb, source = machine_memory_gb(), "memory of this machine"
    if limit_gb is None:
        return
    elements = graph.activation_elements(model)
    size = 2 if "16" in model.dtype_policy.compute_dtype else 4
    need_gb = config.global_batch_size * elements * size / 1e9
    if need_gb > limit_gb:
        raise config_lib.ConfigError(
            f"--global_batch_size={config.global_batch_size} at --image_size="
            f"{image_shape[0]} with --backbone={config.backbone} needs about "
            f"{need_gb:.3g} GB for the activations training keeps ({elements} numbers of "
            f"{size} bytes per image, the network's layer outputs), more than the "
            f"{limit_gb:.3g} GB {source}. Lower --global_batch_size or --image_size, or "
            "set --memory_limit_gb.")


def machine_memory_gb():
    """This machine's memory in GB (its cgroup's limit if lower); `None` with GPUs."""
    if tf.config.list_physical_devices("GPU"):
        return None  # Device memory is only known once TensorFlow starts.
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            total = min(total, int(f.read()))
    except (OSError, ValueError):  # No cgroup v2 limit ("max").
        pass
    return total / 1e9


def epoch_steps(config, data, replicas):
    return config.steps_per_epoch or data_lib.steps_per_epoch(
        data, config.global_batch_size, config.keep_partial_batch, replicas)


def build_model(config, data):
    """The classifier of `config`, converted to NBN when asked."""
    model = build_classifier(
        config.backbone, data.num_classes, data.image_shape, mean=data.mean,
        std=data.std, synchronized_bn=config.synchronized_bn, name=config.backbone,
        ride_options=registry.config_options(config), head=config.head)
    if not config.nbn:
        return model
    selection = config.nbn_selection
    if selection not in GENERIC_SELECTIONS + tuple(registry.family_selections()):
        selection = [name.strip() for name in selection.split(",")]
    return convert_to_nbn(
        model, selection, stages=list(config.nbn_stages) or None,
        scale_sharing=config.nbn_scale_sharing, separate_scales=config.nbn_separate_scales,
        beta_initializer=(keras.initializers.RandomNormal(stddev=config.nbn_beta_init_std)
                          if config.nbn_beta_init_std else None))


def start_model(config, model):
    """`--init_from` weights and `--train_only_head` freezing, before compiling."""
    if config.init_from:
        found = finetune.load_matching_weights(model, config.init_from)
        print(finetune.summary(found, config.init_from), flush=True)
    if config.train_only_head:
        trained = finetune.train_only_head(model)
        print(f"--train_only_head: training {', '.join(trained)}; every other layer "
              "frozen, BN statistics kept.", flush=True)


def train(config, data, strategy, run_dir, model, verbose=1):
    """The `train` phase: fits `model` from the last checkpoint; returns the optimizer steps.

    A loss with a `training_model` method (RIDE's) fits the model it returns,
    which shares `model`'s weights; the checkpoints hold `model`.
    """
    steps = epoch_steps(config, data, strategy.num_replicas_in_sync)
    with strategy.scope():
        start_model(config, model)
        loss = losses.from_config(config, data.class_counts)
        fitted = loss.training_model(model) if hasattr(loss, "training_model") else model
        fitted.compile(optimizer=optimizers.from_config(config, steps), loss=loss,
                       metrics=metrics.long_tail_metrics(
                           data.class_counts, config.many_threshold, config.few_threshold),
                       jit_compile=config.xla)
        checkpoint = nbn_callbacks.RunCheckpoint(run_dir, monitor="val_top1",
                                                 saved_model=model)
        initial_epoch = checkpoint.restore(fitted)
    if initial_epoch:
        print(f"Resuming training at epoch {initial_epoch}.", flush=True)
    train_ds = data_lib.make_train_dataset(
        data, config.global_batch_size, sampler=config.sampler, epochs=config.epochs,
        seed=config.seed, steps_per_epoch=config.steps_per_epoch,
        initial_epoch=initial_epoch, samples_per_class=config.samples_per_class,
        keep_partial_batch=config.keep_partial_batch,
        replicas=strategy.num_replicas_in_sync)
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        with strategy.scope():
            distribute.adapt_to_multi_worker(fitted, next(iter(train_ds)))
    callbacks = nbn_callbacks.for_run(config, run_dir, checkpoint)
    try:
        fitted.fit(train_ds, epochs=config.epochs, steps_per_epoch=steps,
                   initial_epoch=initial_epoch, shuffle=False, callbacks=callbacks,
                   validation_data=data_lib.make_eval_dataset(
                       data, "val", config.global_batch_size),
                   verbose=verbose)
    except nbn_callbacks.NonFiniteLoss as error:
        kept = [os.path.join(run_dir, name) for name in ("backup", "best.keras")
                if os.path.exists(os.path.join(run_dir, name))]
        raise RunError(
            f"Training stopped: {error}. The last good checkpoint is kept "
            f"({', '.join(kept) or 'none: the first epoch did not finish'}); lower "
            "the learning rate and run the same command with --allow_changed_flags "
            "to resume from it.") from None
    return int(fitted.optimizer.iterations.numpy())


def select_model(run_dir):
    """The `select` phase: `model.keras` = the best validation epoch's model."""
    best = os.path.join(run_dir, "best.keras")
    if not os.path.exists(best):  # No finite validation score: the last epoch.
        backup = os.path.join(run_dir, "backup")
        best = os.path.join(backup, files.read_json(
            os.path.join(backup, "state.json"))["checkpoint"])
    with files.atomic_write(os.path.join(run_dir, "model.keras")) as tmp:
        shutil.copyfile(best, tmp)


def evaluate(config, data, run_dir, steps_trained):
    """The `evaluate` phase: test figures and pictures of `model.keras`."""
    model = keras.models.load_model(os.path.join(run_dir, "model.keras"), compile=False)
    files.kill_point("evaluate")
    figures = report.evaluate(model, data, config.many_threshold, config.few_threshold)
    figures["steps_trained"] = steps_trained
    if config.pictures:
        try:  # Pictures are a by-product: they must not fail a finished run.
            plots.write_run_pictures(
                model, data, figures, run_dir, step=steps_trained,
                tensorboard_dir=os.path.join(run_dir, "tensorboard", "pictures"))
        except Exception as error:  # pylint: disable=broad-except
            logging.warning("Could not write the run's pictures: %s", error)
    report.write(figures, run_dir)
    print(report.table(figures))
    return figures


def export(config, options, run_dir, state):
    """The `export` phase: the folded model as a new TF Serving version."""
    model = keras.models.load_model(os.path.join(run_dir, "model.keras"), compile=False)
    path = export_for_serving(model, base_dir=options.export_dir,
                              model_name=options.served_model_name, run_id=state["run_id"],
                              max_image_pixels=config.max_image_pixels,
                              allow_foreign_files=options.allow_foreign_export_dir)
    print(f"Exported for TF Serving to {path}")
    return path
