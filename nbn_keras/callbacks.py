"""Keras callbacks of the training run that Keras itself does not provide."""

import hashlib
import json
import os
import tempfile

import keras
import numpy as np

from nbn_keras.conversion import leaf_layers
from nbn_keras.conversion import select_bn_layers
from nbn_keras.layers import NBNScale
from nbn_keras.layers import NormalizedBatchNormalization


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
    (`keras.callbacks.BackupAndRestore`) keeps the start and step-1 records
    of the file it finds; place this callback before `BackupAndRestore`.

    Args:
        path: Path of the JSON file.

    Example:

    >>> model.fit(ds, epochs=3, callbacks=[
    ...     nbn_keras.callbacks.NBNDynamicsLogger("run/nbn_dynamics.json")])
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
        if os.path.exists(self.path):
            with open(self.path) as f:
                self._record = json.load(f)
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
        _write_json_atomically(record, self.path)


def _write_json_atomically(obj, path):
    directory = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp",
                                     delete=False) as f:
        json.dump(obj, f)
    os.replace(f.name, path)
