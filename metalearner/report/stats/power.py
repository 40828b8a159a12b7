"""Power and the minimum detectable effect of the paired t test, and the sentence it prints.

``mde_paired`` is the smallest true mean paired difference that the two-sided paired t
test detects with 80% power, from the exact noncentral t (solved with ``brentq``), at the
run's n and the standard deviation of its paired differences, at the per-comparison level
alpha / m: Holm's most stringent step, which is Bonferroni's level. So the printed MDE is
detectable whatever the other arms do (Holm only ever tests an arm at alpha / m or at a
looser level). numpy and scipy only.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize, stats

__all__ = ["mde_paired", "mde_sentence", "power_paired"]


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
