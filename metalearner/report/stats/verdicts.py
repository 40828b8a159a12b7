"""The decision rule: paired t tests of each arm against the baseline, Holm over the arms.

Each arm is tested against the baseline with the two-sided paired t test over the seeds
both finished; Holm's step-down correction runs over the m arms compared with the
baseline (family-wise alpha = 0.05). The verdict is "better" / "worse" only when the
Holm-adjusted test rejects, with the side given by the sign of the mean difference;
otherwise "no clear difference". An arm with fewer than two finite pairs has no test but
still counts in m (conservative). A diverged seed is a loss: "better" is withheld from an
arm that lost a seed to divergence ("worse" from one that won a seed that way); withholding
a rejection never raises the family-wise error rate. An arm (or a baseline) with no
finished run gets no verdict at all but a line that says so (``no_verdict``). This is the
only verdict rule of the report.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np
import pandas as pd
from scipy import stats

from metalearner.report.stats.intervals import N_BOOT, bootstrap_ci, summarize_arm
from metalearner.report.stats.pairing import PAIR_CATEGORIES, count_runs, pair_with_baseline
from metalearner.report.stats.power import mde_paired, mde_sentence

__all__ = ["VERDICTS", "compare_with_baseline", "holm", "holm_verdicts", "no_verdict", "paired_t"]

VERDICTS = ("better", "worse", "no clear difference")


def paired_t(diffs: np.ndarray, axis: int = -1) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Two-sided one-sample t test of paired differences, vectorized over other axes.

    Same numbers as ``scipy.stats.ttest_rel``; NaN entries are left out.

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


def no_verdict(n_runs: int, n_finished: int, n_diverged: int) -> str | None:
    """Why an arm cannot be judged at all, or None when it can (some run finished).

    Args:
        n_runs: the arm's runs.
        n_finished: how many finished with a finite value.
        n_diverged: how many diverged (the rest failed or were cut short).

    Returns:
        None when ``n_finished > 0``; else one phrase for the verdict column, e.g.
        "no verdict: all 3 runs failed", "no verdict: all 3 runs diverged", "no verdict:
        none of 3 runs finished (2 failed, 1 diverged)", "no verdict: no run".
    """
    if n_finished > 0:
        return None
    if n_runs == 0:
        return "no verdict: no run"
    if n_diverged == 0:
        return f"no verdict: all {n_runs} runs failed" if n_runs > 1 else "no verdict: its run failed"
    if n_diverged == n_runs:
        return f"no verdict: all {n_runs} runs diverged" if n_runs > 1 else "no verdict: its run diverged"
    return f"no verdict: none of {n_runs} runs finished ({n_runs - n_diverged} failed, {n_diverged} diverged)"


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
        p_holm, mde; and verdict: the Holm verdict, or ``no_verdict``'s phrase for an arm
        with no finished run (every arm gets "no verdict: baseline ... has no finished run"
        when the baseline has none). Such arms keep their place in the Holm family (m).
        ``sentence`` is the MDE sentence for the whole table, at the smallest n_paired over
        the arms that paired at least one seed and the pooled standard deviation of their
        paired differences (df-weighted).
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
    base_dead = no_verdict(*map(int, counts.loc[baseline, ["n_runs", "n_finished", "n_diverged"]]))
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
        if base_dead:
            v = f"no verdict: baseline {baseline!r} has no finished run"
        v = no_verdict(*map(int, counts.loc[arm, ["n_runs", "n_finished", "n_diverged"]])) or v
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
    n_min = int(n[n > 0].min()) if (n > 0).any() else 0
    pooled = math.sqrt(sum(k * s**2 for k, s in sds) / sum(k for k, _ in sds)) if sds else float("nan")
    sentence = mde_sentence(n_min, mde_paired(n_min, pooled, alpha, m, power), metric, alpha, m, power)
    return table, sentence
