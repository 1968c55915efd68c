"""Statistics of the effect study: paired t-intervals and run mechanics.

Standard library and NumPy/SciPy only, no TensorFlow, so the tables can be
recomputed from the study's JSON without training anything.
"""

import math

import numpy as np
from scipy import stats


def paired_interval(treatment, control, confidence=0.95):
    """Mean paired difference `treatment - control` with a t-interval.

    The pairs share everything but the treatment (here: the seed, which
    draws the subset, the initial weights and the sampling order), so the
    differences are treated as `n` independent draws and the interval is
    `mean ± t_{(1 + confidence) / 2, n - 1} * sd / sqrt(n)`, with `sd` the
    sample standard deviation (ddof 1).

    Args:
        treatment: Per-pair values of the treatment arm.
        control: Per-pair values of the control arm, same order and length.
        confidence: Two-sided confidence level.

    Returns:
        A dict: `n`, `mean`, `sd`, `half_width`, `low`, `high`, `t` (the
        critical value), `positive` (pairs with a difference > 0) and
        `negative`. With fewer than 2 pairs the spread fields are NaN.

    Example:

    >>> paired_interval([3.0, 5.0, 4.0], [1.0, 2.0, 3.0])["mean"]
    2.0
    """
    treatment = np.asarray(treatment, dtype=np.float64)
    control = np.asarray(control, dtype=np.float64)
    if treatment.shape != control.shape or treatment.ndim != 1:
        raise ValueError(
            f"Paired values need two 1-D sequences of one length; got shapes "
            f"{treatment.shape} and {control.shape}.")
    diff = treatment - control
    diff = diff[~np.isnan(diff)]
    n = len(diff)
    result = {"n": n, "mean": float(diff.mean()) if n else math.nan,
              "sd": math.nan, "half_width": math.nan, "low": math.nan,
              "high": math.nan, "t": math.nan,
              "positive": int((diff > 0).sum()), "negative": int((diff < 0).sum())}
    if n >= 2:
        sd = float(diff.std(ddof=1))
        t = float(stats.t.ppf(0.5 + confidence / 2, n - 1))
        half = t * sd / math.sqrt(n)
        result.update(sd=sd, t=t, half_width=half, low=result["mean"] - half,
                      high=result["mean"] + half)
    return result


def mean_interval(values, confidence=0.95):
    """Mean of `values` with its t-interval (a one-sample `paired_interval`)."""
    values = np.asarray(values, dtype=np.float64)
    return paired_interval(values, np.zeros_like(values), confidence)


def format_interval(interval, digits=1):
    """`"+2.3 [−0.4, +5.0]"`, or `"+2.3"` when there is no interval."""
    if interval["n"] == 0 or math.isnan(interval["mean"]):
        return "n/a"
    if math.isnan(interval["half_width"]):
        return f"{interval['mean']:+.{digits}f}"
    return (f"{interval['mean']:+.{digits}f} "
            f"[{interval['low']:+.{digits}f}, {interval['high']:+.{digits}f}]")


def one_minus_cosine(a, b):
    """`1 - cos(a, b)`: 0 for the same direction, 2 for opposite ones."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    if norms == 0:
        return math.nan
    return float(1.0 - np.dot(a, b) / norms)


def dynamics_summary(dynamics):
    """Per-layer direction change and norm shrink of one run's raw gamma/beta.

    Args:
        dynamics: The content of a run's `nbn_dynamics.json`
            (`nbn_keras.training.callbacks.NBNDynamicsLogger`).

    Returns:
        A dict from layer name to a dict: `gamma_direction_change`
        (1 - cos between the initial and the last-epoch raw gamma),
        `beta_direction_change` (1 - cos between raw beta after the first
        step and at the last epoch: beta starts at zero, without direction),
        `gamma_norm_initial`, `gamma_norm_ratio` (last / initial norm),
        `beta_norm_step1`, `beta_norm_ratio` (last / after-step-1 norm),
        `beta_norm_peak` (largest of the after-step-1 and epoch-end norms)
        and `beta_norm_shrink_from_peak` (last / peak).
    """
    summary = {}
    for name in dynamics["layers"]:
        start = dynamics["initial"][name]
        step1 = (dynamics.get("after_step_1") or {}).get(name, {})
        last = dynamics["final"][name]
        entry = {}
        if last.get("gamma") is not None:
            entry["gamma_direction_change"] = one_minus_cosine(start["gamma"], last["gamma"])
            entry["gamma_norm_initial"] = float(np.linalg.norm(start["gamma"]))
            entry["gamma_norm_ratio"] = float(
                np.linalg.norm(last["gamma"]) / entry["gamma_norm_initial"])
        if last.get("beta") is not None and step1.get("beta") is not None:
            step1_norm = float(np.linalg.norm(step1["beta"]))
            entry["beta_direction_change"] = one_minus_cosine(step1["beta"], last["beta"])
            entry["beta_norm_step1"] = step1_norm
            entry["beta_norm_ratio"] = (float(np.linalg.norm(last["beta"]) / step1_norm)
                                        if step1_norm > 0 else math.nan)
            # Momentum carries the first gradient on for some steps, so the
            # norm peaks after step 1; the shrink is measured from the peak.
            peak = max([step1_norm] + [e["layers"][name].get("beta_norm", 0.0)
                                       for e in dynamics.get("epochs", [])])
            entry["beta_norm_peak"] = peak
            entry["beta_norm_shrink_from_peak"] = (
                float(np.linalg.norm(last["beta"]) / peak) if peak > 0 else math.nan)
        summary[name] = entry
    return summary


def served_class_strength(gamma, beta, kernel, class_counts):
    """Which class each channel serves, and how strong the channel is.

    A channel of the last BN layer feeds (through the residual sum, ReLU and
    global pooling) the same feature of the linear head, so the class it
    serves is the one whose classifier weight on it is largest
    (`argmax_k kernel[c, k]`).

    Args:
        gamma: Effective gamma of the last BN layer, `(C,)`.
        beta: Effective beta, `(C,)`.
        kernel: Classifier kernel `(C, K)`.
        class_counts: Training images per class, `(K,)`.

    Returns:
        A dict of per-channel lists: `served_class`, `served_count`,
        `abs_gamma`, `abs_beta`; and `spearman_gamma` / `spearman_beta`,
        the rank correlation of |gamma| / |beta| with the served class's
        training-set size (positive: channels of frequent classes are
        stronger, the paper's premise).
    """
    gamma = np.asarray(gamma, dtype=np.float64)
    beta = np.asarray(beta, dtype=np.float64)
    kernel = np.asarray(kernel, dtype=np.float64)
    if kernel.shape[0] != len(gamma):
        raise ValueError(f"The head has {kernel.shape[0]} inputs but the BN layer "
                         f"{len(gamma)} channels.")
    served = kernel.argmax(axis=1)
    counts = np.asarray(class_counts)[served]

    def rho(values):
        if np.ptp(counts) == 0 or np.ptp(values) == 0:
            return math.nan
        return float(stats.spearmanr(values, counts).statistic)

    return {
        "served_class": served.tolist(), "served_count": counts.tolist(),
        "abs_gamma": np.abs(gamma).tolist(), "abs_beta": np.abs(beta).tolist(),
        "spearman_gamma": rho(np.abs(gamma)), "spearman_beta": rho(np.abs(beta)),
    }
