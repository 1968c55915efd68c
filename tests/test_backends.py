"""The layer is written with keras.ops only: it runs under JAX and PyTorch.

Each check runs in a subprocess with `KERAS_BACKEND` set, when that backend
is installed (it is not a dependency of the package), against the NumPy
reference formula.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import numpy as np
import keras
from nbn_keras.layers import NBNScale, NormalizedBatchNormalization
from tests.nbn_reference import batch_moments, nbn_forward

rng = np.random.default_rng(0)
x = rng.normal(2.0, 3.0, (16, 5)).astype("float32")
layer = NormalizedBatchNormalization(epsilon=1e-5, momentum=0.5)
layer.build(x.shape)
gamma, beta = rng.normal(1, .5, 5), np.zeros(5)
layer.gamma.assign(gamma)
layer.alpha.assign(1.7)
mean, variance = batch_moments(x.astype("float64"))
np.testing.assert_allclose(
    keras.ops.convert_to_numpy(layer(x, training=True)),
    nbn_forward(x, gamma, beta, 1.7, 1.7, mean, variance, 1e-5), atol=1e-4)
np.testing.assert_allclose(keras.ops.convert_to_numpy(layer.moving_mean), 0.5 * mean, atol=1e-5)

# A model with a shared scale trains (beta starts at 0) and stays finite.
inputs = keras.Input((5,))
alpha = NBNScale()(inputs)
hidden = NormalizedBatchNormalization(shared_scale=True)(keras.layers.Dense(5)(inputs), scale=alpha)
model = keras.Model(inputs, keras.layers.Dense(2)(hidden))
model.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
model.fit(x, (x[:, 0] > 2).astype("int32"), epochs=2, batch_size=8, verbose=0)
assert all(np.isfinite(w).all() for w in model.get_weights())
(scale_layer,) = [l for l in model.layers if isinstance(l, NBNScale)]
assert float(keras.ops.convert_to_numpy(scale_layer.scales[0])) != 1.0
print("ok", keras.backend.backend())
"""


@pytest.mark.parametrize("backend, module", [("jax", "jax"), ("torch", "torch")])
def test_layer_under_other_backends(backend, module):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")
    env = dict(os.environ, KERAS_BACKEND=backend)
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith(f"ok {backend}")
