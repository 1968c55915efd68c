import keras
import numpy as np
import pytest
import tensorflow as tf

import nbn_keras
from nbn_keras import NBNScale
from nbn_keras import NormalizedBatchNormalization
from tests.nbn_reference import batch_moments
from tests.nbn_reference import nbn_forward

RNG = np.random.default_rng(0)


def random_layer(input_shape, axis=-1, dtype=None, **kwargs):
    """A built NBN layer with random raw parameters, scales and statistics."""
    layer = NormalizedBatchNormalization(
        axis=axis, epsilon=1e-5, dtype=dtype, **kwargs
    )
    layer.build(input_shape)
    channels = input_shape[axis]
    layer.gamma.assign(RNG.normal(1.0, 0.5, channels))
    layer.beta.assign(RNG.normal(0.0, 0.5, channels))
    layer.moving_mean.assign(RNG.normal(0.0, 1.0, channels))
    layer.moving_variance.assign(RNG.uniform(0.5, 2.0, channels))
    for scale in (layer.alpha, layer.gamma_alpha, layer.beta_alpha):
        if scale is not None:
            scale.assign(RNG.uniform(0.5, 3.0))
    return layer


def scales_of(layer):
    if layer.separate_scales:
        return float(layer.gamma_alpha.numpy()), float(layer.beta_alpha.numpy())
    return float(layer.alpha.numpy()), float(layer.alpha.numpy())


def reference(layer, x, mean, variance):
    gamma_alpha, beta_alpha = scales_of(layer)
    return nbn_forward(
        x, layer.gamma.numpy(), layer.beta.numpy(), gamma_alpha, beta_alpha,
        mean, variance, layer.epsilon, axis=layer.axis,
    )


@pytest.mark.parametrize("input_shape", [(6, 5), (4, 3, 3, 8), (2, 3, 4, 4, 3)])
@pytest.mark.parametrize("axis", [-1, 1])
def test_output_shape(input_shape, axis):
    layer = NormalizedBatchNormalization(axis=axis)
    x = RNG.normal(size=input_shape).astype("float32")
    assert layer(x, training=True).shape == input_shape
    assert layer.compute_output_shape(input_shape) == input_shape


@pytest.mark.parametrize(
    "kwargs, trainable, non_trainable",
    [
        ({}, 3, 2),
        ({"separate_scales": True}, 4, 2),
        ({"center": False}, 2, 2),
        ({"renorm": True}, 3, 5),
    ],
)
def test_weight_counts(kwargs, trainable, non_trainable):
    layer = NormalizedBatchNormalization(**kwargs)
    layer.build((None, 4))
    assert len(layer.trainable_weights) == trainable
    assert len(layer.non_trainable_weights) == non_trainable


def test_shared_scale_layer_owns_no_scale():
    inputs = keras.Input((4,))
    alpha = NBNScale()(inputs)
    layer = NormalizedBatchNormalization(shared_scale=True)
    layer(inputs, scale=alpha)
    assert [w.name for w in layer.trainable_weights] == ["gamma", "beta"]


def test_shared_scale_layer_without_scale_fails_clearly():
    layer = NormalizedBatchNormalization(shared_scale=True, name="nbn_x")
    with pytest.raises(ValueError, match="nbn_x.*scale="):
        layer(np.ones((2, 3), "float32"))


@pytest.mark.parametrize("axis", [-1, 1])
@pytest.mark.parametrize("separate_scales", [False, True])
def test_training_mode_matches_numpy(axis, separate_scales):
    x = RNG.normal(2.0, 3.0, (16, 4, 5, 6)).astype("float32")
    layer = random_layer(x.shape, axis=axis, separate_scales=separate_scales)
    mean, variance = batch_moments(x.astype("float64"), axis=axis)
    old_mean = layer.moving_mean.numpy().copy()
    old_variance = layer.moving_variance.numpy().copy()
    outputs = layer(x, training=True)
    np.testing.assert_allclose(outputs, reference(layer, x, mean, variance), atol=1e-4)
    momentum = layer.momentum
    np.testing.assert_allclose(
        layer.moving_mean.numpy(), momentum * old_mean + (1 - momentum) * mean,
        rtol=1e-5, atol=1e-6,
    )
    np.testing.assert_allclose(
        layer.moving_variance.numpy(),
        momentum * old_variance + (1 - momentum) * variance, rtol=1e-5,
    )


@pytest.mark.parametrize("training", [False, None])
def test_inference_mode_matches_numpy_and_keeps_statistics(training):
    x = RNG.normal(size=(8, 3, 3, 5)).astype("float32")
    layer = random_layer(x.shape)
    mean = layer.moving_mean.numpy().copy()
    variance = layer.moving_variance.numpy().copy()
    outputs = layer(x, training=training)
    np.testing.assert_allclose(outputs, reference(layer, x, mean, variance), atol=1e-5)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), mean)


def test_trainable_false_means_inference_mode():
    x = RNG.normal(size=(8, 5)).astype("float32")
    layer = random_layer(x.shape)
    layer.trainable = False
    mean = layer.moving_mean.numpy().copy()
    variance = layer.moving_variance.numpy().copy()
    outputs = layer(x, training=True)
    np.testing.assert_allclose(outputs, reference(layer, x, mean, variance), atol=1e-5)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), mean)
    assert not layer.trainable_weights


def plain_bn_with_effective_parameters(nbn, input_shape, **kwargs):
    """A Keras BN holding `nbn`'s effective gamma and beta and statistics."""
    bn = keras.layers.BatchNormalization(
        axis=nbn.axis, epsilon=nbn.epsilon, momentum=nbn.momentum, **kwargs
    )
    gamma_alpha, beta_alpha = scales_of(nbn)
    gamma, beta = nbn.gamma.numpy(), nbn.beta.numpy()
    bn.build(input_shape)
    bn.set_weights([
        gamma_alpha * gamma / (np.linalg.norm(gamma) + 1e-6),
        beta_alpha * beta / (np.linalg.norm(beta) + 1e-6),
        nbn.moving_mean.numpy(), nbn.moving_variance.numpy(),
    ])
    return bn


def test_mask_matches_keras_batch_normalization():
    x = RNG.normal(size=(4, 7, 3)).astype("float32")
    mask = RNG.uniform(size=(4, 7)) > 0.3
    nbn = random_layer(x.shape)
    bn = plain_bn_with_effective_parameters(nbn, x.shape)
    np.testing.assert_allclose(
        nbn(x, training=True, mask=mask), bn(x, training=True, mask=mask),
        atol=1e-5,
    )
    np.testing.assert_allclose(nbn.moving_mean, bn.moving_mean, atol=1e-6)
    np.testing.assert_allclose(nbn.moving_variance, bn.moving_variance, atol=1e-6)


def test_mask_of_wrong_rank_is_rejected():
    layer = NormalizedBatchNormalization()
    with pytest.raises(ValueError, match="mask"):
        layer(np.ones((2, 3, 4), "float32"), mask=np.ones((2,), bool))


def test_renorm_matches_keras_batch_normalization():
    x = RNG.normal(size=(8, 5)).astype("float32")
    nbn = random_layer(x.shape, renorm=True)
    bn = keras.layers.BatchNormalization(epsilon=nbn.epsilon, renorm=True)
    bn.build(x.shape)
    gamma_alpha, beta_alpha = scales_of(nbn)
    bn.gamma.assign(gamma_alpha * nbn.gamma / (np.linalg.norm(nbn.gamma) + 1e-6))
    bn.beta.assign(beta_alpha * nbn.beta / (np.linalg.norm(nbn.beta) + 1e-6))
    for _ in range(2):
        np.testing.assert_allclose(
            nbn(x, training=True), bn(x, training=True), atol=1e-5
        )


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_computes_in_float32(policy):
    x = RNG.normal(size=(16, 6)).astype("float32")
    layer = random_layer(x.shape, dtype=policy)
    half = keras.ops.cast(x, layer.compute_dtype)
    outputs = layer(half, training=True)
    assert outputs.dtype == layer.compute_dtype
    assert all(w.dtype == "float32" for w in layer.weights)
    x32 = np.asarray(keras.ops.cast(half, "float32"), dtype="float64")
    mean, variance = batch_moments(x32)
    # Only the final cast to half precision is lossy.
    tolerance = 2e-2 if policy == "mixed_bfloat16" else 4e-3
    np.testing.assert_allclose(
        np.asarray(keras.ops.cast(outputs, "float32")),
        reference(layer, x32, mean, variance), rtol=tolerance, atol=tolerance,
    )


def test_shared_scale_keeps_float32_under_mixed_precision(monkeypatch):
    inputs = keras.Input((6,))
    alpha = NBNScale(dtype="mixed_float16")(inputs)
    layer = NormalizedBatchNormalization(shared_scale=True, dtype="mixed_float16")
    model = keras.Model(inputs, layer(inputs, scale=alpha))
    received = []
    original = layer.effective_parameters

    def spy(scale=None, dtype="float32"):
        received.append(scale.dtype)
        return original(scale, dtype)

    monkeypatch.setattr(layer, "effective_parameters", spy)
    model(RNG.normal(size=(2, 6)).astype("float32"))
    assert received == ["float32"]


def test_config_round_trip():
    layer = NormalizedBatchNormalization(
        axis=1, momentum=0.9, epsilon=1e-5, separate_scales=True,
        alpha_initializer=keras.initializers.Constant(2.0),
        alpha_regularizer=keras.regularizers.L2(1e-4), norm_epsilon=1e-7,
        synchronized=True, name="nbn",
    )
    config = layer.get_config()
    restored = NormalizedBatchNormalization.from_config(config)
    assert restored.get_config() == config
    for key, value in [("separate_scales", True), ("norm_epsilon", 1e-7),
                       ("synchronized", True), ("axis", 1), ("momentum", 0.9)]:
        assert config[key] == value


def random_bn(input_shape, **kwargs):
    """A built plain BN with random parameters and statistics, as if trained."""
    bn = keras.layers.BatchNormalization(**kwargs)
    bn.build(input_shape)
    channels = input_shape[bn.axis]
    bn.set_weights([RNG.normal(1.0, 0.5, channels), RNG.normal(0.0, 0.5, channels),
                    RNG.normal(0.0, 1.0, channels), RNG.uniform(0.5, 2.0, channels)])
    return bn


BN_ARGUMENTS = dict(
    axis=1, momentum=0.8, epsilon=1e-4, synchronized=True, name="bn",
    beta_initializer="ones", gamma_initializer=keras.initializers.Constant(2.0),
    moving_mean_initializer="ones", moving_variance_initializer="zeros",
    gamma_regularizer=keras.regularizers.L2(1e-3),
    beta_constraint=keras.constraints.NonNeg(), dtype="float64",
)


def test_from_and_to_batch_normalization_keep_every_bn_argument():
    bn = keras.layers.BatchNormalization(**BN_ARGUMENTS)
    nbn = NormalizedBatchNormalization.from_batch_normalization(
        bn, shared_scale=True, separate_scales=True, norm_epsilon=1e-7)
    assert not nbn.built
    assert (nbn.shared_scale, nbn.separate_scales, nbn.norm_epsilon) == (True, True, 1e-7)
    assert nbn.to_batch_normalization().get_config() == bn.get_config()


@pytest.mark.parametrize("axis", [-1, 1])
def test_from_batch_normalization_copies_state_and_preserves_outputs(axis):
    bn = random_bn((4, 3, 3, 6), axis=axis, epsilon=1e-5)
    x = RNG.normal(size=(4, 3, 3, 6)).astype("float32")
    fresh = NormalizedBatchNormalization.from_batch_normalization(bn)
    for attr in ("gamma", "beta", "moving_mean", "moving_variance"):
        np.testing.assert_array_equal(getattr(fresh, attr), getattr(bn, attr))
    assert float(fresh.alpha.numpy()) == 1.0
    # Inference outputs follow the NBN formula with alpha = 1 ...
    mean, variance = bn.moving_mean.numpy(), bn.moving_variance.numpy()
    np.testing.assert_allclose(fresh(x), reference(fresh, x, mean, variance), atol=1e-5)
    # ... and with preserve_outputs those of the BN layer.
    preserved = NormalizedBatchNormalization.from_batch_normalization(
        bn, separate_scales=True, preserve_outputs=True)
    np.testing.assert_allclose(preserved(x), bn(x), atol=1e-5)
    with pytest.raises(ValueError, match="separate_scales=True"):
        NormalizedBatchNormalization.from_batch_normalization(bn, preserve_outputs=True)


def test_to_batch_normalization_folds_the_effective_parameters():
    x = RNG.normal(size=(5, 4, 4, 6)).astype("float32")
    nbn = random_layer((5, 4, 4, 6), separate_scales=True)
    bn = nbn.to_batch_normalization()
    assert type(bn) is keras.layers.BatchNormalization
    mean, variance = nbn.moving_mean.numpy(), nbn.moving_variance.numpy()
    np.testing.assert_allclose(bn(x), reference(nbn, x, mean, variance), atol=1e-5)
    # A shared scale is given as a value.
    shared = NormalizedBatchNormalization.from_batch_normalization(
        bn, shared_scale=True)
    np.testing.assert_allclose(
        shared.to_batch_normalization(2.5).gamma,
        2.5 * bn.gamma.numpy() / (np.linalg.norm(bn.gamma.numpy()) + 1e-6), rtol=1e-6)


def test_from_batch_normalization_rejects_other_layers():
    with pytest.raises(TypeError, match="Dense 'dense_x'"):
        NormalizedBatchNormalization.from_batch_normalization(
            keras.layers.Dense(2, name="dense_x"))
    with pytest.raises(TypeError, match="NormalizedBatchNormalization"):
        NormalizedBatchNormalization.from_batch_normalization(
            NormalizedBatchNormalization())


@pytest.mark.parametrize("cls, kwargs", [
    (NormalizedBatchNormalization, {"shared_scale": True}),
    (NBNScale, {"separate_scales": True}),
])
def test_serialize_deserialize_round_trip(cls, kwargs):
    layer = cls(**kwargs)
    serialized = keras.saving.serialize_keras_object(layer)
    assert serialized["registered_name"] == f"nbn_keras>{cls.__name__}"
    restored = keras.saving.deserialize_keras_object(serialized)
    assert type(restored) is cls
    assert restored.get_config() == layer.get_config()


def test_custom_objects_mapping_loads_a_model(tmp_path):
    inputs = keras.Input((3,))
    alpha = NBNScale()(inputs)
    outputs = NormalizedBatchNormalization(shared_scale=True)(inputs, scale=alpha)
    model = keras.Model(inputs, outputs)
    path = tmp_path / "m.keras"
    model.save(path)
    restored = keras.models.load_model(path, custom_objects=nbn_keras.custom_objects())
    x = RNG.normal(size=(4, 3)).astype("float32")
    np.testing.assert_allclose(restored(x), model(x), atol=1e-6)


# Gradients, in float64 so finite differences are meaningful.


def loss_and_grads(layer, x, weight, training):
    with tf.GradientTape() as tape:
        y = layer(x, training=training)
        loss = tf.reduce_sum(y * weight)
    variables = layer.trainable_weights
    return float(loss), dict(zip([v.name for v in variables],
                                 tape.gradient(loss, variables)))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("separate_scales", [False, True])
def test_gradients_match_finite_differences(training, separate_scales):
    x = RNG.normal(size=(6, 4)).astype("float64")
    weight = RNG.normal(size=(6, 4))
    layer = random_layer(x.shape, dtype="float64", momentum=1.0,
                         separate_scales=separate_scales)
    _, grads = loss_and_grads(layer, x, weight, training)
    step = 1e-6
    for variable in layer.trainable_weights:
        value = np.array(variable.numpy())
        numeric = np.zeros_like(value)
        for index in np.ndindex(value.shape):
            for sign in (1, -1):
                shifted = value.copy()
                shifted[index] += sign * step
                variable.assign(shifted)
                numeric[index] += sign * loss_and_grads(layer, x, weight, training)[0]
            variable.assign(value)
        numeric /= 2 * step
        np.testing.assert_allclose(
            grads[variable.name], numeric, rtol=1e-5, atol=1e-7,
            err_msg=variable.name,
        )


def test_gradients_are_finite_at_zero_beta_and_follow_the_reference():
    """At beta = 0 the norm's subgradient is 0, as in PyTorch (see layer)."""
    x = RNG.normal(size=(6, 4)).astype("float64")
    weight = RNG.normal(size=(6, 4))
    layer = random_layer(x.shape, dtype="float64")
    layer.beta.assign(np.zeros(4))
    alpha = float(layer.alpha.numpy())
    loss, grads = loss_and_grads(layer, x, weight, training=True)
    for grad in grads.values():
        assert np.all(np.isfinite(grad))
    # d loss / d beta_eff is the column sum of the weights; the reference's
    # gradient on raw beta at 0 is alpha / 1e-6 times that.
    np.testing.assert_allclose(grads["beta"], alpha / 1e-6 * weight.sum(0), rtol=1e-9)
    # And it is the one-sided derivative along each axis (float64, h << 1e-6).
    step = 1e-12
    for i in range(4):
        layer.beta.assign(np.eye(4)[i] * step)
        slope = (loss_and_grads(layer, x, weight, True)[0] - loss) / step
        np.testing.assert_allclose(slope, grads["beta"][i], rtol=1e-5)


def test_first_sgd_step_from_zero_beta_is_finite():
    x = RNG.normal(size=(32, 8)).astype("float32")
    y = RNG.normal(size=(32, 8)).astype("float32")
    inputs = keras.Input((8,))
    model = keras.Model(inputs, NormalizedBatchNormalization()(inputs))
    model.compile(keras.optimizers.SGD(0.1), "mse")
    history = model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())


@pytest.mark.parametrize("strides, padding", [(1, "same"), (2, "valid")])
def test_grouped_conv_matches_keras_conv2d_with_gradients(strides, padding):
    from nbn_keras.layers import GroupedConv2D

    grouped = GroupedConv2D(16, 3, strides=strides, padding=padding, groups=4)
    x = tf.constant(RNG.normal(size=(2, 9, 9, 8)).astype("float32"))
    grouped.build(x.shape)
    stock = keras.layers.Conv2D.from_config(grouped.get_config())
    stock.build(x.shape)
    stock.set_weights(grouped.get_weights())
    weight = tf.constant(RNG.normal(size=grouped(x).shape).astype("float32"))
    results = []
    for layer in (grouped, stock):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x) * weight)
        results.append([layer(x)] + tape.gradient(loss, [x, layer.kernel, layer.bias]))
    for ours, theirs in zip(*results, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(grouped.to_conv2d()(x), stock(x))
    assert type(grouped.to_conv2d()) is keras.layers.Conv2D
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(grouped))
    assert type(restored) is GroupedConv2D and restored.get_config() == grouped.get_config()
