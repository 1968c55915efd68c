"""An independent NumPy statement of NBN, used as the tests' reference."""

import numpy as np


def unit(vector, norm_epsilon=1e-6):
    return vector / (np.linalg.norm(vector) + norm_epsilon)


def nbn_forward(x, gamma, beta, gamma_alpha, beta_alpha, mean, variance,
                epsilon, axis=-1, norm_epsilon=1e-6):
    """y = a_g g/(|g|+e') (x - mean)/sqrt(var + eps) + a_b b/(|b|+e')."""
    shape = [1] * x.ndim
    shape[axis] = -1
    gamma_eff = gamma_alpha * unit(gamma, norm_epsilon)
    beta_eff = beta_alpha * unit(beta, norm_epsilon)
    return (gamma_eff.reshape(shape) * (x - mean.reshape(shape))
            / np.sqrt(variance.reshape(shape) + epsilon) + beta_eff.reshape(shape))


def batch_moments(x, axis=-1):
    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    return x.mean(axis=axes), x.var(axis=axes)
