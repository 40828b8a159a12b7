"""Intervals over seeds: the mean with its t interval, the IQM, and percentile bootstraps.

Means carry the 95% t interval (``ci95``) and a percentile bootstrap over seeds
(``bootstrap_ci``, explicit RNG seed, deterministic). Statistics that combine arms (a ratio
of two arms' means) use a bootstrap stratified by arm: seeds are resampled within each arm
independently (``stratified_bootstrap_ci``). The IQM (mean of the middle 50%, rliable /
``scipy.stats.trim_mean(x, 0.25)``) is given where n >= 5. numpy and scipy only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = ["IQM_MIN_N", "N_BOOT", "ArmSummary", "bootstrap_ci", "ci95", "finite", "iqm", "mean",
           "stratified_bootstrap_ci", "summarize_arm"]

N_BOOT = 10_000
IQM_MIN_N = 5


def finite(values: Iterable[float]) -> np.ndarray:
    """The finite values as a flat float array.

    Args:
        values: numbers (any iterable or array); NaN and +-inf are left out.

    Returns:
        A 1-d float array.
    """
    x = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float).ravel()
    return x[np.isfinite(x)]


def ci95(values: Iterable[float]) -> float:
    """Half-width of the 95% t interval of the mean over the finite values.

    Args:
        values: one number per seed; non-finite values are ignored.

    Returns:
        ``t_{0.975, n-1} * sd / sqrt(n)``; NaN for fewer than two finite values.
    """
    x = finite(values)
    if len(x) < 2:
        return float("nan")
    return float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


def mean(values: Iterable[float]) -> float:
    """Mean of the finite values.

    Args:
        values: numbers; non-finite values are ignored.

    Returns:
        The mean, or NaN when no value is finite.
    """
    x = finite(values)
    return float(x.mean()) if len(x) else float("nan")



def iqm(values: Iterable[float] | np.ndarray, axis: int = -1) -> float | np.ndarray:
    """Interquartile mean: the mean of the middle 50% (rliable; ``trim_mean(x, 0.25)``).

    ``floor(n / 4)`` values are cut from each end, as ``scipy.stats.trim_mean`` does.

    Args:
        values: numbers; an array is reduced along ``axis`` (vectorized for bootstraps).
        axis: the axis holding the seeds, for arrays.

    Returns:
        A float for 1-d input, else an array with ``axis`` removed. NaN where n < 5 (the
        IQM of fewer values is not worth printing).
    """
    x = np.sort(np.asarray(values, dtype=float), axis=axis)
    n = x.shape[axis]
    if n < IQM_MIN_N:
        out = np.full(np.delete(x.shape, axis % x.ndim) if x.ndim > 1 else (), np.nan)
        return float(out) if out.ndim == 0 else out
    k = n // 4
    out = np.take(x, np.arange(k, n - k), axis=axis).mean(axis=axis)
    return float(out) if np.ndim(out) == 0 else out


def _statistic(name: str | Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    if callable(name):
        return name
    table: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "mean": lambda x: x.mean(axis=-1),
        "median": lambda x: np.median(x, axis=-1),
        "iqm": lambda x: np.asarray(iqm(x, axis=-1)),
    }
    if name not in table:
        raise ValueError(f"statistic: got {name!r}, expected one of {sorted(table)} or a callable")
    return table[name]


def _percentile_interval(boot: np.ndarray, confidence: float) -> tuple[float, float]:
    """Nearest-rank percentiles, so +inf resamples (runs that never reached) stay +inf."""
    lo_q, hi_q = (1 - confidence) / 2, 1 - (1 - confidence) / 2
    lo, hi = np.quantile(boot, [lo_q, hi_q], method="inverted_cdf")
    return float(lo), float(hi)


def _check_boot_args(confidence: float, n_boot: int) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: got {confidence!r}, expected a number in (0, 1)")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot: got {n_boot!r}, expected an int >= 1")


def bootstrap_ci(
    values: Iterable[float],
    statistic: str | Callable[[np.ndarray], np.ndarray] = "mean",
    confidence: float = 0.95,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of a statistic over seeds.

    Seeds are resampled with replacement ``n_boot`` times (one vectorized draw from
    ``numpy.random.default_rng(seed)``), so the same input and seed give the same interval.

    Args:
        values: one value per seed. NaN is an error of the caller (a run with no value
            should be counted, not passed); +inf (a run that never reached a target) is
            kept and propagates to the upper bound.
        statistic: "mean", "median", "iqm", or a callable mapping an array
            (n_boot, n) to (n_boot,).
        confidence: coverage of the interval, e.g. 0.95.
        n_boot: number of resamples.
        seed: seed of the bootstrap RNG.

    Returns:
        ``(low, high)``; ``(nan, nan)`` for fewer than two values (or fewer than five
        for "iqm").
    """
    _check_boot_args(confidence, n_boot)
    x = np.asarray(list(values), dtype=float)
    if np.isnan(x).any():
        raise ValueError(f"values: got NaN in {x.tolist()!r}, expected numbers (+inf for a run that never reached)")
    stat = _statistic(statistic)
    if len(x) < 2 or (statistic == "iqm" and len(x) < IQM_MIN_N):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    with np.errstate(invalid="ignore"):
        boot = np.asarray(stat(x[idx]), dtype=float)
    return _percentile_interval(boot, confidence)


def stratified_bootstrap_ci(
    groups: Mapping[str, Iterable[float]],
    statistic: Callable[[dict[str, np.ndarray]], np.ndarray],
    confidence: float = 0.95,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap stratified by arm: seeds are resampled within each arm.

    Use it for statistics that combine arms, e.g. the ratio of an arm's mean attention
    cost to the baseline's. Strata are drawn in sorted key order from one
    ``numpy.random.default_rng(seed)``, so the result is deterministic.

    Args:
        groups: arm -> one value per seed of that arm (+inf allowed, NaN not).
        statistic: maps {arm: array (n_boot, n_arm)} to an array (n_boot,).
        confidence: coverage of the interval.
        n_boot: number of resamples.
        seed: seed of the bootstrap RNG.

    Returns:
        ``(low, high)``; ``(nan, nan)`` when any arm has fewer than two values.
    """
    _check_boot_args(confidence, n_boot)
    arrays = {k: np.asarray(list(v), dtype=float) for k, v in groups.items()}
    for k, x in arrays.items():
        if np.isnan(x).any():
            raise ValueError(f"groups[{k!r}]: got NaN in {x.tolist()!r}, expected numbers")
    if not arrays or min(len(x) for x in arrays.values()) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    resampled = {k: arrays[k][rng.integers(0, len(arrays[k]), size=(n_boot, len(arrays[k])))]
                 for k in sorted(arrays)}
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = np.asarray(statistic(resampled), dtype=float)
    return _percentile_interval(boot, confidence)


@dataclass(frozen=True)
class ArmSummary:
    """One arm's values over seeds, summarized.

    Attributes:
        n: number of finite values.
        mean: their mean.
        t_ci95: half-width of the 95% t interval (NaN for n < 2).
        boot_low, boot_high: 95% percentile-bootstrap interval of the mean.
        iqm: interquartile mean (NaN for n < 5).
        iqm_low, iqm_high: 95% percentile-bootstrap interval of the IQM (NaN for n < 5).
    """

    n: int
    mean: float
    t_ci95: float
    boot_low: float
    boot_high: float
    iqm: float
    iqm_low: float
    iqm_high: float


def summarize_arm(values: Iterable[float], n_boot: int = N_BOOT, seed: int = 0) -> ArmSummary:
    """Mean with t and bootstrap intervals, and the IQM with its bootstrap interval.

    Args:
        values: one value per seed; non-finite values are left out here (count them with
            ``count_runs``).
        n_boot: bootstrap resamples.
        seed: seed of the bootstrap RNG.

    Returns:
        An ``ArmSummary``.
    """
    x = finite(values)
    lo, hi = bootstrap_ci(x, "mean", n_boot=n_boot, seed=seed)
    q_lo, q_hi = bootstrap_ci(x, "iqm", n_boot=n_boot, seed=seed)
    return ArmSummary(n=len(x), mean=mean(x), t_ci95=ci95(x), boot_low=lo, boot_high=hi,
                      iqm=float(iqm(x)) if len(x) else float("nan"), iqm_low=q_lo, iqm_high=q_hi)
