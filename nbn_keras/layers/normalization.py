"""The NBN layer and the scale layer that lets several NBN layers share alpha."""

import keras
import numpy as np
from keras import ops

from nbn_keras import keras_internals

# Added to the norm (not under the square root), as in the reference code.
NORM_EPSILON = 1e-6


def unit_direction(vector, norm_epsilon=NORM_EPSILON):
    """Returns `vector / (||vector||_2 + norm_epsilon)` with a finite gradient.

    The norm's gradient at the zero vector is taken as 0 (the subgradient
    PyTorch uses), so at `vector = 0` the gradient of the result is
    `I / norm_epsilon`, exactly as in the reference code, instead of the NaN a
    plain `sqrt(sum(x**2))` gives there.
    """
    squared_norm = ops.sum(ops.square(vector))
    is_positive = squared_norm > 0
    safe_squared_norm = ops.where(is_positive, squared_norm, 1.0)
    norm = ops.where(is_positive, ops.sqrt(safe_squared_norm), 0.0)
    return vector / (norm + norm_epsilon)


def _add_scale_weight(layer, name):
    """A float32 scalar scale of `layer`, from its alpha initializer."""
    return layer.add_weight(
        shape=(),
        name=name,
        initializer=layer.alpha_initializer,
        regularizer=layer.alpha_regularizer,
        trainable=True,
        autocast=False,
    )


def _split_scale(scale, separate_scales):
    if separate_scales:
        return scale[0], scale[1]
    return scale, scale


@keras.saving.register_keras_serializable(package="nbn_keras")
class NormalizedBatchNormalization(keras.layers.BatchNormalization):
    """Batch normalization whose gamma and beta are normalised and rescaled.

    Normalizing Batch Normalization (NBN) learns the direction and the
    magnitude of BN's affine parameters separately. The layer keeps raw
    vectors `gamma` and `beta` and a learnable scalar `alpha`, and uses

    ```
    gamma_eff = alpha * gamma / (||gamma||_2 + 1e-6)
    beta_eff = alpha * beta / (||beta||_2 + 1e-6)
    outputs = gamma_eff * (inputs - mean) / sqrt(var + epsilon) + beta_eff
    ```

    in place of `gamma` and `beta`. Everything else is exactly
    `keras.layers.BatchNormalization`: batch statistics when `training=True`,
    moving statistics otherwise, the same moving-average update, masks,
    `synchronized=True`, and float32 computation for float16/bfloat16 inputs.
    Under long-tailed training, plain BN lets the channels that serve frequent
    classes grow large; normalising the vectors evens out channel strengths so
    rare-class features are not drowned.

    The scale `alpha` either belongs to the layer (the default for a layer
    used on its own) or comes from an `NBNScale` layer through the `scale`
    call argument, which is how one `alpha` is shared by every NBN layer of a
    model, as in the reference code. `nbn_keras.convert_to_nbn` wires this up.

    **The zero start of beta.** `beta` starts at 0, like BN's. There the
    norm's gradient is taken as 0, as PyTorch does, so the first gradient
    reaching `beta` is `alpha / 1e-6` times the gradient on `beta_eff`: the
    reference behaviour, reproduced exactly. The first step moves `beta` far
    from 0 and afterwards mostly `alpha` changes its magnitude; `beta`'s
    direction is what it learns. Pass a non-zero `beta_initializer` to start
    elsewhere.

    **`trainable=False`** means inference mode, as for
    `keras.layers.BatchNormalization`: moving statistics are used and not
    updated, and gamma, beta and an own `alpha` are frozen.

    Args:
        axis: Integer, the axis that should be normalized (typically the
            features axis).
        momentum: Momentum for the moving average.
        epsilon: Small float added to the variance to avoid dividing by zero.
        center: If `True`, add the normalised offset `beta_eff`.
        scale: If `True`, multiply by the normalised `gamma_eff`.
        beta_initializer: Initializer for the raw beta vector.
        gamma_initializer: Initializer for the raw gamma vector.
        moving_mean_initializer: Initializer for the moving mean.
        moving_variance_initializer: Initializer for the moving variance.
        beta_regularizer: Optional regularizer for the raw beta vector.
        gamma_regularizer: Optional regularizer for the raw gamma vector.
        beta_constraint: Optional constraint for the raw beta vector.
        gamma_constraint: Optional constraint for the raw gamma vector.
        synchronized: TensorFlow backend only. If `True`, the batch
            statistics are synchronised across replicas of a distribution
            strategy.
        shared_scale: If `False` (default), the layer owns its scale
            variable(s). If `True`, it owns none and must be called with
            `scale=`, the output of an `NBNScale` layer.
        separate_scales: If `True`, gamma and beta get separate scalars
            (`gamma_alpha`, `beta_alpha`); if `False`, one `alpha` scales both.
        alpha_initializer: Initializer for the layer's own scale(s).
        alpha_regularizer: Optional regularizer for the layer's own scale(s).
        norm_epsilon: Float added to the L2 norms of gamma and beta.
        **kwargs: Base layer keyword arguments (e.g. `name` and `dtype`).
            Batch renormalization (`renorm=True`) is supported as in
            `keras.layers.BatchNormalization`.

    Call arguments:
        inputs: Input tensor (of any rank).
        training: Python boolean: `True` normalises with the batch
            statistics and updates the moving ones, `False` uses the moving
            statistics.
        mask: Binary tensor of shape broadcastable to `inputs`, `True` where
            positions count for the batch statistics.
        scale: With `shared_scale=True`, the output of an `NBNScale` layer
            (shape `()`, or `(2,)` for separate gamma and beta scales).

    Example:

    >>> layer = nbn_keras.NormalizedBatchNormalization()
    >>> x = np.random.normal(size=(8, 4, 4, 16)).astype("float32")
    >>> layer(x, training=True).shape
    TensorShape([8, 4, 4, 16])

    Sharing one scale between two layers:

    >>> inputs = keras.Input((4, 4, 16))
    >>> alpha = nbn_keras.NBNScale()(inputs)
    >>> x = nbn_keras.NormalizedBatchNormalization(shared_scale=True)(
    ...     inputs, scale=alpha)
    >>> x = nbn_keras.NormalizedBatchNormalization(shared_scale=True)(
    ...     x, scale=alpha)

    Reference:
    - [Bao et al., Normalizing Batch Normalization for Long-Tailed
      Recognition, IEEE TIP 2025](https://arxiv.org/abs/2501.03122).
    - [Ioffe and Szegedy, 2015](https://arxiv.org/abs/1502.03167).
    """

    def __init__(
        self,
        axis=-1,
        momentum=0.99,
        epsilon=1e-3,
        center=True,
        scale=True,
        shared_scale=False,
        separate_scales=False,
        alpha_initializer="ones",
        alpha_regularizer=None,
        norm_epsilon=NORM_EPSILON,
        **kwargs,
    ):
        # Keras would cast every float argument, `scale` included, to the
        # compute dtype (float16 under mixed precision). `call` casts
        # `inputs` alone, so the shared scale keeps float32 precision.
        kwargs["autocast"] = False
        super().__init__(
            axis=axis, momentum=momentum, epsilon=epsilon, center=center,
            scale=scale, **kwargs
        )
        self.shared_scale = bool(shared_scale)
        self.separate_scales = bool(separate_scales)
        self.alpha_initializer = keras.initializers.get(alpha_initializer)
        self.alpha_regularizer = keras.regularizers.get(alpha_regularizer)
        self.norm_epsilon = float(norm_epsilon)
        self.alpha = None
        self.gamma_alpha = None
        self.beta_alpha = None

    def build(self, input_shape):
        super().build(input_shape)
        if self.shared_scale:
            return
        if self.separate_scales:
            self.gamma_alpha = _add_scale_weight(self, "gamma_alpha")
            self.beta_alpha = _add_scale_weight(self, "beta_alpha")
        else:
            self.alpha = _add_scale_weight(self, "alpha")

    def effective_parameters(self, scale=None, dtype="float32"):
        """Returns `(gamma_eff, beta_eff)`, `None` for a disabled one.

        Args:
            scale: The shared scale tensor when `shared_scale=True`.
            dtype: The dtype to compute in.
        """
        if self.shared_scale:
            if scale is None:
                raise ValueError(
                    f"Layer '{self.name}' has shared_scale=True and must be "
                    "called with `scale=`, the output of an NBNScale layer."
                )
            gamma_alpha, beta_alpha = _split_scale(
                ops.cast(scale, dtype), self.separate_scales
            )
        elif self.separate_scales:
            gamma_alpha = ops.cast(self.gamma_alpha, dtype)
            beta_alpha = ops.cast(self.beta_alpha, dtype)
        else:
            gamma_alpha = beta_alpha = ops.cast(self.alpha, dtype)
        gamma_eff = beta_eff = None
        if self.scale:
            gamma_eff = gamma_alpha * unit_direction(
                ops.cast(self.gamma, dtype), self.norm_epsilon
            )
        if self.center:
            beta_eff = beta_alpha * unit_direction(
                ops.cast(self.beta, dtype), self.norm_epsilon
            )
        return gamma_eff, beta_eff

    def call(self, inputs, training=None, mask=None, scale=None):
        if mask is not None and len(mask.shape) != len(inputs.shape) - 1:
            raise ValueError(
                "The mask provided should be one dimension less than the "
                f"inputs. Received: mask.shape={mask.shape}, "
                f"inputs.shape={inputs.shape}"
            )
        if keras.backend.is_float_dtype(inputs.dtype):
            inputs = ops.cast(inputs, self.input_dtype)
        # BN overflows in half precision: compute in float32, like Keras BN.
        compute_dtype = keras.backend.result_type(inputs.dtype, "float32")
        inputs = ops.cast(inputs, compute_dtype)
        gamma, beta = self.effective_parameters(scale, compute_dtype)
        moving_mean = ops.cast(self.moving_mean, compute_dtype)
        moving_variance = ops.cast(self.moving_variance, compute_dtype)

        if training and self.trainable:
            mean, variance = self._moments(inputs, mask)
            if self.renorm:
                r, d, mean, variance = self._renorm_correction_and_moments(
                    mean, variance
                )
                gamma, beta = self._compose_transforms(
                    r, d, gamma, beta, compute_dtype
                )
                self._update_renorm_statistics(mean, variance)
            else:
                self.moving_mean.assign(
                    moving_mean * self.momentum + mean * (1.0 - self.momentum)
                )
                self.moving_variance.assign(
                    moving_variance * self.momentum
                    + variance * (1.0 - self.momentum)
                )
        else:
            mean, variance = moving_mean, moving_variance

        outputs = ops.batch_normalization(
            x=inputs,
            mean=mean,
            variance=variance,
            axis=self.axis,
            offset=beta,
            scale=gamma,
            epsilon=self.epsilon,
        )
        return ops.cast(outputs, self.compute_dtype)

    @classmethod
    def from_batch_normalization(
        cls,
        layer,
        shared_scale=False,
        separate_scales=False,
        preserve_outputs=False,
        **kwargs,
    ):
        """Returns an NBN layer with the configuration and state of a BN layer.

        The new layer has `layer`'s configuration (axis, momentum, epsilon,
        initializers, `synchronized`, name, ...). If `layer` is built, so is
        the new one, with `layer`'s gamma and beta as its raw vectors, its
        moving statistics, and its own scale(s) at the initial value (1.0 by
        default). With `preserve_outputs=True` the own scales are set to
        `||gamma|| + norm_epsilon` and `||beta|| + norm_epsilon` instead, so
        the layer gives `layer`'s outputs exactly.

        Args:
            layer: A built or unbuilt `keras.layers.BatchNormalization`.
            shared_scale: See the class arguments.
            separate_scales: See the class arguments.
            preserve_outputs: If `True`, keep `layer`'s outputs. Needs
                `shared_scale=False` and `separate_scales=True`: one scale
                cannot restore both magnitudes.
            **kwargs: Other NBN arguments (`alpha_initializer`, ...).

        Returns:
            A new `NormalizedBatchNormalization`.

        Example:

        >>> bn = keras.layers.BatchNormalization()
        >>> bn.build((None, 8))
        >>> nbn = nbn_keras.NormalizedBatchNormalization.from_batch_normalization(
        ...     bn, separate_scales=True, preserve_outputs=True)
        """
        if not isinstance(layer, keras.layers.BatchNormalization) or isinstance(
            layer, NormalizedBatchNormalization
        ):
            raise TypeError(
                "from_batch_normalization() takes a "
                f"keras.layers.BatchNormalization, got {type(layer).__name__} "
                f"'{getattr(layer, 'name', layer)}'."
            )
        if preserve_outputs and (shared_scale or not separate_scales):
            raise ValueError(
                "preserve_outputs=True needs shared_scale=False and "
                "separate_scales=True: a shared scale, or one scale for both "
                "gamma and beta, cannot keep every layer's magnitudes."
            )
        config = layer.get_config()
        config.update(
            shared_scale=shared_scale, separate_scales=separate_scales, **kwargs
        )
        nbn = cls.from_config(config)
        if not layer.built:
            return nbn
        nbn.build_from_config(layer.get_build_config())
        nbn.moving_mean.assign(layer.moving_mean)
        nbn.moving_variance.assign(layer.moving_variance)
        for raw, scale in (("gamma", "gamma_alpha"), ("beta", "beta_alpha")):
            vector = getattr(layer, raw)
            if vector is None:
                continue
            getattr(nbn, raw).assign(vector)
            if preserve_outputs:
                norm = np.linalg.norm(np.asarray(vector, dtype=np.float64))
                getattr(nbn, scale).assign(norm + nbn.norm_epsilon)
        return nbn

    def to_batch_normalization(self, scale=None):
        """Returns the plain BN layer that computes what this layer computes.

        A trained NBN layer is exactly a `keras.layers.BatchNormalization`
        whose gamma and beta are the effective ones (see
        `effective_parameters`); this is how NBN is folded away for export.
        The BN layer has this layer's configuration without the NBN
        arguments and, if this layer is built, its effective gamma and beta
        and its moving statistics.

        Args:
            scale: With `shared_scale=True`, the value of the shared scale
                (what the `NBNScale` layer outputs).

        Returns:
            A new `keras.layers.BatchNormalization`.
        """
        config = self.get_config()
        for key in self._nbn_config():
            config.pop(key)
        bn = keras.layers.BatchNormalization.from_config(config)
        if not self.built:
            return bn
        bn.build_from_config(self.get_build_config())
        gamma, beta = self.effective_parameters(scale)
        if gamma is not None:
            bn.gamma.assign(gamma)
        if beta is not None:
            bn.beta.assign(beta)
        bn.moving_mean.assign(self.moving_mean)
        bn.moving_variance.assign(self.moving_variance)
        return bn

    def stock_equivalent(self):
        """The stock layer that replaces this one on export (the fold hook).

        `nbn_keras.fold_nbn`, and so the exporter, replaces every layer that
        has this method by what it returns. Here: `to_batch_normalization`
        with the value of the connected shared scale, if any.

        Returns:
            A new `keras.layers.BatchNormalization`.
        """
        return self.to_batch_normalization(self._connected_scale_value())

    def _connected_scale_value(self):
        """The value of the shared scale feeding this layer, or `None`."""
        if not self.shared_scale:
            return None
        for node in keras_internals.inbound_nodes(self):
            scale = node.arguments.kwargs.get("scale")
            if scale is not None:
                return keras_internals.producing_operation(scale).value()
        raise ValueError(f"Layer '{self.name}' is not connected to a scale.")

    def _nbn_config(self):
        """The constructor arguments NBN adds to BatchNormalization's."""
        return {
            "shared_scale": self.shared_scale,
            "separate_scales": self.separate_scales,
            "alpha_initializer": keras.initializers.serialize(
                self.alpha_initializer
            ),
            "alpha_regularizer": keras.regularizers.serialize(
                self.alpha_regularizer
            ),
            "norm_epsilon": self.norm_epsilon,
        }

    def get_config(self):
        config = super().get_config()
        config.update(self._nbn_config())
        return config


@keras.saving.register_keras_serializable(package="nbn_keras")
class NBNScale(keras.layers.Layer):
    """Holds the scale `alpha` shared by several NBN layers of a model.

    The layer ignores the values of its input (any tensor of the graph, used
    only to place the layer in it) and returns its scale variable(s): a
    scalar `alpha`, or with `separate_scales=True` the vector
    `[gamma_alpha, beta_alpha]`. Feed the output to every
    `NormalizedBatchNormalization(shared_scale=True)` as `scale=`. Because
    the sharing is an edge of the model graph, it survives
    `keras.models.clone_model`, saving and loading.

    Args:
        separate_scales: If `True`, hold two scalars, for gamma and beta.
        alpha_initializer: Initializer for the scale(s); the reference starts
            at 1.0.
        alpha_regularizer: Optional regularizer for the scale(s).
        **kwargs: Base layer keyword arguments (e.g. `name`).

    Call arguments:
        inputs: Any tensor; only its graph position matters.

    Example:

    >>> inputs = keras.Input((8, 8, 4))
    >>> alpha = nbn_keras.NBNScale(name="nbn_scale")(inputs)
    >>> outputs = nbn_keras.NormalizedBatchNormalization(shared_scale=True)(
    ...     inputs, scale=alpha)
    """

    def __init__(
        self,
        separate_scales=False,
        alpha_initializer="ones",
        alpha_regularizer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.separate_scales = bool(separate_scales)
        self.alpha_initializer = keras.initializers.get(alpha_initializer)
        self.alpha_regularizer = keras.regularizers.get(alpha_regularizer)
        names = ("gamma_alpha", "beta_alpha") if self.separate_scales else ("alpha",)
        self.scales = [_add_scale_weight(self, name) for name in names]
        self.built = True

    def call(self, inputs):
        return self.value()

    def value(self):
        """Returns the scale: a scalar, or `[gamma_alpha, beta_alpha]`."""
        if self.separate_scales:
            return ops.stack([s.value for s in self.scales])
        return self.scales[0].value

    def stock_equivalent(self):
        """`None`: folding drops the layer (the fold hook).

        Its value is folded into the gamma and beta of the NBN layers it
        feeds (`NormalizedBatchNormalization.stock_equivalent`), after which
        nothing reads it. One that still feeds a layer after folding stops
        the export.
        """
        return None

    def compute_output_spec(self, inputs):
        shape = (2,) if self.separate_scales else ()
        return keras.KerasTensor(shape, dtype=self.variable_dtype)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "separate_scales": self.separate_scales,
                "alpha_initializer": keras.initializers.serialize(
                    self.alpha_initializer
                ),
                "alpha_regularizer": keras.regularizers.serialize(
                    self.alpha_regularizer
                ),
            }
        )
        return config
