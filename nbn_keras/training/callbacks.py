"""Keras callbacks of the training run that Keras itself does not provide."""

import csv
import hashlib
import io
import math
import os

import keras
import numpy as np

from nbn_keras import files
from nbn_keras.conversion import select_bn_layers
from nbn_keras.graph import leaf_layers
from nbn_keras.layers import NBNScale
from nbn_keras.layers import NormalizedBatchNormalization
from nbn_keras.training import losses


class NonFiniteLoss(RuntimeError):
    """Training reached a NaN or infinite loss."""


class TerminateOnNonFiniteLoss(keras.callbacks.Callback):
    """Raises `NonFiniteLoss` at the first batch whose loss is NaN or infinite.

    Keras' `TerminateOnNaN(raise_error=True)` does the same with a plain
    `RuntimeError`; its own type lets a caller catch this error only.
    Raising (rather than stopping) skips the epoch-end checkpoint, so the
    last good one survives.

    Example:

    >>> try:
    ...     model.fit(x, y, callbacks=[TerminateOnNonFiniteLoss()])
    ... except NonFiniteLoss as error:
    ...     print(error)
    """

    def on_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise NonFiniteLoss(f"NaN or Inf loss encountered at batch {batch}. Loss value: "
                                f"{loss}. Terminating training immediately.")


def scale_variables(model):
    """Returns `{name: variable}` for every NBN scale of `model`."""
    scales = {}
    for layer in leaf_layers(model):
        if isinstance(layer, NBNScale):
            scales.update({v.path: v for v in layer.scales})
        elif isinstance(layer, NormalizedBatchNormalization):
            for v in (layer.alpha, layer.gamma_alpha, layer.beta_alpha):
                if v is not None:
                    scales[v.path] = v
    return scales


class NBNScaleLogger(keras.callbacks.Callback):
    """Adds the NBN scale values to the epoch logs.

    Each scale is added as `nbn_scale/<variable path>`. Place this callback
    before `keras.callbacks.TensorBoard` and `CSVLogger`, which then record
    the values like any metric.
    """

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        for path, variable in scale_variables(self.model).items():
            logs[f"nbn_scale/{path}"] = float(np.asarray(variable.numpy()))


class LearningRateLogger(keras.callbacks.Callback):
    """Adds the learning rate the epoch trained at to the epoch logs, as `lr`.

    The rate is the schedule's at the epoch's first step: the whole epoch's
    for the per-epoch schedules. (Keras' TensorBoard callback logs
    `learning_rate` at the epoch's end, which for a per-epoch schedule is
    already the next epoch's.) Place it before `RunCheckpoint` and
    `keras.callbacks.TensorBoard`, which then record it like any metric.

    Example:

    >>> model.fit(data, epochs=3, callbacks=[LearningRateLogger(),
    ...                                      RunCheckpoint(run_dir)])
    """

    def on_epoch_begin(self, epoch, logs=None):
        self._rate = float(np.asarray(self.model.optimizer.learning_rate))

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["lr"] = self._rate


class RunCheckpoint(keras.callbacks.Callback):
    """Crash-safe epoch checkpoints, best-model selection and `history.csv`.

    At the end of every epoch, in this order, each file written atomically
    (`nbn_keras.training.run_files`):

    1. `best.keras` when `monitor` improved on the best value so far;
    2. `backup/epoch-NNNN.keras`: the whole model with its optimizer state;
    3. `backup/state.json`: the epoch reached, the best value and its epoch,
       and the history of epoch logs; then older backups are removed;
    4. `history.csv`, rewritten from that history.

    `backup/state.json` always names a complete backup, and the previous one
    is removed only after the new one is complete, so a process killed at any
    instant resumes from the last completed epoch (`restore`). A rerun that
    trains an epoch again (killed after `best.keras` but before the backup)
    computes the same weights and rewrites the same `best.keras`.

    Keras' `BackupAndRestore` and `ModelCheckpoint` overwrite their files in
    place, and `CSVLogger` appends, which is why they are not used.

    Args:
        run_dir: The run directory.
        monitor: The logged value that selects `best.keras` (maximised).
        saved_model: The model the files hold when it is not the one `fit`
            trains but shares its weights (the classifier of a
            `nbn_keras.models.ride.ExpertLogitsTrainer`); it is compiled
            with the fitted model's optimizer, so that its backups keep the
            training state. Defaults to the fitted model.
    """

    def __init__(self, run_dir, monitor="val_top1", saved_model=None):
        super().__init__()
        self.run_dir = run_dir
        self.monitor = monitor
        self.saved_model = saved_model
        self.backup_dir = os.path.join(run_dir, "backup")
        self.state = {"epoch": 0, "best": None, "best_epoch": None, "history": []}

    @property
    def state_path(self):
        return os.path.join(self.backup_dir, "state.json")

    def restore(self, model):
        """Loads the last complete backup into `model`; returns its epoch (0 if none).

        Call it on the compiled model `fit` trains, before `fit(...,
        initial_epoch=...)`; with `saved_model`, the backup is loaded into
        that model (and `model`'s optimizer).
        """
        files.remove_stale_temporaries(self.backup_dir)
        files.remove_stale_temporaries(self.run_dir)
        state = files.read_json(self.state_path)
        if state is None:
            return 0
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        self._model_to_save(model).load_weights(
            os.path.join(self.backup_dir, state["checkpoint"]))
        self.state = state
        return state["epoch"]

    def _model_to_save(self, fitted):
        """`saved_model` with `fitted`'s optimizer, or `fitted` itself."""
        if self.saved_model is None:
            return fitted
        if getattr(self.saved_model, "optimizer", None) is not fitted.optimizer:
            self.saved_model.compile(optimizer=fitted.optimizer)
        return self.saved_model

    def on_train_batch_end(self, batch, logs=None):
        files.kill_point("batch")

    def on_epoch_end(self, epoch, logs=None):
        logs = {key: _as_float(value) for key, value in (logs or {}).items()}
        state = dict(self.state, epoch=epoch + 1,
                     history=self.state["history"] + [{"epoch": epoch, **logs}])
        value = logs.get(self.monitor)
        if value is not None and math.isfinite(value) and (
                state["best"] is None or value > state["best"]):
            with files.atomic_write(os.path.join(self.run_dir, "best.keras"),
                                        kill_point_name="best") as tmp:
                self._model_to_save(self.model).save(tmp)
            state.update(best=value, best_epoch=epoch)
        os.makedirs(self.backup_dir, exist_ok=True)
        checkpoint = f"epoch-{epoch + 1:04d}.keras"
        with files.atomic_write(os.path.join(self.backup_dir, checkpoint),
                                    kill_point_name="backup") as tmp:
            self._model_to_save(self.model).save(tmp)
        state["checkpoint"] = checkpoint
        files.write_json(self.state_path, state)
        for name in os.listdir(self.backup_dir):
            if name.startswith("epoch-") and name != checkpoint:
                os.remove(os.path.join(self.backup_dir, name))
        self.state = state
        write_history_csv(os.path.join(self.run_dir, "history.csv"), state["history"])


def write_history_csv(path, history):
    """Writes a list of epoch-log dicts as CSV, atomically."""
    columns = list(dict.fromkeys(key for row in history for key in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    files.write_text(path, text.getvalue())


def _as_float(value):
    return float(np.asarray(value))
DYNAMICS_FILENAME = "nbn_dynamics.json"


def tracked_bn_layers(model):
    """The NBN layers of `model`, or for a plain-BN model the paper's choice.

    A plain-BN model is tracked on the layers `convert_to_nbn` would convert
    by default, so BN and NBN runs are compared on the same layers.

    Returns:
        A list of BatchNormalization (or NBN) layers; empty when a plain
        model has no ResNet BN names.
    """
    nbn_layers = [l for l in leaf_layers(model)
                  if isinstance(l, NormalizedBatchNormalization)]
    if nbn_layers:
        return nbn_layers
    try:
        return select_bn_layers(model, "paper")
    except ValueError:
        return []


def _cosine(a, b):
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    return float(np.dot(a, b) / norms) if norms > 0 else float("nan")


def _raw(layer):
    gamma = np.asarray(layer.gamma, dtype=np.float64) if layer.scale else None
    beta = np.asarray(layer.beta, dtype=np.float64) if layer.center else None
    return gamma, beta


def _vectors(layers):
    return {l.name: {k: None if v is None else v.tolist()
                     for k, v in zip(("gamma", "beta"), _raw(l))}
            for l in layers}


def conv_kernel_fingerprint(model):
    """SHA-256 of all convolution kernels of `model`, in layer order.

    Two models built from the same seed (with or without NBN) have the same
    fingerprint before training.
    """
    digest = hashlib.sha256()
    for layer in leaf_layers(model):
        if isinstance(layer, keras.layers.Conv2D):
            digest.update(np.asarray(layer.kernel, dtype=np.float32).tobytes())
    return digest.hexdigest()


class NBNDynamicsLogger(keras.callbacks.Callback):
    """Writes how NBN's raw gamma and beta move during training, per epoch.

    For every tracked layer (see `tracked_bn_layers`) the file holds the
    raw vectors at the start, after the first training step and at the
    latest epoch end, and per epoch: the L2 norms of raw gamma and beta,
    the cosine of raw gamma to its start and to its value after step 1, the
    cosine of raw beta to its value after step 1 (beta starts at zero, where
    it has no direction), and the NBN scale values. For plain BN the same
    figures of its gamma and beta are written (they are then the effective
    ones). It also records `conv_kernel_fingerprint` at the start, to check
    that runs meant to start alike did.

    The JSON file is replaced atomically at every epoch end. A resumed run
    (`RunCheckpoint.restore`) keeps the start and step-1 records of the file
    it finds.

    Args:
        path: Path of the JSON file.

    Example:

    >>> model.fit(ds, epochs=3, callbacks=[
    ...     nbn_keras.training.callbacks.NBNDynamicsLogger("run/nbn_dynamics.json")])
    """

    def __init__(self, path):
        super().__init__()
        self.path = path
        self._record = None
        self._layers = []
        self._need_step1 = False

    def on_train_begin(self, logs=None):
        self._layers = tracked_bn_layers(self.model)
        self._record = None
        self._record = files.read_json(self.path)
        if self._record is None or self._record.get("layers") != [
                l.name for l in self._layers]:
            self._record = {
                "layers": [l.name for l in self._layers],
                "kind": ("nbn" if any(isinstance(l, NormalizedBatchNormalization)
                                      for l in self._layers) else "bn"),
                "conv_kernel_fingerprint": conv_kernel_fingerprint(self.model),
                "initial": _vectors(self._layers),
                "after_step_1": None,
                "epochs": [],
                "final": None,
            }
        self._need_step1 = self._record["after_step_1"] is None

    def on_train_batch_end(self, batch, logs=None):
        if self._need_step1:
            self._record["after_step_1"] = _vectors(self._layers)
            self._need_step1 = False

    def on_epoch_end(self, epoch, logs=None):
        record = self._record
        entry = {"epoch": int(epoch), "step": int(self.model.optimizer.iterations.numpy()),
                 "layers": {}, "scales": {p: float(np.asarray(v))
                                          for p, v in scale_variables(self.model).items()}}
        for layer in self._layers:
            gamma, beta = _raw(layer)
            start = record["initial"][layer.name]
            step1 = (record["after_step_1"] or {}).get(layer.name, {})
            stats = {}
            if gamma is not None:
                stats.update(
                    gamma_norm=float(np.linalg.norm(gamma)),
                    gamma_cos_initial=_cosine(np.asarray(start["gamma"]), gamma),
                    gamma_cos_step1=_cosine(np.asarray(step1["gamma"]), gamma)
                    if step1.get("gamma") is not None else float("nan"))
            if beta is not None:
                stats.update(
                    beta_norm=float(np.linalg.norm(beta)),
                    beta_cos_step1=_cosine(np.asarray(step1["beta"]), beta)
                    if step1.get("beta") is not None else float("nan"))
            entry["layers"][layer.name] = stats
        record["epochs"] = [e for e in record["epochs"] if e["epoch"] < epoch] + [entry]
        record["final"] = _vectors(self._layers)
        files.write_json(self.path, record)


def for_run(config, run_dir, checkpoint):
    """The callbacks of a training run, in the order they must run.

    Args:
        config: A `nbn_keras.training.config.TrainConfig` (`nbn_dynamics`, `loss`).
        run_dir: The run's directory (TensorBoard logs, `nbn_dynamics.json`).
        checkpoint: The run's `RunCheckpoint`, already restored.

    Returns:
        A list of `keras.callbacks.Callback`.

    Example:

    >>> checkpoint = RunCheckpoint("runs/x", monitor="val_top1")
    >>> model.fit(..., callbacks=for_run(config, "runs/x", checkpoint))
    """
    callbacks = [
        TerminateOnNonFiniteLoss(),
        NBNScaleLogger(),
        LearningRateLogger(),
        checkpoint,
        keras.callbacks.TensorBoard(os.path.join(run_dir, "tensorboard")),
    ]
    if config.nbn_dynamics:  # First: it reads the weights each step begins with.
        callbacks.insert(0, NBNDynamicsLogger(os.path.join(run_dir, DYNAMICS_FILENAME)))
    return callbacks + losses.callbacks_for(config.loss)
