"""Statistics for comparing controller policies over seeds: intervals, Holm, power, compute.

What this module is for: everything ``metalearner compare`` needs to say, at the strength
the data allow, whether an arm (a controller policy run once per seed) differs from the
baseline arm (static), and what it cost in attention compute and wall-clock to reach a
target loss. It reads plain arrays and pandas frames and returns numbers, frames and
sentences; it never prints. It imports numpy, scipy and pandas only, and must not import
mlflow, ray or torch (reading runs, computing statistics and drawing plots are three
modules).

Decisions, stated once (each is tested in ``tests/test_stats.py``):

* **Unit of replication** is the seed. An arm and the baseline run with the same seed share
  initialisation and data order, so arms are compared by the *paired* difference over the
  seeds both finished.
* **Intervals.** Means carry the 95% t interval (``ci95``) and a percentile bootstrap over
  seeds (``bootstrap_ci``, explicit RNG seed, deterministic). Statistics that combine arms
  (a ratio of two arms' means) use a bootstrap stratified by arm: seeds are resampled
  within each arm independently (``stratified_bootstrap_ci``). The IQM (mean of the middle
  50%, rliable / ``scipy.stats.trim_mean(x, 0.25)``) is given where n >= 5.
* **Verdicts.** Each arm is tested against the baseline with the two-sided paired t test;
  Holm's step-down correction runs over the m arms compared with the baseline
  (family-wise alpha = 0.05). The verdict is "better" / "worse" only when the
  Holm-adjusted test rejects, with the side given by the sign of the mean difference;
  otherwise "no clear difference". An arm with fewer than two finite pairs has no test
  but still counts in m (conservative).
* **Minimum detectable effect** (``mde_paired``): the smallest true mean paired difference
  that the paired t test detects with 80% power, from the exact noncentral t (solved with
  ``brentq``), at the run's n and the standard deviation of its paired differences, at the
  per-comparison level alpha / m: Holm's most stringent step, which is Bonferroni's level.
  So the printed MDE is detectable whatever the other arms do (Holm only ever tests an arm
  at alpha / m or at a looser level).
* **Diverged and incomplete runs** are never dropped silently. ``pair_with_baseline`` lists
  every seed that either side ran, with a category: ``paired`` (both finished with finite
  values; these enter the t test), ``missing`` (one side absent or incomplete: counted, not
  tested), ``lost`` (the arm diverged, the baseline finished), ``won`` (the baseline
  diverged, the arm finished), ``both_diverged``. A diverged run is a loss for its arm: its
  value is +inf (for lower-is-better metrics), the t test cannot use it, and a verdict of
  "better" is withheld from an arm that lost any seed to divergence ("worse" is withheld
  from an arm that won a seed that way). Withholding a rejection never raises the
  family-wise error rate.
* **Compute to target.** ``attention_cost`` counts the query-key pairs one layer scores per
  sequence: a causal local head at query t sees min(w, t + 1) keys, a non-causal one the
  keys with |t - s| < w; a global head is a local head with w = T (so causal global heads
  cost about half of T**2). This is the band that ``metalearner.model.attention`` computes
  (its cost follows the window, not the sequence). Summed over the steps up to the first
  evaluation at or below the target, it gives the attention compute to target; a run that
  never reaches the target costs +inf and is counted as "not reached", never dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import optimize, stats

__all__ = [
    "STATUSES",
    "VERDICTS",
    "ArmSummary",
    "ToTarget",
    "attention_cost",
    "baseline_target",
    "bootstrap_ci",
    "ci95",
    "compare_with_baseline",
    "compute_to_target",
    "count_runs",
    "holm",
    "holm_verdicts",
    "iqm",
    "mde_paired",
    "mde_sentence",
    "mean",
    "pair_with_baseline",
    "paired",
    "paired_t",
    "power_paired",
    "run_to_target",
    "stratified_bootstrap_ci",
    "summarize_arm",
    "verdict",
]

STATUSES = ("finished", "diverged", "incomplete")
VERDICTS = ("better", "worse", "no clear difference")
N_BOOT = 10_000
IQM_MIN_N = 5


# ---------------------------------------------------------------- today's helpers (public)


def ci95(values: Iterable[float]) -> float:
    """Half-width of the 95% t interval of the mean over the finite values.

    Args:
        values: one number per seed; non-finite values are ignored.

    Returns:
        ``t_{0.975, n-1} * sd / sqrt(n)``; NaN for fewer than two finite values.
    """
    x = _finite(values)
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
    x = _finite(values)
    return float(x.mean()) if len(x) else float("nan")


def paired(a: pd.Series, b: pd.Series) -> tuple[float, float, int, float]:
    """Paired difference a - b over the common index (e.g. seeds), NaN rows dropped.

    Args:
        a, b: one value per index label (seed).

    Returns:
        ``(mean difference, 95% t half-width, n pairs, two-sided p of scipy's ttest_rel)``.
        n = 0 gives NaNs; n = 1 gives the difference with NaN half-width and p. When all
        differences are equal the t statistic is undefined: half-width 0 and p = 1 if the
        difference is 0, else 0.
    """
    both = pd.concat([a.rename("a"), b.rename("b")], axis=1, join="inner").dropna()
    n = len(both)
    if n == 0:
        return float("nan"), float("nan"), 0, float("nan")
    d = (both["a"] - both["b"]).to_numpy(dtype=float)
    delta = float(d.mean())
    if n < 2:
        return delta, float("nan"), n, float("nan")
    if float(d.std(ddof=1)) == 0.0:
        return delta, 0.0, n, 1.0 if delta == 0 else 0.0
    p = float(stats.ttest_rel(both["a"], both["b"]).pvalue)
    return delta, ci95(d), n, p


def verdict(delta: float, ci: float) -> str:
    """Uncorrected verdict from one interval (lower is better): kept for today's callers.

    Args:
        delta: mean paired difference arm - baseline.
        ci: half-width of its 95% interval.

    Returns:
        "better" when the interval lies below 0, "worse" above 0, else "no clear
        difference" (also when either number is not finite). Prefer ``holm_verdicts`` when
        more than one arm is compared with the baseline.
    """
    if not (np.isfinite(delta) and np.isfinite(ci)):
        return "no clear difference"
    if delta + ci < 0:
        return "better"
    if delta - ci > 0:
        return "worse"
    return "no clear difference"


def _finite(values: Iterable[float]) -> np.ndarray:
    x = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float).ravel()
    return x[np.isfinite(x)]


# ---------------------------------------------------------------- IQM and bootstrap


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
    x = _finite(values)
    lo, hi = bootstrap_ci(x, "mean", n_boot=n_boot, seed=seed)
    q_lo, q_hi = bootstrap_ci(x, "iqm", n_boot=n_boot, seed=seed)
    return ArmSummary(n=len(x), mean=mean(x), t_ci95=ci95(x), boot_low=lo, boot_high=hi,
                      iqm=float(iqm(x)) if len(x) else float("nan"), iqm_low=q_lo, iqm_high=q_hi)


# ---------------------------------------------------------------- paired tests, Holm, power


def paired_t(diffs: np.ndarray, axis: int = -1) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Two-sided one-sample t test of paired differences, vectorized over other axes.

    Same numbers as ``paired`` / ``scipy.stats.ttest_rel``; NaN entries are left out.

    Args:
        diffs: paired differences arm - baseline, seeds along ``axis``.
        axis: the seed axis.

    Returns:
        ``(delta, ci95 half-width, n, p)`` arrays with ``axis`` removed. n < 2 gives NaN
        half-width and p; zero spread gives half-width 0 and p = 1 if delta == 0 else 0.
    """
    d = np.moveaxis(np.asarray(diffs, dtype=float), axis, -1)
    ok = np.isfinite(d)
    n = ok.sum(axis=-1)
    z = np.where(ok, d, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        delta = np.where(n > 0, z.sum(axis=-1) / n, np.nan)
        ss = np.where(ok, (z - delta[..., None]) ** 2, 0.0).sum(axis=-1)
        sd = np.sqrt(ss / (n - 1))
        se = sd / np.sqrt(n)
        df = np.maximum(n - 1, 1)
        half = np.where(n >= 2, stats.t.ppf(0.975, df) * se, np.nan)
        p = np.where(n >= 2, 2 * stats.t.sf(np.abs(delta / se), df), np.nan)
    flat = (n >= 2) & (ss <= 0.0)
    half = np.where(flat, 0.0, half)
    p = np.where(flat, np.where(delta == 0, 1.0, 0.0), p)
    return delta, half, n, p


def holm(pvalues: np.ndarray, alpha: float = 0.05, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Holm's step-down correction over the comparisons along ``axis`` (vectorized).

    Sorted p-values p_(1) <= ... <= p_(m) are compared with alpha / (m - i + 1); testing
    stops at the first that fails. A NaN p-value (no test) never rejects but counts in m.

    Args:
        pvalues: p-values, comparisons along ``axis`` (other axes: independent families).
        alpha: family-wise error rate.
        axis: the comparison axis.

    Returns:
        ``(reject, adjusted)``: boolean array and Holm-adjusted p-values
        (``max_{j<=i} (m - j + 1) p_(j)``, capped at 1; NaN stays NaN), same shape as input.
    """
    p = np.moveaxis(np.asarray(pvalues, dtype=float), axis, -1)
    m = p.shape[-1]
    filled = np.where(np.isnan(p), np.inf, p)
    order = np.argsort(filled, axis=-1, kind="stable")
    sorted_p = np.take_along_axis(filled, order, axis=-1)
    factors = m - np.arange(m)
    adj_sorted = np.minimum(np.maximum.accumulate(sorted_p * factors, axis=-1), 1.0)
    reject_sorted = np.cumprod(sorted_p <= alpha / factors, axis=-1).astype(bool)
    inv = np.argsort(order, axis=-1, kind="stable")
    adjusted = np.take_along_axis(adj_sorted, inv, axis=-1)
    reject = np.take_along_axis(reject_sorted, inv, axis=-1)
    adjusted = np.where(np.isnan(p), np.nan, adjusted)
    return np.moveaxis(reject, -1, axis), np.moveaxis(adjusted, -1, axis)


def holm_verdicts(
    delta: np.ndarray, p: np.ndarray, alpha: float = 0.05, lower_is_better: bool = True, axis: int = -1
) -> np.ndarray:
    """Verdict per arm from Holm over the arms along ``axis`` (vectorized).

    Args:
        delta: mean paired differences arm - baseline.
        p: their two-sided p-values (NaN: no test).
        alpha: family-wise error rate.
        lower_is_better: True for losses.
        axis: the arm axis.

    Returns:
        Array of "better" / "worse" / "no clear difference", same shape as ``delta``.
    """
    reject, _ = holm(p, alpha, axis=axis)
    d = np.asarray(delta, dtype=float)
    good = d < 0 if lower_is_better else d > 0
    bad = d > 0 if lower_is_better else d < 0
    return np.where(reject & good, "better", np.where(reject & bad, "worse", "no clear difference"))


def _level(alpha: float, n_comparisons: int) -> float:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha: got {alpha!r}, expected a number in (0, 1)")
    if isinstance(n_comparisons, bool) or not isinstance(n_comparisons, (int, np.integer)) or n_comparisons < 1:
        raise ValueError(f"n_comparisons: got {n_comparisons!r}, expected an int >= 1")
    return alpha / n_comparisons


def power_paired(effect: float, n: int, sd: float, alpha: float = 0.05, n_comparisons: int = 1) -> float:
    """Power of the two-sided paired t test at level alpha / n_comparisons (noncentral t).

    Args:
        effect: true mean paired difference (either sign).
        n: number of pairs (seeds), >= 2.
        sd: true standard deviation of the paired differences, > 0.
        alpha: family-wise alpha; the test runs at alpha / n_comparisons.
        n_comparisons: m, the arms compared with the baseline.

    Returns:
        P(|T| > t_crit) with T ~ noncentral t(df = n - 1, nc = effect * sqrt(n) / sd).
    """
    level = _level(alpha, n_comparisons)
    if n < 2 or not sd > 0:
        raise ValueError(f"n, sd: got n={n!r}, sd={sd!r}, expected n >= 2 and sd > 0")
    df = n - 1
    crit = stats.t.ppf(1 - level / 2, df)
    nc = abs(effect) * math.sqrt(n) / sd
    wrong_side = float(stats.nct.sf(crit, df, -nc))  # = P(T < -crit); scipy's cdf can give NaN here
    return float(stats.nct.sf(crit, df, nc) + (wrong_side if np.isfinite(wrong_side) else 0.0))


def mde_paired(n: int, sd: float, alpha: float = 0.05, n_comparisons: int = 1, power: float = 0.8) -> float:
    """Minimum detectable effect of the paired t test (exact noncentral t).

    The smallest |mean paired difference| detected with probability ``power`` by the
    two-sided paired t test at level alpha / n_comparisons (Holm's most stringent step),
    found with ``brentq`` on ``power_paired``. For comparison, the usual approximation
    ``(t_{1-a/2,n-1} + t_{power,n-1}) * sd / sqrt(n)`` is a little smaller for small n.

    Args:
        n: number of pairs (seeds).
        sd: standard deviation of the paired differences (the run's estimate).
        alpha: family-wise alpha.
        n_comparisons: m, the arms compared with the baseline.
        power: target power in (0, 1), e.g. 0.8.

    Returns:
        The MDE in the metric's units; inf when n < 2 or sd is not finite (nothing can be
        detected without a variance estimate); 0.0 when sd == 0.
    """
    level = _level(alpha, n_comparisons)
    if not 0 < power < 1:
        raise ValueError(f"power: got {power!r}, expected a number in (0, 1)")
    if n < 2 or not np.isfinite(sd):
        return float("inf")
    if sd == 0:
        return 0.0
    hi = (stats.t.ppf(1 - level / 2, n - 1) + stats.norm.ppf(power) + 1.0) * sd / math.sqrt(n)
    while power_paired(hi, n, sd, alpha, n_comparisons) < power:
        hi *= 2
    return float(optimize.brentq(lambda e: power_paired(e, n, sd, alpha, n_comparisons) - power,
                                 0.0, hi, xtol=1e-12 * max(1.0, hi), rtol=1e-10))


def mde_sentence(
    n: int, mde: float, metric: str = "val_loss", alpha: float = 0.05, n_comparisons: int = 1,
    power: float = 0.8,
) -> str:
    """The sentence printed under the table.

    Args:
        n: seeds that paired up (the smallest n over the arms, to be safe).
        mde: from ``mde_paired``.
        metric: the compared metric's name.
        alpha: family-wise alpha.
        n_comparisons: m, the arms compared with the baseline.
        power: the power used for ``mde``.

    Returns:
        e.g. "with n=2 seeds, differences in val_loss under 0.41 cannot be detected (80%
        power, α=0.05 Holm over 4 arms)".
    """
    seeds = "seed" if n == 1 else "seeds"
    how = f"{power:.0%} power, α={alpha:g}" + (f" Holm over {n_comparisons} arms" if n_comparisons > 1 else "")
    if not np.isfinite(mde):
        return f"with n={n} {seeds}, no difference in {metric} can be detected (no variance estimate; {how})"
    return f"with n={n} {seeds}, differences in {metric} under {mde:.3g} cannot be detected ({how})"


# ---------------------------------------------------------------- runs, pairs, verdicts


def _plain(x: object) -> object:
    """numpy scalar -> Python scalar, so messages read ``seed 0``, not ``np.int64(0)``."""
    item = getattr(x, "item", None)
    return item() if callable(item) else x


def _check_rows(rows: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in ("arm", "seed", "value", "status") if c not in rows.columns]
    if missing:
        raise ValueError(f"rows: missing columns {missing}, expected arm, seed, value, status")
    bad = sorted(set(rows["status"]) - set(STATUSES))
    if bad:
        raise ValueError(f"status: got {bad[0]!r}, expected one of {list(STATUSES)}")
    dup = rows.duplicated(["arm", "seed"])
    if dup.any():
        r = rows[dup].iloc[0]
        raise ValueError(f"rows: arm {r['arm']!r} seed {_plain(r['seed'])!r} appears twice, expected one run per arm and seed")
    fin = rows[rows["status"] == "finished"]
    nonfinite = fin[~np.isfinite(fin["value"].astype(float))]
    if len(nonfinite):
        r = nonfinite.iloc[0]
        raise ValueError(f"value: got {_plain(r['value'])!r} for finished arm {r['arm']!r} seed {_plain(r['seed'])!r}, "
                         "expected a finite number (mark the run diverged)")
    return rows


def count_runs(rows: pd.DataFrame) -> pd.DataFrame:
    """Per-arm counts of runs by status.

    Args:
        rows: one row per run with columns arm, seed, value, status
            (``finished`` | ``diverged`` | ``incomplete``).

    Returns:
        DataFrame indexed by arm with columns n_runs, n_finished, n_diverged, n_incomplete.
    """
    _check_rows(rows)
    out = pd.crosstab(rows["arm"], rows["status"]).reindex(columns=list(STATUSES), fill_value=0)
    out.columns = [f"n_{c}" for c in out.columns]
    out.insert(0, "n_runs", out.sum(axis=1))
    out.index.name = "arm"
    return out.astype(int)


def _effective(values: pd.Series, status: pd.Series, lower_is_better: bool) -> pd.Series:
    """Value used in pairing: +inf (or -inf) for diverged runs, NaN for incomplete or absent."""
    v = values.astype(float).where(status == "finished", np.nan)
    return v.where(status != "diverged", np.inf if lower_is_better else -np.inf)


PAIR_CATEGORIES = ("paired", "missing", "lost", "won", "both_diverged")


def pair_with_baseline(rows: pd.DataFrame, baseline: str, lower_is_better: bool = True) -> pd.DataFrame:
    """Every (arm, seed) that either the arm or the baseline ran, paired, none dropped.

    Args:
        rows: one row per run with columns arm, seed, value, status.
        baseline: the baseline arm's name (e.g. "static").
        lower_is_better: True for losses (a diverged run's value is then +inf, else -inf).

    Returns:
        DataFrame with columns arm, seed, value, baseline_value, status, baseline_status
        ("absent" when that side has no run for the seed), diff (value - baseline_value,
        NaN unless both finished) and category: ``paired`` | ``missing`` | ``lost`` |
        ``won`` | ``both_diverged`` (see the module docstring). Sorted by arm, seed.
    """
    _check_rows(rows)
    if baseline not in set(rows["arm"]):
        raise ValueError(f"baseline: got {baseline!r}, expected one of the arms {sorted(set(rows['arm']))}")
    cols = ["arm", "seed", "value", "baseline_value", "status", "baseline_status", "diff", "category"]
    base = rows.loc[rows["arm"] == baseline, ["seed", "value", "status"]]
    others = rows.loc[rows["arm"] != baseline, ["arm", "seed", "value", "status"]]
    if others.empty:
        return pd.DataFrame(columns=cols)
    arms = pd.DataFrame({"arm": sorted(set(others["arm"]))})
    seeds = pd.concat([others[["arm", "seed"]], arms.merge(base[["seed"]], how="cross")]).drop_duplicates()
    out = (seeds.merge(others, on=["arm", "seed"], how="left")
           .merge(base.rename(columns={"value": "baseline_value", "status": "baseline_status"}), on="seed", how="left"))
    out["status"] = out["status"].fillna("absent")
    out["baseline_status"] = out["baseline_status"].fillna("absent")
    out["value"] = _effective(out["value"], out["status"], lower_is_better)
    out["baseline_value"] = _effective(out["baseline_value"], out["baseline_status"], lower_is_better)
    st_, bst = out["status"], out["baseline_status"]
    out["category"] = np.select(
        [(st_ == "finished") & (bst == "finished"), (st_ == "diverged") & (bst == "diverged"),
         (st_ == "diverged") & (bst == "finished"), (st_ == "finished") & (bst == "diverged")],
        ["paired", "both_diverged", "lost", "won"], default="missing")
    out["diff"] = (out["value"] - out["baseline_value"]).where(out["category"] == "paired", np.nan)
    return out[cols].sort_values(["arm", "seed"], kind="stable").reset_index(drop=True)


def compare_with_baseline(
    rows: pd.DataFrame,
    baseline: str,
    alpha: float = 0.05,
    power: float = 0.8,
    lower_is_better: bool = True,
    metric: str = "val_loss",
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> tuple[pd.DataFrame, str]:
    """Each arm against the baseline: paired t test, Holm over the arms, MDE, counts.

    Args:
        rows: one row per run with columns arm, seed, value, status.
        baseline: the baseline arm (its row carries verdict "baseline").
        alpha: family-wise error rate of the Holm family (the arms other than baseline).
        power: power for the minimum detectable effect.
        lower_is_better: True for losses.
        metric: the metric's name, for the sentence.
        n_boot, seed: bootstrap resamples and RNG seed (deterministic for a given seed).

    Returns:
        ``(table, sentence)``. ``table`` is indexed by arm (baseline first) with columns
        n_runs, n_finished, n_diverged, n_incomplete; the arm's finished values summarized
        (the ``ArmSummary`` fields: n, mean, t_ci95, boot_low, boot_high, iqm, iqm_low,
        iqm_high); the pairing counts n_paired, n_missing, n_lost, n_won, n_both_diverged;
        the paired comparison delta (mean arm - baseline), ci95 (t half-width, per
        comparison), delta_boot_low/high (percentile bootstrap of delta over seeds), p,
        p_holm, mde; and verdict. ``sentence`` is the MDE
        sentence for the whole table, at the smallest n_paired over the arms and the
        pooled standard deviation of their paired differences (df-weighted).
    """
    counts = count_runs(rows)
    pairs = pair_with_baseline(rows, baseline, lower_is_better)
    arms = sorted(set(rows["arm"]) - {baseline})
    m = len(arms)
    cat_counts = (pd.crosstab(pairs["arm"], pairs["category"]).reindex(index=arms, columns=list(PAIR_CATEGORIES))
                  .fillna(0).astype(int))
    n_paired = cat_counts["paired"].to_numpy()
    diffs = np.full((m, max(int(n_paired.max()) if m else 0, 1)), np.nan)
    paired_rows = pairs[pairs["category"] == "paired"]
    by_arm = {a: d.to_numpy(dtype=float) for a, d in paired_rows.groupby("arm", sort=True)["diff"]}
    for i, arm in enumerate(arms):
        d = by_arm.get(arm, np.empty(0))
        diffs[i, : len(d)] = d
    delta, half, n, p = paired_t(diffs)
    verdicts = holm_verdicts(delta, p, alpha, lower_is_better) if m else np.empty(0, dtype=str)
    p_adj = holm(p, alpha)[1] if m else np.empty(0)
    base_row: dict[str, object] = {"arm": baseline, **{f"n_{c}": 0 for c in PAIR_CATEGORIES},
                                   "delta": np.nan, "ci95": np.nan, "delta_boot_low": np.nan,
                                   "delta_boot_high": np.nan, "p": np.nan, "p_holm": np.nan,
                                   "mde": np.nan, "verdict": "baseline"}
    out = [base_row]
    sds: list[tuple[int, float]] = []
    for i, arm in enumerate(arms):
        d = by_arm.get(arm, np.empty(0))
        sd = float(d.std(ddof=1)) if len(d) >= 2 else float("nan")
        if len(d) >= 2:
            sds.append((len(d) - 1, sd))
        v = str(verdicts[i])
        lost, won = cat_counts.at[arm, "lost"], cat_counts.at[arm, "won"]
        if (v == "better" and lost > 0) or (v == "worse" and won > 0):
            v = "no clear difference"  # a diverged seed is a loss: no side is taken against it
        boot_lo, boot_hi = bootstrap_ci(d, "mean", n_boot=n_boot, seed=seed)
        out.append({"arm": arm, **{f"n_{c}": int(cat_counts.at[arm, c]) for c in PAIR_CATEGORIES},
                    "delta": float(delta[i]), "ci95": float(half[i]), "delta_boot_low": boot_lo,
                    "delta_boot_high": boot_hi, "p": float(p[i]),
                    "p_holm": float(p_adj[i]), "mde": mde_paired(int(n[i]), sd, alpha, m, power), "verdict": v})
    table = pd.DataFrame(out).set_index("arm")
    finished = rows[rows["status"] == "finished"]
    summaries = pd.DataFrame(
        [{"arm": a, **asdict(summarize_arm(finished.loc[finished["arm"] == a, "value"], n_boot, seed))}
         for a in table.index]).set_index("arm")
    table = counts.reindex(table.index).join(summaries).join(table)
    if m == 0:
        return table, f"no arm to compare with the baseline {baseline!r}"
    n_min = int(n.min())
    pooled = math.sqrt(sum(k * s**2 for k, s in sds) / sum(k for k, _ in sds)) if sds else float("nan")
    sentence = mde_sentence(n_min, mde_paired(n_min, pooled, alpha, m, power), metric, alpha, m, power)
    return table, sentence


# ---------------------------------------------------------------- compute to target


def attention_cost(
    window: float | np.ndarray, seq_len: int, n_heads: int, n_global_heads: int, causal: bool
) -> float | np.ndarray:
    """Query-key pairs one attention layer scores for one sequence (vectorized over window).

    Per head: a causal local head at query t sees min(w, t + 1) keys, so it scores
    ``T*w - w*(w-1)/2`` pairs (w = min(window, T)); a non-causal local head sees |t - s| < w,
    ``T*(2w-1) - w*(w-1)``. A global head is a local head with w = T (causal: T(T+1)/2,
    about half of T**2). Multiply by ``4 * head_dim`` for forward FLOPs of QK^T and AV.

    Args:
        window: local width(s) >= 1; values >= seq_len act as global.
        seq_len: T, tokens per sequence.
        n_heads: heads per layer.
        n_global_heads: how many of them are global, 0 .. n_heads.
        causal: decoder (True) or encoder (False) attention.

    Returns:
        The pair count (float, or an array shaped like ``window``).
    """
    if not 0 <= n_global_heads <= n_heads:
        raise ValueError(f"n_global_heads: got {n_global_heads!r}, expected 0 .. n_heads={n_heads}")
    if seq_len < 1:
        raise ValueError(f"seq_len: got {seq_len!r}, expected an int >= 1")
    w_in = np.asarray(window, dtype=float)
    if (w_in < 1).any() or np.isnan(w_in).any():
        raise ValueError(f"window: got {window!r}, expected numbers >= 1")
    t = float(seq_len)

    def band(w: np.ndarray | float) -> np.ndarray | float:
        return t * w - w * (w - 1) / 2 if causal else t * (2 * w - 1) - w * (w - 1)

    w = np.minimum(np.floor(w_in), t)
    out = n_global_heads * band(t) + (n_heads - n_global_heads) * band(w)
    return float(out) if np.ndim(out) == 0 else out


@dataclass(frozen=True)
class ToTarget:
    """How one run reached a target loss.

    Attributes:
        reached: whether an evaluation at or below the target happened.
        step: the first such step (1-based), NaN when not reached.
        attention: attention cost (``attention_cost`` pairs) summed over steps 1..step;
            +inf when not reached.
        seconds: training seconds at that step (``train_seconds`` trace, cumulative);
            +inf when not reached, NaN when the run has no seconds trace.
    """

    reached: bool
    step: float
    attention: float
    seconds: float


def run_to_target(
    trace: pd.DataFrame,
    target: float,
    seq_len: int,
    n_heads: int,
    n_global_heads: int,
    causal: bool = True,
    loss_key: str = "val_loss",
) -> ToTarget:
    """Attention compute and wall-clock for one run to reach ``target``.

    Args:
        trace: one row per step with columns step (1-based), window, ``loss_key`` (NaN
            between evaluations) and optionally train_seconds (cumulative training seconds
            at that step). A step missing from the window column takes the last logged
            window (DESIGN.md logs one point per step, so this is only a safety net).
        target: the loss to reach (<=).
        seq_len, n_heads, n_global_heads, causal: the model's attention shape.
        loss_key: the column holding the evaluated loss.

    Returns:
        A ``ToTarget``; a run that never reaches the target has reached=False and +inf
        costs.
    """
    for col in ("step", "window", loss_key):
        if col not in trace.columns:
            raise ValueError(f"trace: missing column {col!r}, expected step, window, {loss_key}")
    tr = trace.sort_values("step")
    hit = tr.loc[tr[loss_key].astype(float) <= target, "step"]
    if hit.empty:
        return ToTarget(False, float("nan"), float("inf"), float("inf"))
    step = int(hit.iloc[0])
    win = tr.set_index("step")["window"].astype(float).dropna()
    win = win[~win.index.duplicated(keep="last")]
    steps = np.arange(1, step + 1)
    per_step = win.reindex(win.index.union(steps)).ffill().bfill().reindex(steps).to_numpy()
    attention = float(np.sum(attention_cost(per_step, seq_len, n_heads, n_global_heads, causal)))
    seconds = float("nan")
    if "train_seconds" in tr.columns:
        s = tr.loc[(tr["step"] <= step) & tr["train_seconds"].notna(), "train_seconds"]
        seconds = float(s.iloc[-1]) if len(s) else float("nan")
    return ToTarget(True, float(step), attention, seconds)


def baseline_target(final_values: Iterable[float], how: str = "max") -> float:
    """A target loss from the baseline's final losses over seeds.

    Args:
        final_values: the baseline's final val loss per seed.
        how: "max" (every baseline seed reaches it, so the baseline's own cost is finite)
            or "mean" (about half the baseline seeds may never reach their own mean).

    Returns:
        The target loss.
    """
    x = _finite(final_values)
    if not len(x):
        raise ValueError(f"final_values: got {list(final_values)!r}, expected at least one finite loss")
    if how == "max":
        return float(x.max())
    if how == "mean":
        return float(x.mean())
    raise ValueError(f"how: got {how!r}, expected 'max' or 'mean'")


def compute_to_target(
    runs: pd.DataFrame,
    traces: pd.DataFrame,
    target: float,
    baseline: str | None = None,
    loss_key: str = "val_loss",
    confidence: float = 0.95,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Attention compute and wall-clock seconds to ``target``, per run and per arm.

    Args:
        runs: one row per run: run_id, arm, seed, seq_len, n_heads, n_global_heads and
            optionally causal (default True).
        traces: long format as ``load_traces`` returns it: run_id, step, key, value, with
            keys "window", ``loss_key`` and optionally "train_seconds".
        target: the loss to reach.
        baseline: arm for the relative columns (ratio of means arm / baseline, stratified
            bootstrap interval); None leaves them NaN.
        loss_key: the evaluated loss key.
        confidence, n_boot, seed: bootstrap settings (deterministic for a given seed).

    Returns:
        ``(per_run, per_arm)``. per_run: run_id, arm, seed, reached, step, attention,
        seconds. per_arm (indexed by arm): n_runs, n_reached, then for attention and
        seconds: ``*_mean`` (+inf when any run did not reach), ``*_low``/``*_high`` (the
        bootstrap interval of the mean; the upper end is +inf when unreached runs can be
        drawn), ``*_rel`` (mean / baseline mean) with ``*_rel_low``/``*_rel_high``.
    """
    need = ("run_id", "arm", "seed", "seq_len", "n_heads", "n_global_heads")
    missing = [c for c in need if c not in runs.columns]
    if missing:
        raise ValueError(f"runs: missing columns {missing}, expected {list(need)}")
    keys = traces["key"].isin(["window", loss_key, "train_seconds"]) & traces["run_id"].isin(runs["run_id"])
    wide = traces[keys].pivot_table(index=["run_id", "step"], columns="key", values="value", aggfunc="last")
    per_run = []
    for r in runs.itertuples(index=False):
        tr = wide.loc[r.run_id].reset_index() if r.run_id in wide.index.get_level_values(0) else pd.DataFrame()
        if tr.empty or "window" not in tr or loss_key not in tr:
            res = ToTarget(False, float("nan"), float("inf"), float("inf"))
        else:
            res = run_to_target(tr, target, int(r.seq_len), int(r.n_heads), int(r.n_global_heads),
                                bool(getattr(r, "causal", True)), loss_key)
        per_run.append({"run_id": r.run_id, "arm": r.arm, "seed": r.seed, "reached": res.reached,
                        "step": res.step, "attention": res.attention, "seconds": res.seconds})
    per_run_df = pd.DataFrame(per_run, columns=["run_id", "arm", "seed", "reached", "step", "attention", "seconds"])
    rows = []
    for arm, g in per_run_df.groupby("arm", sort=True):
        row: dict[str, float | int | str] = {"arm": arm, "n_runs": len(g), "n_reached": int(g["reached"].sum())}
        for col in ("attention", "seconds"):
            x = g[col].to_numpy(dtype=float)
            row[f"{col}_mean"] = float(x.mean()) if len(x) and not np.isnan(x).any() else float("nan")
            lo, hi = (bootstrap_ci(x, "mean", confidence, n_boot, seed) if not np.isnan(x).any()
                      else (float("nan"), float("nan")))
            row[f"{col}_low"], row[f"{col}_high"] = lo, hi
            row[f"{col}_rel"] = row[f"{col}_rel_low"] = row[f"{col}_rel_high"] = float("nan")
            if baseline is not None and arm != baseline and baseline in set(per_run_df["arm"]):
                b = per_run_df.loc[per_run_df["arm"] == baseline, col].to_numpy(dtype=float)
                if not (np.isnan(x).any() or np.isnan(b).any()) and np.isfinite(b).all():  # else no unit
                    with np.errstate(invalid="ignore", divide="ignore"):
                        row[f"{col}_rel"] = float(x.mean() / b.mean())
                    lo, hi = stratified_bootstrap_ci(
                        {"arm": x, "base": b}, lambda s: s["arm"].mean(axis=-1) / s["base"].mean(axis=-1),
                        confidence, n_boot, seed)
                    row[f"{col}_rel_low"], row[f"{col}_rel_high"] = lo, hi
            elif baseline is not None and arm == baseline and np.isfinite(x).all():
                row[f"{col}_rel"] = 1.0  # a baseline that did not reach the target on every seed is no unit
        rows.append(row)
    per_arm = pd.DataFrame(rows).set_index("arm") if rows else pd.DataFrame()
    return per_run_df, per_arm
