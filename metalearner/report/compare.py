"""The comparison table: one row per compare-phase arm, then the best search configurations.

Each compare-phase arm is run once per seed at equal steps; its means carry a 95% t
interval over seeds and it is tested against the static arm with the paired test of
`metalearner.report.stats`. Runs cut before ``train.steps`` are counted, not averaged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from metalearner.report import stats
from metalearner.report.runs import controller_summary, one_point_per_step, run_summary

TABLE_COLUMNS = [
    "arm", "phase", "controller", "n_seeds", "n_incomplete", "steps",
    "final_val_loss_mean", "final_val_loss_ci95", "best_val_loss_mean", "best_val_loss_ci95",
    "steps_to_static", "static_reached", "attention_cost",
    "vs_static_delta", "vs_static_ci95", "vs_static_n", "vs_static_p", "verdict", "run_ids",
]


def _static_arm(runs_df: pd.DataFrame) -> str | None:
    compare = runs_df[runs_df["phase"] == "compare"]
    if "controller.name" not in compare:
        return None
    arms = sorted(set(compare.loc[compare["controller.name"] == "static", "arm"]))
    if not arms:
        return None
    return "static" if "static" in arms else arms[0]


def compare_table(runs_df: pd.DataFrame, traces_df: pd.DataFrame, top_search: int = 3) -> pd.DataFrame:
    """The comparison: one row per compare-phase arm, then the best search configurations.

    Args:
        runs_df, traces_df: from `load_traces` (a step stored twice counts once: its last point).
        top_search: how many search-phase configurations to list per searched arm.

    Returns:
        A DataFrame with the columns of ``TABLE_COLUMNS`` (see the module docstring and
        ``HOW_TO_READ``). Compare rows come first, sorted by ``final_val_loss_mean``; search
        rows (``phase == "search"``, one per distinct controller configuration, usually
        n = 1) follow, also sorted. Runs that stopped before ``train.steps`` are left out
        of the compare statistics and counted in ``n_incomplete``. The static arm's row
        has verdict ``"baseline"``; without a static arm the ``vs_static_*`` and
        ``steps_to_static`` columns are NaN and the verdict is ``"no static arm"``.
    """
    if runs_df.empty:
        return pd.DataFrame(columns=TABLE_COLUMNS)
    traces_df = one_point_per_step(traces_df)
    summary = run_summary(runs_df, traces_df)
    runs = runs_df.set_index("run_id")
    summary["controller"] = [controller_summary(runs.loc[rid]) for rid in summary.index]
    static = _static_arm(runs_df)
    ok = summary[summary["complete"] & summary["final_val_loss"].notna()]

    static_runs = ok[(ok["phase"] == "compare") & (ok["arm"] == static)] if static else ok.iloc[:0]
    static_final = stats.mean(static_runs["final_val_loss"]) if static else float("nan")
    static_window = stats.mean(static_runs["window_first"]) if static else float("nan")
    static_by_seed = static_runs.groupby("seed")["final_val_loss"].mean()

    val = traces_df[traces_df["key"] == "val_loss"].sort_values(["run_id", "step"])
    reached: dict[str, float] = {}
    if np.isfinite(static_final):
        hit = val[val["value"] <= static_final].groupby("run_id")["step"].min()
        reached = {rid: float(s) for rid, s in hit.items()}

    def cost(rid: str) -> float:
        r = summary.loc[rid]
        if np.isfinite(r["n_heads"]) and r["n_heads"] == r["n_global_heads"]:
            return float("nan")  # no local heads: the window costs nothing
        ref = static_window if np.isfinite(static_window) else r["window_first"]
        ref = min(ref, r["seq_len"]) if np.isfinite(r["seq_len"]) else ref
        if not (np.isfinite(ref) and ref > 0 and r["window_steps"] and np.isfinite(r["window_used"])):
            return float("nan")
        return float(r["window_used"] / (r["window_steps"] * ref))

    def row(arm: str, phase: str, group: pd.DataFrame, n_incomplete: int) -> dict[str, Any]:
        rids = list(group.index)
        hits = [reached[r] for r in rids if r in reached]
        controllers = sorted(set(group["controller"]))
        out: dict[str, Any] = {
            "arm": arm, "phase": phase,
            "controller": controllers[0] if len(controllers) == 1 else " | ".join(controllers),
            "n_seeds": len(rids), "n_incomplete": n_incomplete,
            "steps": int(group["last_step"].max()) if len(group) else 0,
            "final_val_loss_mean": stats.mean(group["final_val_loss"]),
            "final_val_loss_ci95": stats.ci95(group["final_val_loss"]),
            "best_val_loss_mean": stats.mean(group["best_val_loss"]),
            "best_val_loss_ci95": stats.ci95(group["best_val_loss"]),
            "steps_to_static": stats.mean(hits) if static else float("nan"),
            "static_reached": f"{len(hits)}/{len(rids)}" if static else "",
            "attention_cost": stats.mean([cost(r) for r in rids]),
            "run_ids": ",".join(rids),
        }
        if static is None:
            delta, ci, n, p, verdict = float("nan"), float("nan"), 0, float("nan"), "no static arm"
        elif phase == "compare" and arm == static:
            delta, ci, n, p, verdict = 0.0, float("nan"), len(rids), float("nan"), "baseline"
        else:
            delta, ci, n, p = stats.paired(group.groupby("seed")["final_val_loss"].mean(), static_by_seed)
            verdict = stats.verdict(delta, ci)
        out.update(vs_static_delta=delta, vs_static_ci95=ci, vs_static_n=n, vs_static_p=p, verdict=verdict)
        return out

    rows = []
    compare_all = summary[summary["phase"] == "compare"]
    for arm in sorted(set(compare_all["arm"])):
        grp = ok[(ok["phase"] == "compare") & (ok["arm"] == arm)]
        n_bad = int(((compare_all["arm"] == arm) & ~compare_all.index.isin(ok.index)).sum())
        rows.append(row(arm, "compare", grp, n_bad))
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS).sort_values("final_val_loss_mean", kind="stable")

    search_rows = []
    search_all = summary[summary["phase"] != "compare"]
    for (phase, arm), grp_all in search_all.groupby(["phase", "arm"], sort=True):
        grp = ok[ok.index.isin(grp_all.index)]
        if grp.empty:  # every trial stopped early (e.g. ASHA with no finisher): show what there is
            grp = grp_all[grp_all["final_val_loss"].notna()]
        configs = [row(arm, phase, g, 0) for _, g in grp.groupby("controller", sort=True)]
        configs.sort(key=lambda r: (not np.isfinite(r["final_val_loss_mean"]), r["final_val_loss_mean"]))
        search_rows += configs[:top_search]
    if search_rows:
        extra = pd.DataFrame(search_rows, columns=TABLE_COLUMNS).sort_values("final_val_loss_mean", kind="stable")
        table = pd.concat([table, extra], ignore_index=True) if len(table) else extra
    return table.reset_index(drop=True)

