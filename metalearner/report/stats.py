"""The statistics of a comparison: means, 95% t intervals, the paired test, the verdict.

Seeds are the unit of replication. An arm is compared with the static baseline by the
*paired* difference of final val loss over the seeds both ran (same seed = same init and
data order), with ``scipy.stats.ttest_rel``; the verdict is "better"/"worse" only when the
95% CI of that paired difference excludes 0, and "no clear difference" otherwise
(including when fewer than two seeds pair up).

Numbers in, numbers out: no MLflow, no plotting.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import pandas as pd


def ci95(values: Iterable[float]) -> float:
    """Half-width of the 95% t interval of the mean; NaN for fewer than two values."""
    from scipy import stats

    x = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    if len(x) < 2:
        return float("nan")
    return float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


def mean(values: Iterable[float]) -> float:
    """Mean of the finite values; NaN when there are none."""
    x = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    return float(x.mean()) if len(x) else float("nan")


def paired(a: pd.Series, b: pd.Series) -> tuple[float, float, int, float]:
    """Paired difference a - b over the common index.

    Returns:
        (mean difference, 95% CI half-width, number of pairs, p of ``ttest_rel``); the
        half-width and p are NaN for fewer than two pairs.
    """
    from scipy import stats

    both = pd.concat([a.rename("a"), b.rename("b")], axis=1, join="inner").dropna()
    n = len(both)
    if n == 0:
        return float("nan"), float("nan"), 0, float("nan")
    d = (both["a"] - both["b"]).to_numpy(dtype=float)
    delta = float(d.mean())
    if n < 2:
        return delta, float("nan"), n, float("nan")
    if float(d.std(ddof=1)) == 0.0:  # identical differences: the t statistic is undefined
        return delta, 0.0, n, 1.0 if delta == 0 else 0.0
    p = float(stats.ttest_rel(both["a"], both["b"]).pvalue)
    return delta, ci95(d), n, p


def verdict(delta: float, ci: float) -> str:
    """Lower loss is better; a side is taken only when the 95% CI excludes 0."""
    if not (np.isfinite(delta) and np.isfinite(ci)):
        return "no clear difference"
    if delta + ci < 0:
        return "better"
    if delta - ci > 0:
        return "worse"
    return "no clear difference"
