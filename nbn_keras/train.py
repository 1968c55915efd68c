r"""Trains a long-tailed classifier, with or without NBN, and exports it.

Usage:

    python -m nbn_keras.train --flagfile=configs/digits_lt_nbn.cfg \
        [--flag=value ...]

Everything the run writes goes to `--run_dir`: the resolved flags
(`flags.cfg`, usable as a flagfile), the long-tailed subset
(`class_counts.json`), checkpoints (`backup/` to resume a killed run by
rerunning the same command, `best.keras` chosen on the validation split),
`model.keras`, TensorBoard logs, `history.csv`, the test figures
(`test_metrics.json`) and pictures. The serving export lands in
`<--export_dir>/<--model_name>/<version>/`.
"""

import csv
import os
import shutil
import sys

import keras
import tensorflow as tf
from absl import app
from absl import flags
from absl import logging

from nbn_keras import callbacks as nbn_callbacks
from nbn_keras import data as data_lib
from nbn_keras import distribute
from nbn_keras import losses
from nbn_keras import metrics
from nbn_keras import plots
from nbn_keras import report
from nbn_keras import schedules
from nbn_keras.backbones import BACKBONES
from nbn_keras.backbones import build_classifier
from nbn_keras.conversion import SCALE_SHARING_MODES
from nbn_keras.conversion import convert_to_nbn
from nbn_keras.data.samplers import SAMPLERS
from nbn_keras.export import export_for_serving
from nbn_keras.losses import LOSS_NAMES
from nbn_keras.optimizers import CoupledSGD

DATA_SETS = ("digits_lt", "synthetic_lt", "cifar10_lt", "cifar100_lt",
             "imagenet_lt", "places_lt", "inaturalist")
LIST_FILE_DATA_SETS = ("imagenet_lt", "places_lt", "inaturalist")

# Data.
flags.DEFINE_enum("data", "digits_lt", DATA_SETS, "Long-tailed data set.")
flags.DEFINE_float("imbalance_factor", 10.0,
                   "Largest over smallest class size (CIFAR-LT, digits, synthetic).")
flags.DEFINE_integer("n_max", None,
                     "Training images of the largest class (default: the data "
                     "set's standard, e.g. 5000 for CIFAR-10-LT, 500 for CIFAR-100-LT).")
flags.DEFINE_enum("imbalance_profile", "exp", ["exp", "step"],
                  "Class-size profile of the long-tailed subset.")
flags.DEFINE_integer("data_seed", 0, "Seed choosing the long-tailed subset.")
flags.DEFINE_integer("image_size", None,
                     "Image size of digits-LT and the synthetic set (default: 32).")
flags.DEFINE_string("data_dir", None,
                    "TFDS data directory (CIFAR-LT). Must exist when given.")
flags.DEFINE_string("manual_dir", None,
                    "Directory with a manually downloaded TFDS archive (CIFAR-LT).")
flags.DEFINE_boolean("download", True,
                     "Let TFDS download CIFAR when it is not prepared in --data_dir.")
flags.DEFINE_string("image_root", None, "Image root of list-file data sets.")
flags.DEFINE_string("train_list", None, "`path label` training list file.")
flags.DEFINE_string("val_list", None, "`path label` validation list file.")
flags.DEFINE_string("test_list", None,
                    "`path label` test list file (default: the validation list).")
flags.DEFINE_enum("on_bad_image", "error", ["error", "skip"],
                  "List-file images that are missing or undecodable: fail, "
                  "or skip and count them.")
flags.DEFINE_enum("sampler", "instance", SAMPLERS, "Training sampler.")
flags.DEFINE_integer("many_threshold", 100,
                     "Classes with more training images than this are 'many'.")
flags.DEFINE_integer("few_threshold", 20,
                     "Classes with fewer training images than this are 'few'.")

# Model.
flags.DEFINE_enum("backbone", "resnet32", BACKBONES, "Backbone network.")
flags.DEFINE_boolean("nbn", True, "Convert the selected BN layers to NBN.")
flags.DEFINE_string("nbn_selection", "paper",
                    "'paper' (last stage: last BN of each block and shortcut "
                    "BN), 'all', or comma-separated BN layer names.")
flags.DEFINE_list("nbn_stages", None,
                  "With --nbn_selection=paper: stage indices to convert "
                  "instead of the last stage.")
flags.DEFINE_enum("nbn_scale_sharing", "model", SCALE_SHARING_MODES,
                  "One NBN scale for the model (the paper's) or one per layer.")
flags.DEFINE_boolean("nbn_separate_scales", False,
                     "Separate scales for gamma and beta.")
flags.DEFINE_float("nbn_beta_init_std", 0.0,
                   "Start NBN's raw beta from N(0, std^2) instead of BN's zeros "
                   "(0: the reference's zero start).")
flags.DEFINE_boolean("nbn_dynamics", False,
                     "Write the raw gamma/beta norms, directions and scales of "
                     "the NBN (or would-be NBN) layers per epoch to "
                     "<run_dir>/nbn_dynamics.json.")

# Optimisation.
flags.DEFINE_integer("epochs", 200, "Training epochs.")
flags.DEFINE_integer("global_batch_size", 128,
                     "Batch size summed over all replicas and workers.")
flags.DEFINE_float("base_lr", 0.2,
                   "Learning rate for a global batch of 256; the run uses "
                   "base_lr * global_batch_size / 256.")
flags.DEFINE_float("learning_rate", None,
                   "Explicit learning rate; overrides --base_lr scaling.")
flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
flags.DEFINE_float("weight_decay", 5e-4, "Weight decay.")
flags.DEFINE_enum("weight_decay_mode", "coupled", ["coupled", "decoupled"],
                  "'coupled': L2 added to the gradient before momentum, like "
                  "the reference (PyTorch SGD); 'decoupled': Keras' own.")
flags.DEFINE_boolean("decay_nbn_scale", True,
                     "Apply weight decay to the NBN scale too (the reference does).")
flags.DEFINE_enum("schedule", "warmup_steps", ["warmup_steps", "cosine"],
                  "'warmup_steps' (CIFAR-LT recipe) or 'cosine' (ImageNet-LT).")
flags.DEFINE_integer("warmup_epochs", 5, "Linear warmup epochs.")
flags.DEFINE_list("lr_drop_epochs", ["160", "180"],
                  "Epochs of the step drops ('warmup_steps' schedule).")
flags.DEFINE_list("lr_drop_factors", ["0.01", "0.001"],
                  "Learning-rate factors from each drop epoch on.")
flags.DEFINE_enum("loss", "cross_entropy", LOSS_NAMES, "Training loss.")
flags.DEFINE_float("logit_adjust_tau", 1.0, "tau of the logit-adjusted loss.")
flags.DEFINE_integer("drw_epoch", 160, "Epoch deferred re-weighting starts (ldam_drw).")
flags.DEFINE_integer("steps_per_epoch", None,
                     "Steps per epoch (default: training images / global batch).")
flags.DEFINE_integer("seed", 0, "Seed of initialisation, sampling and augmentation.")

# Execution.
flags.DEFINE_enum("mixed_precision", "none", ["none", "float16", "bfloat16"],
                  "Mixed-precision compute dtype.")
flags.DEFINE_boolean("xla", False,
                     "XLA-compile the training step (single device only).")
flags.DEFINE_string("run_dir", "runs/default", "Directory of the run's files.")
flags.DEFINE_string("export_dir", "saved_models",
                    "TF Serving base directory of the export.")
flags.DEFINE_string("model_name", None,
                    "Name of the served model (default: the run directory's name).")
flags.DEFINE_boolean("export", True, "Export a SavedModel for TF Serving at the end.")
flags.DEFINE_integer("verbose", 1, "Keras progress output: 0, 1 (bar) or 2.")
flags.DEFINE_boolean("pictures", True,
                     "Write pictures of the trained model (BN magnitudes, "
                     "per-class accuracy, Grad-CAM) to <run_dir>/pictures and "
                     "TensorBoard.")

FLAGS = flags.FLAGS


def _positive(name):
    flags.register_validator(name, lambda v: v is None or v > 0,
                             message=f"--{name} must be positive.")


flags.register_validator(
    "imbalance_factor", lambda v: v >= 1,
    message="--imbalance_factor must be >= 1 (largest / smallest class size).")

for _name in ("n_max", "epochs", "global_batch_size", "base_lr",
              "learning_rate", "steps_per_epoch"):
    _positive(_name)


@flags.validator("data_dir", message="--data_dir does not exist.")
def _data_dir_exists(value):
    return value is None or os.path.isdir(value)


@flags.validator("manual_dir", message="--manual_dir does not exist.")
def _manual_dir_exists(value):
    return value is None or os.path.isdir(value)


@flags.multi_flags_validator(
    ["data", "image_root", "train_list", "val_list"],
    message="List-file data sets need an existing --image_root, --train_list "
            "and --val_list.")
def _list_files_given(values):
    if values["data"] not in LIST_FILE_DATA_SETS:
        return True
    paths = [values["image_root"], values["train_list"], values["val_list"]]
    return all(paths) and os.path.isdir(paths[0]) and all(
        os.path.isfile(p) for p in paths[1:])


@flags.multi_flags_validator(
    ["few_threshold", "many_threshold"],
    message="Need 0 <= --few_threshold <= --many_threshold.")
def _thresholds_ordered(values):
    return 0 <= values["few_threshold"] <= values["many_threshold"]


@flags.multi_flags_validator(
    ["lr_drop_epochs", "lr_drop_factors"],
    message="--lr_drop_epochs and --lr_drop_factors need the same number of "
            "numeric entries, epochs increasing.")
def _drops_consistent(values):
    try:
        epochs = [int(e) for e in values["lr_drop_epochs"]]
        factors = [float(f) for f in values["lr_drop_factors"]]
    except ValueError:
        return False
    return len(epochs) == len(factors) and epochs == sorted(epochs)


def load_data():
    """Loads the data set the flags name."""
    if FLAGS.data in LIST_FILE_DATA_SETS:
        options = dict(train_list=FLAGS.train_list, val_list=FLAGS.val_list,
                       test_list=FLAGS.test_list, image_root=FLAGS.image_root,
                       on_bad_image=FLAGS.on_bad_image)
    else:
        options = dict(imbalance_factor=FLAGS.imbalance_factor,
                       profile=FLAGS.imbalance_profile, seed=FLAGS.data_seed)
        if FLAGS.n_max:
            options["n_max"] = FLAGS.n_max
        if FLAGS.image_size:
            options["image_size"] = FLAGS.image_size
        if FLAGS.data in ("cifar10_lt", "cifar100_lt"):
            options.update(data_dir=FLAGS.data_dir, manual_dir=FLAGS.manual_dir,
                           download=FLAGS.download)
    return data_lib.load(FLAGS.data, **options)


def build_model(data):
    """The classifier of the flags, converted to NBN when asked."""
    model = build_classifier(
        FLAGS.backbone, data.num_classes, data.image_shape, mean=data.mean,
        std=data.std, synchronized_bn=True, name=FLAGS.backbone)
    if not FLAGS.nbn:
        return model
    selection = FLAGS.nbn_selection
    if selection not in ("paper", "all"):
        selection = [name.strip() for name in selection.split(",")]
    stages = [int(s) for s in FLAGS.nbn_stages] if FLAGS.nbn_stages else None
    return convert_to_nbn(
        model, selection, stages=stages, scale_sharing=FLAGS.nbn_scale_sharing,
        separate_scales=FLAGS.nbn_separate_scales,
        beta_initializer=(keras.initializers.RandomNormal(stddev=FLAGS.nbn_beta_init_std)
                          if FLAGS.nbn_beta_init_std else None))


def learning_rate_schedule(steps_per_epoch):
    lr = FLAGS.learning_rate or schedules.scaled_learning_rate(
        FLAGS.base_lr, FLAGS.global_batch_size)
    if FLAGS.schedule == "cosine":
        return schedules.WarmupCosineDecay(
            lr, total_steps=FLAGS.epochs * steps_per_epoch,
            warmup_steps=FLAGS.warmup_epochs * steps_per_epoch)
    return schedules.WarmupStepDecay(
        lr, steps_per_epoch, warmup_epochs=FLAGS.warmup_epochs,
        boundaries=[int(e) for e in FLAGS.lr_drop_epochs],
        factors=[float(f) for f in FLAGS.lr_drop_factors])


def build_optimizer(steps_per_epoch):
    schedule = learning_rate_schedule(steps_per_epoch)
    exclude = [] if FLAGS.decay_nbn_scale else ["alpha"]
    if FLAGS.weight_decay_mode == "coupled":
        return CoupledSGD(schedule, momentum=FLAGS.momentum,
                          coupled_weight_decay=FLAGS.weight_decay,
                          exclude_from_coupled_decay=exclude)
    optimizer = keras.optimizers.SGD(schedule, momentum=FLAGS.momentum,
                                     weight_decay=FLAGS.weight_decay)
    if exclude:
        optimizer.exclude_from_weight_decay(var_names=exclude)
    return optimizer


def build_loss(class_counts):
    options = {}
    if FLAGS.loss == "logit_adjusted":
        options["tau"] = FLAGS.logit_adjust_tau
    elif FLAGS.loss == "ldam_drw":
        # The head is a plain linear layer, so margins are subtracted from
        # unscaled logits, as in the reference code (not s * logits).
        options.update(drw_start_epoch=FLAGS.drw_epoch, scale_logits=False)
    return losses.build_loss(FLAGS.loss, class_counts, **options)


def fit_metrics(class_counts):
    return metrics.long_tail_metrics(
        class_counts, many_threshold=FLAGS.many_threshold,
        few_threshold=FLAGS.few_threshold)


def best_so_far(csv_path, monitor):
    """The best `monitor` value of a resumed run's log, or `None`."""
    if not os.path.exists(csv_path):
        return None
    with open(csv_path, newline="") as f:
        values = [float(row[monitor]) for row in csv.DictReader(f)
                  if row.get(monitor) not in (None, "", "nan")]
    return max(values) if values else None


def make_callbacks(run_dir, class_counts):
    monitor = "val_top1"
    csv_path = os.path.join(run_dir, "history.csv")
    callbacks = [
        # Raising (rather than stopping) skips the epoch-end backup, so the
        # last good checkpoint in backup/ survives a NaN loss.
        keras.callbacks.TerminateOnNaN(raise_error=True),
        keras.callbacks.BackupAndRestore(os.path.join(run_dir, "backup")),
        keras.callbacks.ModelCheckpoint(
            os.path.join(run_dir, "best.keras"), monitor=monitor, mode="max",
            save_best_only=True,
            initial_value_threshold=best_so_far(csv_path, monitor)),
        nbn_callbacks.NBNScaleLogger(),
        keras.callbacks.TensorBoard(os.path.join(run_dir, "tensorboard")),
        keras.callbacks.CSVLogger(csv_path, append=True),
    ]
    if FLAGS.nbn_dynamics:  # First, so that it sees the weights before a restore.
        callbacks.insert(0, nbn_callbacks.NBNDynamicsLogger(
            os.path.join(run_dir, nbn_callbacks.DYNAMICS_FILENAME)))
    if FLAGS.loss == "ldam_drw":
        callbacks.append(losses.DeferredReweighting())
    return callbacks


def write_flags(run_dir):
    with open(os.path.join(run_dir, "flags.cfg"), "w") as f:
        f.write(FLAGS.flags_into_string())


def run(run_dir):
    """Trains, selects on validation, reports on test, saves and exports."""
    strategy = distribute.make_strategy(single_device=FLAGS.xla)
    replicas = strategy.num_replicas_in_sync
    if FLAGS.global_batch_size % replicas:
        raise app.UsageError(
            f"--global_batch_size={FLAGS.global_batch_size} is not divisible "
            f"by the {replicas} replicas.")
    chief = distribute.is_chief(strategy)
    if not chief:
        run_dir = os.path.join(run_dir, "workers", f"{strategy.cluster_resolver.task_id}")
    finished = os.path.join(run_dir, report.FIGURES_FILENAME)
    if os.path.exists(finished):
        # Training again there would mix logs and could keep the old best
        # checkpoint; a killed run (no report yet) resumes instead.
        raise app.UsageError(
            f"--run_dir={run_dir} holds a finished run ({finished}). Choose "
            "another --run_dir, or move that one away.")
    os.makedirs(run_dir, exist_ok=True)
    write_flags(run_dir)
    if FLAGS.mixed_precision != "none":
        keras.mixed_precision.set_global_policy(f"mixed_{FLAGS.mixed_precision}")
    keras.utils.set_random_seed(FLAGS.seed)

    data = load_data()
    data.write_subset(run_dir)
    class_counts = data.class_counts
    steps = FLAGS.steps_per_epoch or data_lib.steps_per_epoch(
        data, FLAGS.global_batch_size)
    train_ds = data_lib.make_train_dataset(
        data, FLAGS.global_batch_size, sampler=FLAGS.sampler,
        epochs=FLAGS.epochs if FLAGS.sampler == "progressive" else None,
        seed=FLAGS.seed)
    val_ds = data_lib.make_eval_dataset(data, "val", FLAGS.global_batch_size)
    logging.info("%s: %d training images in %d classes, %d steps per epoch, "
                 "%d replica(s).", data.name, len(data.train_split),
                 data.num_classes, steps, replicas)

    with strategy.scope():
        model = build_model(data)
        model.compile(optimizer=build_optimizer(steps),
                      loss=build_loss(class_counts),
                      metrics=fit_metrics(class_counts),
                      jit_compile=FLAGS.xla)
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        with strategy.scope():
            distribute.adapt_to_multi_worker(model, next(iter(train_ds)))
    try:
        model.fit(train_ds, epochs=FLAGS.epochs, steps_per_epoch=steps,
                  validation_data=val_ds, shuffle=False,
                  callbacks=make_callbacks(run_dir, class_counts),
                  verbose=FLAGS.verbose)
    except RuntimeError as error:
        if "NaN" not in str(error) and "Inf" not in str(error):
            raise
        raise SystemExit(
            f"Training stopped: {error}. The last good checkpoint is kept in "
            f"{os.path.join(run_dir, 'backup')} and the best model so far in "
            f"{os.path.join(run_dir, 'best.keras')}.") from None

    if not chief:
        return None  # The chief reports and exports.
    steps_trained = int(model.optimizer.iterations.numpy())
    best_path = os.path.join(run_dir, "best.keras")
    model_path = os.path.join(run_dir, "model.keras")
    if os.path.exists(best_path):
        model = keras.models.load_model(best_path)
        shutil.copyfile(best_path, model_path)
    else:
        model.save(model_path)
    figures = report.evaluate(model, data, FLAGS.many_threshold, FLAGS.few_threshold)
    figures["steps_trained"] = steps_trained
    report.write(figures, run_dir)
    print(report.table(figures))
    if FLAGS.pictures:
        try:  # Pictures are a by-product: they must not fail a finished run.
            plots.write_run_pictures(
                model, data, figures, run_dir, step=steps_trained,
                tensorboard_dir=os.path.join(run_dir, "tensorboard", "pictures"))
        except Exception as error:  # pylint: disable=broad-except
            logging.warning("Could not write the run's pictures: %s", error)
    if FLAGS.export:
        model_name = FLAGS.model_name or os.path.basename(os.path.normpath(run_dir))
        path = export_for_serving(model, base_dir=FLAGS.export_dir,
                                  model_name=model_name)
        print(f"Exported for TF Serving to {path}")
    return figures


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    try:
        run(FLAGS.run_dir)
    except (ValueError, FileNotFoundError) as error:
        # Bad data or options found once loading starts: one clear line
        # (the traceback with --verbosity=1).
        logging.debug("Traceback:", exc_info=True)
        print(f"Error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    app.run(main)
