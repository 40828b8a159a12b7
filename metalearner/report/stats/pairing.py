"""Which runs an arm and the baseline share: counts by status and pairs by seed, none dropped.

The unit of replication is the seed: an arm and the baseline run with the same seed share
initialisation and data order, so arms are compared by the paired difference over the
seeds both finished. ``pair_with_baseline`` lists every seed that either side ran, with a
category: ``paired`` (both finished with finite values; these enter the t test),
``missing`` (one side absent or incomplete: counted, not tested), ``lost`` (the arm
diverged, the baseline finished), ``won`` (the baseline diverged, the arm finished),
``both_diverged``. A diverged run's value is +inf for lower-is-better metrics (-inf
otherwise), so no test can use it. pandas and numpy only.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["PAIR_CATEGORIES", "STATUSES", "count_runs", "pair_with_baseline"]

STATUSES = ("finished", "diverged", "incomplete")
PAIR_CATEGORIES = ("paired", "missing", "lost", "won", "both_diverged")


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
