"""The comparison: one row per compare-phase arm, then the best search configurations.

Each compare-phase arm is run once per seed at equal steps. For the spec's metric (the
final value of its trace; ``val_loss`` by default, ``mode`` min/max) an arm's row carries
the mean with its 95% t interval and percentile-bootstrap interval, the IQM where n >= 5,
and the paired comparison with the static arm: Holm-corrected over the arms
(`metalearner.report.stats.compare_with_baseline`), with the minimum detectable effect
as one sentence under the table. Diverged runs (tag ``metalearner.diverged``) and runs cut
before ``train.steps`` are counted per arm and shown, never dropped silently.

Compute to target: per arm (finished and diverged runs), the attention compute (query-key pairs of the local-window
cost model, summed over steps) and the training seconds until val loss first reaches the
target: the spec's ``target_loss``, else static's final val loss (``baseline_target``,
the worst static seed, so every static seed reaches it), with bootstrap intervals.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
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
    # the spec's metric (final value per run) with its intervals, and the run counts
    "metric", "n_runs", "n_finished", "n_diverged", "value_mean", "value_ci95", "value_boot_low",
    "value_boot_high", "value_iqm", "value_iqm_low", "value_iqm_high",
    "vs_static_boot_low", "vs_static_boot_high", "vs_static_p_holm", "mde", "n_paired", "n_missing",
    "n_lost", "n_won",
    # compute to the target loss
    "n_reached", "attention_to_target", "attention_to_target_low", "attention_to_target_high",
    "attention_rel", "attention_rel_low", "attention_rel_high", "seconds_to_target", "seconds_to_target_low",
    "seconds_to_target_high", "seconds_rel", "seconds_rel_low", "seconds_rel_high",
]
N_BOOT = 2_000  # bootstrap resamples per interval: enough for 95% ends at a few seeds, fast


@dataclass
class Comparison:
    """What `compare_sweep` found.

    Args:
        table: one row per arm (``TABLE_COLUMNS``).
        metric, lower_is_better: the compared metric and its direction.
        mde_sentence: "with n=2 seeds, differences in val_loss under 0.41 cannot be detected (...)".
        target: the val loss of compute-to-target (NaN when there is none).
        target_source: "target_loss in the spec" | "static's final val loss (worst seed)" | "".
        verdicts: one line per compared arm, verdict first (for the parent run's description).
        per_run_to_target: `stats.compute_to_target`'s per-run frame.
    """

    table: pd.DataFrame
    metric: str = "val_loss"
    lower_is_better: bool = True
    mde_sentence: str = ""
    target: float = float("nan")
    target_source: str = ""
    verdicts: list[str] = field(default_factory=list)
    per_run_to_target: pd.DataFrame = field(default_factory=pd.DataFrame)


def _static_arm(runs_df: pd.DataFrame) -> str | None:
    compare = runs_df[runs_df["phase"] == "compare"]
    if "controller.name" not in compare:
        return None
    arms = sorted(set(compare.loc[compare["controller.name"] == "static", "arm"]))
    if not arms:
        return None
    return "static" if "static" in arms else arms[0]


def compare_table(runs_df: pd.DataFrame, traces_df: pd.DataFrame, top_search: int = 3,
                  metric: str = "val_loss", mode: str = "min", target_loss: float | None = None) -> pd.DataFrame:
    """`compare_sweep`'s table (see there)."""
    return compare_sweep(runs_df, traces_df, top_search, metric, mode, target_loss).table


def _base_table(runs_df: pd.DataFrame, traces_df: pd.DataFrame, top_search: int = 3) -> pd.DataFrame:
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



# ---------------------------------------------------------------- statistics and compute


def run_status(runs_df: pd.DataFrame, traces_df: pd.DataFrame, metric: str = "val_loss") -> pd.DataFrame:
    """One row per run: arm, phase, seed, value (final value of ``metric``) and status.

    Status: ``diverged`` (tag ``metalearner.diverged``), else ``incomplete`` (stopped before
    ``train.steps``, or no finite final value of the metric), else ``finished``.
    """
    t = one_point_per_step(traces_df)
    summary = run_summary(runs_df, t)
    last = (t[t["key"] == metric].sort_values(["run_id", "step"]).groupby("run_id")["value"].last()
            .reindex(summary.index))
    diverged = runs_df.set_index("run_id")["diverged"].reindex(summary.index).fillna(False).astype(bool) \
        if "diverged" in runs_df else pd.Series(False, index=summary.index)
    ok = summary["complete"] & np.isfinite(last.astype(float))
    status = np.where(diverged, "diverged", np.where(ok, "finished", "incomplete"))
    return pd.DataFrame({"run_id": summary.index, "arm": summary["arm"].to_numpy(), "phase": summary["phase"].to_numpy(),
                         "seed": summary["seed"].to_numpy(), "value": last.to_numpy(dtype=float),
                         "status": status}).reset_index(drop=True)


def _target(status: pd.DataFrame, static: str | None, target_loss: float | None,
            traces_df: pd.DataFrame) -> tuple[float, str]:
    if target_loss is not None:
        return float(target_loss), "target_loss in the spec"
    if static is None:
        return float("nan"), ""
    ok = status[(status["arm"] == static) & (status["phase"] == "compare") & (status["status"] == "finished")]
    val = one_point_per_step(traces_df)
    val = val[(val["key"] == "val_loss") & val["run_id"].isin(ok["run_id"])].sort_values("step")
    finals = val.groupby("run_id")["value"].last()
    if finals.empty:
        return float("nan"), ""
    return stats.baseline_target(finals, "max"), f"{static}'s final val loss (worst of {len(finals)} seed(s))"


def _to_target(runs_df: pd.DataFrame, traces_df: pd.DataFrame, compare_ids: list[str], target: float,
               static: str | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    runs = runs_df[runs_df["run_id"].isin(compare_ids)].copy()
    shape = ["seq_len", "n_heads", "n_global_heads"]
    runs = runs[np.isfinite(runs[shape].astype(float)).all(axis=1)]
    if runs.empty or not np.isfinite(target):
        return pd.DataFrame(), pd.DataFrame()
    arch = runs["arch"] if "arch" in runs else pd.Series("decoder", index=runs.index)
    runs["causal"] = arch.fillna("decoder").ne("encoder_decoder")  # the window bounds the encoder's attention there
    return stats.compute_to_target(runs[["run_id", "arm", "seed", *shape, "causal"]], one_point_per_step(traces_df),
                                   target, baseline=static, n_boot=N_BOOT)


def _pct(x: float) -> str:
    return f"{x:.0%}"


def verdict_line(r: pd.Series, metric: str, static: str) -> str:
    """One line per compared arm: the verdict, the difference, and the compute to target."""
    if r["verdict"] == "baseline":
        line = f"{r['arm']}: baseline"
    else:
        d = r["vs_static_delta"]
        line = (f"{r['arm']} vs {static}: {r['verdict']} (Δ {metric} {d:+.4g}" if np.isfinite(d)
                else f"{r['arm']} vs {static}: {r['verdict']} (no paired seeds")
        if np.isfinite(r.get("vs_static_p_holm", np.nan)):
            line += f", Holm p={r['vs_static_p_holm']:.2g}"
        line += f", n={int(r['n_paired'])})"
        counts = [f"{int(r[c])} {w}" for c, w in (("n_diverged", "diverged"), ("n_incomplete", "incomplete"))
                  if r.get(c, 0)]
        if counts:
            line += " [" + ", ".join(counts) + "]"
    rel, lo, hi = r.get("attention_rel", np.nan), r.get("attention_rel_low", np.nan), r.get("attention_rel_high", np.nan)
    if r["verdict"] != "baseline" and r.get("n_runs", 0) and r.get("n_reached", np.nan) == 0:
        line += "; never reached the target"
    elif r["verdict"] != "baseline" and (rel == np.inf or (not np.isfinite(rel) and r.get("n_reached", 0)
                                                           and r["n_reached"] < r.get("n_runs", 0))):
        line += f"; only {int(r['n_reached'])}/{int(r['n_runs'])} runs reached the target"
    elif r["verdict"] != "baseline" and not np.isfinite(rel) and r.get("n_reached", 0):
        line += f"; reached the target on {int(r['n_reached'])}/{int(r['n_runs'])} runs, {static} did not on every seed"
    elif r["verdict"] != "baseline" and np.isfinite(rel):
        if np.isfinite(hi) and hi < 1:
            line += f"; reaches the target with {_pct(1 - rel)} less attention compute (95% CI {_pct(1 - hi)}–{_pct(1 - lo)})"
        elif np.isfinite(lo) and lo > 1:
            line += f"; needs {_pct(rel - 1)} more attention compute to reach the target (95% CI {_pct(lo - 1)}–{_pct(hi - 1) if np.isfinite(hi) else '∞'})"
        else:
            line += (f"; attention compute to target {rel:.2f}× {static} (95% CI {lo:.2f}–"
                     f"{hi:.2f}×: no clear difference)" if np.isfinite(lo) else f"; attention compute to target {rel:.2f}× {static}")
    return line


def compare_sweep(runs_df: pd.DataFrame, traces_df: pd.DataFrame, top_search: int = 3, metric: str = "val_loss",
                  mode: str = "min", target_loss: float | None = None) -> Comparison:
    """The comparison of a sweep, statistics and compute to target included.

    Args:
        runs_df, traces_df: from `load_traces` (a step stored twice counts once: its last point).
        top_search: how many search-phase configurations to list per searched arm.
        metric: the spec's metric; each run's value is the last point of its trace.
        mode: "min" (lower is better) or "max".
        target_loss: the spec's ``target_loss``; None: static's final val loss.

    Returns:
        A `Comparison`. Its table has ``TABLE_COLUMNS``: compare rows first (sorted by
        ``value_mean``, best first), then search rows (single trials, n = 1). The static
        arm's row has verdict ``"baseline"``; without a static arm the ``vs_static_*``
        columns are NaN and the verdict is ``"no static arm"``.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode: got {mode!r}, expected 'min' or 'max'")
    lower = mode == "min"
    base = _base_table(runs_df, traces_df, top_search)
    for c in TABLE_COLUMNS:
        if c not in base:
            base[c] = np.nan
    base["metric"] = metric
    if runs_df.empty:
        return Comparison(base[TABLE_COLUMNS], metric, lower)
    status = run_status(runs_df, traces_df, metric)
    static = _static_arm(runs_df)
    cmp_rows = status[status["phase"] == "compare"]
    out = Comparison(base, metric, lower)
    if not cmp_rows.empty:
        counts = stats.count_runs(cmp_rows)
        if static is not None and static in set(cmp_rows["arm"]):
            st, out.mde_sentence = stats.compare_with_baseline(cmp_rows, static, lower_is_better=lower,
                                                               metric=metric, n_boot=N_BOOT)
        else:
            st = counts.join(pd.DataFrame([{"arm": a, **asdict(stats.summarize_arm(
                cmp_rows.loc[(cmp_rows["arm"] == a) & (cmp_rows["status"] == "finished"), "value"], N_BOOT))}
                for a in counts.index]).set_index("arm"))
        target, out.target_source = _target(status, static, target_loss, traces_df)
        out.target = target
        # runs cut short (failure, interrupt) are left out here as in the statistics (counted in
        # n_incomplete); a diverged run stays: if it never got to the target, its cost is +inf
        counted = cmp_rows[cmp_rows["status"].isin(["finished", "diverged"])]
        per_run, per_arm = _to_target(runs_df, traces_df, list(counted["run_id"]), target, static)
        out.per_run_to_target = per_run
        is_cmp = base["phase"] == "compare"
        for i in base.index[is_cmp]:
            arm = base.at[i, "arm"]
            if arm not in st.index:
                continue
            r = st.loc[arm]
            base.loc[i, ["n_runs", "n_finished", "n_diverged", "n_incomplete"]] = [
                int(r["n_runs"]), int(r["n_finished"]), int(r["n_diverged"]), int(r["n_incomplete"])]
            base.loc[i, ["value_mean", "value_ci95", "value_boot_low", "value_boot_high", "value_iqm",
                         "value_iqm_low", "value_iqm_high"]] = [r["mean"], r["t_ci95"], r["boot_low"], r["boot_high"],
                                                                r["iqm"], r["iqm_low"], r["iqm_high"]]
            if "verdict" in st and static is not None:
                if arm != static:
                    base.loc[i, ["vs_static_delta", "vs_static_ci95", "vs_static_n", "vs_static_p",
                                 "vs_static_boot_low", "vs_static_boot_high", "vs_static_p_holm", "mde",
                                 "n_paired", "n_missing", "n_lost", "n_won"]] = [
                        r["delta"], r["ci95"], r["n_paired"], r["p"], r["delta_boot_low"], r["delta_boot_high"],
                        r["p_holm"], r["mde"], r["n_paired"], r["n_missing"], r["n_lost"], r["n_won"]]
                    base.at[i, "verdict"] = r["verdict"]
                else:
                    base.at[i, "n_paired"] = int(r["n_finished"])
            if len(per_arm) and arm in per_arm.index:
                a = per_arm.loc[arm]
                base.loc[i, ["n_reached", "attention_to_target", "attention_to_target_low", "attention_to_target_high",
                             "attention_rel", "attention_rel_low", "attention_rel_high", "seconds_to_target",
                             "seconds_to_target_low", "seconds_to_target_high", "seconds_rel", "seconds_rel_low",
                             "seconds_rel_high"]] = [
                    a["n_reached"], a["attention_mean"], a["attention_low"], a["attention_high"], a["attention_rel"],
                    a["attention_rel_low"], a["attention_rel_high"], a["seconds_mean"], a["seconds_low"],
                    a["seconds_high"], a["seconds_rel"], a["seconds_rel_low"], a["seconds_rel_high"]]
        cmp_part = base[is_cmp].copy()
        key = cmp_part["value_mean"] if lower else -cmp_part["value_mean"]
        cmp_part = cmp_part.assign(_k=key).sort_values("_k", kind="stable", na_position="last").drop(columns="_k")
        base = pd.concat([cmp_part, base[~is_cmp]], ignore_index=True)
        if static is not None:
            out.verdicts = [verdict_line(r, metric, static) for _, r in base[base["phase"] == "compare"].iterrows()
                            if r["verdict"] != "baseline"]
            b = base[(base["phase"] == "compare") & (base["verdict"] == "baseline")]
            if len(b) and b.iloc[0].get("n_reached", 0) < b.iloc[0].get("n_runs", 0):
                out.verdicts.append(f"{static} reached the target on {int(b.iloc[0]['n_reached'])}/"
                                    f"{int(b.iloc[0]['n_runs'])} runs: compute relative to it is undefined")
    out.table = base[TABLE_COLUMNS].reset_index(drop=True)
    return out
