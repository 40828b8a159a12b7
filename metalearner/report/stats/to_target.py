"""Compute to target: attention query-key pairs and training seconds until a run first
reaches a target loss, per run and per arm.

``attention_cost`` counts the query-key pairs one layer scores per sequence: a causal local
head at query t sees min(w, t + 1) keys, a non-causal one the keys with |t - s| < w; a
global head is a local head with w = T (so causal global heads cost about half of T**2).
This is the band that ``metalearner.model.attention`` computes (its cost follows the
window, not the sequence). Summed over the steps up to the first evaluation at or below the
target, it gives the attention compute to target; a run that never reaches the target
costs +inf and is counted as "not reached", never dropped. This is the report's only
measure of attention cost. numpy and pandas only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from metalearner.report.stats.intervals import N_BOOT, bootstrap_ci, finite, stratified_bootstrap_ci

__all__ = ["ToTarget", "attention_cost", "baseline_target", "compute_to_target", "run_to_target"]


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
    x = finite(final_values)
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
